"""Memory store costs: snapshot save/load time and bytes as a session grows, and bytes written per turn at
OLMo Hybrid 7B's state shapes, on a real SQLite file.

Part 1 (the default model, 4k window, real text): at N = 1k, 4k, 16k, 64k tokens seen, generate a 64-token reply
and save the turn with its snapshot (engine.snapshot + Store.save_turn); load it back (Store.load_snapshot +
restore into a fresh engine, checked to continue exactly). The save must cost < 5% of the reply.

Part 2 (OLMo Hybrid 7B shapes, random state tensors, no weights): 24 DeltaNet states (53 MB fp32 + conv) and 8
bf16 KV windows of 4 sink + 4096 slots (120 KiB/token), driven through the engine's real cache code; after the
window is full, turns of 200 new tokens. Bytes written per turn (new pieces + the snapshot's headers) against
the floor the design allows: the DeltaNet state plus the KV pages that changed (counted by comparing pages).

    python benchmarks/state_store.py [--sizes 1024,4096,16384,65536] [--turns 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import corpus_text, olmo_hybrid_7b_config, timed, write_results

from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.model import snapshot as snap
from deltamem.model.cache import DeltaState
from deltamem.model.config import ModelConfig
from deltamem.model.engine import empty_states


def _db_bytes(store: Store) -> int:
    return (
        store.db.execute("select coalesce(sum(bytes), 0) from pieces").fetchone()[0]
        + store.db.execute("select coalesce(sum(length(prefix)), 0) from snapshots").fetchone()[0]
    )


def growth(sizes: list[int], window: int, tmp: Path) -> list[dict]:
    """At each N: bring the session to N tokens (a bulk save, as after an ingest), then one chat turn: a 64-token
    reply and the save that follows it, the cost a user pays after every answer."""
    engine = load_model("random", window=window, device="cpu", quant="none", compile_decode=False)
    fresh = load_model("random", window=window, device="cpu", quant="none", compile_decode=False)
    ids = engine.tokenizer.encode(corpus_text(6 * max(sizes)))
    rows = []
    with Store(tmp / "growth.db") as store:
        sid = store.create_session("growth", engine.fingerprint)

        def save(text: str) -> tuple[float, float, int, bytes]:
            before = _db_bytes(store)
            t0 = time.perf_counter()
            blob = engine.snapshot()
            t1 = time.perf_counter()
            store.save_turn(sid, [{"role": "user", "text": text}], blob)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, _db_bytes(store) - before, blob

        engine.feed(ids[:16], logits="none")
        save("warm-up")  # a long-running app is past its first allocations of snapshot-sized buffers
        for n in sizes:
            engine.feed(ids[engine.tokens_seen : n], logits="none")
            _, _, bulk_written, _ = save(f"read up to {n}")
            turns = []
            for k in range(3):  # three reply + save turns; medians, as the machine is noisy
                t0 = time.perf_counter()
                list(engine.generate(ids[n + k : n + k + 1], max_new_tokens=64, stop_ids=[]))
                reply_s = time.perf_counter() - t0
                assert len(engine.generated) == 64
                turns.append((reply_s, *save("reply")))
            reply_s = statistics.median(t[0] for t in turns)
            pack_s = statistics.median(t[1] for t in turns)
            store_s = statistics.median(t[2] for t in turns)
            written = statistics.median(t[3] for t in turns)
            blob = turns[-1][4]

            def load():
                fresh.restore(store.load_snapshot(sid))

            load_s, _ = timed(load, repeat=3)
            nxt = ids[n + 3 : n + 7]
            assert torch.equal(fresh.feed(nxt), engine.feed(nxt)), "restored state diverged"
            row = {
                "tokens_seen": engine.tokens_seen - len(nxt),
                "snapshot_bytes": len(blob),
                "bulk_written_bytes": bulk_written,
                "turn_written_bytes": written,
                "pack_ms": pack_s * 1e3,
                "store_ms": store_s * 1e3,
                "save_ms": (pack_s + store_s) * 1e3,  # medians of pack and store, each over the three turns
                "load_ms": load_s * 1e3,
                "reply64_ms": reply_s * 1e3,
                "save_pct_of_reply": 100 * (pack_s + store_s) / reply_s,
            }
            rows.append(row)
            print(
                f"N={n:>6}: snapshot {len(blob) / 1e6:.2f} MB (bulk wrote {bulk_written / 1e6:.2f} MB, turn wrote "
                f"{written / 1e6:.2f} MB) | save {row['save_ms']:.1f} ms (pack {row['pack_ms']:.1f}) | load "
                f"{row['load_ms']:.1f} ms | 64-token reply {row['reply64_ms']:.0f} ms | save = "
                f"{row['save_pct_of_reply']:.2f}% of the reply",
                flush=True,
            )
    return rows


def seven_b_turns(turns: int, turn_tokens: int, window: int, sink: int, tmp: Path) -> list[dict]:
    cfg = ModelConfig.from_hf(olmo_hybrid_7b_config())
    states = empty_states(cfg, window, sink, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    seen = 0

    def advance(n: int) -> None:
        """n new tokens: every DeltaNet state changes; each KV window gets n random keys/values."""
        nonlocal seen
        pos = torch.arange(seen, seen + n)
        for st in states:
            if isinstance(st, DeltaState):
                st.recurrent = torch.randn(st.recurrent.shape, generator=gen)
                st.conv = torch.randn(st.conv.shape, generator=gen).to(st.conv.dtype)
            else:
                shape = (n, st.k.shape[0], st.k.shape[2])
                st._write(
                    torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16(), pos
                )
                st.seen += n
        seen += n

    def blob() -> tuple[bytes, dict[str, torch.Tensor]]:
        tensors = {}
        for i, st in enumerate(states):
            tensors.update(st.tensors(f"layers.{i:03d}"))
        header = {"fingerprint": "olmo-hybrid-7b-shapes", "tokens_seen": seen, "window": window, "sink": sink}
        return snap.pack(header, tensors), {k: v.clone() for k, v in tensors.items()}

    rows = []
    with Store(tmp / "7b.db") as store:
        sid = store.create_session("7b", "olmo-hybrid-7b-shapes")
        advance(sink + window + 100)  # the window is full: steady state from here on
        first, prev = blob()
        store.save_turn(sid, [{"role": "user", "text": "warm-up"}], first)
        state_bytes = sum(t.numel() * t.element_size() for n, t in prev.items() if ".kv." not in n)
        for turn in range(turns):
            advance(turn_tokens)
            before = _db_bytes(store)
            t0 = time.perf_counter()
            b, cur = blob()
            t1 = time.perf_counter()
            store.save_turn(sid, [{"role": "user", "text": f"turn {turn}", "tokens": turn_tokens}], b)
            t2 = time.perf_counter()
            written = _db_bytes(store) - before
            changed = {n for n in cur if ".kv." in n and not torch.equal(cur[n], prev[n])}
            floor = state_bytes + sum(cur[n].numel() * cur[n].element_size() for n in changed)
            t3 = time.perf_counter()
            assert store.load_snapshot(sid) == b
            t4 = time.perf_counter()
            prev = cur
            row = {
                "turn": turn + 1,
                "tokens_seen": seen,
                "snapshot_bytes": len(b),
                "written_bytes": written,
                "floor_bytes": floor,
                "written_over_floor": written / floor,
                "changed_pages": len(changed),
                "snapshot_ms": (t1 - t0) * 1e3,
                "store_ms": (t2 - t1) * 1e3,
                "load_ms": (t4 - t3) * 1e3,
            }
            rows.append(row)
            print(
                f"7B turn {turn + 1}: snapshot {len(b) / 1e6:.0f} MB, wrote {written / 1e6:.1f} MB = "
                f"{row['written_over_floor']:.4f} x floor ({state_bytes / 1e6:.1f} MB state + {len(changed)} pages) | "
                f"pack {row['snapshot_ms']:.0f} ms, store {row['store_ms']:.0f} ms, load {row['load_ms']:.0f} ms",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096,16384,65536")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-tokens", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grow = growth([int(s) for s in args.sizes.split(",")], args.window, Path(tmp))
        seven = seven_b_turns(args.turns, args.turn_tokens, args.window, 4, Path(tmp))
    out = write_results(
        "memory_cpu",
        grow,
        "Memory store: snapshot save/load vs tokens seen (default model, 4k window, SQLite file)",
        [
            "tokens_seen",
            "snapshot_bytes",
            "bulk_written_bytes",
            "turn_written_bytes",
            "save_ms",
            "load_ms",
            "reply64_ms",
            "save_pct_of_reply",
        ],
        window=args.window,
        olmo_hybrid_7b_turns=seven,
        command="python benchmarks/state_store.py",
    )
    md = out.with_suffix(".md")
    lines = [
        "",
        f"## Bytes written per turn at OLMo Hybrid 7B state shapes ({args.turn_tokens}-token turns, "
        f"4+{args.window} window)",
        "",
        "| turn | snapshot_bytes | written_bytes | floor_bytes | written/floor | changed pages | store_ms | load_ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in seven:
        lines.append(
            f"| {r['turn']} | {r['snapshot_bytes']:,} | {r['written_bytes']:,} | {r['floor_bytes']:,} | "
            f"{r['written_over_floor']:.4f} | {r['changed_pages']} | {r['store_ms']:.0f} | {r['load_ms']:.0f} |"
        )
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
