"""Guided tool calls (agent/guide.py): what the guide allows where a tool's name is due against a brute-force scan of
the vocabulary; free text left free; and generation through the engine (host loop and device-side bursts) by a
random-weight model, which left alone writes noise, always giving calls that the agent's parser reads and whose
arguments jsonschema (an independent validator) accepts under the tool's schema, and where the reply must be JSON
(OpenAI's response_format), JSON that json.loads reads and jsonschema accepts, or a call."""

import json
import re

import jsonschema
import pytest
import torch

from deltamem.agent.guide import Guides, ListGuide, ReplyGuide
from deltamem.agent.parse import parse_tool_calls
from deltamem.model import load_model
from deltamem.model.generation import GRAPH_CHUNK
from deltamem.model.tokenizer import Tokenizer

VOCAB = 100352  # the random model's (OLMo's padded vocabulary)


def spec(name, properties=None, required=()):
    params = {"type": "object", "properties": properties or {}, "required": list(required)}
    return {"type": "function", "function": {"name": name, "description": name, "parameters": params}}


NAMED = [spec("grep", {"pattern": {"type": "string"}}, ["pattern"]), spec("read_file", {"path": {"type": "string"}}),
         spec("map"), spec("list_dir")]  # fmt: skip
# Arguments a random model can finish: a choice, a bounded integer, a boolean, a string with a maxLength (without
# one, a free string could run on forever)
SHORT = [
    spec("paint", {"color": {"enum": ["red", "green", "blue"]}, "coats": {"type": "integer", "minimum": 1,
                   "maximum": 3}}, ["color"]),  # fmt: skip
    spec("wait", {"long": {"type": "boolean"}}),
    spec("find", {"word": {"type": "string", "maxLength": 12}}, ["word"]),
    spec("stop"),
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.cl100k_olmo()


@pytest.fixture(scope="module")
def eos(tok):
    return [tok.special_tokens["<|im_end|>"]] if "<|im_end|>" in tok.special_tokens else [tok.eos_id]


def allowed(mask) -> set[int]:
    return set(mask.nonzero()[:, 0].tolist())


@pytest.mark.parametrize(("syntax", "opening", "ends"), [("json", '<tool_call>\n{"name": "', '"'),
                                                         ("xml", "<tool_call>\n<function=", ">")])  # fmt: skip
def test_where_a_name_is_due_only_offered_names_are_allowed(tok, eos, syntax, opening, ends):
    guide = ReplyGuide(tok, NAMED, VOCAB, eos, syntax)
    names = [s["function"]["name"] for s in NAMED]
    for written in ["", "r", "read_", "l", "gre"]:
        mask = guide(tok.encode("Let me look. " + opening + written))
        assert mask is not None and mask.shape == (VOCAB,)
        for i in allowed(mask):  # each allowed token stays on (or completes) the way to an offered name
            text = written + tok.decode([i])
            assert any((n + ends).startswith(text) or text.startswith(n + ends) for n in names), (written, text)
        for n in names:  # and every offered name that fits can still be written, one character at a time
            if n.startswith(written) and n != written:
                assert any(tok.decode([i]) == n[len(written)] or n[len(written) :].startswith(tok.decode([i]))
                           for i in allowed(mask)), (written, n)  # fmt: skip
    wrong = guide(tok.encode("Let me look. " + opening + "is_coroutine"))  # off every name: left the grammar
    assert wrong is None


def test_free_text_is_free_and_a_call_is_not(tok, eos):
    guide = ReplyGuide(tok, NAMED, VOCAB, eos)
    assert guide(tok.encode("The answer is in `src/a.py`.")) is None
    assert guide(tok.encode('<tool_call>\n{"name": "grep", "arguments": {"pattern": "x"}}\n</tool_call>\n')) is None
    inside = guide(tok.encode("<tool_call>"))
    assert inside is not None and not inside[tok.encode("```")[0]]  # a code fence cannot open a call
    assert not any(inside[i] for i in eos)  # nor can the reply end inside one
    closed = guide(tok.encode('<tool_call>\n{"name": "grep", "arguments": {"pattern": "x"}}'))
    assert allowed(closed) == {tok.encode("\n")[0]}  # on to </tool_call>, nothing else


def test_arguments_keep_to_the_schema(tok, eos):
    guide = ReplyGuide(tok, NAMED, VOCAB, eos)
    keys = guide(tok.encode('<tool_call>\n{"name": "grep", "arguments": {"'))
    for i in allowed(keys):  # only grep's own key
        text = tok.decode([i])
        assert 'pattern"'.startswith(text) or text.startswith('pattern"'), text
    missing = guide(tok.encode('<tool_call>\n{"name": "grep", "arguments": {'))
    assert not missing[tok.encode("}")[0]]  # grep's pattern is required


@pytest.mark.parametrize(("syntax", "opening", "closing"), [
    ("json", '<tool_call>\n{"name": "grep", "arguments": {"pattern": "', '"'),
    ("xml", "<tool_call>\n<function=grep>\n<parameter=pattern>\n", "\n")])  # fmt: skip
def test_string_arguments_end_at_their_max_length_and_never_hold_the_end_tag(tok, eos, syntax, opening, closing):
    """A looping argument cannot run past its schema's maxLength (the string must close there), and no string
    argument can write the call's end tag (a model copying an error message into a pattern)."""
    capped = [spec("grep", {"pattern": {"type": "string", "maxLength": 8}}, ["pattern"])]
    guide = ReplyGuide(tok, capped, VOCAB, eos, syntax)
    full = guide(tok.encode("Looking. " + opening + "ab-ab-ab"))
    assert full is not None and all(tok.decode([i]).startswith(closing) for i in allowed(full))
    partial = guide(tok.encode("Looking. " + opening + "ab-ab"))
    assert any(tok.decode([i]) == "-" for i in allowed(partial))  # under the cap the string goes on
    if syntax == "xml":  # JSON strings may hold the tag: the parser reads a JSON call as JSON (test_parse.py)
        free = [spec("grep", {"pattern": {"type": "string"}}, ["pattern"])]
        guide = ReplyGuide(tok, free, VOCAB, eos, syntax)
        tag = guide(tok.encode("Looking. " + opening + "abc</tool_call"))
        assert tag is not None and not any(tok.decode([i]).startswith(">") for i in allowed(tag))
        assert any(tok.decode([i]).startswith(">") for i in allowed(guide(tok.encode("Looking. " + opening + "<a"))))


@pytest.mark.parametrize("syntax", ["json", "xml"])
@pytest.mark.parametrize("fast", [False, True])
def test_guided_generation_gives_calls_the_schemas_accept(tok, eos, syntax, fast):
    eng = load_model("random", window=64)
    eng.fast_decode = fast  # on the CPU: the device-side burst loop, run eagerly
    eng.burst_chunk = GRAPH_CHUNK  # in a GPU's bursts
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in SHORT}
    prompt = tok.encode("Which tool now? ")
    free = "".join(eng.generate(prompt, max_new_tokens=40, stop_ids=eos, temperature=1.0, seed=0))
    assert not parse_tool_calls(free, schemas=schemas).calls  # left alone, the random model calls nothing
    for seed in range(4):
        eng.reset()
        guide = ReplyGuide(tok, SHORT, VOCAB, eos, syntax, required=True)
        text = "".join(eng.generate(prompt, max_new_tokens=60, stop_ids=eos, temperature=1.0, seed=seed,
                                    guide=guide))  # fmt: skip
        parsed = parse_tool_calls(text, schemas=schemas)
        assert len(parsed.calls) == 1 and not parsed.errors, text
        call = parsed.calls[0]
        jsonschema.validate(call["arguments"], schemas[call["name"]])
        assert eng.generated[-1] in eos  # the call complete, the reply ends
        assert tok.decode(eng.generated[:-1]) == text and eng.tokens_seen == len(prompt) + len(eng.generated)


def test_calls_opened_by_a_special_token(tok, eos):
    """Where `<tool_call>` and `</tool_call>` are single added tokens of the vocabulary (Qwen's), the guide works on
    those tokens: free text stays free, the token opens a guided call, and a required call starts with it."""
    import tiktoken

    ids = {"<tool_call>": 100280, "</tool_call>": 100281}
    base = tok.encoding
    enc = tiktoken.Encoding("cl100k_calls", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                            special_tokens={**base._special_tokens, **ids})  # fmt: skip
    calls_tok = Tokenizer(enc, {**tok._id_to_bytes, **{i: s.encode() for s, i in ids.items()}}, name="cl100k_calls",
                          eos_id=tok.eos_id, chat_template=tok.chat_template)  # fmt: skip
    assert calls_tok.encode("<tool_call>") == [100280]
    guide = ReplyGuide(calls_tok, NAMED, VOCAB, eos)
    assert guide(calls_tok.encode("Some prose first.")) is None
    opened = guide(calls_tok.encode("Some prose first.<tool_call>"))
    assert opened is not None and allowed(opened) == {calls_tok.encode("\n")[0]}
    eng = load_model("random", window=64)
    eng.tokenizer = calls_tok  # which can decode the two added ids
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in SHORT}
    text = "".join(eng.generate(calls_tok.encode("Go. "), max_new_tokens=60, stop_ids=eos, temperature=1.0, seed=1,
                                guide=ReplyGuide(calls_tok, SHORT, VOCAB, eos, required=True)))  # fmt: skip
    assert eng.generated[0] == 100280 and 100281 in eng.generated
    (call,) = parse_tool_calls(text, schemas=schemas).calls
    jsonschema.validate(call["arguments"], schemas[call["name"]])


# An answer a random model can finish (bounded: a choice, a bounded integer, a boolean, a short string)
ANSWER = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer",
          "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 6}},
          "required": ["color", "n", "ok", "tag"], "additionalProperties": False}  # fmt: skip


@pytest.mark.parametrize("tools", [[], SHORT])
def test_an_answer_that_must_be_json_is_json_its_schema_accepts_or_a_call(tok, eos, tools):
    """OpenAI's response_format: the reply is one JSON value the schema accepts, then the end; with tools offered,
    that or calls of them, never free text."""
    eng = load_model("random", window=64)
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in SHORT}
    prompt = tok.encode("Answer in JSON. ")
    kinds = set()
    for seed in range(6):
        eng.reset()
        guide = ReplyGuide(tok, tools, VOCAB, eos, answer=ANSWER)
        text = "".join(eng.generate(prompt, max_new_tokens=80, stop_ids=eos, temperature=1.0, seed=seed,
                                    guide=guide))  # fmt: skip
        if text.startswith("<tool_call>"):  # calls, one after another (a random model may not stop calling)
            calls = parse_tool_calls(text, schemas=schemas).calls
            assert tools and calls, text
            for call in calls:
                jsonschema.validate(call["arguments"], schemas[call["name"]])
            kinds.add("call")
        else:
            assert eng.generated[-1] in eos, text  # the answer complete, then the reply ends
            jsonschema.validate(json.loads(text), ANSWER)
            kinds.add("answer")
    assert "answer" in kinds


@pytest.mark.parametrize("syntax", ["json", "xml"])
@pytest.mark.parametrize("answer", [None, {"type": "object"}], ids=["text", "json answer"])
def test_without_parallel_calls_one_call_ends_the_reply(tok, eos, syntax, answer):
    """parallel=False (OpenAI's parallel_tool_calls: false): after one closed call the only token allowed is the
    end of the reply; with parallel calls, a second call may follow."""
    call = ('<tool_call>\n{"name": "stop", "arguments": {}}\n</tool_call>' if syntax == "json"
            else "<tool_call>\n<function=stop>\n</function>\n</tool_call>")  # fmt: skip
    text = ("Done. " if answer is None else "") + call
    one = ReplyGuide(tok, SHORT, VOCAB, eos, syntax, answer=answer, parallel=False)(tok.encode(text))
    assert one is not None and allowed(one) == set(eos)
    many = ReplyGuide(tok, SHORT, VOCAB, eos, syntax, answer=answer)(tok.encode(text))
    assert many is None or allowed(many) > set(eos)  # free text, or another call, may follow


# --- ListGuide: a list of shown files names none twice while one is missing -------------------------------------

SHOWN = ["pkg/src/error.rs", "pkg/src/lib.rs", "pkg/src/parse.rs", "pkg/tests/test_req.rs"]


def spelled_again(tok, item: str, listed: list[str], missing: list[str]) -> set[int]:
    """Brute force over the whole vocabulary: the ids whose text, after the open item, spells on into a listed path
    (or past its closing backtick) and into no missing one."""
    out = set()
    for i in range(VOCAB):
        try:
            t = tok.decode_bytes([i]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
        s = item + t
        into_listed = any((p + "`").startswith(s) or s.startswith(p + "`") for p in listed)
        if t and into_listed and not any(q.startswith(s) for q in missing):
            out.add(i)
    return out


@pytest.mark.parametrize(
    "before, item",
    [
        ("`wildcard` is used in 4 files: `pkg/src/error.rs`, `pkg/src/lib.rs`, `pkg/src/parse.rs`, `", "pkg/"),
        ("Used in:\n- `pkg/src/parse.rs`\n- `pkg/src/lib.rs`\n- `", "pkg/src/"),
        ("`pkg/src/parse.rs` and `", "pkg/src/pa"),
    ],
)
def test_list_guide_forbids_exactly_the_ids_that_list_a_file_again(tok, before, item):
    guide = ListGuide(tok, VOCAB, lambda: SHOWN)
    listed = [p for p in SHOWN if f"`{p}`" in before]
    missing = [p for p in SHOWN if p not in listed]
    want = spelled_again(tok, item, listed, missing)
    assert want  # the case is one where the model could list a file again
    mask = guide(tok.encode(before + item))
    assert mask is not None and set(range(VOCAB)) - allowed(mask) == want
    # what stays allowed: the missing file, spelled on from the item, token by token
    rest, text = missing[-1][len(item) :], before + item
    for i in tok.encode(rest):
        m = guide(tok.encode(text))
        assert m is None or bool(m[i]), (text, tok.decode([i]))
        text += tok.decode([i])


def test_list_guide_goes_on_with_no_list_that_holds_every_shown_file(tok):
    guide = ListGuide(tok, VOCAB, lambda: SHOWN)
    done = "Used in 4 files: `pkg/src/error.rs`, `pkg/src/lib.rs`, `pkg/src/parse.rs`, `pkg/tests/test_req.rs`"
    cases = [(done, [" `", "`", ",", " and", ";"], [".", " (", "\n\n", " in"]),
             (done + ",", [" `", " and"], [" which"]), (done + "\n", ["-", "*"], ["The"])]  # fmt: skip
    for text, going_on, free in cases:
        mask = guide(tok.encode(text))
        assert mask is not None
        for t in going_on:  # each a single token of this vocabulary
            (i,) = tok.encode(t)
            assert not mask[i], (text, t)
        for t in free:
            assert all(mask[i] for i in tok.encode(t)), (text, t)
        for i in set(range(VOCAB)) - allowed(mask):  # nothing but backticks, separators and bullets
            t = tok.decode([i])
            assert "`" in t or re.fullmatch(r"\s*(,|;|,? ?and|[-*]|\d+[.)])?\s*", t), t
    # one file still missing: the list goes on
    assert guide(tok.encode(done.replace(", `pkg/tests/test_req.rs`", "") + ", ")) is None
    # one file alone is no list: what follows it is free
    assert ListGuide(tok, VOCAB, lambda: SHOWN[:1])(tok.encode("Defined in `pkg/src/error.rs`")) is None


@pytest.mark.parametrize(
    "text",
    [
        "The error is raised in `pkg/src/parse.rs` (line 3); see `pkg/",  # prose, not a list's next item
        "`pkg/src/error.rs`, `pkg/src/lib.rs`, `pkg/src/parse.rs`, `pkg/tests/test_req.rs`, `pkg/",  # all listed
        "Defined in `pkg/src/lib.rs` as `",  # no list
        "```\nuse `pkg/src/parse.rs`, `pkg/",  # in code
        "`pkg/src/parse.rs`, `pkg/src/lib.rs`",  # no item open
        "`other/file.rs`, `pkg/",  # the item before is no shown file
        # named before the list, not in it: the list may still name it
        "Defined in `pkg/src/parse.rs`. Used in `pkg/src/lib.rs`, `pkg/src/pa",
    ],
)
def test_list_guide_leaves_everything_else_free(tok, text):
    assert ListGuide(tok, VOCAB, lambda: SHOWN)(tok.encode(text)) is None


def test_guides_allow_what_each_allows(tok, eos):
    calls = ReplyGuide(tok, NAMED, VOCAB, eos)
    listing = ListGuide(tok, VOCAB, lambda: SHOWN)
    both = Guides(calls, listing, None)
    free = tok.encode("`pkg/src/parse.rs`, `pkg/src/")
    assert listing(free) is not None and torch.equal(both(free), listing(free))  # the call guide is free here
    opened = tok.encode("Let me look.\n<tool_call>\n")
    assert torch.equal(both(opened), calls(opened))  # no list here
    assert Guides(listing)(tok.encode("no list")) is None
