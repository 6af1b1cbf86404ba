"""scripts/distill.py end to end on the CPU (--tiny: a small random Llama teacher, a tiny corpus from the installed
packages, a few steps of each stage), run as users run it: a subprocess. The GPU run that made the shipped delta
goes through the same code with real sizes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from model import distilled

ROOT = Path(__file__).resolve().parents[2]


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_tiny_pipeline_writes_a_loadable_delta_and_an_evaluation(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    r = distill("all", "--tiny", "--work", str(work), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    held = (work / "heldout.u16").stat().st_size
    assert held > 0 and (work / "train.u16").stat().st_size > held  # split by package, most of it for training

    delta, meta = distilled.load_delta(out / "smollm2_hybrid.safetensors")
    assert meta["made_by"] == "scripts/distill.py" and meta["stage"] == "2"
    layers = {int(k.split(".")[2]) for k in delta}
    assert layers and all(i % 4 != 3 for i in layers)  # only the converted (DeltaNet) layers ship
    assert all(".linear_attn." in k or "layernorm" in k for k in delta)

    ev = json.loads((out / "eval.json").read_text())
    assert ev["chunk_op"] == "reference"
    assert set(ev["models"]) == {"teacher_full", "teacher_window64", "student_window64", "student_no_eviction"}
    for m in ev["models"].values():
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1 and 0 <= m["top1_agreement_with_teacher_full"] <= 1
    assert ev["models"]["teacher_full"]["top1_agreement_with_teacher_full"] == 1.0
    assert len(ev["recall"]) == 3

    r = distill("train", "--tiny", "--chunk-op", "triton", "--work", str(work), "--out", str(out))
    assert r.returncode != 0 and "no backward" in r.stderr and "Traceback" not in r.stderr
