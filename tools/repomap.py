"""A repository map: the file tree with each source file's top-level definitions (classes, functions, types and their
signatures; a class's or impl's methods one level down), parsed with tree-sitter and its maintained grammar packages
(Python, JavaScript, TypeScript, Go, Rust, Java, C, C++), cut to a token budget. Ingest feeds it last, nearest the
window (agent/runner.py); the `map` tool (tools/fs.py) shows it on demand.

The most important files (the caller's order) keep their definitions first; what does not fit the budget is shortened
(methods left out, then definitions), then counted. Tokens are estimated at 4 characters each.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable
from pathlib import PurePosixPath

CHARS_PER_TOKEN = 4
MAX_SIGNATURE = 160

# extension -> (grammar module, its language function)
GRAMMARS = {
    ".py": ("tree_sitter_python", "language"),
    ".pyi": ("tree_sitter_python", "language"),
    ".js": ("tree_sitter_javascript", "language"),
    ".jsx": ("tree_sitter_javascript", "language"),
    ".mjs": ("tree_sitter_javascript", "language"),
    ".cjs": ("tree_sitter_javascript", "language"),
    ".ts": ("tree_sitter_typescript", "language_typescript"),
    ".tsx": ("tree_sitter_typescript", "language_tsx"),
    ".go": ("tree_sitter_go", "language"),
    ".rs": ("tree_sitter_rust", "language"),
    ".java": ("tree_sitter_java", "language"),
    ".c": ("tree_sitter_c", "language"),
    ".h": ("tree_sitter_cpp", "language"),  # C headers parse as C++ too; C++ headers do not parse as C
    ".cc": ("tree_sitter_cpp", "language"),
    ".cpp": ("tree_sitter_cpp", "language"),
    ".cxx": ("tree_sitter_cpp", "language"),
    ".hpp": ("tree_sitter_cpp", "language"),
    ".hh": ("tree_sitter_cpp", "language"),
}
# Node types that are definitions, per grammar; CONTAINERS hold definitions one level down (methods).
DEFINITIONS = {
    "function_definition", "class_definition",  # python, c/c++ functions
    "function_declaration", "generator_function_declaration", "class_declaration", "abstract_class_declaration",
    "interface_declaration", "type_alias_declaration", "enum_declaration", "method_definition",  # js/ts
    "method_declaration", "type_declaration", "constructor_declaration", "record_declaration",  # go, java
    "function_item", "struct_item", "enum_item", "trait_item", "impl_item", "mod_item", "type_item",  # rust
    "function_signature_item", "class_specifier", "struct_specifier", "namespace_definition",  # rust, c++
}
CONTAINERS = {
    "class_definition", "class_declaration", "abstract_class_declaration", "interface_declaration",
    "enum_declaration", "record_declaration", "impl_item", "trait_item", "class_specifier", "struct_specifier",
}
WRAPPERS = {"decorated_definition", "export_statement", "template_declaration"}  # the definition is inside


@functools.cache
def _parser(ext: str):
    """A tree-sitter parser for a file extension, or None (no grammar for it, or the packages are missing)."""
    spec = GRAMMARS.get(ext)
    if spec is None:
        return None
    try:
        from tree_sitter import Language, Parser

        grammar = importlib.import_module(spec[0])
        return Parser(Language(getattr(grammar, spec[1])()))
    except (ImportError, AttributeError, ValueError):
        return None


def parse(path: str, text: str):
    """(tree-sitter root node, the UTF-8 source) of one file, or None where no grammar reads it or it fails."""
    parser = _parser(PurePosixPath(path).suffix.lower())
    if parser is None:
        return None
    src = text.encode("utf-8", "replace")
    try:
        return parser.parse(src).root_node, src
    except Exception:  # a grammar bug must not take ingest or a tool down: the file is still listed
        return None


def outline(path: str, text: str) -> list[str]:
    """The definitions of one file as indented signature lines ([] for an unsupported or unparsable file)."""
    parsed = parse(path, text)
    if parsed is None:
        return []
    root, src = parsed
    lines: list[str] = []
    _walk(root, src, 0, lines)
    return lines


def _walk(node, src: bytes, depth: int, out: list[str]) -> None:
    for child in node.children:
        kind = child.type
        if kind in WRAPPERS:
            inner = child.child_by_field_name("definition") or child.child_by_field_name("declaration")
            inner = inner or next((c for c in child.named_children if c.type in DEFINITIONS), None)
            if inner is not None:
                _one(inner, src, depth, out, start=child.start_byte if kind == "export_statement" else None)
        elif kind in DEFINITIONS:
            _one(child, src, depth, out)
        elif kind in ("declaration", "field_declaration") and _is_prototype(child):  # C/C++ prototypes, methods
            out.append("  " * depth + _signature(child, src, None))
        elif kind == "lexical_declaration" and depth == 0:  # const f = (...) => ... (js/ts)
            value = next((d.child_by_field_name("value") for d in child.named_children
                          if d.type == "variable_declarator"), None)
            if value is not None and value.type in ("arrow_function", "function_expression", "function"):
                out.append("  " * depth + _signature(child, src, value.child_by_field_name("body")))


def _one(node, src: bytes, depth: int, out: list[str], start: int | None = None) -> None:
    body = node.child_by_field_name("body")
    out.append("  " * depth + _signature(node, src, body, start))
    if node.type in CONTAINERS and body is not None and depth < 1:
        _walk(body, src, depth + 1, out)
    elif node.type == "namespace_definition" and body is not None:
        _walk(body, src, depth, out)


def _is_prototype(node) -> bool:
    return any(c.type == "function_declarator" for c in node.named_children)


def _signature(node, src: bytes, body, start: int | None = None) -> str:
    end = body.start_byte if body is not None else node.end_byte
    text = src[start if start is not None else node.start_byte : end].decode("utf-8", "replace")
    text = " ".join(text.split()).rstrip(" {:=")
    return text if len(text) <= MAX_SIGNATURE else text[: MAX_SIGNATURE - 3] + "..."


def repo_map(files: Iterable[tuple[str, str]], max_tokens: int = 1500) -> str:
    """files: (path, text), most important first. Each file gets, of what still fits the budget: its definitions
    with their methods, or its top-level definitions only, or its name; past the budget files are counted. The map
    lists them in path order (the tree); "" for no files."""
    budget = max_tokens * CHARS_PER_TOKEN - 24  # room for the "(and N more files)" line
    entries: dict[str, str] = {}
    used, dropped = 0, 0
    for path, text in files:
        lines = outline(path, text)
        top = [line for line in lines if not line.startswith("  ")]
        for block in ("\n".join([path, *("  " + x for x in lines)]), "\n".join([path, *("  " + x for x in top)]), path):
            if used + len(block) + 1 <= budget:
                entries[path] = block
                used += len(block) + 1
                break
        else:
            dropped += 1
    out = [entries[p] for p in sorted(entries)]
    if dropped:
        out.append(f"(and {dropped} more files)")
    return "\n".join(out)
