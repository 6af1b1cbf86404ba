"""The protocol seam (agent/protocol.py) the runner, ChatDeltamem and the server share: tool_choice's meaning, the
conversation as the model's own template renders it (checked against transformers' renderer of the real templates),
the stop ids and the guide."""

import json
import logging
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from deltamem.agent.parse import format_tool_call
from deltamem.agent.prompt import ChatTemplate
from deltamem.agent.protocol import Offer, call_guide, conversation, stop_ids
from deltamem.model.gguf_file import smollm2_gguf
from deltamem.model.tokenizer import Tokenizer

QWEN35 = (Path(__file__).parent / "templates" / "qwen3_5.jinja").read_text()


def spec(name: str, **props) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}


PAINT, WAIT = spec("paint", color={"type": "string"}), spec("wait", seconds={"type": "integer"})


@pytest.mark.parametrize(
    "choice, offered, required",
    [
        (None, ["paint", "wait"], False),
        ("auto", ["paint", "wait"], False),
        ("none", [], False),
        ("required", ["paint", "wait"], True),
        ("any", ["paint", "wait"], True),  # LangChain's word for it
        ("wait", ["wait"], True),  # LangChain's bind_tools(tool_choice=name)
        ({"type": "function", "function": {"name": "paint"}}, ["paint"], True),  # OpenAI's form
    ],
)
def test_tool_choice_offers_what_openai_and_langchain_mean(choice, offered, required):
    offer = Offer.of([PAINT, WAIT], choice)
    assert [t["function"]["name"] for t in offer.tools] == offered and offer.required is required


def test_a_choice_naming_no_offered_tool_is_refused():
    for choice in ("draw", {"function": {"name": "draw"}}, {"function": {}}):
        with pytest.raises(ValueError, match="names no offered tool"):
            Offer.of([PAINT, WAIT], choice)
    assert Offer.of(None, "required") == Offer()  # nothing to call: nothing required


def test_a_template_that_takes_tools_lays_them_out_and_reads_calls_in_its_syntax():
    template = ChatTemplate(QWEN35)
    plain = [
        {"role": "user", "content": "Paint it blue."},
        {"role": "assistant", "content": "", "calls": [("paint", {"color": "blue"})]},
        {"role": "tool", "content": "done"},
    ]
    got = template.render(conversation(template, plain, Offer([PAINT])))
    written = [
        {"role": "user", "content": "Paint it blue."},
        {"role": "assistant", "content": format_tool_call("paint", {"color": "blue"}, "xml")},
        {"role": "tool", "content": "done"},
    ]
    (want,), _ = render_jinja_template(
        conversations=[written], tools=[PAINT], chat_template=QWEN35, add_generation_prompt=True, preserve_thinking=True
    )
    assert got == want and "<function=paint>" in got and '"name": "paint"' in got


def test_a_template_without_tools_gets_them_listed_in_the_system_message_and_json_calls():
    tok = Tokenizer.from_gguf(smollm2_gguf())
    template = ChatTemplate.for_tokenizer(tok)
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Wait a second."},
        {"role": "assistant", "content": "Sure.", "calls": [("wait", {"seconds": 1})]},
    ]
    out = conversation(template, plain, Offer([PAINT, WAIT]))
    assert template.tools is None
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    for t in (PAINT, WAIT):  # each spec listed as the JSON the parser's syntax names
        assert json.dumps(t["function"], ensure_ascii=False) in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": 'Sure.<tool_call>\n{"name": "wait", "arguments": {"seconds": 1}}\n</tool_call>',
    }
    assert conversation(template, plain[:2], Offer()) == [
        {"role": m["role"], "content": m["content"]} for m in plain[:2]
    ]


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("response_format", "answer"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "count", "schema": SCHEMA, "strict": True}}, SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "any"}}, {"type": "object"}),
    ],
)
def test_response_format_gives_the_schema_an_answer_must_meet(response_format, answer):
    assert Offer.of([PAINT], "auto", response_format) == Offer([PAINT], False, answer)
    assert Offer.of([PAINT], "none", response_format) == Offer(answer=answer)


@pytest.mark.parametrize("bad", ["json", {"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": "object"}}])  # fmt: skip
def test_a_response_format_not_openais_is_refused(bad):
    with pytest.raises(ValueError, match="response_format"):
        Offer.of([], None, bad)


def test_stop_ids_and_the_guide():
    from deltamem.model import load_model

    engine = load_model("default", device="cpu")
    tok, vocab = engine.tokenizer, engine.config.vocab_size
    stops = stop_ids(engine)
    assert set(stops) == set(engine.config.eos_ids) | {tok.special_tokens["<|im_end|>"]}
    template = ChatTemplate.for_tokenizer(tok)
    assert call_guide(tok, vocab, stops, template, Offer()) is None  # nothing offered: nothing to hold
    assert call_guide(tok, vocab, stops, template, Offer([PAINT], True)) is not None
    assert call_guide(tok, vocab, stops, template, Offer(answer={"type": "object"})) is not None  # JSON, no tool


def test_a_schema_the_grammar_compiler_refuses_leaves_calls_unguided(caplog):
    tok = Tokenizer.from_gguf(smollm2_gguf())
    bad = spec("f", x={"type": "strnig"})
    with caplog.at_level(logging.WARNING, logger="deltamem.agent"):
        assert call_guide(tok, 49152, [2], ChatTemplate.for_tokenizer(tok), Offer([bad])) is None
    assert "reply unguided" in caplog.text
