"""The tool-call parser, fuzzed with hypothesis: it never raises on any text, and valid calls round-trip."""


from hypothesis import given, settings
from hypothesis import strategies as st

from deltamem.agent.parse import CLOSE, CUT_OFF, OPEN, format_tool_call, parse_tool_calls

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4), max_leaves=12
)
names = st.text(min_size=1, max_size=30)
arguments = st.dictionaries(st.text(max_size=20), json_values, max_size=5)
prose = st.text(max_size=200).filter(lambda t: OPEN not in t and CLOSE not in t)


@settings(max_examples=400, deadline=None)
@given(
    st.text(max_size=400)
    | st.lists(
        st.sampled_from([OPEN, CLOSE, "{", "}", '"name"', ":", '"x"', "[", "]", '"arguments"', ",", "null", " ", "\n"]),
        max_size=40,
    ).map("".join)
)
def test_never_raises(text):
    parsed = parse_tool_calls(text)
    assert isinstance(parsed.content, str)
    for call in parsed.calls:
        assert isinstance(call["name"], str) and call["name"] and isinstance(call["arguments"], dict)
    # every opened block is accounted for: a call or an error
    assert len(parsed.calls) + len(parsed.errors) == text.count(OPEN) - _nested_opens(text)


def _nested_opens(text):
    """Opens that sit inside an earlier block (before its close): they are part of that block's body."""
    n, i, inside = 0, 0, False
    while True:
        j = text.find(OPEN if not inside else CLOSE, i)
        k = text.find(OPEN, i) if inside else -1
        if inside and k != -1 and (j == -1 or k < j):
            n += 1
            i = k + len(OPEN)
            continue
        if j == -1:
            return n
        inside = not inside
        i = j + len(OPEN if inside else CLOSE)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(names, arguments), max_size=4), st.lists(prose, min_size=5, max_size=5))
def test_valid_calls_round_trip(calls, texts):
    text = texts[0]
    for i, (name, args) in enumerate(calls):
        text += format_tool_call(name, args) + texts[i + 1]
    parsed = parse_tool_calls(text)  # a close marker inside a JSON string is the string's, not the block's end
    assert parsed.errors == []
    assert [(c["name"], c["arguments"]) for c in parsed.calls] == calls
    assert len({c["id"] for c in parsed.calls}) == len(calls)


def test_malformed_calls_become_messages():
    text = (
        f'ok {OPEN}{{"name": "read_file", "arguments": {{"path": "a"}}}}{CLOSE} {OPEN}not json{CLOSE} {OPEN}[1]{CLOSE}'
        f' {OPEN}{{"arguments": {{}}}}{CLOSE} {OPEN}{{"name": "x", "arguments": "[1]"}}{CLOSE} {OPEN}{{"name": "y"'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == [{"name": "read_file", "arguments": {"path": "a"}, "id": "call_0"}]
    assert len(parsed.errors) == 5
    assert "not valid JSON" in parsed.errors[0] and "JSON object" in parsed.errors[1]
    assert 'no "name"' in parsed.errors[2] and "must be a JSON object" in parsed.errors[3]
    assert parsed.errors[4] == CUT_OFF
    assert not any("tool_call>" in e for e in parsed.errors)  # nothing for a model to copy into its next call
    assert parsed.content == "ok"
    # double-encoded arguments, as some models write them, are accepted
    parsed = parse_tool_calls(f'{OPEN}{{"name": "grep", "arguments": "{{\\"pattern\\": \\"x\\"}}"}}{CLOSE}')
    assert parsed.calls[0]["arguments"] == {"pattern": "x"}


def test_an_unclosed_last_block_holding_a_whole_call_is_read():
    """A reply that ends (or closes a code fence) where </tool_call> was due still makes its call, as vLLM's Hermes
    parser reads it; an unclosed block that is not a whole call stays an error."""
    call = '{"name": "grep", "arguments": {"pattern": "def x"}}'
    for text in (f"{OPEN}\n{call}", f"{OPEN}\n{call}\n", f"{OPEN}\n{call}\n```", f"Looking. {OPEN}{call}"):
        parsed = parse_tool_calls(text)
        assert parsed.errors == [] and [(c["name"], c["arguments"]) for c in parsed.calls] == [
            ("grep", {"pattern": "def x"})
        ], text
    for text in (f'{OPEN}{{"name": "grep", "argu', f"{OPEN}\n```python\nprint(1)\n```"):
        parsed = parse_tool_calls(text)
        assert parsed.calls == [] and parsed.errors == [CUT_OFF] and "tool_call>" not in CUT_OFF
    parsed = parse_tool_calls(f"{OPEN}{call}{CLOSE} {OPEN}{call}")  # a closed call, then an unclosed one
    assert len(parsed.calls) == 2 and parsed.errors == []


def test_a_close_marker_inside_an_argument_is_part_of_it():
    """The guided grammar lets a JSON string hold `</tool_call>` (a model copying an error message into a grep
    pattern did): the call is read whole, the marker in its argument, instead of failing as unterminated JSON."""
    pattern = f"def x{CLOSE}"
    text = f'Searching. {OPEN}\n{{"name": "grep", "arguments": {{"pattern": "{pattern}"}}}}\n{CLOSE} done'
    parsed = parse_tool_calls(text)
    assert parsed.errors == [] and parsed.content == "Searching.  done"
    assert [(c["name"], c["arguments"]) for c in parsed.calls] == [("grep", {"pattern": pattern})]
    # not JSON up to a close marker: the first marker ends the block, as before
    parsed = parse_tool_calls(f'{OPEN}{{"name": "grep", {CLOSE} tail')
    assert parsed.calls == [] and len(parsed.errors) == 1 and parsed.content == "tail"
