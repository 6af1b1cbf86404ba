"""Guided replies: once the model opens a `<tool_call>`, it can only write a whole, well-formed call of an offered
tool with arguments that fit the tool's JSON schema; everywhere else sampling is free, unless the reply must be JSON
(OpenAI's response_format): then it is calls or one JSON value its schema accepts.

The small default model opens calls well but then often names the question's function instead of a tool, writes a
code fence instead of JSON, or loops on `<tool_call>` (benchmarks/results/agent_eval.md), and each such call costs
a step. Constrained decoding fixes that at the source, as vLLM's guided decoding and llama.cpp's grammars do. The
grammar is compiled by llguidance (the library llama.cpp, vLLM and SGLang use), from the tools' own schemas:

- JSON syntax: `<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`, ARGS an object the tool's schema
  accepts (its properties only, its required ones present, values of their types);
- XML syntax (Qwen3.5): `<tool_call>\\n<function=NAME>\\n` then `<parameter=KEY>\\nVALUE\\n</parameter>\\n` for the
  tool's own keys, then `</function>\\n</tool_call>`.

Outside a call the grammar allows any text, and the guide says so (None), so the engine samples as usual (and on a
GPU keeps decoding in device-side bursts). The guide follows the reply token by token; a token the grammar refuses
(sampled where the guide was free, e.g. a special token) ends guiding for that reply, and the parser then reports
whatever follows as usual.
"""

from __future__ import annotations

import bisect
import copy
import json
import re
from collections.abc import Callable, Sequence

import llguidance
import llguidance.numpy as llnp  # not llguidance.torch, whose import pulls in torch._dynamo (1.5 s)
import torch

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NL = "\n"
END_PARAMETER = NL + "</parameter>" + NL


def _lit(s: str) -> str:
    return json.dumps(s)


def _json_args(schema: dict | None) -> str:
    """The schema an arguments object must meet: the tool's, with no keys beyond its properties, written as
    json.dumps writes it (the form the agent's prompts and traces show; no room for runs of whitespace)."""
    schema = copy.deepcopy(schema) if schema else {"type": "object", "properties": {}}
    schema.setdefault("type", "object")
    schema.setdefault("additionalProperties", False)
    schema["x-guidance"] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    return json.dumps(schema)


def _xml_value(schema: dict, rule: str) -> tuple[str, list[str]]:
    """A parameter's value in the XML syntax, as chat templates write it: a string as it is (up to its closing
    tag; never holding the call's end tag; at most its schema's maxLength characters), anything else as JSON.
    Returns the value's expression and the rules it needs."""
    end = _lit(END_PARAMETER)
    if "enum" in schema:
        return f"({' | '.join(_lit(v if isinstance(v, str) else json.dumps(v)) for v in schema['enum'])}) {end}", []
    kind = schema.get("type")
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        most = schema.get("maxLength")
        text = "(.|\\n)" + ("*" if most is None else f"{{0,{int(most)}}}")
        lexeme = rule.upper()
        return rule, [f"{rule}[lazy]: {lexeme} {end}", f"{lexeme}: /{text}/ & ~/(.|\\n)*<\\/tool_call>(.|\\n)*/"]
    return f"%json {json.dumps({**schema, 'x-guidance': {'whitespace_flexible': False}})} {end}", []


def answer_rule(schema: dict) -> str:
    """The rule of an answer that is one JSON value `schema` accepts, written as json.dumps writes it (no room for
    runs of whitespace, where a small model can loop)."""
    fmt = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    return f"answer: %json {json.dumps({**schema, 'x-guidance': fmt})}"


def call_grammar(tools: Sequence[dict], syntax: str = "json", required: bool = False,
                 special_tags: bool = False, answer: dict | None = None, parallel: bool = True) -> str:  # fmt: skip
    """A Lark grammar (llguidance's dialect) of a reply: free text with any number of well-formed calls of `tools`
    (OpenAI function specs), or with `required`, exactly one call and nothing else. special_tags: `<tool_call>` and
    `</tool_call>` are single special tokens of the tokenizer (Qwen's), not text. answer: a JSON schema (OpenAI's
    response_format) that the reply meets where it calls no tool: then the reply is calls or that JSON value,
    never free text. parallel=False (OpenAI's parallel_tool_calls): one call at most, which ends the reply."""
    if syntax not in ("json", "xml"):
        raise ValueError("syntax must be json or xml")
    functions = [t.get("function", t) for t in tools]
    if not functions and answer is None:
        raise ValueError("a guide needs at least one tool or an answer's schema")
    if not functions:
        return "\n".join(["%llguidance {}", "start: answer", answer_rule(answer)]) + "\n"
    rules = []
    for i, f in enumerate(functions):
        name = f["name"]
        if syntax == "json":
            head = _lit('{"name": "' + name + '", "arguments": ')
            rules.append(f"tool_{i}: {head} %json {_json_args(f.get('parameters'))} \"}}\"")
        else:  # the required parameters, then the others, each in the schema's order
            params = f.get("parameters") or {}
            props = params.get("properties") or {}
            need = [k for k in params.get("required") or [] if k in props]
            for j, (k, sub) in enumerate(props.items()):
                value, more = _xml_value(sub, f"value_{i}_{j}")
                rules += [f"p_{i}_{j}: {_lit('<parameter=' + k + '>' + NL)} {value}", *more]
            body = [f"p_{i}_{list(props).index(k)}" for k in need]
            body += [f"p_{i}_{j}?" for j, k in enumerate(props) if k not in need]  # each once at most
            opening = _lit("<function=" + name + ">" + NL)
            rules.append(f"tool_{i}: {opening} {' '.join(body)} {_lit('</function>')}")
    choice = " | ".join(f"tool_{i}" for i in range(len(functions)))
    opening, closing = (OPEN, CLOSE) if special_tags else (_lit(OPEN), _lit(CLOSE))  # a token's name, or text
    call = f"{_lit(NL)} ({choice}) {_lit(NL)} {closing}"
    if required:
        top = [f"start: {opening} {call}"]
    elif answer is not None:  # calls (one after another, a newline between them at most), or the answer
        calls = f"calls: tcall ({_lit(NL)}? tcall)*" if parallel else "calls: tcall"
        top = ["start: calls | answer", calls, f"tcall: {opening} {call}", answer_rule(answer)]
    else:
        # free text (with special tags it cannot hold the token; else the text `<tool_call>` ends it, lazily: at its
        # first occurrence), then a call opens; any number of them, or one that ends the reply
        start = "start: (call)* tail" if parallel else "start: call | tail"
        opens = [f"open[lazy]: TEXT {opening}", f"call: open {call}"]
        if special_tags:
            opens = [f"call: TEXT {opening} {call}"]
        top = [start, "tail: TEXT", "TEXT: /(.|\\n)*/", *opens]
    return "\n".join(["%llguidance {}", *top, *rules]) + "\n"


_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], llguidance.LLTokenizer] = {}


def ll_tokenizer(tok, vocab_size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a deltamem Tokenizer: each id's bytes (special tokens marked with byte 0xFF, as
    llguidance expects; ids the tokenizer lacks, a padded vocabulary's, as never-allowed specials)."""
    key = (tok.fingerprint(), vocab_size, tuple(eos_ids))
    if key not in _TOKENIZERS:
        specials = set(tok.special_tokens.values())
        tokens = []
        for i in range(vocab_size):
            try:
                raw = tok.decode_bytes([i])
            except ValueError:
                raw = None
            tokens.append(b"\xff[unused %d]" % i if raw is None else b"\xff" + raw if i in specials else raw)

        class Wrapped:  # the attributes llguidance.TokenizerWrapper reads
            eos_token_id = eos_ids[0]
            bos_token_id = None
            special_token_ids = sorted(specials)

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text):
                return tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        _TOKENIZERS[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), eos_token=list(eos_ids))
    return _TOKENIZERS[key]


class ReplyGuide:
    """guide(reply_ids, device) -> a [vocab] bool mask of the ids allowed next, or None where sampling is free."""

    def __init__(self, tokenizer, tools: Sequence[dict], vocab_size: int, eos_ids: Sequence[int],
                 syntax: str = "json", required: bool = False, answer: dict | None = None,
                 parallel: bool = True):  # fmt: skip
        """tools: OpenAI function specs (agent/prompt.py tool_specs). vocab_size: the model's (its logits' width,
        which may pad the tokenizer's). eos_ids: the ids that end a reply (allowed wherever the grammar may end).
        answer: the JSON schema of a reply that calls no tool (call_grammar)."""
        self._args = (tokenizer, tools, vocab_size, eos_ids, syntax, required, answer, parallel)
        self.vocab_size = vocab_size
        special = {OPEN, CLOSE} <= set(tokenizer.special_tokens)
        self.grammar = call_grammar(tools, syntax, required, special, answer, parallel)
        self._matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), self.grammar)
        if self._matcher.is_error():
            raise ValueError(f"the grammar does not compile: {self._matcher.get_error()}")
        self._bits = torch.from_numpy(llnp.allocate_token_bitmask(1, vocab_size))
        self._shifts = torch.arange(32, dtype=torch.int32)
        free = not required and answer is None  # a reply that starts as free text
        self._free = self._fill().clone() if free else None  # the mask of free text (the reply's start)
        self._fed: list[int] = []
        self._off = False  # the reply left the grammar: free from here on
        self._last: tuple[int, torch.Tensor | None] | None = None  # (len of the reply, its answer)

    def fresh(self) -> ReplyGuide:
        """A guide of the same grammar for another reply (one matcher follows one reply at a time)."""
        return ReplyGuide(*self._args)

    def _fill(self) -> torch.Tensor:
        llnp.fill_next_token_bitmask(self._matcher, self._bits.numpy())
        return self._bits[0]

    def _follow(self, ids: Sequence[int]) -> None:
        n = len(self._fed)
        if len(ids) < n or list(ids[:n]) != self._fed:  # another reply (or a rewind): start again
            self._matcher.reset()
            self._fed, self._off, self._last, n = [], False, None, 0
        for t in ids[n:]:
            t = int(t)
            self._fed.append(t)
            if not self._off and not self._matcher.consume_token(t):
                self._off = True

    def __call__(self, ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        self._follow(ids)
        if self._last is None or self._last[0] != len(self._fed):
            mask = None
            if not self._off:
                bits = self._fill()
                if self._free is None or not torch.equal(bits, self._free):
                    mask = ((bits[:, None] >> self._shifts) & 1).flatten()[: self.vocab_size].bool()
            self._last = (len(self._fed), mask)
        mask = self._last[1]
        return None if mask is None else mask.to(device)


# what comes before a list's next item: "`a.py`, `", "`a.py` and `", "- `a.py`\n- `", "1. `a.py`\n2. `"
_LIST_BEFORE = re.compile(r"`([^`\n]+)`\s*(?:,|;|and|,\s*and)?\s*(?:[-*]|\d+[.)])?\s*$")
_TEXTS: dict[tuple[str, int], tuple[dict[str, list[int]], list[str], list[str]]] = {}


def token_texts(tok, vocab_size: int) -> tuple[dict[str, list[int]], list[str], list[str]]:
    """Each text a single token spells -> its ids, those texts sorted (for a prefix's range), and those that may
    continue a list (a backtick, a separator, a bullet); ids whose bytes are not whole UTF-8 text are left out."""
    key = (tok.fingerprint(), vocab_size)
    if key not in _TEXTS:
        by_text: dict[str, list[int]] = {}
        for i in range(vocab_size):
            try:
                by_text.setdefault(tok.decode_bytes([i]).decode("utf-8"), []).append(i)
            except (ValueError, UnicodeDecodeError):
                continue
        listy = [t for t in by_text if "`" in t or re.fullmatch(r"\s*(?:,|;|and|,\s*and|[-*]|\d+[.)])?\s*", t)]
        _TEXTS[key] = (by_text, sorted(by_text), listy)
    return _TEXTS[key]


# the list a text ends in: backticked items, each followed by a separator (the last one's may be empty)
_TRAILING_LIST = re.compile(r"(?:`[^`\n]+`\s*(?:,|;|and|,\s*and)?\s*(?:[-*]|\d+[.)])?\s*)+$")


def _list_items(text: str) -> list[str]:
    """The items of the list `text` ends in (`a.py`, `b.py` -> [a.py, b.py]): not the paths named before it."""
    m = _TRAILING_LIST.search(text)
    return re.findall(r"`([^`\n]+)`", m.group(0)) if m else []


_SEPARATOR = re.compile(r"`[^`\n]+`(?:\s*(?:,|;|and|,\s*and)|\s*\n\s*(?:[-*]|\d+[.)]))\s*$")


def _continues_list(text: str) -> bool:
    """Whether `text` ends in a list's separator (`a.py`, ) or its next item just opened (`a.py`, `)."""
    if "```" in text:
        return False
    if text.count("`") % 2 == 0:
        return _SEPARATOR.search(text) is not None
    at = text.rfind("`")
    return not text[at + 1 :].strip() and _LIST_BEFORE.search(text[:at]) is not None


class ListGuide:
    """guide(reply_ids, device) -> a mask, or None: a reply that lists files it was shown (`a.py`, `b.py`, ...)
    cannot write a file it has already listed as the next item while a shown file is still missing from the list,
    nor go on listing (a separator, another item) once a list holds every shown file.

    A small model copying a list of paths from a tool result tends to write the last one again instead of the next
    (`src/parse.rs`, `src/parse.rs`, ...) and then loops on it (benchmarks/results/agent_eval_heldout_2d8a8bd.md).
    Only the tokens that would spell an already listed path from where the item stands are forbidden, and only while
    that item opens right after a listed path and another shown path could still follow; everything else is free.
    paths(): the files the tools have shown so far (called at each step where a list item is open)."""

    def __init__(self, tok, vocab_size: int, paths: Callable[[], Sequence[str]]):
        self.tok, self.vocab_size, self.paths = tok, vocab_size, paths

    def forbidden(self, text: str) -> set[int]:
        """The ids that would make the list item open at the end of `text` spell a path listed before it, or, where
        a list holds every shown path, continue it."""
        paths = list(self.paths())
        if "```" in text or not paths:  # in code, or nothing shown
            return set()
        if text.count("`") % 2 == 0:  # no item open: after the whole list, no separator and no item more
            items = _list_items(text)
            if len(items) < 2 or items[-1] not in paths or any(p not in items for p in paths):
                return set()  # no list, or one that still lacks a shown file
            by_text, _, listy = token_texts(self.tok, self.vocab_size)
            return {i for t in listy if _continues_list(text + t) for i in by_text[t]}
        at = text.rfind("`")
        item, before = text[at + 1 :], text[:at]
        m = _LIST_BEFORE.search(before)
        if "\n" in item or m is None or m.group(1) not in paths:
            return set()
        listed = set(_list_items(before)) & set(paths)  # this list's items, not paths named before it
        missing = [p for p in paths if p not in listed]
        if not missing:
            return set()
        by_text, texts, _ = token_texts(self.tok, self.vocab_size)
        out: set[int] = set()
        for p in listed:
            if not p.startswith(item):
                continue
            rest = p[len(item) :] + "`"
            spelled = [rest[:k] for k in range(1, len(rest) + 1)]  # tokens inside the rest of the path
            i = bisect.bisect_left(texts, rest)
            while i < len(texts) and texts[i].startswith(rest):  # and tokens running past its closing backtick
                spelled.append(texts[i])
                i += 1
            for t in spelled:
                if t in by_text and not any(q.startswith(item + t) for q in missing):
                    out.update(by_text[t])
        return out

    def __call__(self, ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        if not ids:
            return None
        out = self.forbidden(self.tok.decode(list(ids)))
        if not out:
            return None
        mask = torch.ones(self.vocab_size, dtype=torch.bool)
        mask[list(out)] = False
        return mask.to(device)


class Guides:
    """Several guides at once: a token is allowed where each of them allows it (None where all are free)."""

    def __init__(self, *guides):
        self.guides = [g for g in guides if g is not None]

    def __call__(self, ids: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        masks = [m for m in (g(ids, device) for g in self.guides) if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out
