"""scripts/distill.py end to end on the CPU (--tiny: a small random Llama teacher, a tiny corpus from the installed
packages, a few steps of each stage), run as users run it: a subprocess. The GPU run that made the shipped delta
goes through the same code with real sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

    # a second invocation resumes from the checkpoint; stage-2 seconds add up across invocations (the LR horizon)
    s2 = torch.load(work / "ckpt.pt", weights_only=False)["state"]["stage2_s"]
    assert s2 > 0
    r = distill("train", "--tiny", "--steps2", "6", "--work", str(work), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(work / "ckpt.pt", weights_only=False)["state"]
    assert "resumed at stage 2 step 4" in r.stderr + r.stdout and state["step"] == 6 and state["stage2_s"] > s2

    r = distill("train", "--tiny", "--chunk-op", "triton", "--work", str(work), "--out", str(out))
    assert r.returncode != 0 and "no backward" in r.stderr and "Traceback" not in r.stderr


def test_learning_rate_schedule():
    spec = importlib.util.spec_from_file_location("distill", ROOT / "scripts" / "distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    peak = 1e-3
    assert mod.lr_at(0, 100, peak) == pytest.approx(peak / 20)  # linear warm-up over 20 steps
    assert mod.lr_at(19, 100, peak) == pytest.approx(peak)
    assert mod.lr_at(100, 100, peak) == pytest.approx(0.1 * peak)  # cosine down to 10% at the last step
    assert mod.lr_at(60, 100, peak) == pytest.approx(0.55 * peak)  # half-way: 0.1 + 0.9 * 0.5
    # time runs out first: the time fraction decides, so a run cut by time ends annealed
    assert mod.lr_at(30, 1000, peak, time_frac=0.5) == pytest.approx(0.55 * peak)
    assert mod.lr_at(30, 1000, peak, time_frac=1.0) == pytest.approx(0.1 * peak)
