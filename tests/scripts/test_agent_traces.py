"""The agent's training traces and evaluation questions (scripts/agent_tasks.py, scripts/agent_traces.py), checked
against what the tests themselves wrote: a real git repository whose definitions sit in known files, case files
written with fpdf2 and python-docx whose facts sit on known pages and sections, the chat template's own rendering of
a conversation, and the tokenizer's own encoding of the replies that distill.py trains on."""

from __future__ import annotations

import json
import lzma
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.repos import git_repo

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

agent_tasks = pytest.importorskip("agent_tasks")

CORE = '''"""Core."""
TIMEOUT_SECONDS = 30
RETRY_LABEL = "again"


class Engine:
    def start(self) -> None:
        pass


def build_index(rows: list) -> dict[str, int]:
    return {}


def shared_name():
    return Engine()
'''
UTIL = """from pkg.core import Engine


def helper_function(e: Engine) -> str:
    return "x"


def shared_name():
    return 1
"""
APP = """from pkg.core import Engine
engine = Engine()
"""


@pytest.fixture()
def repo(tmp_path):
    return git_repo(
        tmp_path / "proj", {"pkg/core.py": CORE, "pkg/util.py": UTIL, "pkg/app.py": APP, "README.md": "# proj\n"}
    )


def _by(tasks, kind, name):
    return [t for t in tasks if t.kind == kind and t.facts.get("name") == name]


def test_code_tasks_point_where_the_repository_has_them(repo):
    tasks = [t for seed in range(12) for t in agent_tasks.python_tasks(repo, random.Random(seed), per_kind=20)]
    seen = {(t.kind, t.facts["name"]) for t in tasks}
    assert {("where", "Engine"), ("uses", "Engine"), ("returns", "build_index"), ("value", "TIMEOUT_SECONDS")} <= seen
    for t in tasks:
        if t.kind == "where":
            assert t.expect == [
                [{"Engine": "pkg/core.py", "build_index": "pkg/core.py"}.get(t.facts["name"], "pkg/util.py")]
            ]
        if t.kind == "uses" and t.facts["name"] == "Engine":  # the three files the name appears in
            assert t.expect == [["pkg/app.py"], ["pkg/core.py"], ["pkg/util.py"]]
        if t.kind == "returns":
            assert t.expect == [{"build_index": ["dict[str, int]"], "helper_function": ["str"]}[t.facts["name"]]]
        if t.kind == "value":
            assert t.expect == [
                {"TIMEOUT_SECONDS": ["30"], "RETRY_LABEL": ['"again"']}[t.facts["name"]],
                ["pkg/core.py"],
            ]
        assert agent_tasks.exact(t, t.answer()), t.answer()
        ok, result = agent_tasks.run_calls(repo, t)[0]
        assert ok and t.calls[0][0] == "grep"
    assert "shared_name" not in {t.facts["name"] for t in tasks}  # defined twice: no single answer
    t = next(t for t in tasks if t.kind == "where" and t.facts["name"] == "Engine")
    assert not agent_tasks.exact(t, t.answer().replace("pkg/core.py", "pkg/util.py"))
    assert agent_tasks.exact(t, t.answer().replace("`", ""))  # backticks and spacing do not matter
    assert agent_tasks.exact([["str"]], "It returns `str`.") and not agent_tasks.exact([["str"]], "a string")
    assert not agent_tasks.exact([["30"], ["pkg/core.py"]], "300 in pkg/core.py")  # whole values only
    assert not agent_tasks.exact([["pkg/core.py"]], "mypkg/core.py")
    assert agent_tasks.exact([["dict[str, int]"]], "It returns `dict[str,int]`.")


def test_case_folder_facts_sit_on_the_pages_and_sections_the_tasks_name(tmp_path):
    from deltamem.tools.documents import convert

    tasks = agent_tasks.case_folder(tmp_path / "case", random.Random(3), "eval", n_docs=4, facts_per_doc=3)
    assert len(tasks) == 12 and {t.kind for t in tasks} == {"document"}
    for t in tasks:
        text = convert(tmp_path / "case" / t.facts["path"])
        anchor = t.facts["anchor"]
        if anchor.startswith("page "):
            n = int(anchor.split()[1])
            page = text.split(f"[page {n}]\n", 1)[1].split("[page ", 1)[0]
            assert t.facts["sentence"] in page
        else:
            heading = anchor.removeprefix("section ")
            section = text.split(f"## {heading}\n", 1)[1].split("\n#", 1)[0]
            assert t.facts["sentence"] in section
        assert agent_tasks.exact(t, t.answer())
    train = {a for a, _, _ in agent_tasks.THEMES["train"]}
    assert not train & {a for a, _, _ in agent_tasks.THEMES["eval"]}  # the evaluation's facts are never trained


def test_other_formats_hold_each_fact_in_the_sheet_slide_or_message_the_task_names(tmp_path):
    """Read back with each format's own library (openpyxl, python-pptx, mailbox), not deltamem's converter."""
    import mailbox

    import openpyxl
    from pptx import Presentation

    case = tmp_path / "case"
    tasks = agent_tasks.case_folder(case, random.Random(5), "eval", n_docs=4, facts_per_doc=3,
                                    formats=("xlsx", "pptx", "mbox", "eml"))  # fmt: skip
    assert len(tasks) == 12 and {Path(t.facts["path"]).suffix for t in tasks} == {".xlsx", ".pptx", ".mbox", ".eml"}
    for t in tasks:
        path, anchor, sentence = case / t.facts["path"], t.facts["anchor"], t.facts["sentence"]
        if path.suffix == ".xlsx":
            sheet = openpyxl.load_workbook(path)[anchor.removeprefix("sheet ")]
            assert sentence in [c.value for row in sheet.iter_rows() for c in row]
        elif path.suffix == ".pptx":
            slide = Presentation(path).slides[int(anchor.split()[1]) - 1]
            assert sentence in "\n".join(s.text_frame.text for s in slide.shapes if s.has_text_frame)
        elif path.suffix == ".mbox":
            message = list(mailbox.mbox(path))[int(anchor.split()[1]) - 1]
            assert sentence in message.get_payload(decode=True).decode()
        else:
            assert anchor == "" and sentence in path.read_text()
        assert agent_tasks.exact(t, t.answer()) and t.expect[0] == [t.facts["path"]]
        assert not agent_tasks.exact(t, t.answer().replace(t.facts["path"], "other.pdf"))


GO_A = """package a

const MaxDepth = 32

const (
\tretryLimit int = 5
\tlabel = "x"
)

type Parser struct {
\tdepth int
}

func NewParser() *Parser {
\treturn &Parser{}
}

func (p *Parser) Parse(s string) error {
\treturn nil
}
"""
RUST = """pub const MAX_LEN: usize = 64;
static NAME: &str = "semver";

pub struct Version {
    major: u64,
}

impl Version {
    pub fn parse(s: &str) -> Self { todo!() }
}

pub(crate) fn compare_parts(a: u64) -> bool {
    true
}

pub enum Op {
    Exact,
}
"""
JAVA = """package zip;

public class Inflate {
    private static final int BUF_SIZE = 512;
    public static final String TAG_NAME = "inflate";

    public synchronized int inflateBytes(byte[] b, int off) throws IOException {
        return 0;
    }
}
"""
TS = """export const DRAFT_STATE: unique symbol = Symbol.for('immer-state')
export const NOTHING = 'nothing'
export interface Patch {
  op: string
}
export type Draft<T> = T
export function produce<T>(base: T): T {
  return base
}
export const isDraft = (x: unknown): boolean => false
"""
C_H = """#ifndef A_H
#define A_H
#define MAX_DEPTH 64
#define GREETING "hello"
#define SQUARE(x) ((x) * (x))
typedef struct parser {
  int depth;
} parser;
int parse_num(const char *s);
#endif
"""
C_C = """#include "a.h"
static int helper_count = 0;
static const char *skip_space(const char *s) {
  while (*s == ' ') s++;
  return s;
}
int parse_num(const char *s)
{
  return SQUARE(MAX_DEPTH) + (skip_space(s) != 0);
}
"""
SOURCES = {  # per language: files, and what the regular-expression index must find in them (name: kind, file)
    "go": ({"a.go": GO_A, "b.go": "package a\n\nfunc use() {\n\t_ = NewParser()\n}\n",
            "a_test.go": "package a\n\nfunc TestX() {}\n"},
           {"MaxDepth": ("value", "a.go"), "retryLimit": ("value", "a.go"), "label": ("value", "a.go"),
            "Parser": ("class", "a.go"), "NewParser": ("function", "a.go"), "use": ("function", "b.go")}),
    "rust": ({"src/lib.rs": RUST},
             {"MAX_LEN": ("value", "src/lib.rs"), "NAME": ("value", "src/lib.rs"), "Version": ("class", "src/lib.rs"),
              "compare_parts": ("function", "src/lib.rs"), "Op": ("class", "src/lib.rs")}),
    "java": ({"zip/Inflate.java": JAVA},
             {"Inflate": ("class", "zip/Inflate.java"), "BUF_SIZE": ("value", "zip/Inflate.java"),
              "TAG_NAME": ("value", "zip/Inflate.java"), "inflateBytes": ("function", "zip/Inflate.java")}),
    "c": ({"a.h": C_H, "a.c": C_C},  # a prototype (";") declares, defines nothing; a function-like macro no value
          {"MAX_DEPTH": ("value", "a.h"), "GREETING": ("value", "a.h"), "parser": ("class", "a.h"),
           "parse_num": ("function", "a.c"), "skip_space": ("function", "a.c")}),
    "typescript": ({"src/core.ts": TS, "src/types.d.ts": "export declare function ignored(): void\n"},
                   {"NOTHING": ("value", "src/core.ts"), "Patch": ("class", "src/core.ts"),
                    "Draft": ("class", "src/core.ts"), "produce": ("function", "src/core.ts"),
                    "isDraft": ("function", "src/core.ts"), "DRAFT_STATE": ("variable", "src/core.ts")}),
}  # fmt: skip


@pytest.mark.parametrize("language", sorted(SOURCES))
def test_other_languages_index_what_the_files_define(tmp_path, language):
    from agent_tasks_code import _regex_index

    files, want = SOURCES[language]
    root = git_repo(tmp_path / language, files)
    defs, read = _regex_index(root, agent_tasks.LANGUAGES[language])
    assert {name: (d[0][0], d[0][1]) for name, d in defs.items()} == want
    assert all(d[1] not in ("a_test.go", "src/types.d.ts") for ds in defs.values() for d in ds)  # they define nothing
    assert {p for p, _ in read} == {p for p in files if p.endswith(agent_tasks.LANGUAGES[language].suffixes)}
    tasks = [t for seed in range(6) for t in agent_tasks.code_tasks(root, random.Random(seed), 5, language)]
    assert tasks and all(agent_tasks.exact(t, t.answer()) for t in tasks)
    for t in tasks:  # answers from the index, shown by the product's own tools (tree-sitter)
        assert [want[t.facts["name"]][1]] in t.expect or t.kind == "uses"


def test_java_and_typescript_raise_tasks_name_the_one_class_thrown(tmp_path):
    body = '        if (n < 0) {\n            throw new IllegalArgumentException("negative");\n        }\n'
    java = f"class Box {{\n    public int checkedSize(int n) {{\n{body}        return n;\n    }}\n}}\n"
    ts = (
        "export function parseLimit(s: string): number {\n  if (!s) {\n    throw new RangeError('empty')\n  }\n"
        "  return 1\n}\n"
    )
    root = git_repo(tmp_path / "p", {"Box.java": java, "limit.ts": ts})
    tasks = agent_tasks.raise_tasks(root, random.Random(0), 5)
    assert {(t.facts["name"], t.facts["exception"], t.facts["path"]) for t in tasks} == {
        ("checkedSize", "IllegalArgumentException", "Box.java"),
        ("parseLimit", "RangeError", "limit.ts"),
    }


class Draws(random.Random):
    """A generator whose random() gives `values` in turn (which branches an episode takes: the look-up runs where
    the first is >= NO_LOOKUP, a miss comes first where the second is < MISS); its other draws seeded."""

    def __init__(self, *values: float):
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.5


def test_trace_episodes_play_the_runners_look_up_turn(repo):
    """As agent/runner.py runs a task: the look-up's calls in one assistant turn the model does not write (so not
    trained), their real results, and the answer read from them; without the look-up, the model's own call."""
    agent_traces = pytest.importorskip("agent_traces")
    from deltamem.agent.prompt import ChatTemplate
    from deltamem.model.gguf_file import smollm2_gguf
    from deltamem.model.tokenizer import Tokenizer

    template = ChatTemplate.for_tokenizer(Tokenizer.from_gguf(smollm2_gguf()))
    tasks = agent_tasks.python_tasks(repo, random.Random(0), per_kind=20)
    task = next(t for t in tasks if t.kind == "where" and t.facts["name"] == "build_index")
    msgs = agent_traces.episode(repo, task, Draws(0.99, 0.99))
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["auto"] and '"name": "definition"' in msgs[1]["content"] and "build_index" in msgs[1]["content"]
    assert msgs[2]["content"].startswith("[definition] ") and "pkg/core.py" in msgs[2]["content"]
    assert msgs[3]["content"].startswith("`build_index` is defined in `pkg/core.py`")
    segs = agent_traces.segments(template, [{"role": "system", "content": "S"}, *msgs])
    assert [s for s, y in segs if y] == [msgs[3]["content"] + "<|im_end|>"]  # the look-up turn is not trained
    assert msgs[1]["content"] in "".join(s for s, y in segs if not y)

    plain = agent_traces.episode(repo, task, Draws(0.1, 0.9))  # no look-up, no miss: the task's call
    assert [m["role"] for m in plain] == ["user", "assistant", "tool", "assistant"] and "auto" not in plain[1]
    assert '"name": "grep"' in plain[1]["content"] and "pkg/core.py" in plain[2]["content"]


def test_a_missed_search_is_followed_by_the_one_that_finds(tmp_path):
    """A first pattern that matches nothing literally: its real result, then the task's own call where that result
    does not show the answer, and the answer."""
    agent_traces = pytest.importorskip("agent_traces")
    root = tmp_path / "case"
    tasks = agent_tasks.case_folder(root, random.Random(3), "train", n_docs=3, facts_per_doc=2, formats=("docx",))
    for task in tasks:
        msgs = agent_traces.episode(root, task, Draws(0.0, 0.0))  # no look-up, a miss first
        calls = [m for m in msgs if m["role"] == "assistant"][:-1]
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        assert '"name": "grep"' in calls[0]["content"] and "no match" in results[0]
        if agent_traces.covers(task, results[0]):  # the ranked fallback already shows the line
            assert len(calls) == 1
        else:
            assert len(calls) == 2 and agent_traces.covers(task, results[1])
        assert task.facts["path"] in msgs[-1]["content"] and task.facts["sentence"] in msgs[-1]["content"]


def test_training_trees_are_none_of_the_evaluations():
    """Split by package: no registry package, JDK package or npm package the traces train on is one agent_eval
    asks about."""
    agent_traces = pytest.importorskip("agent_traces")
    sys.path.insert(0, str(SCRIPTS.parent / "benchmarks"))
    agent_eval = pytest.importorskip("agent_eval")
    evaluated = {(source, folder) for _, _, source, folder in agent_eval.FETCHED}
    trained = {(source, folder) for _, source, folder in agent_traces.TRAIN_FETCHED}
    assert not evaluated & trained
    jdk = lambda pairs: {f for s, f in pairs if s.startswith("jdk:")}  # noqa: E731
    assert not any(a.startswith(b) or b.startswith(a) for a in jdk(evaluated) for b in jdk(trained))
    packages = {s for s, _ in evaluated if not s.startswith("jdk:")}
    assert not packages & {s for s, _ in trained}
    assert not set(agent_eval.JS_REPOS) & {s.split(":", 1)[1] for s, _ in trained if s.startswith("npm-bundled:")}


def test_trace_segments_are_the_rendered_conversation(repo):
    agent_traces = pytest.importorskip("agent_traces")
    from deltamem.agent.prompt import ChatTemplate
    from deltamem.model.gguf_file import smollm2_gguf
    from deltamem.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    template = ChatTemplate.for_tokenizer(tok)
    tasks = agent_tasks.python_tasks(repo, random.Random(0), per_kind=20)
    task = next(t for t in tasks if t.kind == "where")
    msgs = [{"role": "system", "content": "S"}, *agent_traces.episode(repo, task, Draws(0.1, 0.9))]  # no look-up
    tool = msgs[3]
    assert tool["role"] == "tool" and tool["content"].startswith("[grep] pkg/")  # the real tool's real output
    segs = agent_traces.segments(template, msgs)
    assert "".join(s for s, _ in segs) == template.render(msgs, add_generation_prompt=False)
    assert [s for s, y in segs if y] == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]

    seqs = agent_traces.sessions(repo, "proj", "proj", tasks[:3], tok, template, 4096, random.Random(1))
    for s in seqs:
        text = "".join(x for x, _ in s["segments"])
        assert text.startswith("<|im_start|>system\nYou are deltamem") and len(tok.encode(text)) <= 4096


def test_distill_batches_train_on_the_replies_alone(repo, tmp_path):
    import torch

    agent_traces = pytest.importorskip("agent_traces")
    import distill

    from deltamem.agent.prompt import ChatTemplate
    from deltamem.model.gguf_file import smollm2_gguf
    from deltamem.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    template = ChatTemplate.for_tokenizer(tok)
    task = agent_tasks.python_tasks(repo, random.Random(0), per_kind=20)[0]
    msgs = [{"role": "system", "content": "S"}, *agent_traces.episode(repo, task, Draws(0.1, 0.9))]
    segs = agent_traces.segments(template, msgs)
    with lzma.open(tmp_path / "traces.jsonl.xz", "wt") as f:
        f.write(json.dumps({"tree": "proj", "segments": segs}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    np.random.default_rng(0).integers(3, 49152, 5000).astype(np.uint16).tofile(work / "train.u16")
    data = distill.Batches(
        work, seed=0, chat_frac=0.0, tok=tok, traces=tmp_path / "traces.jsonl.xz", trace_frac=1.0, ce_weights=(0.5, 2.0)
    )
    ids, weights = data(2, 512, torch.device("cpu"))
    expect = [t for s, _ in segs for t in tok.encode(s)]
    replies = [tok.encode(s) for s, y in segs if y]
    for row, w in zip(ids.tolist(), weights.numpy(), strict=True):
        assert row[-len(expect) :] == expect and row[-len(expect) - 1] == distill.EOT  # after code and an end of text
        assert set(np.unique(w)) == {0.0, 2.0}
        trained = [t for t, x in zip(row, w, strict=True) if x]
        assert trained == [t for r in replies for t in r]


def test_agent_eval_sets_travel_with_their_folders(tmp_path):
    """--save-sets then --sets elsewhere: the same questions and answers, each set's folder found under the new
    work directory (a machine without the registries runs what this one built)."""
    import shutil

    sys.path.insert(0, str(SCRIPTS.parent / "benchmarks"))
    agent_eval = pytest.importorskip("agent_eval")
    built = tmp_path / "built"
    root = built / "cases" / "case_files_1"
    tasks = agent_tasks.case_folder(root, random.Random(3), "eval", n_docs=2, facts_per_doc=2, formats=("xlsx",))
    sets = [{"name": "case_files_1", "root": root, "tasks": tasks, "language": "case files"}]
    agent_eval.save_sets(built / "sets.json", sets, built)
    moved = tmp_path / "elsewhere"
    shutil.copytree(built, moved)
    shutil.rmtree(built)
    (got,) = agent_eval.load_sets(moved / "sets.json", moved)
    assert got["root"] == moved / "cases" / "case_files_1" and got["root"].is_dir()
    assert [(t.question, t.expect, t.kind) for t in got["tasks"]] == [(t.question, t.expect, t.kind) for t in tasks]
    assert all(agent_tasks.exact(t, t.answer()) for t in got["tasks"])
    with pytest.raises(SystemExit, match="not under"):
        agent_eval.load_sets(moved / "sets.json", tmp_path / "nowhere")
