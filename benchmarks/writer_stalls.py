"""How long `deltamem serve`'s prefix-state writer stops the other threads (the batch scheduler's among them) while it
stores states of OLMo Hybrid 7B's shapes (559 MB each: 32 layers, window 4096), on the CPU.

A thread standing in for the scheduler runs small torch ops and a 0.5 ms sleep in a loop and records the time of each
round (0.6 ms when nothing else runs): a round that takes longer waited for the GIL or for a core. Measured side by
side: with nothing else running; while the writer stores N states as the server did before (the safetensors header of
the state's layout made at its first state; the pieces' bytes bound as SQL parameters, which SQLite copies holding
the GIL); with the header made as the server starts (server/prefix.py `_warm`); and as it does now, the pieces also
written through SQLite's blob API, which lets the GIL go (memory/snapshots.py `_insert_piece`). Only the state's
tensors are real: the weights are left unset (never read).

    python benchmarks/writer_stalls.py [--states 4]

Writes benchmarks/results/writer_stalls.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import olmo_hybrid_7b_config, write_results

from deltamem.memory.store import Store
from deltamem.model import snapcache
from deltamem.model.cache import KVWindow
from deltamem.model.config import ModelConfig
from deltamem.model.engine import Engine
from deltamem.model.layers import HybridLM
from deltamem.server.prefix import PrefixCache

TICK_S = 0.0005


def engine_of_7b_state() -> Engine:
    """An engine with OLMo Hybrid 7B's state (a 5,000-token one, random) and a small MLP and vocabulary."""
    cfg = ModelConfig.from_hf({**olmo_hybrid_7b_config(), "intermediate_size": 64, "vocab_size": 512})
    with torch.device("meta"):
        model = HybridLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    eng = Engine(model.eval(), None, window=4096, sink=4, fingerprint="writer-stalls")
    for st in eng.states:
        if isinstance(st, KVWindow):
            st.k.normal_(), st.v.normal_()
            st.pos.copy_(torch.arange(st.pos.numel()).view_as(st.pos))
            st.seen = 5000
        else:
            st.conv.normal_(), st.recurrent.normal_()
    eng.tokens_seen = 5000
    return eng


def rounds(work) -> dict:
    """Run work() while the stand-in scheduler thread records its rounds."""
    stop, times = threading.Event(), []

    def scheduler():
        a, b = torch.ones(64), torch.ones(64)
        t = time.perf_counter()
        while not stop.is_set():
            for _ in range(20):
                a.add_(b)
            time.sleep(TICK_S)
            now = time.perf_counter()
            times.append(now - t)
            t = now

    thread = threading.Thread(target=scheduler)
    thread.start()
    t0 = time.perf_counter()
    work()
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    times.sort()
    return {"wall_s": round(wall, 2), "rounds": len(times), "round_median_ms": round(1e3 * statistics.median(times), 2),
            "round_p99_ms": round(1e3 * times[int(0.99 * len(times))], 1), "round_max_ms": round(1e3 * times[-1], 1),
            "stalled_s": round(sum(max(0.0, t - 0.002) for t in times), 2)}  # fmt: skip


def bound(store: Store, digest: str, data) -> None:
    """A piece's bytes bound as a parameter (as before: SQLite copies them holding the GIL)."""
    store.db.execute("insert into pieces (sha256, bytes, data) values (?, ?, ?)", [digest, len(data), data])


def store_states(eng: Engine, n: int, warm_header: bool, blob_api: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "m.db") as store:
        cache = PrefixCache(eng, store, byte_budget=64 << 30)
        if not warm_header:
            snapcache._HEADS.clear()  # as before: the first state's snapshot makes the header
        if not blob_api:
            store._insert_piece = lambda digest, data: bound(store, digest, data)

        def work():
            for i in range(n):
                for st in eng.states:  # a new prompt's state: every piece differs from the last
                    (st.k if isinstance(st, KVWindow) else st.recurrent).add_(1)
                cache.save_kept("s", list(range(i, i + 2000)), eng.keep())
            cache.flush()

        row = rounds(work)
        for phase in ("copy", "snapshot", "store"):  # the writer's own seconds
            row[f"writer_{phase}_s"] = round(cache.metrics.writer.labels(phase)._value.get(), 2)
        cache.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--states", type=int, default=4)
    args = ap.parse_args()
    eng = engine_of_7b_state()
    mb = eng.state_bytes() / 2**20
    store_states(eng, 1, True)  # not counted: the first host copies and SQLite file of the process
    rows = [{"writer": "none", "states": 0, **rounds(lambda: time.sleep(2))}]
    for name, warm, blob_api in (("header made at the first state, pieces bound (before)", False, False),
                                 ("header made at start, pieces bound", True, False),
                                 ("header made at start, pieces written as blobs (now)", True, True)):
        rows.append({"writer": name, "states": args.states, **store_states(eng, args.states, warm, blob_api)})
        print(rows[-1], flush=True)
    write_results(
        "writer_stalls", rows, f"A stand-in scheduler thread's rounds while the prefix writer stores {args.states} "
        f"states of {mb:.0f} MB (OLMo Hybrid 7B shapes; `benchmarks/writer_stalls.py`)",
        ["writer", "states", "wall_s", "writer_copy_s", "writer_snapshot_s", "writer_store_s", "rounds",
         "round_median_ms", "round_p99_ms", "round_max_ms", "stalled_s"],
        state_mb=round(mb, 1), tick_s=TICK_S,
    )


if __name__ == "__main__":
    main()
