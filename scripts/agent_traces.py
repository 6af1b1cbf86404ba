"""Training traces for the agent's protocol: real sessions on real trees, for scripts/distill.py --traces.

Each trace is what the agent's model consumes in a session (agent/runner.py): its real system prompt with the tool
list, files of the tree as ingest feeds them (file_message, in feed order), the repository map, then two to four
questions (scripts/agent_tasks.py), each with the tool call that answers it, the real tool's real result on the real
tree, and a final answer citing the path. Trees are the permissively licensed packages installed here and the
standard library, minus distill.py's held-out packages (the evaluation's repositories come only from those), plus
generated case-file folders (PDF pages, DOCX sections) written with the training fact templates.

Written as JSON lines, xz-compressed: {"tree": name, "segments": [[text, trained], ...]}; `trained` marks the
assistant's replies (tool calls, answers, each with its <|im_end|>), the tokens the cross-entropy term learns.

    python scripts/agent_traces.py --out traces.jsonl.xz [--trees 250] [--folders 60] [--seq 4096]
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
from deltamem.agent.runner import scan_project  # noqa: E402
from deltamem.model.gguf_file import smollm2_gguf  # noqa: E402
from deltamem.model.tokenizer import Tokenizer  # noqa: E402
from deltamem.tools import default_tools  # noqa: E402

MIN_PY, MAX_PY, MAX_TREE_BYTES = 3, 120, 1_500_000


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
    """The rendered conversation cut at message boundaries; the assistant's words (content + <|im_end|>) trained."""
    out, before = [], ""
    for k in range(1, len(messages) + 1):
        text = template.render(messages[:k], add_generation_prompt=False)
        piece, before = text[len(before) :], text
        if messages[k - 1]["role"] == "assistant":
            content = messages[k - 1]["content"]
            head, _, tail = piece.partition(content)
            end = "<|im_end|>"
            assert tail.startswith(end), "the chat template must close an assistant turn with <|im_end|>"
            out += [[head, False], [content + end, True], [tail[len(end) :], False]]
        else:
            out.append([piece, False])
    return [s for s in out if s[0]]


def episode(root: Path, task: agent_tasks.Task) -> list[dict]:
    msgs = [{"role": "user", "content": task.question}]
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
        eps = [episode(root, t) for t in tasks[:k]]
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tok = Tokenizer.from_gguf(smollm2_gguf())
    template = ChatTemplate.for_tokenizer(tok)
    trees = candidate_trees()
    rng.shuffle(trees)
    per_dist = Counter()
    traces, kinds = [], Counter()
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
            kinds.update(t.kind for t in tasks)
            traces += sessions(root, d.name, f"{name}/{d.name}", tasks, tok, template, args.seq, rng)
        for i in range(args.folders):
            root = Path(tmp) / f"case{i}" / f"case_{rng.choice(agent_tasks.WORDS).lower()}"
            tasks = agent_tasks.case_folder(
                root, rng, "train", n_docs=rng.randint(3, 6), facts_per_doc=rng.randint(2, 4)
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
                "trained_tokens": trained,
                "bytes": args.out.stat().st_size,
            }
        )
    )


if __name__ == "__main__":
    main()
