"""Restore says what failed: a sound snapshot that does not fit in memory is OutOfMemory (not "bad snapshot"), a
damaged one is SnapshotError. The memory limit is real: a subprocess caps its own address space (RLIMIT_AS) just
above what it uses, then restores a state larger than the headroom."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from deltamem.model import load_model
    from deltamem.model.errors import OutOfMemory, SnapshotError

    blob = open(sys.argv[1], "rb").read()
    engine = load_model("random", window=60_000)  # two attention layers: about 123 MB of KV window
    def vm_bytes():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmSize:"))
        return int(line.split()[1]) * 1024
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    try:
        engine.restore(bytes(damaged))
    except SnapshotError as e:
        print("damaged:", e)
    from deltamem.model import snapshot as snap
    header, tensors = snap.unpack(blob)  # sound bytes (its own hashes), but a layer's state is missing
    partial = snap.pack(header, {k: v.clone() for k, v in tensors.items() if not k.startswith("layers.000")})
    try:
        engine.restore(partial)
    except SnapshotError as e:
        print("unfit:", str(e)[:40])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 40_000_000, hard))
    try:
        engine.restore(blob)
    except OutOfMemory as e:
        print("capped:", e)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    engine.restore(blob)
    print("uncapped: restored", engine.tokens_seen)
    """
)


def test_out_of_memory_is_not_a_bad_snapshot(tmp_path):
    from deltamem.model import load_model

    engine = load_model("random", window=60_000)
    engine.feed(list(range(100, 400)))
    (tmp_path / "s.snap").write_bytes(engine.snapshot())
    del engine
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s.snap")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("damaged: snapshot is corrupt")
    assert lines[1].startswith("unfit: snapshot state does not fit this model")
    assert lines[2].startswith("capped: not enough memory to restore a snapshot of") and "on cpu" in lines[2]
    assert lines[3] == "uncapped: restored 300"
