"""definition and references (tools/symbols.py): definitions per language checked against what each source
defines (Python against the standard library's own `ast` over a real package), and references against a plain
whole-word count of the files."""

import ast
import re
import shutil
import sysconfig
from pathlib import Path

from deltamem.tools import ToolContext, default_tools
from deltamem.tools.base import run_tool
from deltamem.tools.symbols import definitions, find_definitions
from tests.repos import git_repo

SOURCES = {
    "web/app.ts": "export class Cart extends Base {\n  total(tax: number): number { return 1 }\n}\n"
    "export function checkout(cart: Cart): void { const local = 2 }\nexport const MAX_ITEMS = 40\n"
    "interface Item { price: number }\ntype Id = string\n",
    "web/ui.js": "class Button { click(e) { let inner = e } }\nfunction render(el) {}\nvar retries = 3, delay = 5\n",
    "svc/main.go": "package main\nconst Port = 8080\nvar (\n\tName, Mode = \"a\", \"b\"\n)\n"
    "type Server struct { port int }\nfunc (s *Server) Serve(addr string) error { x := 1; return nil }\n",
    "core/lib.rs": "pub const LIMIT: u64 = 9;\nstatic GREETING: &str = \"hi\";\npub struct Ledger { n: u64 }\n"
    "impl Ledger { pub fn add(&mut self, x: u64) { let y = x; } }\npub trait Store { fn get(&self) -> u64; }\n",
    "java/Shop.java": "public class Shop {\n  static final int FEE = 3;\n  public Shop() {}\n"
    "  int price(String item) { int k = 1; return k; }\n}\n",
    "py/util.py": "def convert(\n    value,\n    strict=False,\n) -> dict:\n    return {}\n",
    "py/checks.py": "def check(x):\n    if x < 0:\n        raise ValueError('negative')\n    try:\n        pass\n"
    "    except OSError as e:\n        raise\n    def inner():\n        raise KeyError(x)\n    raise errors.Invalid\n",
    "web/guard.js": "function guard(v) {\n  if (!v) throw new TypeError('empty')\n  const e = new Error('x')\n"
    "  throw e\n}\n",
    "native/calc.h": "#define SCALE 10\nstruct point { int x; };\nint add(int a, int b);\n"
    "union number { int i; float f; };\n",
    "native/calc.c": "#include \"calc.h\"\nint counter = 0;\n"
    "static int twice(struct point *p) { int t = 2; return t; }\n",
}
# (name, line) of every definition each file makes (struct and class fields included), written from the sources
# above by hand
EXPECTED = {
    "web/app.ts": {("Cart", 1), ("total", 2), ("checkout", 4), ("MAX_ITEMS", 5), ("Item", 6), ("Id", 7)},
    "web/ui.js": {("Button", 1), ("click", 1), ("render", 2), ("retries", 3), ("delay", 3)},
    "svc/main.go": {("Port", 2), ("Name", 4), ("Mode", 4), ("Server", 6), ("port", 6), ("Serve", 7)},
    "core/lib.rs": {("LIMIT", 1), ("GREETING", 2), ("Ledger", 3), ("n", 3), ("add", 4), ("Store", 5), ("get", 5)},
    "java/Shop.java": {("Shop", 1), ("FEE", 2), ("Shop", 3), ("price", 4)},
    "py/util.py": {("convert", 1)},
    "py/checks.py": {("check", 1), ("inner", 8)},
    "web/guard.js": {("guard", 1)},
    "native/calc.h": {("SCALE", 1), ("point", 2), ("x", 2), ("add", 3), ("number", 4), ("i", 4), ("f", 4)},
    "native/calc.c": {("counter", 2), ("twice", 3)},
}


def test_definitions_per_language_are_what_each_source_defines():
    for path, text in SOURCES.items():
        found = {(d.name, d.line) for d in definitions(path, text)}
        assert found == EXPECTED[path], path


def _ast_definitions(text: str) -> set[tuple[str, int]]:
    """Classes and functions anywhere, variables assigned outside functions: Python's own parser."""
    out = set()

    def walk(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add((child.name, child.lineno if not child.decorator_list else child.decorator_list[0].lineno))
            elif isinstance(child, (ast.Assign, ast.AnnAssign)) and not in_function:
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for t in targets:
                    for n in [t] if isinstance(t, ast.Name) else getattr(t, "elts", []):
                        if isinstance(n, ast.Name):
                            out.add((n.id, child.lineno))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(text), False)
    return out


def test_python_definitions_match_ast_over_a_real_package():
    src = Path(sysconfig.get_paths()["stdlib"]) / "json"
    for f in sorted(src.glob("*.py")):
        text = f.read_text()
        found = {(d.name, d.line) for d in definitions(f.name, text)}
        # tree-sitter starts a decorated definition at its `def` line; ast at its first decorator: compare names,
        # and lines where ast's node has no decorator
        want = _ast_definitions(text)
        assert {n for n, _ in found} == {n for n, _ in want}, f.name
        plain = {(n, line) for n, line in want if (n, line) in found}
        assert len(plain) >= 0.9 * len(want), f.name


def _ctx(tmp_path) -> ToolContext:
    return ToolContext(root=git_repo(tmp_path / "repo", SOURCES))


def test_definition_tool_lists_each_defining_line(tmp_path):
    ctx, tools = _ctx(tmp_path), default_tools()
    ok, out = run_tool(ctx, tools, "definition", {"name": "add"})
    assert ok
    assert out.splitlines() == [
        "add is defined in core/lib.rs (line 4); declared in native/calc.h:",
        "core/lib.rs:4: pub fn add(&mut self, x: u64)",
        "native/calc.h:3: int add(int a, int b);",
    ]
    ok, out = run_tool(ctx, tools, "definition", {"name": "Shop.price"})  # a member by its qualified name
    assert out == "price is defined in java/Shop.java (line 4):\njava/Shop.java:4: int price(String item)"
    ok, out = run_tool(ctx, tools, "definition", {"name": "convert"})  # a signature over several lines, on one
    assert out.splitlines()[1] == "py/util.py:1: def convert( value, strict=False, ) -> dict"
    # what a function's own body raises or throws by class (not a nested function's, not a re-raise or a variable)
    ok, out = run_tool(ctx, tools, "definition", {"name": "check"})
    assert out.splitlines()[0] == "check is defined in py/checks.py (line 1) and raises ValueError, errors.Invalid:"
    ok, out = run_tool(ctx, tools, "definition", {"name": "guard"})
    assert out.splitlines()[0] == "guard is defined in web/guard.js (line 1) and raises TypeError:"
    ok, out = run_tool(ctx, tools, "definition", {"name": "MAX_ITEMS"})  # a constant with its value
    assert out.splitlines() == ["MAX_ITEMS is set to 40 in web/app.ts (line 5):", "web/app.ts:5: MAX_ITEMS = 40"]
    for name, value in (("Port", "8080"), ("LIMIT", "9"), ("FEE", "3"), ("SCALE", "10"), ("counter", "0"),
                        ("GREETING", '"hi"'), ("delay", "5")):  # Go, Rust, Java, C macro, C, Rust static, JS
        ok, out = run_tool(ctx, tools, "definition", {"name": name})
        assert out.startswith(f"{name} is set to {value} in "), out
        assert len(out.splitlines()) == 2, out  # one definition: a declaration and its declarator are one
    # a constant beside a function of the same name elsewhere (Java's ZipConstants.CENOFF, ZipUtils.CENOFF()): the
    # value first, the other files after it
    (ctx.root / "java" / "Offsets.java").write_text("class Offsets {\n    static final int CENOFF(byte[] b) {\n"
                                                   "        return b[0];\n    }\n}\n")
    (ctx.root / "java" / "Consts.java").write_text("interface Consts {\n    static final int CENOFF = 42;\n}\n")
    ok, out = run_tool(ctx, tools, "definition", {"name": "CENOFF"})
    assert out.splitlines()[0] == "CENOFF is set to 42 in java/Consts.java (line 2); also defined in java/Offsets.java:"
    assert len(out.splitlines()) == 3, out
    ok, out = run_tool(ctx, tools, "definition", {"name": "local"})  # a local variable is no definition
    assert out.startswith("no definition of 'local' found") and "web/app.ts" in out
    ok, out = run_tool(ctx, tools, "definition", {"name": "nowhere_at_all"})
    assert ok and out == "no definition of 'nowhere_at_all' and no occurrence of it in the project"
    ok, out = run_tool(ctx, tools, "definition", {"name": "a b"})
    assert not ok and "is not a name" in out


def test_references_count_whole_words_per_file(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", root, ignore=shutil.ignore_patterns("__pycache__"))
    git_repo(root, {})
    ok, out = run_tool(ToolContext(root=root), default_tools(), "references", {"name": "JSONDecodeError"})
    assert ok
    want = {}
    for f in sorted(root.glob("*.py")):
        n = sum(len(re.findall(r"(?<!\w)JSONDecodeError(?!\w)", line)) > 0 for line in f.read_text().splitlines())
        if n:
            want[f.name] = n
    total = sum(want.values())
    head = out.splitlines()[0]
    assert len(want) >= 2
    files = f"JSONDecodeError is used in {len(want)} files: " + ", ".join(sorted(want))
    assert head == f"{files} ({total} lines: " + ", ".join(str(n) for _, n in sorted(want.items())) + ")"
    assert len(out.splitlines()) == 1 + min(total, 40) + (total > 5)
    if total > 5:
        assert out.splitlines()[-1] == f"({files})"


def test_where_the_grammar_gives_up_a_declaration_keyword_still_names_the_definition():
    """After a syntax error tree-sitter cannot recover from (a function being written; or syntax newer than the
    grammar, as immer's interface of call signatures split only by new lines), the declarations that follow are
    still found by their keywords."""
    text = ("export interface A {\n\tx: number\n}\nfunction (((\nexport interface B {\n\ty: number\n}\n"
            "export function c() {}\n")
    assert {(d.name, d.line) for d in definitions("t.ts", text)} == {("A", 1), ("B", 5), ("c", 8)}


def test_definitions_of_a_project_read_documents_as_text(tmp_path):
    root = git_repo(tmp_path / "repo", {**SOURCES, "notes.md": "SCALE is ten.\n"})
    assert [(d.path, d.line) for d in find_definitions(root, "SCALE")] == [("native/calc.h", 1)]


def test_a_definition_comes_before_its_declarations_whatever_the_paths_order(tmp_path):
    files = {"src/api.h": "int render(int n);\n", "src/render.c": "int render(int n)\n{\n    return n;\n}\n",
             "src/zz.c": "static int render(int n) { return 2 * n; }\n",
             "src/api2.h": "int Unit(int n);\n", "src/unit.rs": "pub struct Unit;\n"}  # fmt: skip
    ctx = ToolContext(root=git_repo(tmp_path / "repo", files))
    ok, out = run_tool(ctx, default_tools(), "definition", {"name": "render"})
    assert ok and out.splitlines()[0] == (
        "render is defined in src/render.c (line 1) and in src/zz.c (line 1); declared in src/api.h:"
    )
    ok, out = run_tool(ctx, default_tools(), "definition", {"name": "Unit"})  # a one-line definition is one
    assert ok and out.splitlines()[0] == "Unit is defined in src/unit.rs (line 1); declared in src/api2.h:", out
