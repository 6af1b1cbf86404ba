"""Shared helpers for benchmarks: corpus tokens, timing, and the results format (JSON + markdown in results/)."""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import sysconfig
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("deltamem") is None:  # a bare checkout (nothing installed): this tree is the package
    sys.modules["deltamem"] = types.ModuleType("deltamem")
    sys.modules["deltamem"].__path__ = [str(ROOT)]
RESULTS = ROOT / "benchmarks" / "results"


def corpus_text(min_chars: int) -> str:
    """Real text to tokenize: the standard library's own Python sources, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(stdlib.glob("*.py")):
        s = f.read_text(errors="replace")
        parts.append(s)
        n += len(s)
        if n >= min_chars:
            break
    return "".join(parts)


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Median wall time in seconds over `repeat` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions(**extra: str) -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, **extra}


def write_results(name: str, rows: list[dict], title: str, columns: list[str], **meta) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"device": device_name(), "versions": meta.pop("versions", None) or versions(), **meta, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# {title}", "", f"Device: {doc['device']}; torch {torch.__version__}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.json"


def write_out(out: Path, name: str, doc: dict, lines: list[str]) -> None:
    """A GPU benchmark's figures into --out (brought back from the device): NAME.json (doc) and NAME.md (lines),
    the table printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def olmo_hybrid_7b_config() -> dict:
    """OLMo Hybrid 7B's shapes: hidden 3840, 32 layers = 8 x (3 Gated DeltaNet + 1 attention), 30 heads
    of 128 (30 KV heads), DeltaNet key head 96, value head 192, conv 4, no rotary."""
    return {
        "model_type": "olmo_hybrid",
        "vocab_size": 100352,
        "hidden_size": 3840,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 30,
        "num_key_value_heads": 30,
        "linear_num_key_heads": 30,
        "linear_num_value_heads": 30,
        "linear_key_head_dim": 96,
        "linear_value_head_dim": 192,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": None},
    }
