"""Agent tasks with checkable answers, built from a real source tree or a case-file folder: the questions of
scripts/agent_traces.py (training traces) and benchmarks/agent_eval.py (the evaluation), which draw them from
disjoint trees (distill.py's package split: the evaluation only from held-out packages).

Kinds, each answered by one real tool call whose result holds the answer:
  where     "Where is X defined?"            grep (class|def) X -> the one file that defines it
  returns   "What does f return?"            grep def f -> the signature's return annotation
  uses      "Which files use X?"             grep \\bX\\b -> every file (2 to 4) that names it
  value     "What is NAME set to?"           grep ^NAME = -> the constant's value and file
  raises    "What does f raise?"             read_file of f's lines -> the one exception class f raises (throws)
  document  "Which document and page say .." grep "<phrase>" -> file and [page N] / [section] anchor

A task's `expect` is a list of groups of strings: the answer is exact when each group has a member that appears in
it (compared without case, spaces and backticks).
"""

from __future__ import annotations

import ast
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deltamem.tools import ToolContext, default_tools, project_files, run_tool

KINDS = ("where", "returns", "uses", "value", "raises", "document")


@dataclass
class Task:
    kind: str
    question: str
    calls: list[tuple[str, dict]]  # the tool calls that answer it, in order
    expect: list[list[str]]
    facts: dict = field(default_factory=dict)  # what the ideal answer is written from
    results: list[tuple[bool, str]] = field(default_factory=list)  # the calls' real results, once checked

    def answer(self) -> str:
        """The ideal final answer (training traces), citing the path."""
        f = self.facts
        if self.kind == "where":
            return f"`{f['name']}` is defined in `{f['path']}` (line {f['line']})."
        if self.kind == "returns":
            return f"`{f['name']}` returns `{f['type']}` (defined in `{f['path']}`, line {f['line']})."
        if self.kind == "uses":
            paths = [f"`{p}`" for p in f["paths"]]
            listed = ", ".join(paths[:-1]) + " and " + paths[-1]
            return f"`{f['name']}` is used in {len(paths)} files: {listed}."
        if self.kind == "value":
            return f"`{f['name']}` is set to `{f['value']}` in `{f['path']}` (line {f['line']})."
        if self.kind == "raises":
            return f"`{f['name']}` raises `{f['exception']}` (defined in `{f['path']}`, line {f['line']})."
        where = f"`{f['path']}`, {f['anchor']}" if f["anchor"] else f"`{f['path']}`"  # an e-mail has one part
        return f"{where}: {f['sentence']}"


def _norm(s: str) -> str:
    """Lower case, quotes and backticks as spaces, no spaces inside brackets or after commas, single spaces."""
    s = re.sub(r"[`'\"]", " ", s.lower())
    s = re.sub(r"\s*([,\[\]()])\s*", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def exact(task: Task | list[list[str]], answer: str) -> bool:
    """Each group of the task's expect has a member in the answer, as a whole token: `str` is not found in
    `string`, nor `1` in `10` (compared without case, spaces, quotes and backticks)."""
    a = _norm(answer)
    expect = task.expect if isinstance(task, Task) else task
    return all(any(_whole(_norm(x), a) for x in group) for group in expect)


def _whole(x: str, a: str) -> bool:
    """x in a, not inside a longer word: bounded where x begins or ends with a word character ('[a-z]' has no
    word edge to respect, and _norm glues brackets to their neighbours)."""
    before = "(?<![a-z0-9_])" if x[:1].isalnum() or x[:1] == "_" else ""
    after = "(?![a-z0-9_])" if x[-1:].isalnum() or x[-1:] == "_" else ""
    return re.search(before + re.escape(x) + after, a) is not None


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


def _grep_count(files: list[tuple[str, str]], pattern: str) -> tuple[int, Counter]:
    rx = re.compile(pattern)
    per = Counter()
    for path, text in files:
        for line in text.splitlines():
            if rx.search(line):
                per[path] += 1
    return sum(per.values()), per


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
    return [t for t in tasks if _consistent(root, t)]


def _code_task(k: str, name: str, kind: str, path: str, line: int, node, src: str, files, rng) -> Task | None:
    """A task of kind k about `name` (a definition of `kind` at path:line), or None if the name does not suit it."""
    if k == "where" and kind in ("class", "function"):
        pattern = f"(class|def) {name}\\b"
        if _grep_count(files, pattern)[0] == 1:
            what = "the class" if kind == "class" else "the function"
            q = rng.choice(WHERE_Q).format(what=what, name=name)
            return Task(
                "where", q, [("grep", {"pattern": pattern})], [[path]], {"name": name, "path": path, "line": line}
            )
    if k == "returns" and kind == "function" and node.returns is not None:
        ann = ast.unparse(node.returns)
        pattern = f"def {name}\\b"
        if ann != "None" and f"-> {ann}" in src and _grep_count(files, pattern)[0] == 1:
            q = rng.choice(RETURNS_Q).format(name=name)
            facts = {"name": name, "path": path, "line": line, "type": ann}
            return Task("returns", q, [("grep", {"pattern": pattern})], [[ann]], facts)
    if k == "value" and kind == "value":
        pattern = f"^{name} ="
        if _grep_count(files, pattern)[0] == 1:
            q = rng.choice(VALUE_Q).format(name=name)
            facts = {"name": name, "path": path, "line": line, "value": node}
            return Task("value", q, [("grep", {"pattern": pattern})], [[node], [path]], facts)
    if k == "uses" and kind in ("class", "function"):
        pattern = f"\\b{name}\\b"
        total, per = _grep_count(files, pattern)
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
    return [t for t in tasks if _consistent(root, t)][:n]


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
                total, per = _grep_count(files, word)
                if 2 <= len(per) <= 4 and total <= 16:
                    paths = sorted(per)
                    q = rng.choice(USES_Q).format(name=name)
                    task = Task("uses", q, [("references", {"name": name})], [[p] for p in paths],
                                {"name": name, "paths": paths})  # fmt: skip
            if task is not None:
                out[k].append(task)
                break
    tasks = [t for k in out for t in out[k]]
    return [t for t in tasks if _consistent(root, t)]


def _consistent(root: Path, task: Task) -> bool:
    """The real tool, run on the real tree, shows everything the answer states (its results kept on the task)."""
    task.results = run_calls(root, task)
    result = task.results[-1][1]
    return all(any(x in result for x in group) for group in task.expect) and "truncated" not in result


def run_calls(root: Path, task: Task) -> list[tuple[bool, str]]:
    ctx, tools = ToolContext(root=root), default_tools()
    return [run_tool(ctx, tools, name, args) for name, args in task.calls]


def copy_package(src: Path, dest_root: Path, suffixes: tuple[str, ...]) -> Path:
    """A repository-like copy of a source tree: dest_root/<src's name>/... with the files of these suffixes."""
    for p in src.rglob("*"):
        if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts:
            q = dest_root / src.name / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, q)
    return dest_root


def fetched_dir(source: str, folder: str, downloads: Path) -> tuple[Path, str]:
    """A source tree from a registry, downloaded once into `downloads` and unpacked there: deb:PACKAGE (apt-get
    download, dpkg-deb -x), jdk:PACKAGE (a Debian package holding the JDK's src.zip), npm:NAME@VERSION (npm
    pack) or pypi:NAME==VERSION (its source distribution: pip download); with the package file it came from (its
    version in the name). `folder` may end in a glob (a crate's
    versioned directory)."""
    kind, name = source.split(":", 1)
    dest = downloads / name.replace("@", "-").replace("==", "-")
    if not dest.is_dir():
        downloads.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=downloads))
        try:
            if kind in ("deb", "jdk"):
                _fetch(["apt-get", "download", name], tmp)
                (deb,) = tmp.glob("*.deb")
                _fetch(["dpkg-deb", "-x", str(deb), str(tmp / "x")], tmp)
                if kind == "jdk":
                    (src_zip,) = (tmp / "x").rglob("src.zip")
                    with zipfile.ZipFile(src_zip) as z:
                        z.extractall(tmp / "x", [m for m in z.namelist() if m.startswith("java.base/")])
            else:
                if kind == "pypi":
                    _fetch([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", str(tmp), name], tmp)  # fmt: skip
                else:
                    _fetch(["npm", "pack", name, "--pack-destination", str(tmp)], tmp)
                (tgz,) = [p for p in tmp.iterdir() if p.name.endswith((".tgz", ".tar.gz"))]
                with tarfile.open(tgz) as t:
                    t.extractall(tmp / "x", filter="data")
            ((tmp / "x") / ".fetched").write_text(next(p.name for p in tmp.iterdir() if p.is_file()) + "\n")
            (tmp / "x").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(dest.glob(folder))
    if not found:
        raise SystemExit(f"{source} has no folder {folder!r} (in {dest})")
    return found[-1], (dest / ".fetched").read_text().strip()


def _fetch(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise SystemExit(f"{cmd[0]} is not installed here: the {cmd[-1]} set is fetched with it")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {why[0]}")


def npm_package_dir(name: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed here: the JavaScript sets are read from the packages it bundles")
    path = Path(npm).resolve().parent.parent / "node_modules" / name
    if not path.is_dir():
        raise SystemExit(f"npm bundles no package {name!r} here ({path})")
    return path


# ---------------------------------------------------------------------------------------------- case files
# Fact templates ("the ATTRIBUTE for ENTITY is VALUE"). Training folders and the evaluation's use disjoint ones.
THEMES = {
    "train": [
        ("monthly rent", "unit {c}{n}", "{m},{k}00 EUR"),
        ("deposit", "unit {c}{n}", "{m},{k}50 EUR"),
        ("notice period", "tenant file T-{nn}", "{n} months"),
        ("inspection date", "site {w}-{n}", "{d} {mon} 2026"),
        ("service charge", "building {w}", "{k}{n} EUR a quarter"),
        ("parking fee", "bay {nn}", "{k}{n} EUR a month"),
        ("contract number", "supplier {w}", "K-{nnn}"),
        ("delivery window", "store {w}", "{n} to {m} days"),
        ("start date", "employee {w} {c}.", "{d} {mon} 2027"),
        ("annual budget", "department {w}", "{m}{k}0,000 EUR"),
    ],
    "eval": [
        ("deductible", "claim C-{nnn}", "{m}{k}0 EUR"),
        ("warranty period", "product line {w}", "{n} years"),
        ("unit price", "order PO-{nnn}", "{m}.{k}{n} EUR"),
        ("penalty rate", "project {w}", "{n}.{k}% a week"),
        ("approval date", "permit P-{nn}", "{d} {mon} 2026"),
        ("insured value", "vessel {w}", "{m}.{n} million EUR"),
        ("response deadline", "tender {w}-{n}", "{d} {mon} 2027"),
    ],
}
WORDS = (
    "Alder Birch Cedar Delta Ember Fjord Granite Harbor Iris Juniper Kestrel Larch Meadow Nimbus Onyx Pebble "
    "Quarry Raven Summit Tundra Umber Vale Willow Yarrow Zephyr".split()
)
MONTHS = "January February March April May June July August September October November December".split()
FILLER = [
    "The parties met to review the open items listed in the schedule.",
    "All amounts are stated without value added tax unless noted otherwise.",
    "This section summarises the correspondence received during the period.",
    "Copies of the signed pages are kept in the archive of the office.",
    "Questions about this document go to the administration desk.",
    "The figures below were checked against the ledger at the end of the month.",
    "Any change to these terms must be agreed in writing by both sides.",
    "The committee noted the report and asked for an update next quarter.",
]
DOC_Q = [
    "Which document states the {attr} for {entity}, and on which page?",
    "Where in the case files is the {attr} for {entity} given? Cite the file and page.",
    "Which file and page give the {attr} for {entity}?",
]
DOCX_Q = [
    "Which document states the {attr} for {entity}, and in which section?",
    "Where in the case files is the {attr} for {entity} given? Cite the file and section.",
]
# by format: the questions (what an answer must cite beside the file: case_folder's `cite`)
FORMAT_Q = {
    "pdf": DOC_Q,
    "docx": DOCX_Q,
    "xlsx": ["Which workbook and sheet give the {attr} for {entity}?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and sheet."],
    "pptx": ["Which presentation states the {attr} for {entity}, and on which slide?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and slide."],
    "mbox": ["Which mailbox and message give the {attr} for {entity}?",
             "Where in the case files is the {attr} for {entity} given? Cite the file and message."],
    "eml": ["Which e-mail states the {attr} for {entity}?",
            "Which file in the case folder gives the {attr} for {entity}?"],
}  # fmt: skip


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        c=rng.choice("ABCDEFGH"),
        n=rng.randint(2, 9),
        m=rng.randint(1, 9),
        k=rng.randint(1, 9),
        nn=rng.randint(10, 99),
        nnn=rng.randint(1000, 9999),
        w=rng.choice(WORDS),
        d=rng.randint(1, 28),
        mon=rng.choice(MONTHS),
    )


def case_folder(root: Path, rng: random.Random, split: str, n_docs: int = 6, facts_per_doc: int = 4,
                formats: tuple[str, ...] = ("pdf", "docx")) -> list[Task]:  # fmt: skip
    """Write a folder of documents with facts in them, one question per fact. Formats, in turn: PDF (a page per
    part, fpdf2), DOCX (a heading per part, python-docx), XLSX (a sheet per part, openpyxl), PPTX (a slide per part,
    python-pptx), mailbox (a message per part, the email package) and e-mail (one message)."""
    root.mkdir(parents=True, exist_ok=True)
    themes = THEMES[split]
    tasks, seen = [], set()
    for i in range(n_docs):
        facts = []
        while len(facts) < facts_per_doc:
            attr, ent, val = rng.choice(themes)
            entity, value = _fill(ent, rng), _fill(val, rng)
            if (attr, entity) not in seen:
                seen.add((attr, entity))
                facts.append((attr, entity, value))
        kind = rng.choice(["report", "memo", "schedule", "minutes", "review", "letter"])
        stem = f"{kind}_{rng.choice(WORDS).lower()}_{i + 1}"
        fmt = formats[i % len(formats)]
        name = f"{stem}.{fmt}"
        sections = [[rng.choice(FILLER) for _ in range(rng.randint(2, 4))] for _ in range(rng.randint(3, 5))]
        headings = [
            f"{rng.choice(['Terms', 'Schedule', 'Findings', 'Costs', 'Notes', 'Dates'])} {j + 1}"
            for j in range(len(sections))
        ]
        if fmt == "eml":  # one message: one part
            sections, headings = [sum(sections, [])], [f"{stem.replace('_', ' ').title()}"]
        placed = []
        for attr, entity, value in facts:
            j = rng.randrange(len(sections))
            sentence = f"The {attr} for {entity} is {value}."
            sections[j].insert(rng.randint(0, len(sections[j])), sentence)
            placed.append((attr, entity, sentence, j))
        _write_document(root / name, fmt, stem, headings, sections)
        for attr, entity, sentence, j in placed:
            anchor = {"pdf": f"page {j + 1}", "docx": f"section {headings[j]}", "xlsx": f"sheet {headings[j]}",
                      "pptx": f"slide {j + 1}", "mbox": f"message {j + 1}", "eml": ""}[fmt]  # fmt: skip
            q = rng.choice(FORMAT_Q[fmt]).format(attr=attr, entity=entity)
            cite = {"pdf": [f"page {j + 1}", f"p. {j + 1}", f"p.{j + 1}"], "docx": [headings[j]], "xlsx": [headings[j]],
                    "pptx": [f"slide {j + 1}"], "mbox": [f"message {j + 1}", headings[j]]}.get(fmt)  # fmt: skip
            expect = [[name], cite] if cite else [[name]]
            facts = {"path": name, "anchor": anchor, "sentence": sentence}
            tasks.append(Task("document", q, [("grep", {"pattern": f"{attr} for {entity}"})], expect, facts))
    return [t for t in tasks if _consistent(root, t)]


def _write_document(path: Path, fmt: str, title: str, headings: list[str], parts: list[list[str]]) -> None:
    if fmt == "pdf":
        from fpdf import FPDF

        doc = FPDF()
        for lines in parts:
            doc.add_page()
            doc.set_font("helvetica", size=11)
            for line in lines:
                doc.multi_cell(0, 7, line, new_x="LMARGIN", new_y="NEXT")
        doc.output(str(path))
    elif fmt == "docx":
        import docx

        d = docx.Document()
        d.add_heading(title.replace("_", " ").title(), 1)
        for h, lines in zip(headings, parts, strict=True):
            d.add_heading(h, 2)
            for line in lines:
                d.add_paragraph(line)
        d.save(path)
    elif fmt == "xlsx":
        import openpyxl

        wb = openpyxl.Workbook()
        wb.remove(wb.active)
        for h, lines in zip(headings, parts, strict=True):
            sheet = wb.create_sheet(h)
            sheet.append(["#", "note"])
            for n, line in enumerate(lines, 1):
                sheet.append([n, line])
        wb.save(path)
    elif fmt == "pptx":
        from pptx import Presentation

        p = Presentation()
        for h, lines in zip(headings, parts, strict=True):
            slide = p.slides.add_slide(p.slide_layouts[1])
            slide.shapes.title.text, slide.placeholders[1].text = h, "\n".join(lines)
        p.save(path)
    else:  # mbox, eml
        import mailbox
        from email.message import EmailMessage

        def message(subject: str, lines: list[str], n: int) -> EmailMessage:
            m = EmailMessage()
            m["From"], m["To"], m["Subject"] = "office@example.org", "files@example.org", subject
            m["Date"] = f"Mon, {n + 1} Jun 2026 09:00:00 +0000"
            m.set_content("\n\n".join(lines) + "\n")
            return m

        if fmt == "eml":
            path.write_bytes(message(headings[0], parts[0], 0).as_bytes())
        else:
            box = mailbox.mbox(path)
            for n, (h, lines) in enumerate(zip(headings, parts, strict=True)):
                box.add(message(h, lines, n))
            box.close()
