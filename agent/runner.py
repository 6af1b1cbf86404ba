"""Agent: a model, a session of the memory store, the tools and the graph, wired together for one project.

    agent = Agent(engine, store, "my-repo", root="path/to/repo")
    agent.ingest(on_event=print)                 # read the project's text files (only changed ones next time)
    result = agent.run("where is the config parsed?", on_event=print)
    result.outcome, result.answer, result.snapshot_id

Every run and every ingest batch ends with one transaction in the store: its turns, its ledger entries and a
snapshot of the model state (with the ids it consumed), linked to the graph checkpoint of that moment.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from langgraph.types import Command

from deltamem.agent import threads
from deltamem.agent.graph import Approve, build_graph, outcome
from deltamem.agent.guide import Guides, ListGuide
from deltamem.agent.hygiene import Rules, feed_order
from deltamem.agent.prompt import MAP_PATH, file_message, system_prompt, tool_specs
from deltamem.agent.protocol import Offer, call_guide, lay_out
from deltamem.agent.retrieve import lookup_turn
from deltamem.agent.session import LOOP_MARKER, AgentSession, Cancelled, log
from deltamem.memory.store import Store
from deltamem.model.sampling import LoopGuard
from deltamem.tools import ToolContext, default_tools
from deltamem.tools.documents import MAX_DOCUMENT_BYTES, DocumentError, convert, converter_for, is_document
from deltamem.tools.files import project_files
from deltamem.tools.repomap import repo_map

MAX_FILE_BYTES = 256_000  # larger files are skipped by ingest (the tools can still read them in ranges)
BATCH_BYTES = 128_000  # ingest feeds files in batches of about this much text (~32k tokens)
COMMIT_EVERY_S = 30.0  # and commits (a snapshot with the ledger) once batches have run this long (see ingest)
MAP_TOKENS = 1500  # the repository map's budget (tools/repomap.py)

Event = dict
Approver = Callable[[dict], bool]


DEFAULT_GUARD = LoopGuard()  # holds no state: one serves every agent


@dataclass
class RunResult:
    outcome: str  # "answer" or "step_limit"
    answer: str
    tool_calls: list[dict] = field(default_factory=list)  # name, arguments, ok, result
    tokens_fed: int = 0
    session_id: str = ""
    snapshot_id: int | None = None
    timing: dict = field(default_factory=dict)  # AgentSession.timing over this run (and the resume before it)
    grounded: bool | None = None  # the answer names a file this run's tool results showed (None: they showed none)
    retried: str | None = None  # the hint the first answer was asked again with (None: it stood)


@dataclass
class IngestResult:
    files: int = 0  # new or changed files fed
    removed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    tokens: int = 0
    snapshot_id: int | None = None
    cancelled: bool = False
    timing: dict = field(default_factory=dict)


@dataclass
class _Change:
    path: str
    text: str | None  # None: removed
    sha256: str | None = None
    mtime: float | None = None
    size: int | None = None
    converter: str | None = None  # a document's converter and its version (tools/documents.py)


class Agent:
    def __init__(
        self,
        engine,
        store: Store,
        session: str,
        root: str | Path,
        *,
        approve: Approve = "never",
        max_steps: int = 8,
        allow_shell: bool = False,
        max_new_tokens: int = 512,
        convert_state: bool = False,
        guided_calls: bool = True,
        tools: bool = True,
        retrieve: bool = True,
        sampling: dict | None = None,
        loop_guard: LoopGuard | None = DEFAULT_GUARD,
    ):
        """convert_state: resume a session saved in another dtype by converting its state (not exact; the session
        records it), instead of refusing. guided_calls: a tool call the model opens can only be a well-formed call of
        an offered tool (agent/guide.py). tools=False: no tool is offered, the model answers from its state alone.
        retrieve: the task's names and key words are looked up before the first reply (agent/retrieve.py).
        sampling: engine.generate's temperature, top_p, top_k, seed, repetition_penalty (default: greedy).
        loop_guard: ends a reply caught in a loop (None: never)."""
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"{root} is not a directory")
        self.store = store
        self.session = AgentSession.open(engine, store, session, self.root, convert_state=convert_state)
        self.session.max_new_tokens = max_new_tokens
        self.session.sampling, self.session.loop_guard = dict(sampling or {}), loop_guard
        self.tools = default_tools() if tools else {}
        self.retrieve = retrieve
        offer = Offer(tool_specs(self.tools))
        s = self.session
        lay_out(s.template, offer)  # where the model's template lists them, in its trained words and syntax
        # a reply listing the files the tools showed cannot list one twice while another is missing (ListGuide)
        self._calls: list[dict] = []
        self._shown: tuple[int, list[str]] = (0, [])
        listing = ListGuide(s.tok, engine.config.vocab_size, self._shown_so_far)
        calls = call_guide(s.tok, engine.config.vocab_size, s.stop_ids, s.template, offer) if guided_calls else None
        s.guide = Guides(calls, listing) if self.tools else calls  # no tool, no file shown
        self.ctx = ToolContext(root=self.root, store=store, session_id=self.session.sid, allow_shell=allow_shell)
        self.saver = store.conversation_saver()
        try:
            self.graph = build_graph(
                self.session, self.tools, self.ctx, approve, max_steps, self.saver,
                should_stop=self.session.cancel.is_set,
            )  # fmt: skip
            self.config = {"configurable": {"thread_id": self.session.sid}}
            if self._reconcile():
                log.warning("the conversation went past the last saved turn (an unfinished run?); resuming at the "
                            "last saved turn")  # fmt: skip
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the conversation saver's connection (on PostgreSQL, a server connection); the store and the
        engine are the caller's."""
        self.saver.conn.close()

    def _reconcile(self) -> bool:
        """Bring the graph thread to the checkpoint of the snapshot the state was restored from."""
        restored = self.session.restored_from
        rows = self.store.snapshots(self.session.sid)
        checkpoint = next((r["checkpoint_id"] for r in rows if r["id"] == restored), None)
        return threads.reconcile(self.graph, self.session.sid, checkpoint)

    def back_to_last_save(self) -> None:
        """Drop everything since the last committed turn, state, conversation and notes (a cancelled ingest, an
        error)."""
        self.ctx.pending_turns.clear()
        self.session.events.clear()
        self.session.resume()
        self._reconcile()

    @property
    def session_id(self) -> str:
        return self.session.sid

    def messages(self) -> list[dict]:
        return list(self.graph.get_state(self.config).values.get("messages") or [])

    def _with_system(self, new: list[dict]) -> list[dict]:
        if self.messages():
            return new
        prompt = system_prompt(self.root.name, self.tools, native=self.session.template.uses_tools)
        return [{"role": "system", "content": prompt}, *new]

    def _drive(self, inp, on_event: Callable[[Event], None], approver: Approver | None) -> None:
        """Stream the graph to its end, answering approval interrupts with `approver`."""
        while True:
            pending = None
            for mode, chunk in self.graph.stream(inp, self.config, stream_mode=["custom", "updates"]):
                if mode == "custom":
                    on_event(chunk)
                elif "__interrupt__" in chunk:
                    pending = chunk["__interrupt__"][0].value
            if pending is None:
                return
            inp = Command(resume=bool(approver(pending)) if approver else False)

    def _save(self, before: int, turns_extra: dict, ingested=()) -> int:
        state = self.graph.get_state(self.config)
        rows = [
            {"role": m["role"], "text": m["content"], "tool_calls": m.get("tool_calls") or None}
            for m in state.values["messages"][before:]
        ]
        if rows:
            rows[0].update(turns_extra)
        return self._commit(rows, state.config["configurable"].get("checkpoint_id"), ingested)

    def _commit(self, rows: list[dict], checkpoint: str | None, ingested=()) -> int:
        """Save turns, ledger rows and a snapshot in one transaction, with what is pending: the session's events (a
        state converted on resume) and the run's notes."""
        rows = [*self.session.events, *rows, *self.ctx.pending_turns]
        snap_id = self.session.save(rows, checkpoint_id=checkpoint, ingested=ingested)
        self.session.events.clear()
        self.ctx.pending_turns.clear()
        return snap_id

    # --- tasks ---------------------------------------------------------------------------------------------
    def run(
        self, task: str, on_event: Callable[[Event], None] = lambda e: None, approver: Approver | None = None
    ) -> RunResult:
        if not task.strip():
            raise ValueError("the task is empty")
        self.session.cancel.clear()
        before = len(self.messages())
        fed0 = self.session.fed
        calls: list[dict] = []
        self._calls, self._shown = calls, (0, [])  # this run's: what ListGuide may see listed

        def track(event: Event) -> None:
            if "tool" in event:
                calls.append(event)
            on_event(event)

        looked_up = []
        if self.retrieve and self.tools:
            looked_up = lookup_turn(self.ctx, self.tools, task, self.session.template.syntax_with(self.tools), track)
        inp = {"messages": self._with_system([{"role": "user", "content": task}, *looked_up]), "steps": 0, "mode": ""}
        self._drive(inp, track, approver)
        shown = self._shown_paths(calls)
        grounded = _grounded(self._last_answer(), shown)
        stopped = self.session.cancel.is_set()  # a stopped answer is not asked for again
        hint = None
        if not stopped and outcome(self.graph.get_state(self.config).values) == "answer":
            hint = _answer_hint(self._last_answer(), shown, grounded)
            if hint is not None:  # one retry, the hint as a user turn
                on_event({"retry": hint})
                self._drive({"messages": [{"role": "user", "content": hint}], "steps": 0, "mode": ""}, track, approver)
                grounded = _grounded(self._last_answer(), self._shown_paths(calls))
        state = self.graph.get_state(self.config).values
        fed = self.session.fed - fed0
        snap_id = self._save(before, {"tokens": fed})
        last = state["messages"][-1]
        return RunResult(
            outcome(state),
            last["content"] if last["role"] == "assistant" else "",
            calls,
            fed,
            self.session.sid,
            snap_id,
            self._take_timing(),
            grounded,
            hint,
        )

    def _shown_so_far(self) -> list[str]:
        """_shown_paths of this run's calls so far, found again only when a call has come."""
        if self._shown[0] != len(self._calls):
            self._shown = (len(self._calls), self._shown_paths(self._calls))
        return self._shown[1]

    def _shown_paths(self, calls: list[dict]) -> list[str]:
        """The project's files that this run's tool results named, in the order first shown."""
        text = "\n".join(c["result"] for c in calls if c.get("ok"))
        if not text:
            return []
        files = [rel.as_posix() for rel in project_files(self.root)]
        found = {p: text.find(p) for p in files if p in text}
        found = {p: i for p, i in found.items() if not any(p != q and p in q for q in found)}  # a.py inside b/a.py
        return sorted(found, key=found.get)

    def _last_answer(self) -> str:
        last = self.messages()[-1]
        return last["content"] if last["role"] == "assistant" else ""

    def _take_timing(self) -> dict:
        timing, self.session.timing = self.session.timing, {}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()}

    # --- ingest ------------------------------------------------------------------------------------------
    def scan(
        self, max_bytes: int = MAX_FILE_BYTES, rules: Rules | None = None, map_tokens: int = MAP_TOKENS
    ) -> tuple[list[_Change], IngestResult]:
        """What an ingest would feed, in order: see scan_project."""
        return scan_project(self.root, self.store.ingested(self.session.sid), max_bytes, rules, map_tokens)

    def ingest(
        self,
        on_event: Callable[[Event], None] = lambda e: None,
        max_bytes: int = MAX_FILE_BYTES,
        batch_bytes: int = BATCH_BYTES,
        commit_every_s: float = COMMIT_EVERY_S,
        rules: Rules | None = None,
        map_tokens: int = MAP_TOKENS,
    ) -> IngestResult:
        """Feed new and changed files (and notes of removed ones) through the model, in batches of `batch_bytes`;
        batches are committed with their ledger entries and a snapshot once `commit_every_s` (and ten times the
        last save) has passed since the last commit (after every batch where it is 0), and at the end, so an
        interrupted ingest keeps what it committed and loses at most that much work."""
        self.session.cancel.clear()
        changes, result = self.scan(max_bytes, rules, map_tokens)
        on_event({"scan": {"changed": len(changes), "unchanged": result.unchanged, "skipped": len(result.skipped)}})
        batch: list[_Change] = []
        size = 0
        done = _Uncommitted()
        last_commit, save_s = time.perf_counter(), 0.0
        for i, ch in enumerate(changes):
            batch.append(ch)
            size += ch.size or 0
            last = i == len(changes) - 1
            if size >= batch_bytes or last:
                try:
                    self._ingest_batch(batch, on_event, done)
                except Cancelled:  # the uncommitted batches are dropped: ledger, state and thread stay at the last save
                    self.back_to_last_save()
                    result.cancelled = True
                    break
                batch, size = [], 0
                # Commit when the batches since the last commit took long enough that a save costs little beside
                # them (at most a tenth), and not more often than every COMMIT_EVERY_S: on a CPU every batch
                # (minutes), on a GPU every few hundred thousand tokens, where a save writes the whole state.
                # commit_every_s=0 asks for a commit after every batch, whatever a save costs.
                since = time.perf_counter() - last_commit
                if last or commit_every_s <= 0 or since >= max(commit_every_s, 10 * save_s):
                    t0 = time.perf_counter()
                    done.commit(self, result)
                    last_commit = time.perf_counter()
                    save_s = last_commit - t0
        result.timing = self._take_timing()
        return result

    def _ingest_batch(self, batch: list[_Change], on_event, done: _Uncommitted) -> None:
        """Feed one batch of files through the graph; what to commit goes to `done`."""
        fed0 = self.session.fed
        msgs = [file_message(ch.path, ch.text) for ch in batch]
        tokens: dict[str, int] = {}

        def progress(event: Event) -> None:
            if "progress" in event:
                p = event["progress"]
                ch = batch[p["done"] - 1]
                tokens[ch.path] = p["tokens"]
                on_event({"file": ch.path, "tokens": p["tokens"], "removed": ch.text is None})

        inp = {"messages": self._with_system(msgs), "mode": "feed", "feed_count": len(msgs)}
        self._drive(inp, progress, None)
        fed = self.session.fed - fed0
        done.ledger += [
            {
                "path": ch.path,
                "sha256": ch.sha256,
                "mtime": ch.mtime,
                "bytes": ch.size,
                "text": ch.text,
                "tokens": tokens[ch.path],
                "converter": ch.converter,
            }
            for ch in batch
        ]
        names = ", ".join(ch.path for ch in batch[:3]) + (f" and {len(batch) - 3} more" if len(batch) > 3 else "")
        # the file messages stay in the conversation; the turn log gets one short line per batch
        done.rows.append({"role": "ingest", "text": f"ingested {len(batch)} files: {names}", "tokens": fed})
        done.files += sum(ch.text is not None and ch.path != MAP_PATH for ch in batch)  # the map is no file
        done.removed += sum(ch.text is None for ch in batch)
        done.tokens += fed


def scan_project(
    root: Path,
    ledger: dict[str, dict],
    max_bytes: int = MAX_FILE_BYTES,
    rules: Rules | None = None,
    map_tokens: int = MAP_TOKENS,
) -> tuple[list[_Change], IngestResult]:
    """What an ingest would feed against the ledger: notes of removed files first, then new and changed text files
    in feed order (agent/hygiene.py), then the repository map (tools/repomap.py, within `map_tokens`; 0: none) if it
    changed; the skipped files (too large, unreadable, binary, or left out by `rules`: lock files, vendored,
    minified, generated, data) with their reasons."""
    rules = rules or Rules()
    result = IngestResult()
    changes = []
    files = project_files(root)
    accepted: list[tuple[str, str]] = []  # every text file ingest covers, changed or not: the repository map's
    for rel in files:
        path = root / rel
        key = rel.as_posix()
        why = rules.skip_by_path(key)
        if why:
            result.skipped.append((key, why))
            continue
        doc = is_document(key)
        try:
            st = path.stat()
            limit = MAX_DOCUMENT_BYTES if doc else max_bytes  # a document's limit is on its converted text
            if st.st_size > limit:
                result.skipped.append((key, f"larger than {limit:,} bytes"))
                continue
            data = path.read_bytes()
        except OSError as e:
            result.skipped.append((key, f"unreadable: {e.strerror}"))
            continue
        if doc:  # converted (again) only when its bytes changed
            digest = hashlib.sha256(data).hexdigest()
            if key in ledger and ledger[key]["sha256"] == digest:
                accepted.append((key, ""))  # listed in the map, without definitions
                result.unchanged += 1
                continue
            try:
                text = convert(path)
            except (DocumentError, OSError) as e:
                result.skipped.append((key, str(e)))
                continue
            if len(text.encode()) > max_bytes:
                result.skipped.append((key, f"converted text larger than {max_bytes:,} bytes"))
                continue
            accepted.append((key, ""))
            changes.append(_Change(key, text, digest, st.st_mtime, len(data), converter_for(key)))
            continue
        try:
            text = data.decode("utf-8")
            if "\0" in text:
                raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        except UnicodeDecodeError:
            result.skipped.append((key, "binary"))
            continue
        why = rules.skip_by_text(key, text)
        if why:
            result.skipped.append((key, why))
            continue
        accepted.append((key, text))
        digest = hashlib.sha256(data).hexdigest()
        if key in ledger and ledger[key]["sha256"] == digest:
            result.unchanged += 1
            continue
        changes.append(_Change(key, text, digest, st.st_mtime, len(data)))
    present = {rel.as_posix() for rel in files} | {MAP_PATH}
    order = {p: i for i, p in enumerate(feed_order(ch.path for ch in changes))}
    changes.sort(key=lambda ch: order[ch.path])
    texts = dict(accepted)
    if map_tokens > 0 and accepted:  # fed last, nearest the window; again only when it changed
        text = repo_map([(p, texts[p]) for p in reversed(feed_order(texts))], map_tokens)
        data = text.encode()
        digest = hashlib.sha256(data).hexdigest()
        if ledger.get(MAP_PATH, {}).get("sha256") != digest:
            changes.append(_Change(MAP_PATH, text, digest, None, len(data)))
    return [_Change(p, None) for p in sorted(set(ledger) - present)] + changes, result


def _grounded(answer: str, shown: list[str]) -> bool | None:
    """Whether the answer names a file this run's tool results showed; None where they showed none."""
    return any(p in answer for p in shown) if shown else None


def _answer_hint(answer: str, shown: list[str], grounded: bool | None) -> str | None:
    """What to tell the model when its answer cannot stand, else None: it names none of the files the tool results
    showed; it went round in circles until the loop guard cut it; or it lists one file twice in a row."""
    listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    if grounded is False:
        return (f"Your answer names none of the files the tool results showed ({listed}). Answer again from those "
                "results, citing the file path (and the line, page or section) where the answer is.")
    if LOOP_MARKER in answer:
        return ("Your answer repeated itself until it was cut off. Answer again, once and briefly, from the tool "
                f"results{f' ({listed})' if shown else ''}, naming each file once.")
    def listed_twice(p: str) -> bool:  # "`a.py`, `a.py`" or "a.py and a.py", not b/a.py or a.py.orig
        q = re.escape(p)
        return re.search(rf"(?<![\w/.-]){q}`?(?:,| and|, and) `?{q}(?![\w/-]|\.\w)", answer) is not None

    twice = [p for p in shown if listed_twice(p)]
    if twice:
        return (f"Your answer lists {twice[0]} twice. The tool results show these files: {listed}. Answer again, "
                "naming each file once.")
    return None


@dataclass
class _Uncommitted:
    """Ingested batches not committed yet: their turn rows, ledger rows and counts."""

    rows: list[dict] = field(default_factory=list)
    ledger: list[dict] = field(default_factory=list)
    files: int = 0
    removed: int = 0
    tokens: int = 0

    def commit(self, agent: Agent, result: IngestResult) -> None:
        """One transaction: the rows, the ledger and a snapshot, linked to the graph's checkpoint; counted in
        `result`, then forgotten."""
        if not self.rows:
            return
        checkpoint = agent.graph.get_state(agent.config).config["configurable"].get("checkpoint_id")
        result.snapshot_id = agent._commit(self.rows, checkpoint, self.ledger)
        result.files += self.files
        result.removed += self.removed
        result.tokens += self.tokens
        self.__init__()
