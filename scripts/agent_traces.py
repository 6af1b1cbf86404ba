"""Training traces for the agent's protocol: real sessions on real trees, for scripts/distill.py --traces.

Each trace is what the agent's model consumes in a session (agent/runner.py): its real system prompt with the tool
list, files of the tree as ingest feeds them (file_message, in feed order), the repository map, then two to four
questions (scripts/agent_tasks.py), each played as the runner plays it: the look-up turn before the first reply
(agent/retrieve.py's calls and their real results, not trained: the runner writes it), then the answer where the
look-up shows it, else the model's own tool call (at times first a search that misses, then the retry) and the
answer citing the path. A fifth of the questions run without the look-up (as `--no-retrieve` does).

Trees: the permissively licensed Python packages installed here and the standard library, minus distill.py's
held-out packages (the evaluation's repositories come only from those); Go, Rust, Java, TypeScript, JavaScript and C
trees from the registries (TRAIN_FETCHED: Debian's golang-*-dev, librust-*-dev and the JDK's sources, npm tarballs,
the packages npm bundles, C libraries in Python packages' source distributions; none that benchmarks/agent_eval.py
asks about); and generated case-file folders (PDF, DOCX, XLSX, PPTX, mailbox and e-mail files)
written with the training fact templates.

Written as JSON lines, xz-compressed: {"tree": name, "segments": [[text, trained], ...]}; `trained` marks the
assistant's replies (tool calls, answers, each with its <|im_end|>), the tokens the cross-entropy term learns.

    python scripts/agent_traces.py --out traces.jsonl.xz [--trees 250] [--folders 60] [--seq 4096] [--downloads D]
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import sys
import sysconfig
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_tasks  # noqa: E402
from distill import _licence_ok, held_out  # noqa: E402

from deltamem.agent.parse import format_tool_call  # noqa: E402
from deltamem.agent.prompt import MAP_PATH, ChatTemplate, file_message, system_prompt  # noqa: E402
from deltamem.agent.retrieve import key_words, lookup_turn  # noqa: E402
from deltamem.agent.runner import scan_project  # noqa: E402
from deltamem.model.gguf_file import smollm2_gguf  # noqa: E402
from deltamem.model.tokenizer import Tokenizer  # noqa: E402
from deltamem.tools import ToolContext, default_tools, run_tool  # noqa: E402

MIN_PY, MAX_PY, MAX_TREE_BYTES = 3, 120, 1_500_000

# Trees in other languages, from the registries (benchmarks/agent_eval.py draws its from other packages: its FETCHED
# and JS_REPOS; tests/scripts/test_agent_traces.py checks the two lists share none): (language, source, folder)
_GO, _RUST, _JDK = "usr/share/gocode/src/github.com", "usr/share/cargo/registry", "java.base/java"
TRAIN_FETCHED = [
    *[("go", f"deb:golang-github-{p.replace('/', '-')}-dev", f"{_GO}/{p}{sub}") for p, sub in [
        ("spf13/cobra", ""), ("sirupsen/logrus", ""), ("pkg/errors", ""), ("google/go-cmp", "/cmp"),
        ("davecgh/go-spew", "/spew"), ("urfave/cli", ""), ("fsnotify/fsnotify", "")]],
    *[("rust", f"deb:librust-{c.replace('_', '-')}-dev", f"{_RUST}/{c}-*") for c in
      ["anyhow", "bitflags", "itoa", "memchr", "once_cell", "thiserror", "smallvec", "either", "base64"]],
    *[("java", "jdk:openjdk-17-source", f"{_JDK}/{p}") for p in
      ["util/concurrent/atomic", "util/jar", "util/function", "util/stream", "time/format", "time/temporal", "text",
       "nio/file", "net", "security/cert"]],
    *[("typescript", "npm:rxjs@7.8.2", f"package/src/internal/{p}") for p in
      ["operators", "observable", "util", "scheduler"]],
    *[("typescript", "npm:mobx@6.13.7", f"package/src/{p}") for p in ["api", "types", "core"]],
    ("c", "pypi:brotli==1.1.0", "Brotli-1.1.0/c"),
    ("c", "pypi:pycryptodome==3.23.0", "pycryptodome-3.23.0/src"),
    *[("javascript", f"npm-bundled:{p}", "lib") for p in
      ["cacache", "pacote", "make-fetch-happen", "libnpmexec", "npm-registry-fetch", "@npmcli/arborist",
       "@npmcli/config", "@npmcli/package-json", "minipass-fetch"]],
]  # fmt: skip
DOC_FORMATS = ("pdf", "docx", "xlsx", "pptx", "mbox", "eml")


def candidate_trees() -> list[tuple[str, Path]]:
    """(name, directory) of source trees: directories of MIN_PY..MAX_PY Python files, from the installed packages
    and the standard library that are neither held out nor this project."""
    tops: list[tuple[str, Path]] = []
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if not name or held_out(name) or name == "deltamem" or not _licence_ok(dist):
            continue
        firsts = {
            Path(str(f)).parts[0] for f in dist.files or [] if str(f).endswith(".py") and len(Path(str(f)).parts) > 1
        }
        for first in sorted(firsts):
            d = Path(dist.locate_file(first))
            if d.is_dir() and "dist-info" not in first and first != "__pycache__":
                tops.append((name, d))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for d in sorted(stdlib.iterdir()):
        if (
            d.is_dir()
            and d.name not in ("site-packages", "test", "idlelib", "__pycache__")
            and not held_out(f"stdlib:{d.name}")
        ):
            tops.append((f"stdlib:{d.name}", d))
    out, seen = [], set()

    def walk(name: str, d: Path, depth: int) -> None:
        pys = [p for p in d.rglob("*.py") if "__pycache__" not in p.parts and "tests" not in p.parts]
        size = sum(p.stat().st_size for p in pys)
        if MIN_PY <= len(pys) <= MAX_PY and size <= MAX_TREE_BYTES:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                out.append((name, d))
        elif len(pys) > MAX_PY and depth < 3:
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                walk(name, sub, depth + 1)

    for name, d in tops:
        walk(name, d, 0)
    return out


def segments(template: ChatTemplate, messages: list[dict]) -> list[list]:
    """The rendered conversation cut at message boundaries; the assistant's words (content + <|im_end|>) trained,
    except the runner's own look-up turn (marked auto)."""
    out, before = [], ""
    for k in range(1, len(messages) + 1):
        text = template.render(messages[:k], add_generation_prompt=False)
        piece, before = text[len(before) :], text
        if messages[k - 1]["role"] == "assistant" and not messages[k - 1].get("auto"):
            content = messages[k - 1]["content"]
            head, _, tail = piece.partition(content)
            end = "<|im_end|>"
            assert tail.startswith(end), "the chat template must close an assistant turn with <|im_end|>"
            out += [[head, False], [content + end, True], [tail[len(end) :], False]]
        else:
            out.append([piece, False])
    return [s for s in out if s[0]]


# a fraction of episodes as a run without the look-up (`--no-retrieve`, or a task it finds nothing for), and of
# those where the model must search, a first search that misses and the retry that finds it
NO_LOOKUP, MISS = 0.2, 0.3


def covers(task: agent_tasks.Task, text: str) -> bool:
    """Whether text holds everything the task's answer must state."""
    return all(any(x in text for x in group) for group in task.expect)


def looked_up(root: Path, question: str) -> list[dict]:
    """The runner's look-up turn (agent/retrieve.py's lookup_turn) as a trace writes it: the calls in one assistant
    message marked auto (the model does not write it: not trained), then their real results."""
    turn = lookup_turn(ToolContext(root=root), default_tools(), question)
    return [{k: m[k] for k in ("role", "content", "auto") if k in m} for m in turn]


def miss(root: Path, task: agent_tasks.Task, rng: random.Random) -> tuple[str, dict, str] | None:
    """A first search a small model might try that matches nothing literally (a Python-shaped pattern on another
    language, a phrase worded unlike the document), with the real tool's real result (which may hold the answer
    in its ranked fallback); None where the pattern matches."""
    name = task.facts.get("name")
    if task.kind == "document":
        words = key_words(task.facts["sentence"])
        args = {"pattern": " ".join(rng.sample(words, min(2, len(words)))[::-1]) + " " + rng.choice(["is", "was"])}
    elif name:
        args = {"pattern": rng.choice([f"def {name}(", f"^{name} =", f"class {name}:", f"{name.lower()}_"])}
    else:
        return None
    ok, result = run_tool(ToolContext(root=root), default_tools(), "grep", args)
    return ("grep", args, result) if ok and "no match" in result else None


def episode(root: Path, task: agent_tasks.Task, rng: random.Random) -> list[dict]:
    """One question as the runner plays it: the look-up turn, then either the answer read from it or the model's
    own tool calls (at times first a search that misses, then the retry) and the answer."""
    msgs = [{"role": "user", "content": task.question}]
    if rng.random() >= NO_LOOKUP:
        msgs += looked_up(root, task.question)
    shown = "\n".join(m["content"] for m in msgs[1:] if m["role"] == "tool")
    first = miss(root, task, rng) if not covers(task, shown) and rng.random() < MISS else None
    if first is not None:
        name, args, result = first
        msgs.append({"role": "assistant", "content": format_tool_call(name, args)})
        msgs.append({"role": "tool", "content": f"[{name}] {result}"})
        shown += "\n" + result
    if not covers(task, shown):
        results = task.results or agent_tasks.run_calls(root, task)
        for (name, args), (_, result) in zip(task.calls, results, strict=True):
            msgs.append({"role": "assistant", "content": format_tool_call(name, args)})
            msgs.append({"role": "tool", "content": f"[{name}] {result}"})
    msgs.append({"role": "assistant", "content": task.answer()})
    return msgs


def sessions(
    root: Path, project: str, tree: str, tasks: list[agent_tasks.Task], tok, template, seq: int, rng
) -> list[dict]:
    """Sequences of at most `seq` tokens: system prompt, ingested files, map, then 2-4 of the tasks."""
    system = {"role": "system", "content": system_prompt(project, default_tools())}
    changes, _ = scan_project(root, {}, map_tokens=rng.choice([400, 800, 1500]))
    files = [file_message(c.path, c.text) for c in changes if c.path != MAP_PATH and c.text is not None]
    the_map = [file_message(MAP_PATH, c.text) for c in changes if c.path == MAP_PATH]
    cost = {}

    def n(m: dict) -> int:
        key = id(m)
        if key not in cost:
            cost[key] = len(tok.encode(m["content"])) + 5
        return cost[key]

    rng.shuffle(tasks)
    out = []
    while tasks:
        k = min(len(tasks), rng.randint(2, 4))
        eps = [episode(root, t, rng) for t in tasks[:k]]
        tasks = tasks[k:]
        msgs_tail = [m for e in eps for m in e]
        budget = seq - 16 - n(system) - sum(n(m) for m in msgs_tail)
        head = []
        if the_map and rng.random() < 0.85 and n(the_map[0]) < budget:
            head = the_map[:]
            budget -= n(the_map[0])
        pick = [m for m in files if rng.random() < 0.5]
        chosen = []
        for m in pick:
            if n(m) <= budget:
                chosen.append(m)
                budget -= n(m)
        if budget < 0:  # the episodes alone are too long: drop them one by one
            while eps and budget < 0:
                budget += sum(n(m) for m in eps.pop())
            msgs_tail = [m for e in eps for m in e]
            if not eps:
                continue
        order = {id(m): i for i, m in enumerate(files)}
        chosen.sort(key=lambda m: order[id(m)])
        msgs = [system, *chosen, *head, *msgs_tail]
        out.append({"tree": tree, "segments": segments(template, msgs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trees", type=int, default=500, help="source trees at most")
    ap.add_argument("--per-package", type=int, default=20, help="trees of one installed package at most")
    ap.add_argument("--per-kind", type=int, default=4, help="tasks of each code kind per tree")
    ap.add_argument("--folders", type=int, default=150, help="generated case-file folders")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per trace at most (distill's stage-2 length)")
    ap.add_argument("--rounds", type=int, default=3, help="task draws from each tree in another language")
    ap.add_argument("--downloads", type=Path, default=Path("downloads"), help="registry packages, fetched once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tok = Tokenizer.from_gguf(smollm2_gguf())
    template = ChatTemplate.for_tokenizer(tok)
    trees = candidate_trees()
    rng.shuffle(trees)
    per_dist = Counter()
    traces, kinds, langs = [], Counter(), Counter({"python": 0})
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, d) in enumerate(trees):
            if sum(per_dist.values()) >= args.trees:
                break
            if per_dist[name] >= args.per_package:
                continue
            root = agent_tasks.copy_package(d, Path(tmp) / f"t{i}", (".py", ".md", ".rst", ".txt", ".toml", ".cfg"))
            tasks = agent_tasks.python_tasks(root, rng, args.per_kind)
            if len(tasks) < 2:
                continue
            per_dist[name] += 1
            langs["python"] += 1
            kinds.update(t.kind for t in tasks)
            traces += sessions(root, d.name, f"{name}/{d.name}", tasks, tok, template, args.seq, rng)
        for i, (language, source, folder) in enumerate(TRAIN_FETCHED):
            if language == "javascript":
                src = agent_tasks.npm_package_dir(source.split(":", 1)[1]) / folder
            else:
                src = agent_tasks.fetched_dir(source, folder, args.downloads)[0]
            suffixes = (*agent_tasks.LANGUAGES[language].suffixes, ".md")
            root = agent_tasks.copy_package(src, Path(tmp) / f"f{i}", suffixes)
            for _ in range(args.rounds):  # each round draws other names of the tree
                tasks = agent_tasks.code_tasks(root, rng, args.per_kind, language)
                tasks += agent_tasks.raise_tasks(root, rng, args.per_kind // 2)
                if len(tasks) < 2:
                    break
                langs[language] += 1
                kinds.update(t.kind for t in tasks)
                traces += sessions(root, src.name, f"{source}/{folder}", tasks, tok, template, args.seq, rng)
        for i in range(args.folders):
            root = Path(tmp) / f"case{i}" / f"case_{rng.choice(agent_tasks.WORDS).lower()}"
            formats = tuple(rng.sample(DOC_FORMATS, rng.randint(2, 4)))
            tasks = agent_tasks.case_folder(
                root, rng, "train", n_docs=rng.randint(3, 6), facts_per_doc=rng.randint(2, 4), formats=formats
            )
            kinds.update(t.kind for t in tasks)
            traces += sessions(root, root.name, root.name, tasks, tok, template, args.seq, rng)
    rng.shuffle(traces)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wt", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    trained = sum(len(tok.encode(s)) for t in traces for s, y in t["segments"] if y)
    print(
        json.dumps(
            {
                "traces": len(traces),
                "trees": sum(per_dist.values()),
                "packages": len(per_dist),
                "tasks": dict(kinds),
                "trees_by_language": dict(langs),
                "trained_tokens": trained,
                "bytes": args.out.stat().st_size,
            }
        )
    )


if __name__ == "__main__":
    main()
