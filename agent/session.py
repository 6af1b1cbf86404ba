"""AgentSession: one engine bound to one stored session, fed append-only.

The state has consumed `ids` (whose text is `text`). Each model call renders the whole conversation with the
chat template; when `text` is a prefix of it, only the rest is tokenized and fed. When it is not (a template that
rewrites history, a stop string, a crash between a graph checkpoint and a snapshot), the newest snapshot whose
consumed text *is* a prefix is restored and the rest fed from there: logged, never a silent divergence.

A snapshot is stored with the ids its state consumed, and on resume those ids are checked against the
snapshot's own hash chain (`token_chain` in its header) before the state is trusted.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

from deltamem.agent.prompt import ChatTemplate, TemplateError
from deltamem.agent.protocol import stop_ids
from deltamem.memory.errors import NotFound, StoreError, WrongProject
from deltamem.memory.store import Store
from deltamem.model import snapshot as snap
from deltamem.model.sampling import LoopGuard

log = logging.getLogger("deltamem.agent")


class Cancelled(Exception):
    """Raised by feed_messages when `cancel` is set between two files."""


@dataclass
class Reply:
    text: str  # what the model wrote (end-of-turn token excluded)
    fed: int  # prompt tokens fed for this call
    generated: list[int] = field(default_factory=list)


LOOP_MARKER = "\n[deltamem: stopped here, the reply was repeating itself]"


class AgentSession:
    def __init__(self, engine, store: Store | None, session_id: str, convert_state: bool = False):
        """store None: no snapshots (a conversation that does not match the state is re-read from the start).
        convert_state: a snapshot of another dtype is converted on restore (recorded in `events`), not refused."""
        if engine.tokenizer is None:
            raise ValueError("the agent needs a model with a tokenizer")
        self.engine, self.store, self.sid = engine, store, session_id
        self.tok = engine.tokenizer
        self.template = ChatTemplate.for_tokenizer(self.tok)
        self.stop_ids = stop_ids(engine)
        self.ids: list[int] = []
        self.text = ""
        self.fed = 0  # tokens fed since this object was created (prompts, files and generated tokens)
        self.restored_from: int | None = None  # snapshot id the state was last restored from
        self.max_new_tokens = 512
        self.cancel = threading.Event()  # set from another thread: generation stops after its current token
        self.sampling: dict = {}  # temperature, top_p, top_k, seed for engine.generate
        self.convert_state = convert_state
        self.events: list[dict] = []  # turns to record with the next save (a state converted on resume)
        self.timing: dict[str, float] = {}  # seconds and counts since the caller last cleared it (see _time)
        self.loop_guard: LoopGuard | None = LoopGuard()  # ends a reply caught in a loop (see LOOP_MARKER)
        self.guide = None  # constrains what a reply may write where (agent/guide.py: tool calls), or None

    # --- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        engine,
        store: Store,
        name: str,
        project_root: str | Path | None = None,
        create: bool = True,
        convert_state: bool = False,
    ) -> AgentSession:
        """Resume the session `name` (id, or a title or id prefix of this project's) from its newest good snapshot,
        or create it in this project. A session of another project is never resumed here: a title names a
        session per project, and an id of another project's session is refused (WrongProject)."""
        project = store.project(project_root) if project_root is not None else None
        try:
            sess = store.session(name, project)
        except NotFound:
            # an imported session, or a moved repository: its folder is not here, so it is this folder's now
            sess = store.adopt(name, project) if project is not None else None
            if sess is None:
                if not create:
                    raise
                sess = store.session(store.create_session(name, engine.fingerprint, project))
        if project is not None and sess["project_id"] not in (None, project):  # asked for by id
            other = store.db["projects"].get(sess["project_id"])["root"]
            if not Path(other).is_dir():  # its folder is not on this machine: this one's now
                sess = store.move(sess["id"], project)
            else:
                raise WrongProject(
                    f"session {sess['id']} ({sess['title']!r}) belongs to the project at {other}, not "
                    f"{Path(project_root).resolve()}; run it with --repo {other}, or fork it (`deltamem sessions fork`)"
                )
        if sess["fingerprint"] != engine.fingerprint:
            raise StoreError(
                f"session {sess['title']!r} was saved with model {sess['fingerprint'][:12]}; this model is "
                f"{engine.fingerprint[:12]} (pass the same --model)"
            )
        # one writer per session: a second process waits, then is refused naming this one (memory/store.py lease)
        store.lease(sess["id"], "deltamem " + " ".join(sys.argv[1:2]))
        s = cls(engine, store, sess["id"], convert_state)
        s.resume()
        return s

    def _snapshots(self) -> list[dict]:
        return self.store.snapshots(self.sid) if self.store is not None else []

    def resume(self) -> None:
        """Restore the newest snapshot whose stored ids match its own hash chain; none: the empty state."""
        for row in reversed(self._snapshots()):
            if self._restore(row["id"]):
                return
        self._reset()

    def _reset(self) -> None:
        self.engine.reset()
        self.ids, self.text, self.restored_from = [], "", None

    def _restore(self, snapshot_id: int, ids: list[int] | None = None) -> bool:
        ids = self.store.load_tokens(self.sid, snapshot_id) if ids is None else ids
        if ids is None:
            log.warning("snapshot %s was saved without its token ids; skipping it", snapshot_id)
            return False
        blob = self.store.load_snapshot(self.sid, snapshot_id, joined=False)
        header, _ = snap.read_header(blob[0])
        if header.get("tokens_seen") != len(ids) or header.get("token_chain") != snap.chain(snap.EMPTY_CHAIN, ids):
            log.warning("snapshot %s does not match its stored token ids; skipping it", snapshot_id)
            return False
        t0 = time.perf_counter()
        converted = self.engine.restore(blob, convert_dtype=self.convert_state)
        self._time(restore_s=time.perf_counter() - t0, restored_tokens=len(ids))
        if converted:
            dtype = str(self.engine.dtype).removeprefix("torch.")
            text = f"the model state of snapshot {snapshot_id} was converted from {converted} to {dtype} on resume"
            log.warning("%s (--convert-state): the continuation is not exact", text)
            self.events.append({"role": "event", "text": text})
        self.ids, self.text, self.restored_from = list(ids), self.tok.decode(ids), snapshot_id
        return True

    # --- feeding -----------------------------------------------------------------------------------------
    def _sync(self, rendered: str) -> list[int]:
        """The ids to feed so that the state will have consumed `rendered`; rolls back first if it must."""
        if not rendered.startswith(self.text):
            self._roll_back(rendered)
        return self.tok.encode(rendered[len(self.text) :])

    def _roll_back(self, rendered: str) -> None:
        at = next((i for i, (a, b) in enumerate(zip(self.text, rendered, strict=False)) if a != b), len(self.text))
        for row in reversed(self._snapshots()):
            ids = self.store.load_tokens(self.sid, row["id"])
            if ids is not None and rendered.startswith(self.tok.decode(ids)) and self._restore(row["id"], ids):
                log.warning(
                    "the prompt differs from what the model state consumed at character %d of %d; restored "
                    "snapshot %s (turn %s, %d tokens) and feeding the rest from there",
                    at,
                    len(self.text),
                    row["id"],
                    row["turn_seq"],
                    len(ids),
                )
                return
        log.warning(
            "the prompt differs from what the model state consumed at character %d and no snapshot is a prefix "
            "of it; re-reading the whole conversation",
            at,
        )
        self._reset()

    def feed(self, messages: list[dict], add_generation_prompt: bool = False) -> int:
        """Make the state consume the rendered conversation (no generation); returns the tokens fed."""
        t0 = time.perf_counter()
        rendered = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        new = self._sync(rendered)
        if new:
            self.engine.feed(new, logits="none")
        self._consumed(new, rendered[len(self.text) :])
        self._time(feed_tokens=len(new), feed_s=time.perf_counter() - t0)
        return len(new)

    def stream_reply(self, messages: list[dict], max_new_tokens: int = 512, **sampling) -> Generator[str, None, Reply]:
        """Feed the conversation's new part plus the generation prompt, then generate the assistant's turn,
        yielding text pieces; returns the Reply. Closing it early stops generation with the state consistent."""
        rendered = self.template.render(messages, add_generation_prompt=True)
        new = self._sync(rendered)
        delta = rendered[len(self.text) :]
        if not new:  # the template added nothing (cannot happen with a generation prompt): nudge with a newline
            delta, new = "\n", self.tok.encode("\n")
        self.engine.generated, self.engine.last_generate = [], {}
        try:
            for piece in self.engine.generate(
                new,
                max_new_tokens=max_new_tokens,
                stop_ids=self.stop_ids,
                loop_guard=self.loop_guard,
                guide=self.guide,
                **sampling,
            ):
                yield piece
                if self.cancel.is_set():  # each yielded token is fully fed: stopping here is clean
                    break
        finally:  # finished, closed or interrupted: keep ids/text in step with the state, or go back to a known one
            g = getattr(self.engine, "last_generate", None) or {}
            self._time(
                prompt_tokens=g.get("prompt_tokens", 0), prompt_s=g.get("prompt_s", 0.0),
                decode_tokens=g.get("new_tokens", 0), decode_s=g.get("decode_s", 0.0),
                graph_capture_s=g.get("capture_s", 0.0),
            )  # fmt: skip
            gen = list(self.engine.generated)
            if self.engine.tokens_seen == len(self.ids) + len(new) + len(gen):
                self._consumed(new, delta)
                self._consumed(gen, self.tok.decode(gen))
            else:  # stopped inside a forward pass: the state is half-updated
                log.warning("generation was interrupted mid-step; going back to the last snapshot")
                self.resume()
        body = gen[:-1] if gen and gen[-1] in self.stop_ids else gen
        text = self.tok.decode(body)
        if getattr(self.engine, "stopped_by", None) == "loop" and self.engine.tokens_seen == len(self.ids):
            # the reply went round in circles: say so in it (the state reads the note too, so it stays the text)
            marker = self.tok.encode(LOOP_MARKER)
            self.engine.feed(marker, logits="none")
            self._consumed(marker, LOOP_MARKER)
            text += LOOP_MARKER
            yield LOOP_MARKER
        return Reply(text, len(new), gen)

    def reply(
        self, messages: list[dict], max_new_tokens: int = 512, on_piece: Callable[[str], None] | None = None, **sampling
    ) -> Reply:
        it = self.stream_reply(messages, max_new_tokens, **sampling)
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                return done.value
            if on_piece is not None:
                on_piece(piece)

    def _time(self, **figures: float) -> None:
        """Add to `timing`: restore_s/restored_tokens (resumes), prompt_*/decode_* (replies: tokens, seconds;
        graph_capture_s apart), feed_* (files and messages fed without a reply), save_s/save_bytes/save_new_bytes
        (snapshots: the whole save, of which snapshot_s to take the state's changed pieces to the host)."""
        for k, v in figures.items():
            self.timing[k] = self.timing.get(k, 0) + v

    def _consumed(self, ids: list[int], text: str) -> None:
        self.ids += ids
        self.text += text
        self.fed += len(ids)

    # --- the graph's brain ----------------------------------------------------------------------------------
    def respond(self, messages: list[dict], on_piece: Callable[[str], None]) -> str:
        return self.reply(messages, self.max_new_tokens, on_piece, **self.sampling).text

    def feed_messages(self, messages: list[dict], new_count: int, on_progress: Callable[[dict], None]) -> int:
        """Feed the last `new_count` messages (what comes before them, a new session's system prompt, is fed first),
        with a progress event after each (the tokens of that message alone). Their tokens go to the engine as one
        stream in whole prefill chunks (a message's tail shares a chunk with the next one's head): on a GPU many
        short files still run in large, uniform chunks."""
        start = len(messages) - new_count
        try:
            first = total = self.feed(messages[:start]) if start else 0
        except TemplateError:  # e.g. Qwen3.5's template refuses a conversation without a user message: the system
            first = total = 0  # prompt is fed with the first of the new messages
        chunk = self.engine.prefill_chunk
        unfed: list[int] = []  # consumed by the text and ids here, not yet by the engine
        t0 = time.perf_counter()
        try:
            for i in range(start + 1, len(messages) + 1):
                if self.cancel.is_set():
                    raise Cancelled("ingest cancelled")
                rendered = self.template.render(messages[:i], add_generation_prompt=False)
                if not rendered.startswith(self.text) and unfed:  # a roll-back comes: first feed what is pending
                    self.engine.feed(unfed, logits="none")
                    unfed = []
                new = self._sync(rendered)
                self._consumed(new, rendered[len(self.text) :])
                unfed += new
                whole = len(unfed) // chunk * chunk
                if whole:
                    self.engine.feed(unfed[:whole], logits="none")
                    unfed = unfed[whole:]
                total += len(new)
                on_progress({"done": i - start, "count": new_count, "tokens": len(new)})
            if unfed:
                self.engine.feed(unfed, logits="none")
                unfed = []
        finally:
            if unfed:  # stopped with tokens counted as consumed that the state never saw: back to a known state
                self.resume()
        self._time(feed_tokens=total - first, feed_s=time.perf_counter() - t0)
        return total

    # --- saving ------------------------------------------------------------------------------------------
    def save(self, turns: list[dict], checkpoint_id: str | None = None, ingested=(), name: str | None = None) -> int:
        """Store the turns, ledger entries and a snapshot of the state (with its ids), in one transaction."""
        t0 = time.perf_counter()
        parts = self.engine.snapshot_parts()
        self._time(snapshot_s=time.perf_counter() - t0)
        snap_id = self.store.save_turn(
            self.sid,
            turns,
            parts,
            ingested=ingested,
            checkpoint_id=checkpoint_id,
            token_ids=self.ids,
            name=name,
        )
        saved = self.store.last_save
        self._time(save_s=time.perf_counter() - t0, save_bytes=saved["bytes"], save_new_bytes=saved["new_bytes"])
        return snap_id
