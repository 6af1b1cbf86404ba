"""The default model as an agent, evaluated as a user meets it: real `deltamem ingest` of held-out repositories and
case-file folders, then each question through the real `deltamem run --json` on its own fork of the ingested
session (`deltamem sessions fork`), so that every question starts from the same memory.

Repositories: installed Python packages that scripts/distill.py holds out (its package split; the agent traces train
only on the others), JavaScript packages npm bundles, and Go, Rust, Java, TypeScript and C sources fetched from the
registries (FETCHED: Debian's golang-*-dev, librust-*-dev and openjdk-17-source packages, npm's tarballs, the C
libraries in Python packages' source distributions; downloaded
once into WORK/downloads, their package files recorded in the results), none used in training; each copied into a git
repository. Case-file folders: PDF and DOCX (two folders), XLSX, PPTX, mailbox and e-mail files (a third), with facts
from templates the traces never use. Questions and their checks: scripts/agent_tasks.py (Python's answers read by
its ast module, the other languages' by regular expressions over top-level lines: never by the tools under test).

Scores per delta: exact answers (the path, name, type or value, and for documents the page, section, sheet, slide or
message), by kind, language and document type; tool calls
that were valid (parsed and ran without error), model calls used, degenerate replies (ended by the loop guard),
runs that hit the step limit, wall time. Results: benchmarks/results/agent_eval.{json,md}.

    python benchmarks/agent_eval.py --delta previous=OLD.safetensors --delta new=model/data/smollm2_hybrid.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS, ROOT, device_name, versions

sys.path.insert(0, str(ROOT / "scripts"))

import agent_tasks  # noqa: E402
from distill import held_out  # noqa: E402

from deltamem.agent.graph import INVALID_CALL  # noqa: E402
from deltamem.agent.session import LOOP_MARKER  # noqa: E402

# (distribution name as distill.py splits packages, the importable top-level package); all held out
REPOS = [
    ("tenacity", "tenacity"),
    ("tabulate", "tabulate"),
    ("click", "click"),
    ("markdown-it-py", "markdown_it"),
    ("stdlib:email", "email"),
    ("pycparser", "pycparser"),
    ("pdfplumber", "pdfplumber"),
]
CASE_FOLDERS = 2
# JavaScript packages npm bundles (the training traces use others: all held out)
JS_REPOS = ["semver", "minimatch", "hosted-git-info"]
# Go, Rust, Java and TypeScript sources from the registries this machine reaches (none used in training): Debian's
# packages ship Go and Rust sources (golang-*-dev, librust-*-dev) and the JDK's (openjdk-17-source's src.zip);
# npm's tarballs TypeScript's. (set name, language, source, the folder in it)
FETCHED = [
    ("go-pflag", "go", "deb:golang-github-spf13-pflag-dev", "usr/share/gocode/src/github.com/spf13/pflag"),
    ("go-uuid", "go", "deb:golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid"),
    ("rust-semver", "rust", "deb:librust-semver-dev", "usr/share/cargo/registry/semver-*"),
    ("rust-log", "rust", "deb:librust-log-dev", "usr/share/cargo/registry/log-*"),
    ("java-zip", "java", "jdk:openjdk-17-source", "java.base/java/util/zip"),
    ("java-regex", "java", "jdk:openjdk-17-source", "java.base/java/util/regex"),
    ("ts-immer", "typescript", "npm:immer@11.2.14", "package/src"),
    ("ts-zod", "typescript", "npm:zod@3.25.76", "package/src/v3"),
    ("c-cmark", "c", "pypi:cmarkgfm==2024.11.20", "cmarkgfm-2024.11.20/third_party/cmark"),
    ("c-lz4", "c", "pypi:lz4==4.4.4", "lz4-4.4.4/lz4libs"),
]


def package_dir(module: str) -> Path:
    if module == "email":
        return Path(sysconfig.get_paths()["stdlib"]) / "email"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed here: pip install it (it is one of the held-out repositories)")
    return Path(list(spec.submodule_search_locations)[0])


def git_repo(src: Path, dest: Path, suffixes: tuple[str, ...] = (".py", ".md", ".rst", ".txt", ".typed"),
             leave_out: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """src's source and text files (but the folders leave_out names, relative to src) as a git repository
    dest/<src.name>/..."""
    if dest.exists():
        shutil.rmtree(dest)
    agent_tasks.copy_package(src, dest, suffixes)
    for folder in leave_out:
        shutil.rmtree(dest / src.name / folder, ignore_errors=True)
    git = ["git", "-C", str(dest), "-c", "user.name=eval", "-c", "user.email=eval@example.org"]
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "import"], check=True)
    return dest


def build(work: Path, seed: int, questions: int, per_repo: int, per_folder: int, only: list[str] | None = None
          ) -> list[dict]:  # fmt: skip
    """The evaluation set: [{name, root, tasks}]; at least 5 repositories and CASE_FOLDERS folders, the npm sets
    and the FETCHED ones (those of `only`, where given: the others are not downloaded)."""
    rng = random.Random(seed)
    rng_raises = random.Random(seed + 1)  # its own draws: the other questions stay those of earlier runs
    sets, code = [], 0
    want_code = questions - CASE_FOLDERS * per_folder
    for dist, module in REPOS:
        assert held_out(dist), f"{dist} is not held out of training"
        if len(sets) >= 5 and code >= want_code:
            break
        root = git_repo(package_dir(module), work / "repos" / module)
        picked = _round_robin(agent_tasks.python_tasks(root, rng, per_kind=per_repo // 4 + 2), per_repo)
        code += len(picked)  # counted before the raises questions: the sets drawn stay those of earlier runs
        picked += agent_tasks.raise_tasks(root, rng_raises, per_repo // 5)
        sets.append({"name": module, "root": root, "tasks": picked, "language": "python"})
    for i in range(CASE_FOLDERS):
        root = work / "cases" / f"case_files_{i + 1}"
        if root.exists():
            shutil.rmtree(root)
        tasks = agent_tasks.case_folder(root, rng, "eval", n_docs=6, facts_per_doc=3)
        sets.append({"name": root.name, "root": root, "tasks": tasks[:per_folder], "language": "case files"})
    for name in JS_REPOS:  # after the folders: the sets drawn before them stay what they were
        src = agent_tasks.npm_package_dir(name)
        # a package built twice (dist/esm and dist/commonjs) defines every name twice: no name has one definition
        twice = ("dist/commonjs",) if (src / "dist" / "esm").is_dir() else ()
        root = git_repo(src, work / "repos" / f"js-{name}", (".js", ".mjs", ".cjs", ".md", ".json"), twice)
        picked = _round_robin(agent_tasks.code_tasks(root, rng, per_repo // 3 + 2, "javascript"), per_repo)
        picked += agent_tasks.raise_tasks(root, rng_raises, per_repo // 5)
        sets.append({"name": f"js-{name}", "root": root, "tasks": picked, "language": "javascript"})
    # after the npm sets, for the same reason; each set from its own seed, so that --only leaves the others' draws
    for name, language, source, folder in FETCHED:
        if only and name not in only:
            continue
        src, package = agent_tasks.fetched_dir(source, folder, work / "downloads")
        root = git_repo(src, work / "repos" / name, (*agent_tasks.LANGUAGES[language].suffixes, ".md"))
        own = random.Random(f"{seed}-{name}")
        picked = _round_robin(agent_tasks.code_tasks(root, own, per_repo // 3 + 2, language), per_repo)
        picked += agent_tasks.raise_tasks(root, own, per_repo // 5)
        sets.append({"name": name, "root": root, "tasks": picked, "language": language, "source": package})
    root = work / "cases" / "case_files_3"  # the other formats: workbooks, slides, a mailbox, e-mails
    if root.exists():
        shutil.rmtree(root)
    tasks = agent_tasks.case_folder(root, random.Random(f"{seed}-case_files_3"), "eval", n_docs=8, facts_per_doc=3,
                                    formats=("xlsx", "pptx", "mbox", "eml"))  # fmt: skip
    picked = _round_robin(tasks, per_folder, key=lambda t: Path(t.facts["path"]).suffix)  # each format in turn
    sets.append({"name": root.name, "root": root, "tasks": picked, "language": "case files"})
    for s in sets:
        if not s["tasks"]:
            print(f"warning: set {s['name']} has no question (no name in it is defined once)", file=sys.stderr)
    return sets


def save_sets(path: Path, sets: list[dict], work: Path) -> None:
    """The sets as JSON, each folder relative to work (the folders themselves stay there)."""
    out = [dict(s, root=str(s["root"].relative_to(work)), tasks=[dataclasses.asdict(t) for t in s["tasks"]])
           for s in sets]  # fmt: skip
    path.write_text(json.dumps(out, indent=1))
    print(f"{sum(len(s['tasks']) for s in sets)} questions in {len(sets)} sets: {path}")


def load_sets(path: Path, work: Path) -> list[dict]:
    sets = json.loads(path.read_text())
    for s in sets:
        s["root"] = work / s["root"]
        if not s["root"].is_dir():
            raise SystemExit(f"{path}: the folder of set {s['name']} is not under {work}")
        s["tasks"] = [agent_tasks.Task(**t) for t in s["tasks"]]
    return sets


def _round_robin(tasks: list, n: int, key=lambda t: t.kind) -> list:
    """Up to n tasks, taking one of each kind (or other key) in turn."""
    by_kind: dict[str, list] = {}
    for t in tasks:
        by_kind.setdefault(key(t), []).append(t)
    picked = []
    while len(picked) < n and any(by_kind.values()):
        for k in list(by_kind):
            if by_kind[k] and len(picked) < n:
                picked.append(by_kind[k].pop(0))
    return picked


def cli(*args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-P", str(ROOT / "app.py"), *args], capture_output=True, text=True, env=env, timeout=1800
    )
    return r, time.perf_counter() - t0


def evaluate(label: str, delta: Path, sets: list[dict], work: Path, args, on_set=lambda result: None) -> dict:
    """Every question of the sets with this delta; on_set gets the result so far after each set."""
    db = work / label / "memory.db"
    if db.parent.exists():
        shutil.rmtree(db.parent)
    db.parent.mkdir(parents=True)
    env = {
        **os.environ,
        "DELTAMEM_DELTA": str(delta.resolve()),
        "DELTAMEM_DB": str(db),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    common = ["--device", args.device]
    records, ingests = [], []
    for s in sets:
        if not s["tasks"]:  # nothing to ask: no ingest either
            continue
        r, wall = cli("ingest", "--repo", str(s["root"]), "--json", *common, env=env)
        if r.returncode != 0:
            raise SystemExit(f"ingest of {s['name']} failed: {r.stderr[-2000:]}")
        ing = json.loads(r.stdout)
        ingests.append({"set": s["name"], "tokens": ing["tokens"], "files": ing["files"], "wall_s": round(wall, 1)})
        print(f"[{label}] ingested {s['name']}: {ing['tokens']:,} tokens in {wall:.0f} s", flush=True)

        def ask(i_task: tuple[int, agent_tasks.Task], s: dict = s, ing: dict = ing) -> dict:
            i, task = i_task
            f, _ = cli("sessions", "fork", ing["session"], "--json", "--title", f"{s['name']}-q{i}", env=env)
            if f.returncode != 0:
                raise SystemExit(f"fork failed: {f.stderr[-1000:]}")
            fork = json.loads(f.stdout)["session"]
            r, wall = cli(
                "run",
                "--repo",
                str(s["root"]),
                "--session",
                fork,
                "--json",
                "--max-steps",
                str(args.max_steps),
                *args.run_arg,
                *common,
                task.question,
                env=env,
            )
            out = json.loads(r.stdout) if r.stdout.strip() else {}
            looked_up = [c for c in out.get("tool_calls", []) if c.get("auto")]
            calls = [c for c in out.get("tool_calls", []) if not c.get("auto")]  # the model's own
            answer = out.get("answer", "")
            rec = {
                "set": s["name"],
                "language": s.get("language", "python"),
                "kind": task.kind,
                "question": task.question,
                "expect": task.expect,
                "exit": r.returncode,
                "outcome": out.get("outcome"),
                "answer": answer,
                "exact": r.returncode == 0 and agent_tasks.exact(task, answer),
                "calls": len(calls),
                "valid_calls": sum(1 for c in calls if c["ok"] and c["tool"] != INVALID_CALL),
                "tools": [c["tool"] for c in calls],
                "looked_up": [c["tool"] for c in looked_up],
                "grounded": out.get("grounded"),
                # what each call asked and the start of what it got back: why an answer went wrong
                "call_log": [{"tool": c["tool"], "arguments": c.get("arguments"), "ok": c["ok"],
                              "auto": c.get("auto"), "result": str(c.get("result", ""))[:300]}
                             for c in out.get("tool_calls", [])],  # fmt: skip
                "retried": out.get("retried"),  # the hint the first answer was asked again with
                "model_calls": model_calls(out.get("outcome"), len(calls), args.max_steps, out.get("retried")),
                "degenerate": LOOP_MARKER.strip() in answer,
                "wall_s": round(wall, 2),
                "error": r.stderr[-500:] if r.returncode not in (0, 3) else "",
            }
            if args.memory_only:  # the same question with no tool: on the ingested state, and on an empty session
                for key, session in (("memory_only", fork), ("empty", f"empty-{s['name']}-q{i}")):
                    m, _ = cli("run", "--repo", str(s["root"]), "--session", session, "--json", "--no-tools",
                               *args.run_arg, *common, task.question, env=env)  # fmt: skip
                    got = json.loads(m.stdout).get("answer", "") if m.stdout.strip() else ""
                    rec[f"{key}_exact"] = m.returncode == 0 and agent_tasks.exact(task, got)
            return rec

        with ThreadPoolExecutor(args.jobs) as pool:
            for rec in pool.map(ask, enumerate(s["tasks"])):
                records.append(rec)
                mark = "ok " if rec["exact"] else "-- "
                print(f"[{label}] {mark}{rec['set']} {rec['kind']}: {rec['answer'][:100]!r}", flush=True)
        result = {
            "label": label,
            "delta": delta.name,
            "run_args": list(args.run_arg),
            "summary": summary(records),
            "ingest": ingests,
            "records": records,
        }
        on_set(result)
    return result


def model_calls(outcome: str | None, calls: int, max_steps: int, retried: str | None = None) -> int:
    """Replies the model wrote: one per tool call and the answer's; a run stopped at the step limit wrote max_steps
    (the last one's calls were not run); one more where the answer was asked again (retried)."""
    return (calls + 1 if outcome == "answer" else max_steps if outcome == "step_limit" else calls) + bool(retried)


def _language(rec: dict) -> str:
    """A record's language (records of runs before languages were recorded: by their set's name)."""
    return rec.get("language") or ("case files" if rec["set"].startswith("case_files") else "python")


def _doc_type(rec: dict) -> str | None:
    """A document question's format: its file's extension."""
    return Path(rec["expect"][0][0]).suffix.lstrip(".") if rec["kind"] == "document" else None


def _by(records: list[dict], group) -> tuple[dict, dict]:
    """(exact share, questions) per value of group(record), records it maps to None left out."""
    counts = Counter(g for r in records if (g := group(r)) is not None)
    exact = {g: round(sum(r["exact"] for r in records if group(r) == g) / c, 3) for g, c in counts.items()}
    return exact, dict(counts)


def summary(records: list[dict]) -> dict:
    n = len(records)
    calls = sum(r["calls"] for r in records)
    by_kind, by_lang, by_doc = (_by(records, f) for f in (lambda r: r["kind"], _language, _doc_type))
    return {
        "questions": n,
        "exact": round(sum(r["exact"] for r in records) / n, 3),
        "exact_by_kind": by_kind[0],
        "questions_by_kind": by_kind[1],
        "exact_by_language": by_lang[0],
        "questions_by_language": by_lang[1],
        "exact_by_document_type": by_doc[0],
        "questions_by_document_type": by_doc[1],
        "used_a_tool": round(sum(r["calls"] > 0 for r in records) / n, 3),
        "tool_calls": calls,
        "valid_tool_calls": round(sum(r["valid_calls"] for r in records) / calls, 3) if calls else None,
        "model_calls_mean": round(sum(r["model_calls"] for r in records) / n, 2),
        "degenerate": sum(r["degenerate"] for r in records),
        "retried": sum(bool(r.get("retried")) for r in records) if any("retried" in r for r in records) else None,
        "step_limit": sum(r["outcome"] == "step_limit" for r in records),
        "errors": sum(r["exit"] not in (0, 3) for r in records),
        "wall_s_mean": round(sum(r["wall_s"] for r in records) / n, 2),
        "grounded": round(sum(r.get("grounded") is True for r in records) / n, 3)
        if any("grounded" in r for r in records) else None,
        **{f"{k}_exact": round(sum(r[f"{k}_exact"] for r in records) / n, 3)
           for k in ("memory_only", "empty") if all(f"{k}_exact" in r for r in records)},
    }


def markdown(results: list[dict], meta: dict) -> str:
    labels = [r["label"] for r in results]
    rows = [
        ("questions", "questions"),
        ("exact answers (target >= 60%)", "exact"),
        ("answers that used a tool (the model's own calls)", "used_a_tool"),
        ("tool calls (the model's own; looked-up calls apart)", "tool_calls"),
        ("valid tool calls (target >= 95%)", "valid_tool_calls"),
        ("model calls per question", "model_calls_mean"),
        ("degenerate replies (target 0)", "degenerate"),
        ("answers asked once more (agent/runner.py's hint)", "retried"),
        ("runs at the step limit", "step_limit"),
        ("runs that failed", "errors"),
        ("wall time per question, s", "wall_s_mean"),
        ("answers citing a file the tools showed", "grounded"),
        ("exact with no tool, after ingest (memory only)", "memory_only_exact"),
        ("exact with no tool, on an empty session", "empty_exact"),
    ]
    pct = {"exact", "used_a_tool", "valid_tool_calls", "grounded", "memory_only_exact", "empty_exact"}
    lines = [
        "# The default model as an agent (benchmarks/agent_eval.py)",
        "",
        f"{meta['device']}; {meta['questions']} questions over {meta['repositories']} held-out repositories and "
        f"{meta['folders']} case-file folders; each through `deltamem run --json` on a fork of the ingested session, "
        f"--max-steps {meta['max_steps']}, greedy."
        + (f" Partial: stopped after {meta['partial']} of the last delta." if meta.get("partial") else ""),
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name, key in rows:
        vals = [r["summary"].get(key) for r in results]
        if all(v is None for v in vals):
            continue
        lines.append(
            f"| {name} | "
            + " | ".join("-" if v is None else f"{100 * v:.1f}%" if key in pct else f"{v:,}" for v in vals)
            + " |"
        )
    for k in agent_tasks.KINDS:
        vals = [r["summary"]["exact_by_kind"].get(k) for r in results]
        n = max(r["summary"]["questions_by_kind"].get(k, 0) for r in results)
        lines.append(
            f"| exact, {k} ({n}) | " + " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in vals) + " |"
        )
    for by, prefix in (("language", ""), ("document_type", "document type ")):
        for g in dict.fromkeys(k for r in results for k in r["summary"].get(f"exact_by_{by}", {})):
            vals = [r["summary"].get(f"exact_by_{by}", {}).get(g) for r in results]
            n = max(r["summary"].get(f"questions_by_{by}", {}).get(g, 0) for r in results)
            lines.append(f"| exact, {prefix}{g} ({n}) | "
                         + " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in vals) + " |")  # fmt: skip
    lines += [
        "",
        "Ingest per set (tokens, wall seconds): "
        + "; ".join(f"{i['set']} {i['tokens']:,} tok" for i in results[0]["ingest"])
        + ".",
        "",
    ]
    for r in results:
        lines.append(
            f"- {r['label']}: {r['delta']}"
            + (f", `deltamem run {' '.join(r['run_args'])}`" if r.get("run_args") else "")
            + "; ingest wall "
            + ", ".join(f"{i['set']} {i['wall_s']:.0f} s" for i in r["ingest"])
            + "."
        )
    lines += ["", "Sample answers (first question of each kind, each delta):", ""]
    for r in results:
        seen = set()
        for rec in r["records"]:
            if rec["kind"] not in seen:
                seen.add(rec["kind"])
                mark = "exact" if rec["exact"] else "wrong"
                lines.append(f"- {r['label']} / {rec['set']} / {rec['question']} -> {rec['answer'][:160]!r} ({mark})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="score these runs' results again, side by side")
    ap.add_argument(
        "--delta",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a delta of the default model to evaluate (repeat to compare, side by side)",
    )
    ap.add_argument("--questions", type=int, default=150)
    ap.add_argument("--per-repo", type=int, default=24)
    ap.add_argument("--per-folder", type=int, default=15)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="questions run at once")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--only", action="append", help="evaluate only this set (repeat; a quick check, not the table)")
    ap.add_argument("--limit", type=int, default=3, help="with --only: questions per set (each kind in turn)")
    ap.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass this to every `deltamem run` (repeat; e.g. --run-arg=--free-tool-calls)",
    )
    ap.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="with --merge: show the run labelled OLD as NEW (two runs of one delta side by side)",
    )
    ap.add_argument("--memory-only", action="store_true",
                    help="also ask each question with --no-tools, after ingest and on an empty session: what the "
                    "ingested state alone contributes")
    ap.add_argument("--work", type=Path, default=Path("agent-eval-work"))
    ap.add_argument("--save-sets", type=Path, metavar="JSON",
                    help="build the sets, write them here (their folders under --work) and stop: to carry the "
                    "evaluation to a machine without the registries' packages")
    ap.add_argument("--sets", type=Path, metavar="JSON",
                    help="take the sets from this file (written by --save-sets), their folders under --work")
    ap.add_argument("--out", type=Path, default=RESULTS / "agent_eval")
    args = ap.parse_args()
    if args.merge:  # results of separate runs on the same questions, scored again and tabled side by side
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        results = [r for run in runs for r in run["results"]]
        renames = dict(x.split("=", 1) for x in args.label)
        for r in results:  # OLD=NEW renames the first run so labelled, in --merge's order
            if r["label"] in renames:
                r["label"] = renames.pop(r["label"])
        for r in results:
            for rec in r["records"]:
                rec["exact"] = rec["exit"] == 0 and agent_tasks.exact(rec["expect"], rec["answer"])
                rec["model_calls"] = model_calls(rec["outcome"], rec["calls"], runs[0]["meta"]["max_steps"],
                                                 rec.get("retried"))
            r["summary"] = summary(r["records"])
        write(args.out, results, runs[0]["meta"])
        return
    if not args.delta and not args.save_sets:
        raise SystemExit("give at least one --delta LABEL=PATH (or --merge, or --save-sets)")
    deltas = []
    for d in args.delta:
        label, sep, path = d.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--delta {d!r}: give LABEL=PATH of an existing delta file")
        deltas.append((label, Path(path)))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.sets:
        sets = load_sets(args.sets, args.work)
    else:
        sets = build(args.work, args.seed, args.questions, args.per_repo, args.per_folder, args.only)
    if args.save_sets:
        save_sets(args.save_sets, sets, args.work)
        return
    if args.only:  # a quick look at some sets, a few questions each, each kind in turn
        sets = [dict(s, tasks=_round_robin(s["tasks"], args.limit)) for s in sets if s["name"] in args.only]
    n = sum(len(s["tasks"]) for s in sets)
    print(f"{n} questions: " + ", ".join(f"{s['name']} {len(s['tasks'])}" for s in sets), flush=True)
    meta = {
        "device": device_name() if args.device != "cpu" else f"CPU, {os.cpu_count()} cores",
        "questions": n,
        "repositories": sum(not s["name"].startswith("case_files") for s in sets),
        "max_steps": args.max_steps,
        "folders": sum(s["name"].startswith("case_files") for s in sets),
        "fetched": {s["name"]: s["source"] for s in sets if "source" in s},
        **versions(),
    }
    results = []

    def partial(result: dict) -> None:  # after each set: a run stopped part-way keeps what it measured
        write(args.out, [*results, result], dict(meta, partial=f"{len(result['records'])} of {n} questions"))

    for label, path in deltas:
        results.append(evaluate(label, path, sets, args.work, args, partial))
    write(args.out, results, meta)


def write(out: Path, results: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    Path(f"{out}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
