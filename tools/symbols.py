"""Symbols: where a name is defined and where it is used, across every language the repository map parses
(tools/repomap.py's tree-sitter grammars). The `definition` and `references` tools, and the agent's look-up before
its first reply (agent/retrieve.py), read these.

A definition is a class, function, method, type, constant or variable declared by name: outside function bodies
for variables (a local `x = 1` is no definition of `x`). A reference is a whole-word, case-sensitive occurrence of
the name in any text file or document the project keeps, definitions included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from deltamem.tools.base import MAX_NAME_ARG, Tool, ToolContext, ToolError, kwargs_runner
from deltamem.tools.files import project_files
from deltamem.tools.repomap import GRAMMARS, parse
from deltamem.tools.sandbox import MAX_READ, read_text, split_lines

MAX_SHOWN = 40  # definition and reference lines shown
MAX_LINE = 300
MAX_VALUE = 80  # characters of a constant's value a definition's first line quotes

# Nodes that define the name in their `name` field (or, C-like, at the end of their `declarator` chain)
NAMED = {
    "function_definition", "class_definition",  # python, c/c++
    "function_declaration", "generator_function_declaration", "class_declaration", "abstract_class_declaration",
    "interface_declaration", "type_alias_declaration", "enum_declaration", "method_definition",  # js/ts
    "method_declaration", "type_spec", "constructor_declaration", "record_declaration", "enum_constant",  # go, java
    "function_item", "struct_item", "enum_item", "trait_item", "mod_item", "type_item", "const_item", "static_item",
    "macro_definition", "function_signature_item", "union_item",  # rust
    "class_specifier", "struct_specifier", "union_specifier", "enum_specifier", "namespace_definition",  # c/c++
    "type_definition",
    "preproc_def", "preproc_function_def", "enumerator",
}
# Nodes that define variables: only outside function bodies
VARIABLES = {"assignment", "variable_declarator", "const_spec", "var_spec", "init_declarator", "declaration",
             "field_declaration", "public_field_definition"}
FUNCTIONS = {"function_definition", "function_declaration", "method_definition", "method_declaration", "function_item",
             "arrow_function", "function_expression", "function", "constructor_declaration", "lambda",
             "generator_function_declaration", "func_literal", "closure_expression"}
RAISES = {"raise_statement", "throw_statement", "throw_expression"}  # python; js/ts, java; c++
IDENTIFIERS = {"identifier", "type_identifier", "field_identifier", "property_identifier", "constant", "name"}
# a declaration at the start of a line, by its keyword (files the grammar could not parse whole)
_DECLARED = re.compile(r"(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:abstract\s+)?(?:pub(?:\([^)]*\))?\s+)?"
                       r"(?:async\s+)?(?:class|interface|enum|type|function|def|fn|struct|trait|func)\s+([A-Za-z_$][\w$]*)")


@dataclass(frozen=True)
class Definition:
    name: str
    path: str
    line: int  # from 1
    text: str  # the definition up to its body (a signature; a variable with its value), on one line
    value: str | None = None  # a variable's or constant's value, as written (on one line)
    end: int = 0  # the definition's last line
    raises: tuple[str, ...] = ()  # a function's: the classes it raises or throws by name, in its own body


def _name_nodes(node) -> list:
    """The identifier nodes a definition node names (several for `a, b = ...` or Go's `const a, b = ...`)."""
    name = node.child_by_field_name("name")
    if name is not None:
        if node.type in ("const_spec", "var_spec"):
            return [c for c in node.children_by_field_name("name")]
        return [name]
    target = node.child_by_field_name("left") or node.child_by_field_name("declarator")
    while target is not None and target.type not in IDENTIFIERS:
        if target.type in ("pattern_list", "tuple_pattern"):
            return [c for c in target.named_children if c.type in IDENTIFIERS]
        target = target.child_by_field_name("declarator") or target.child_by_field_name("name")
    return [target] if target is not None else []


def _raised(node, src: bytes) -> tuple[str, ...]:
    """The classes a function's own body raises or throws by name (`raise E(...)`, `raise E`, `throw new E(...)`),
    nested functions and classes left out; a re-raise or a thrown variable names none."""
    out: dict[str, None] = {}
    stack = list(reversed(node.named_children))
    while stack:
        n = stack.pop()
        if n.type in FUNCTIONS or n.type in ("class_definition", "class_declaration", "class_body"):
            continue
        if n.type in RAISES and n.named_children:
            exc = n.named_children[0]
            if exc.type in ("call", "new_expression", "object_creation_expression"):
                exc = exc.child_by_field_name("function") or exc.child_by_field_name("constructor") or \
                    exc.child_by_field_name("type")
            if exc is not None and exc.type in ("identifier", "type_identifier", "attribute", "member_expression"):
                name = src[exc.start_byte : exc.end_byte].decode("utf-8", "replace")
                if name[:1].isupper() or "." in name:  # a class, not a variable holding an exception
                    out[name] = None
            continue
        stack.extend(reversed(n.named_children))
    return tuple(out)


def definitions(path: str, text: str) -> list[Definition]:
    """Every definition in one file ([] for a file no grammar parses)."""
    parsed = parse(path, text)
    if parsed is None:
        return []
    root, src = parsed
    out: dict[tuple[str, int], Definition] = {}  # (name, line): one definition, the outermost node's text
    stack = [(root, False)]
    while stack:
        node, in_function = stack.pop()
        kind = node.type
        defines = kind in NAMED or (kind in VARIABLES and not in_function)
        if kind.endswith("_specifier") and node.child_by_field_name("body") is None:
            defines = False  # `struct s *p`: a use of the type, not its definition
        if defines:
            body = node.child_by_field_name("body")
            text = src[node.start_byte : body.start_byte if body is not None else node.end_byte]
            text = " ".join(text.decode("utf-8", "replace").split()).rstrip(" {:")
            value = node.child_by_field_name("value") or node.child_by_field_name("right")
            if value is not None:
                value = " ".join(src[value.start_byte : value.end_byte].decode("utf-8", "replace").split())
                value = value if len(value) <= MAX_VALUE else None  # a long literal is no value to quote
            line = node.start_point[0] + 1
            for ident in _name_nodes(node):
                name = src[ident.start_byte : ident.end_byte].decode("utf-8", "replace")
                known = out.get((name, line))
                if known is None:
                    raises = _raised(body, src) if kind in FUNCTIONS and body is not None else ()
                    out[name, line] = Definition(name, path, line, text, value, node.end_point[0] + 1, raises)
                elif known.value is None and value is not None:  # `int n = 1;`: the declarator has the value
                    out[name, line] = replace(known, value=value)
        inner = in_function or kind in FUNCTIONS
        stack.extend((c, inner) for c in reversed(node.named_children))
    if root.has_error:  # where the grammar gave up (syntax newer than it), a declaration's keyword still names it
        for n, line in enumerate(split_lines(src.decode("utf-8", "replace")), 1):
            m = _DECLARED.match(line)
            if m is not None and (m[1], n) not in out:
                out[m[1], n] = Definition(m[1], path, n, " ".join(line.split()).rstrip(" {:"), None, n)
    return sorted(out.values(), key=lambda d: (d.line, d.name))


def _files(root: Path, code_only: bool = False) -> list[tuple[str, str]]:
    """(path, text) of the project's readable text files and documents, converted (tools/sandbox.read_text); or of
    its source files in a language the map parses."""
    out = []
    for rel in project_files(root, max_bytes=MAX_READ):
        if code_only and rel.suffix.lower() not in GRAMMARS:
            continue
        try:
            text, _ = read_text(root / rel, rel.as_posix())
        except (ToolError, OSError):
            continue
        out.append((rel.as_posix(), text))
    return out


def find_definitions(root: Path, names: str | set[str]) -> list[Definition]:
    """The definitions of a name (or of any of a set of names) in the project, by path and line."""
    names = {names} if isinstance(names, str) else names
    return [d for path, text in _files(root, code_only=True) for d in definitions(path, text) if d.name in names]


def find_references(root: Path, name: str) -> dict[str, list[tuple[int, str]]]:
    """path -> [(line number, line)] of the whole-word occurrences of `name`, files in path order."""
    rx = re.compile(rf"(?<![\w$]){re.escape(name)}(?![\w$])")
    out: dict[str, list[tuple[int, str]]] = {}
    for path, text in _files(root):
        if name not in text:
            continue
        for n, line in enumerate(split_lines(text), 1):
            if rx.search(line):
                out.setdefault(path, []).append((n, line))
    return out


def _check_name(name: str) -> str:
    name = name.strip()
    if not re.fullmatch(r"[\w$.:]+", name or "-"):
        raise ToolError(f"{name!r} is not a name (letters, digits, _, $; e.g. parse_args or Parser.parse)")
    return name.rsplit(".", 1)[-1].rsplit("::", 1)[-1]  # Parser.parse, Type::new: the member's own name


def _line(path: str, n: int, text: str) -> str:
    text = text.strip()
    return f"{path}:{n}: {text if len(text) <= MAX_LINE else text[:MAX_LINE] + ' [...]'}"


def _prototype(line: str) -> bool:
    """A signature with no body (`int add(int a, int b);`, an abstract method), not a one-line definition that
    ends with a semicolon (`int counter = 0;`, `pub struct Unit;`, `type A = B;`)."""
    line = line.rstrip()
    return line.endswith(";") and "(" in line and "=" not in line


def definition(ctx: ToolContext, name: str) -> str:
    short = _check_name(name)
    found = find_definitions(ctx.root.resolve(), short)
    if not found:
        used = find_references(ctx.root.resolve(), short)
        if used:
            return (f"no definition of {short!r} found (code in a language the map parses); it occurs in "
                    f"{len(used)} files: {', '.join(used)} (see references)")
        return f"no definition of {short!r} and no occurrence of it in the project"
    paths = list(dict.fromkeys(d.path for d in found))
    valued = [d for d in found if d.value is not None]
    # a first line in the words an answer takes, then each definition as grep shows a line
    if len(valued) == 1:  # one constant (beside, say, a function of the same name elsewhere): its value first
        v = valued[0]
        others = [p for p in paths if p != v.path]
        head = f"{short} is set to {v.value} in {v.path} (line {v.line})"
        head += (f"; also defined in {', '.join(others)}" if others else "") + ":\n"
    elif len(paths) > 1:  # each file with its line, in the words of one (a count is no answer to copy); where
        # some are declarations only (a C prototype, an abstract method: no body), the definitions come first
        bare = {p for p in paths if all(_prototype(d.text) for d in found if d.path == p)}
        bodies = [p for p in paths if p not in bare] or paths
        first = {p: next(d.line for d in found if d.path == p) for p in paths}
        head = f"{short} is defined in " + " and in ".join(f"{p} (line {first[p]})" for p in bodies[:3])
        head += f" and {len(bodies) - 3} more files" if len(bodies) > 3 else ""
        declared = [p for p in paths if p not in bodies]
        head += f"; declared in {', '.join(declared)}" if declared else ""
        head += ":\n"
    else:
        at = f"line {found[0].line}" if len(found) == 1 else "lines " + ", ".join(str(d.line) for d in found)
        raises = list(dict.fromkeys(r for d in found for r in d.raises))
        head = f"{short} is defined in {paths[0]} ({at})" + (f" and raises {', '.join(raises)}" if raises else "")
        head += ":\n"
    lines = [_line(d.path, d.line, d.text) for d in found[:MAX_SHOWN]]
    more = f"\n[... {len(found) - MAX_SHOWN} more definitions]" if len(found) > MAX_SHOWN else ""
    return head + "\n".join(lines) + more


def references(ctx: ToolContext, name: str) -> str:
    short = _check_name(name)
    found = find_references(ctx.root.resolve(), short)
    if not found:
        return f"{short!r} occurs nowhere in the project (whole words, case-sensitive)"
    total = sum(len(v) for v in found.values())
    files = f"{short} is used in {len(found)} files: {', '.join(found)}" if len(found) > 1 else \
        f"{short} is used in 1 file: {next(iter(found))}"
    counts = ", ".join(str(len(v)) for v in found.values())
    lines = [_line(p, n, t) for p, hits in found.items() for n, t in hits][:MAX_SHOWN]
    more = f"\n[... {total - MAX_SHOWN} more lines]" if total > MAX_SHOWN else ""
    # after a long listing the distinct files once more, last: what a reader answering "which files" copies
    again = f"\n({files})" if len(lines) > 5 else ""
    return f"{files} ({total} lines: {counts})\n" + "\n".join(lines) + more + again


_NAME = {"type": "string", "description": "a class, function, method, type, constant or variable name",
         "maxLength": MAX_NAME_ARG}

TOOLS = (
    Tool(
        "definition",
        "Where a name is defined, in any language of the project: the files, then 'path:line: signature' (a "
        "variable or constant with its value) for each class, function, method, type, constant or variable of "
        "that name.",
        {"type": "object", "properties": {"name": _NAME}, "required": ["name"]},
        False,
        kwargs_runner(definition),
    ),
    Tool(
        "references",
        "Where a name is used: the distinct files first (with their line counts), then 'path:line: text' for each "
        "whole-word, case-sensitive occurrence (definitions included), then the files again after a long list.",
        {"type": "object", "properties": {"name": _NAME}, "required": ["name"]},
        False,
        kwargs_runner(references),
    ),
)
