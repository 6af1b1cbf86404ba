"""The repository map (tools/repomap.py): definitions per language checked against what the sources define (Python
against the standard library's own `ast` over a real package), the budget, the `map` tool, and ingest feeding the
map last and again only when it changed."""

import ast
import json
import sysconfig
from pathlib import Path

import pytest

from deltamem.agent.prompt import MAP_PATH
from deltamem.tools import ToolContext, default_tools
from deltamem.tools.base import run_tool
from deltamem.tools.repomap import outline, repo_map
from tests.repos import git_repo
from tests.test_app import deltamem

SOURCES = {
    "web/app.ts": "export class Cart extends Base {\n  total(tax: number): number { return 1 }\n}\n"
    "export function checkout(cart: Cart): void {}\nconst fmt = (x: number) => `${x}`\n"
    "interface Item { price: number }\ntype Id = string\n",
    "web/ui.js": "class Button { click(e) {} }\nfunction render(el) {}\n",
    "svc/main.go": "package main\ntype Server struct { port int }\n"
    "func (s *Server) Serve(addr string) error { return nil }\nfunc main() {}\n",
    "core/lib.rs": "pub struct Ledger { n: u64 }\nimpl Ledger { pub fn add(&mut self, x: u64) {} }\n"
    "pub trait Store { fn get(&self) -> u64; }\nenum Kind { A }\nfn helper() {}\n",
    "java/Shop.java": "public class Shop { public Shop() {} int price(String item) { return 3; } }\n",
    "native/calc.c": "int add(int a, int b);\nstruct point { int x; };\nstatic int twice(int v) { return 2 * v; }\n",
    "native/geo.cpp": "namespace geo { class Shape { public: double area() const; };\n"
    "double norm(double x) { return x; } }\n",
}
EXPECTED = {
    "web/app.ts": [
        "export class Cart extends Base",
        "  total(tax: number): number",
        "export function checkout",
        "const fmt = (x: number) =>",
        "interface Item",
        "type Id = string",
    ],
    "web/ui.js": ["class Button", "  click(e)", "function render(el)"],
    "svc/main.go": ["type Server struct", "func (s *Server) Serve(addr string) error", "func main()"],
    "core/lib.rs": [
        "pub struct Ledger",
        "impl Ledger",
        "  pub fn add(&mut self, x: u64)",
        "pub trait Store",
        "  fn get(&self) -> u64;",
        "enum Kind",
        "fn helper()",
    ],
    "java/Shop.java": ["public class Shop", "  public Shop()", "  int price(String item)"],
    "native/calc.c": ["int add(int a, int b);", "struct point", "static int twice(int v)"],
    "native/geo.cpp": ["namespace geo", "class Shape", "  double area() const;", "double norm(double x)"],
}


@pytest.mark.parametrize("path", sorted(SOURCES))
def test_definitions_per_language(path):
    got = outline(path, SOURCES[path])
    for want in EXPECTED[path]:
        assert any(line.startswith(want) for line in got), (want, got)


def test_python_definitions_match_the_ast_module_on_a_real_package():
    """Every top-level class and function of the standard library's json and email packages, as `ast` finds them,
    is in the outline, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))
    assert len(files) > 10
    for f in files:
        text = f.read_text(encoding="utf-8")
        want = [
            n.name for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        got = [
            line.split("(")[0].split(":")[0].split()[-1] for line in outline(f.name, text) if not line.startswith(" ")
        ]
        assert got == want, f


def test_budget_and_importance():
    files = [(p, SOURCES[p]) for p in sorted(SOURCES)]
    full = repo_map(files, 10_000)
    assert all(line in full for lines in EXPECTED.values() for line in (x.strip() for x in lines if "(" not in x))
    small = repo_map(files, 60)
    assert len(small) <= 60 * 4
    first = files[0][0]
    assert small.splitlines()[0] == first and "(and " in small  # the first (most important) file keeps its place
    assert repo_map([], 100) == ""


def test_map_tool(tmp_path):
    repo = git_repo(tmp_path / "r", {**SOURCES, "README.md": "# demo\n"})
    tools, ctx = default_tools(), ToolContext(root=repo)
    ok, out = run_tool(ctx, tools, "map", {})
    assert ok and "README.md" in out and "func (s *Server) Serve(addr string) error" in out
    ok, out = run_tool(ctx, tools, "map", {"path": "web"})
    assert ok and "web/app.ts" in out and "svc/main.go" not in out
    assert run_tool(ctx, tools, "map", {"path": "README.md"}) == (
        False,
        "error: 'README.md' is a file, not a directory (use read_file)",
    )
    ok, out = run_tool(ctx, tools, "map", {"max_tokens": 5})
    assert not ok and "max_tokens" in out
    ok, out = run_tool(ctx, tools, "map", {"path": "../"})
    assert not ok


def test_ingest_feeds_the_map_last_and_again_only_when_it_changes(tmp_path):
    repo = git_repo(tmp_path / "r", {"app/shop.py": "def price(item):\n    return 3\n", "README.md": "# shop\n"})
    db = str(tmp_path / "m.db")
    common = ["--model", "random", "--window", "64", "--repo", str(repo), "--db", db]

    def plan():
        r = deltamem("ingest", *common, "--dry-run", "--json")
        assert r.returncode == 0, r.stderr
        return [f["path"] for f in json.loads(r.stdout)["files"]]

    assert plan() == ["app/shop.py", "README.md", MAP_PATH]
    assert deltamem("ingest", *common, "--json").returncode == 0
    assert plan() == []  # nothing changed: the map is not fed again
    (repo / "README.md").write_text("# shop\nSells fruit.\n")
    assert plan() == ["README.md"]  # same definitions, same map
    (repo / "app" / "shop.py").write_text("def price(item):\n    return 3\n\n\ndef stock(item):\n    return 1\n")
    assert plan() == ["app/shop.py", "README.md", MAP_PATH]
    assert deltamem("ingest", *common, "--map-tokens", "0", "--dry-run", "--json").returncode == 0
