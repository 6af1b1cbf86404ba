"""scripts/agent_tasks.py's code questions (where, returns, uses, value, raises) from a source tree: Python's files read
by its ast module, the other languages' (LANGUAGES) by regular expressions over top-level lines, never by the tools
under test."""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from pathlib import Path

from agent_tasks_core import Task, consistent, grep_count

from deltamem.tools import project_files

WHERE_Q = [
    "Where is {what} `{name}` defined?",
    "Which file defines {what} `{name}`?",
    "In which file is {what} {name} defined?",
    "Where can I find the definition of `{name}`?",
]
RETURNS_Q = [
    "What does `{name}` return?",
    "What type does the function {name} return?",
    "What is the return type of `{name}`?",
]
RAISES_Q = ["What does `{name}` raise?", "Which exception can {name} raise?", "What error does `{name}` throw?"]
USES_Q = ["Which files use `{name}`?", "In which files is {name} used?", "Which modules refer to `{name}`?"]
VALUE_Q = ["What is `{name}` set to?", "What is the value of {name}?", "Which value does the constant `{name}` have?"]


def _python_index(root: Path) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """name -> [(kind, path, line, node, def line)] for top-level definitions and constants; and every file's
    (path, text)."""
    defs: dict[str, list] = {}
    files = []
    for rel in project_files(root):
        if rel.suffix != ".py":
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        path = rel.as_posix()
        files.append((path, text))
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                defs.setdefault(node.name, []).append((kind, path, node.lineno, node, lines[node.lineno - 1]))
            elif (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and re.fullmatch(r"[A-Z][A-Z0-9_]{3,}", node.targets[0].id)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int | float | str)
                and not isinstance(node.value.value, bool)
                and node.lineno == node.end_lineno
            ):
                seg = ast.get_source_segment(text, node.value) or ""
                if 0 < len(seg) <= 40:
                    defs.setdefault(node.targets[0].id, []).append(
                        ("value", path, node.lineno, seg, lines[node.lineno - 1])
                    )
    return defs, files

def python_tasks(root: Path, rng: random.Random, per_kind: int) -> list[Task]:
    """Up to per_kind tasks of each code kind from the Python files under root, each checked against the real
    tool's output (the tool result must contain what the answer states)."""
    defs, files = _python_index(root)
    names = sorted(n for n, d in defs.items() if len(d) == 1 and len(n) >= 4 and not n.startswith("_"))
    rng.shuffle(names)
    out: dict[str, list[Task]] = {k: [] for k in ("where", "returns", "uses", "value")}
    for name in names:
        kind, path, line, node, src = defs[name][0]
        for k in rng.sample(list(out), len(out)):  # each name asked about once, of a kind drawn at random
            if len(out[k]) < per_kind:
                task = _code_task(k, name, kind, path, line, node, src, files, rng)
                if task is not None:
                    out[k].append(task)
                    break
    tasks = [t for k in out for t in out[k]]
    return [t for t in tasks if consistent(root, t)]


def _code_task(k: str, name: str, kind: str, path: str, line: int, node, src: str, files, rng) -> Task | None:
    """A task of kind k about `name` (a definition of `kind` at path:line), or None if the name does not suit it."""
    if k == "where" and kind in ("class", "function"):
        pattern = f"(class|def) {name}\\b"
        if grep_count(files, pattern)[0] == 1:
            what = "the class" if kind == "class" else "the function"
            q = rng.choice(WHERE_Q).format(what=what, name=name)
            return Task(
                "where", q, [("grep", {"pattern": pattern})], [[path]], {"name": name, "path": path, "line": line}
            )
    if k == "returns" and kind == "function" and node.returns is not None:
        ann = ast.unparse(node.returns)
        pattern = f"def {name}\\b"
        if ann != "None" and f"-> {ann}" in src and grep_count(files, pattern)[0] == 1:
            q = rng.choice(RETURNS_Q).format(name=name)
            facts = {"name": name, "path": path, "line": line, "type": ann}
            return Task("returns", q, [("grep", {"pattern": pattern})], [[ann]], facts)
    if k == "value" and kind == "value":
        pattern = f"^{name} ="
        if grep_count(files, pattern)[0] == 1:
            q = rng.choice(VALUE_Q).format(name=name)
            facts = {"name": name, "path": path, "line": line, "value": node}
            return Task("value", q, [("grep", {"pattern": pattern})], [[node], [path]], facts)
    if k == "uses" and kind in ("class", "function"):
        pattern = f"\\b{name}\\b"
        total, per = grep_count(files, pattern)
        if 2 <= len(per) <= 4 and total <= 16:
            paths = sorted(per)
            q = rng.choice(USES_Q).format(name=name)
            return Task(
                "uses", q, [("grep", {"pattern": pattern})], [[p] for p in paths], {"name": name, "paths": paths}
            )
    return None


def raise_tasks(root: Path, rng: random.Random, n: int) -> list[Task]:
    """Up to n "what does f raise" tasks: functions and methods (of any depth) whose body raises (or, in
    JavaScript, TypeScript and Java, throws) instances of exactly one class, by name; read_file of the function's
    lines shows it."""
    found: dict[str, list] = {}
    for rel in project_files(root):
        path = rel.as_posix()
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if rel.suffix == ".py":
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    raised = set()
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Raise) and sub.exc is not None:
                            exc = sub.exc.func if isinstance(sub.exc, ast.Call) else sub.exc
                            raised.add(exc.id if isinstance(exc, ast.Name) else None)
                    found.setdefault(node.name, []).append((path, node.lineno, node.end_lineno, raised))
        elif rel.suffix in _THROWING:
            lines = text.splitlines()
            for i, line in enumerate(lines):
                m = _THROWING[rel.suffix].match(line)
                if m is None:
                    continue
                end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(m[1] + "}")), None)
                if end is None:
                    continue
                raised = set(re.findall(r"\bthrow\s+new\s+([A-Za-z_$][\w$]*)", "\n".join(lines[i : end + 1])))
                if re.search(r"\bthrow\s+(?!new\b)", "\n".join(lines[i : end + 1])):
                    raised.add(None)  # a rethrow or a thrown value: no one class to name
                found.setdefault(m[2], []).append((path, i + 1, end + 1, raised))
    names = sorted(k for k, v in found.items() if len(v) == 1 and len(k) >= 4 and not k.startswith("_")
                   and len(v[0][3]) == 1 and None not in v[0][3] and next(iter(v[0][3]))[:1].isupper())  # fmt: skip
    rng.shuffle(names)
    tasks = []
    for name in names[: n * 2]:
        path, start, end, raised = found[name][0]
        if end - start > 60:
            continue
        exc = next(iter(raised))
        q = rng.choice(RAISES_Q).format(name=name)
        tasks.append(Task("raises", q, [("read_file", {"path": path, "start_line": start, "end_line": end})],
                          [[exc]], {"name": name, "path": path, "line": start, "exception": exc}))  # fmt: skip
    return [t for t in tasks if consistent(root, t)][:n]


# Other languages, read by regular expressions over top-level lines (independent of the tools' tree-sitter index):
# each pattern's groups name what a line defines: f a function, c a class or type, v a variable with its value rhs
_IDENT = r"[A-Za-z_$][\w$]*"
_PUB = r"(?:pub(?:\([^)]*\))?\s+)?"
_JAVA_MODS = r"(?:(?:public|protected|private|static|final|abstract|synchronized|native|default|strictfp)\s+)*"
# a Java method's first line after its indentation: modifiers, type parameters, return type, name (group f), "("
_JAVA_METHOD = rf"{_JAVA_MODS}(?:<[^>]+>\s+)?[\w<>\[\], ?]+\s+(?P<f>[a-z]\w*)\s*\([^;]*$"


@dataclass(frozen=True)
class RegexLanguage:
    name: str
    suffixes: tuple[str, ...]
    defs: tuple[re.Pattern, ...]
    word: str = r"\w"  # what a name is made of, for whole-word counts
    literal: re.Pattern = re.compile(r"-?\d[\d_.]*|'[^'\\]{0,38}'|\"[^\"\\]{0,38}\"")
    function_rhs: re.Pattern | None = None  # a variable bound to a function counts as a function
    block: re.Pattern | None = None  # opens a block whose lines define one name each (Go's const ( ... ))
    block_item: re.Pattern | None = None
    skip: re.Pattern | None = None  # files left out (tests, declarations, minified)


_JS_FUNCTION = re.compile(rf"(?:async\s+)?(?:function\b|\([^)]*\)(?:\s*:\s*[^=]+?)?\s*=>|{_IDENT}\s*=>)")
LANGUAGES = {
    "javascript": RegexLanguage(
        "javascript", (".js", ".mjs", ".cjs"),
        (re.compile(rf"^(?:export\s+(?:default\s+)?)?(?:(?:async\s+)?function\*?\s+(?P<f>{_IDENT})\s*\("
                    rf"|class\s+(?P<c>{_IDENT})|(?:const|let|var)\s+(?P<v>{_IDENT})\s*=\s*(?P<rhs>.*?);?\s*$)"),),
        word=r"[\w$]", function_rhs=_JS_FUNCTION, skip=re.compile(r"\.min\.js$"),
    ),
    "typescript": RegexLanguage(
        "typescript", (".ts", ".tsx", ".mts"),
        (re.compile(rf"^(?:export\s+(?:default\s+)?)?(?:declare\s+)?(?:(?:async\s+)?function\*?\s+(?P<f>{_IDENT})"
                    rf"\s*[<(]|(?:abstract\s+)?(?:class|interface|enum)\s+(?P<c>{_IDENT})|type\s+(?P<c2>{_IDENT})\b"
                    rf".*=|(?:const|let|var)\s+(?P<v>{_IDENT})(?:\s*:\s*[^=]+?)?\s*=\s*(?P<rhs>.*?);?\s*$)"),),
        word=r"[\w$]", function_rhs=_JS_FUNCTION, skip=re.compile(r"\.d\.[cm]?ts$|\.test\.tsx?$|\.spec\.tsx?$"),
    ),
    "go": RegexLanguage(
        "go", (".go",),
        (re.compile(r"^func\s+(?P<f>[A-Za-z_]\w*)\s*[\[(]"),  # functions; methods (func (r T) M) left out
         re.compile(r"^type\s+(?P<c>[A-Za-z_]\w*)\s+(?:struct|interface)\b"),
         re.compile(r"^(?:const|var)\s+(?P<v>[A-Za-z_]\w*)(?:\s+[\w.]+)?\s*=\s*(?P<rhs>.+?)\s*(?://.*)?$")),
        block=re.compile(r"^(?:const|var)\s+\($"),
        block_item=re.compile(r"^\t(?P<v>[A-Za-z_]\w*)(?:\s+[\w.]+)?\s*=\s*(?P<rhs>.+?)\s*(?://.*)?$"),
        skip=re.compile(r"_test\.go$"),
    ),
    "rust": RegexLanguage(
        "rust", (".rs",),
        (re.compile(rf"^{_PUB}(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?(?:extern\s+\"C\"\s+)?fn\s+(?P<f>[A-Za-z_]\w*)"),
         re.compile(rf"^{_PUB}(?:struct|enum|trait|union)\s+(?P<c>[A-Za-z_]\w*)"),
         re.compile(rf"^{_PUB}(?:const|static)\s+(?P<v>[A-Z][A-Z0-9_]*)\s*:\s*[^=]+=\s*(?P<rhs>.+?);\s*$")),
    ),
    "java": RegexLanguage(
        "java", (".java",),
        (re.compile(rf"^{_JAVA_MODS}(?:class|interface|enum|record)\s+(?P<c>[A-Za-z_]\w*)"),
         re.compile(rf"^ {{4}}{_JAVA_MODS}static\s+final\s+[\w<>\[\]]+\s+(?P<v>[A-Z][A-Z0-9_]*)\s*=\s*(?P<rhs>.+?);"),
         re.compile(rf"^ {{4}}{_JAVA_METHOD}")),
    ),
    "c": RegexLanguage(
        "c", (".c", ".h"),
        # a definition on one line (a prototype ends in ";"), its return type before the name: `static int f(`;
        # a struct, union or enum with its body; a macro bound to a literal (a function-like macro has "(" at once)
        (re.compile(r"^(?:(?:static|inline|extern|const|unsigned|signed|struct|enum|union)\s+)*[A-Za-z_]\w*[\s*]+"
                    r"(?P<f>[A-Za-z_]\w*)\s*\([^;]*$"),
         re.compile(r"^(?:typedef\s+)?(?:struct|union|enum)\s+(?P<c>[A-Za-z_]\w*)\s*\{"),
         re.compile(r"^#\s*define\s+(?P<v>[A-Za-z_]\w*)[ \t]+(?P<rhs>[^\s(].*?)\s*(?:/[*/].*)?$")),
        literal=re.compile(r"-?\d[\d.]*[uUlL]*|\"[^\"\\]{0,38}\""),
    ),
}
JS_SUFFIXES = LANGUAGES["javascript"].suffixes
# a function's first line where `throw new X` names what it throws: (indentation, name); its body ends at the first
# line of that indentation starting with "}"
_JS_HEAD = re.compile(rf"^(\s*)(?:export\s+)?(?:async\s+)?function\*?\s+({_IDENT})\s*[<(]")
_JAVA_HEAD = re.compile(rf"^(\s+){_JAVA_METHOD}")
_THROWING = {**dict.fromkeys(JS_SUFFIXES + LANGUAGES["typescript"].suffixes, _JS_HEAD), ".java": _JAVA_HEAD}


def _regex_index(root: Path, lang: RegexLanguage) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """As _python_index, for the files of one language under root: top-level functions (declared, or a variable
    bound to a function), classes and types, and constants bound to a number or string literal. The files that
    `lang.skip` names (tests, declarations) define nothing here but are read (for the uses questions' counts)."""
    defs: dict[str, list] = {}
    files = []
    for rel in project_files(root):
        if rel.suffix not in lang.suffixes:
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        path = rel.as_posix()
        files.append((path, text))
        if lang.skip and lang.skip.search(rel.name):
            continue
        in_block = False
        for n, line in enumerate(text.splitlines(), 1):
            if in_block:
                in_block = not line.startswith(")")
                m = lang.block_item.match(line) if in_block else None
            elif lang.block is not None and lang.block.match(line):
                in_block, m = True, None
            else:
                m = next((m for rx in lang.defs if (m := rx.match(line))), None)
            if m is None:
                continue
            got = {k: v for k, v in m.groupdict().items() if v is not None}
            if "f" in got or "c" in got or "c2" in got:
                kind = "function" if "f" in got else "class"
                defs.setdefault(got.get("f") or got.get("c") or got["c2"], []).append((kind, path, n, None, line))
            elif lang.function_rhs is not None and lang.function_rhs.match(got["rhs"]):
                defs.setdefault(got["v"], []).append(("function", path, n, None, line))
            elif re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{3,}", got["v"]) and lang.literal.fullmatch(got["rhs"]) and (
                got["v"].isupper() or lang.name == "go"  # Go's constants are named like any other name
            ):
                defs.setdefault(got["v"], []).append(("value", path, n, got["rhs"], line))
            else:
                defs.setdefault(got["v"], []).append(("variable", path, n, None, line))
    return defs, files


def code_tasks(root: Path, rng: random.Random, per_kind: int, language: str) -> list[Task]:
    """Up to per_kind tasks of the kinds where, uses and value from one language's files under root (read by
    LANGUAGES' regular expressions), each checked against the real tool's output."""
    lang = LANGUAGES[language]
    defs, files = _regex_index(root, lang)
    names = sorted(n for n, d in defs.items() if len(d) == 1 and len(n) >= 4 and not n.startswith("_"))
    rng.shuffle(names)
    out: dict[str, list[Task]] = {k: [] for k in ("where", "uses", "value")}
    for name in names:
        kind, path, line, value, _ = defs[name][0]
        word = f"(?<!{lang.word}){re.escape(name)}(?!{lang.word})"
        for k in rng.sample(list(out), len(out)):
            if len(out[k]) >= per_kind:
                continue
            task = None
            if k == "where" and kind in ("class", "function"):
                what = "the function" if kind == "function" else "the type" if language == "c" else "the class"
                q = rng.choice(WHERE_Q).format(what=what, name=name)
                task = Task("where", q, [("definition", {"name": name})], [[path]],
                            {"name": name, "path": path, "line": line})  # fmt: skip
            elif k == "value" and kind == "value":
                q = rng.choice(VALUE_Q).format(name=name)
                task = Task("value", q, [("definition", {"name": name})], [[value], [path]],
                            {"name": name, "path": path, "line": line, "value": value})  # fmt: skip
            elif k == "uses" and kind in ("class", "function"):
                total, per = grep_count(files, word)
                if 2 <= len(per) <= 4 and total <= 16:
                    paths = sorted(per)
                    q = rng.choice(USES_Q).format(name=name)
                    task = Task("uses", q, [("references", {"name": name})], [[p] for p in paths],
                                {"name": name, "paths": paths})  # fmt: skip
            if task is not None:
                out[k].append(task)
                break
    tasks = [t for k in out for t in out[k]]
    return [t for t in tasks if consistent(root, t)]
