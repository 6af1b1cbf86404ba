"""Where sessions and snapshot pieces live, side by side in one run: inside the SQLite file, in a local folder
(`--objects file://`), in S3 (`--objects s3://`, SeaweedFS's gateway on this machine, started here as the tests
start it); and the same with the rows in PostgreSQL (`--db postgresql://`, a server on this machine from Debian's
binaries, fsync on), pieces inside it or in S3.

The default model reads a 2,000-token prefix, then takes 200-token turns, each saved with its snapshot
(Store.save_turn); per backend: seconds to save a turn (pieces, rows, commit), bytes a turn writes (new pieces),
what the database file itself holds, and seconds to load the last snapshot back (Store.load_snapshot, every piece
checked against its hash) and restore it, checked to continue exactly.

    python benchmarks/objects.py [--turns 8]

Writes benchmarks/results/objects_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_results

from deltamem.memory.store import Store
from deltamem.model import load_model

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo: tests.objectstore (last: no shadowing)
from tests.objectstore import seaweedfs  # noqa: E402
from tests.postgres import create_database, pg_bin, postgres_server  # noqa: E402


def run(label: str, db: Path | str, objects: str, eng, turns: int, gen_seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(gen_seed)
    vocab = eng.config.vocab_size
    eng.reset()
    with Store(db, objects=objects) as store:
        sid = store.create_session("bench", eng.fingerprint)
        eng.feed(torch.randint(0, vocab, (2000,), generator=gen).tolist(), logits="none")
        store.save_turn(sid, [{"role": "user", "text": "prefix"}], eng.snapshot())
        saves, new = [], []
        for t in range(turns):
            eng.feed(torch.randint(0, vocab, (200,), generator=gen).tolist(), logits="none")
            blob = eng.snapshot()
            t0 = time.perf_counter()
            store.save_turn(sid, [{"role": "user", "text": f"turn {t}"}], blob)
            saves.append(time.perf_counter() - t0)
            new.append(store.last_save["new_bytes"])
        follow = torch.randint(0, vocab, (4,), generator=gen).tolist()
        want = eng.feed(follow)
        t0 = time.perf_counter()
        parts = store.load_snapshot(sid, joined=False)
        load_s = time.perf_counter() - t0
        eng.restore(parts)
        exact = torch.equal(eng.feed(follow), want)
        db_bytes = store.file_bytes()
    return {"backend": label, "save_ms_median": 1e3 * statistics.median(saves), "new_kb_per_turn":
            statistics.median(new) / 1024, "snapshot_kb": len(blob) / 1024, "db_kb": db_bytes / 1024,
            "load_ms": 1e3 * load_s, "continues_exactly": exact}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=8)
    args = ap.parse_args()
    eng = load_model("default")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with seaweedfs(tmp / "weed") as s3, contextlib.ExitStack() as stack:
            os.environ.update(s3.env)
            for label, objects in (("SQLite file", ""), ("folder (file://)", f"file://{tmp / 'objects'}"),
                                   ("S3 (SeaweedFS, local)", s3.url("bench"))):  # fmt: skip
                rows.append(run(label, tmp / f"{len(rows)}.db", objects, eng, args.turns))
                print(rows[-1], flush=True)
            if pg_bin() is None:
                print("PostgreSQL's server binaries are not installed: its rows are left out", flush=True)
            else:
                server = stack.enter_context(postgres_server(fsync=True))
                for label, objects in (("PostgreSQL", ""), ("PostgreSQL + S3", s3.url("bench-pg"))):
                    rows.append(run(label, create_database(server, f"bench{len(rows)}"), objects, eng, args.turns))
                    print(rows[-1], flush=True)
    write_results(
        "objects_cpu", rows, "Sessions in SQLite or PostgreSQL, snapshot pieces inside the database, in a folder or "
        "in S3 (`benchmarks/objects.py`)",
        ["backend", "save_ms_median", "new_kb_per_turn", "snapshot_kb", "db_kb", "load_ms", "continues_exactly"],
        turns=args.turns, model="default",
    )


if __name__ == "__main__":
    main()
