"""GPU benchmark of the Gated DeltaNet kernels: ours (kernels/*.py) vs fla vs the torch reference.

Shapes (--shape): OLMo Hybrid 7B's DeltaNet layer (B=1, H=HV=30, K=96, V=192) or Qwen3.5-9B's (H=16 key heads, HV=32
value heads, K=V=128); bf16 inputs, fp32 state. Reports the chunked
prefill at several T (ms, tokens/s per layer, ours/fla), the T=1 recurrent step (us), the short conv and gated norm,
and relative errors of ours vs fla and vs an fp32 torch reference. Writes kernels_gpu.json/.md (OLMo) or
kernels_gpu_qwen35_9b.json/.md.

    python benchmarks/gdn_kernels.py --out benchmarks/results [--shape qwen35_9b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import common  # noqa: F401  (deltamem from this checkout when it is not installed)
import torch

from deltamem.kernels import reference

SHAPES = {"olmo7b": (30, 30, 96, 192), "qwen35_9b": (16, 32, 128, 128)}  # H, HV, K, V
H, HV, DK, DV = SHAPES["olmo7b"]
CONV_W = 4
ROTATE_BYTES = 256 << 20  # enough distinct input sets to stream past the L2 cache


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(t: int, seed: int, b: int = 1) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    return {
        "q": randn(b, t, H, DK).bfloat16(),
        "k": randn(b, t, H, DK).bfloat16(),
        "v": randn(b, t, HV, DV).bfloat16(),
        "g": torch.nn.functional.logsigmoid(randn(b, t, HV) + 3.0),  # log decay, mostly close to 0
        "beta": torch.sigmoid(randn(b, t, HV)).bfloat16(),
        "initial_state": randn(b, HV, DK, DV) * 0.05,
    }


def rotating(t: int, seed: int) -> list[dict]:
    per_set = t * (2 * H * DK + HV * DV) * 2
    return [make_inputs(t, seed + i) for i in range(max(1, min(8, ROTATE_BYTES // max(per_set, 1))))]


def bench(fn, sets: list[dict], rep_ms: int = 200) -> float:
    """Median ms of fn(**inputs) by triton.testing.do_bench, cycling through the input sets."""
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fn(**sets[state["i"] % len(sets)])
        state["i"] += 1

    return float(do_bench(call, warmup=25, rep=rep_ms, return_mode="median"))


def versions() -> dict:
    import triton

    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "fla": None,
    }
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "unknown")
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="2048,8192,32768,65536")
    ap.add_argument("--reference-max-t", type=int, default=32768, help="skip the torch reference above this T")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmo7b")
    args = ap.parse_args()
    global H, HV, DK, DV
    H, HV, DK, DV = SHAPES[args.shape]
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gdn_kernels.py needs a CUDA GPU")
    from deltamem.kernels import triton_ops as ours

    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except ImportError as e:
        fla_chunk = fla_recurrent = None
        print(f"fla not importable ({e}): running ours and the torch reference only")
    info = versions()
    info["low_precision_stages"] = sorted(x for x in ours.LOW_PRECISION if x)
    print(json.dumps(info))
    started = time.time()
    scale = DK**-0.5

    def run_ours(**x):
        return ours.chunk_gated_delta_rule(**x)

    def run_fla(**x):
        return fla_chunk(**x, scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=True)

    def run_ref(**x):
        return reference.chunk_gated_delta_rule(**x)

    chunk_rows = []
    for t in [int(x) for x in args.lengths.split(",")]:
        sets = rotating(t, seed=t)
        row: dict = {"T": t, "input_sets": len(sets)}
        x0 = sets[0]
        o, s = run_ours(**x0)
        if t <= 8192:  # fp32 reference on the same bf16 inputs
            ro, rs = reference.chunk_gated_delta_rule(**{k: v.float() for k, v in x0.items()})
            row["ours_vs_fp32_ref"] = {"o": rel(o, ro), "state": rel(s, rs)}
        row["ours_ms"] = bench(run_ours, sets)
        if fla_chunk is not None:
            fo, fs = run_fla(**x0)
            row["ours_vs_fla"] = {"o": rel(o, fo), "state": rel(s, fs)}
            if "ours_vs_fp32_ref" in row:
                row["fla_vs_fp32_ref"] = {"o": rel(fo, ro), "state": rel(fs, rs)}
            row["fla_ms"] = bench(run_fla, sets)
            row["ours_over_fla"] = row["ours_ms"] / row["fla_ms"]
        if t <= args.reference_max_t:
            row["ref_ms"] = bench(run_ref, sets[:1], rep_ms=100)
        else:
            row["ref_ms"] = None
            row["ref_note"] = f"torch reference skipped above T={args.reference_max_t} (slow)"
        for name in ("ours", "fla", "ref"):
            if row.get(f"{name}_ms"):
                row[f"{name}_mtok_s"] = t / row[f"{name}_ms"] / 1e3
        print(json.dumps(row))
        chunk_rows.append(row)
        del sets, x0, o, s
        torch.cuda.empty_cache()

    # T=1 decode step
    sets = [make_inputs(1, 1000 + i) for i in range(16)]
    step: dict = {}
    x0 = sets[0]
    o, s = ours.recurrent_gated_delta_rule(**x0)
    ro, rs = reference.recurrent_gated_delta_rule(**{k: v.float() for k, v in x0.items()})
    step["ours_vs_fp32_ref"] = {"o": rel(o, ro), "state": rel(s, rs)}
    step["ours_us"] = 1e3 * bench(lambda **x: ours.recurrent_gated_delta_rule(**x), sets)
    step["ref_us"] = 1e3 * bench(lambda **x: reference.recurrent_gated_delta_rule(**x), sets)
    if fla_recurrent is not None:

        def run_fla_rec(**x):
            return fla_recurrent(**x, scale=scale, output_final_state=True, use_qk_l2norm_in_kernel=True)

        fo, fs = run_fla_rec(**x0)
        step["ours_vs_fla"] = {"o": rel(o, fo), "state": rel(s, fs)}
        step["fla_us"] = 1e3 * bench(run_fla_rec, sets)
        step["ours_over_fla"] = step["ours_us"] / step["fla_us"]
    own = [{**x, "initial_state": x["initial_state"].clone()} for x in sets]  # the in-place run advances these
    step["ours_inplace_us"] = 1e3 * bench(lambda **x: ours.recurrent_gated_delta_rule(**x, inplace=True), own)
    print(json.dumps(step))

    # short conv (decode and a 8k prefill) and gated norm, ours vs the torch reference
    c = 2 * H * DK + HV * DV
    misc = {}
    for t in (1, 8192):
        gen = torch.Generator(device="cuda").manual_seed(t)
        x = torch.randn(t, c, generator=gen, device="cuda").bfloat16()
        w = torch.randn(c, CONV_W, generator=gen, device="cuda").bfloat16()
        st = torch.randn(CONV_W - 1, c, generator=gen, device="cuda").bfloat16()
        y, _ = ours.causal_conv1d(x, w, st)
        ry, _ = reference.causal_conv1d(x.float(), w.float(), st.float())
        conv_in = [{"x": x, "weight": w, "state": st}]
        misc[f"conv_T{t}"] = {
            "ours_us": 1e3 * bench(ours.causal_conv1d, conv_in),
            "ref_us": 1e3 * bench(reference.causal_conv1d, conv_in),
            "ours_vs_fp32_ref": rel(y, ry),
        }
        xn = torch.randn(t * HV, DV, generator=gen, device="cuda").bfloat16()
        gate = torch.randn(t * HV, DV, generator=gen, device="cuda").bfloat16()
        weight = torch.rand(DV, generator=gen, device="cuda") + 0.5
        yn = ours.gated_rms_norm(xn, gate, weight, 1e-5)
        norm_in = [{"x": xn, "gate": gate, "weight": weight, "eps": 1e-5}]
        misc[f"gated_norm_T{t}"] = {
            "ours_us": 1e3 * bench(ours.gated_rms_norm, norm_in),
            "ref_us": 1e3 * bench(reference.gated_rms_norm, norm_in),
            "ours_vs_ref": rel(yn, reference.gated_rms_norm(xn, gate, weight, 1e-5)),
        }
    print(json.dumps(misc))

    result = {
        "info": info,
        "shapes": {"B": 1, "H": H, "HV": HV, "K": DK, "V": DV, "dtype": "bfloat16", "state": "float32"},
        "chunk": chunk_rows,
        "recurrent_step": step,
        "conv_and_norm": misc,
        "seconds": time.time() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_gpu" if args.shape == "olmo7b" else f"kernels_gpu_{args.shape}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    i = r["info"]
    lines = [
        "# Gated DeltaNet kernels on GPU",
        "",
        f"{i['device']}; torch {i['torch']}, triton {i['triton']}, fla {i['fla'] or 'not installed'}. "
        f"Shapes: B=1, H={H}, HV={HV}, K={DK}, V={DV}, bf16 inputs, fp32 state; per layer. "
        f"Median of triton.testing.do_bench over rotating inputs. 16-bit product stages: "
        f"{', '.join(i['low_precision_stages']) or 'none'}.",
        "",
        "## Chunked prefill",
        "",
        "| T | ours ms | fla ms | torch ref ms | ours Mtok/s | fla Mtok/s | ours/fla | rel err o vs fla | "
        "rel err state vs fla | rel err o vs fp32 ref (ours / fla) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["chunk"]:
        vf = row.get("ours_vs_fla", {})
        ref = row.get("ours_vs_fp32_ref")
        fref = row.get("fla_vs_fp32_ref")
        ref_s = "-" if ref is None else f"{ref['o']:.2e} / {fref['o']:.2e}" if fref else f"{ref['o']:.2e} / -"
        lines.append(
            f"| {row['T']} | {_f(row.get('ours_ms'))} | {_f(row.get('fla_ms'))} | "
            f"{_f(row.get('ref_ms'), '{:.1f}') if row.get('ref_ms') else 'skipped'} | "
            f"{_f(row.get('ours_mtok_s'), '{:.2f}')} | {_f(row.get('fla_mtok_s'), '{:.2f}')} | "
            f"{_f(row.get('ours_over_fla'), '{:.2f}')} | {_f(vf.get('o'), '{:.2e}')} | "
            f"{_f(vf.get('state'), '{:.2e}')} | {ref_s} |"
        )
    s = r["recurrent_step"]
    lines += [
        "",
        "## Recurrent step (T=1)",
        "",
        "| ours us | ours in-place us | fla us | torch ref us | ours/fla | rel err o vs fla | rel err o vs fp32 ref |",
        "|---|---|---|---|---|---|---|",
        f"| {_f(s['ours_us'], '{:.1f}')} | {_f(s['ours_inplace_us'], '{:.1f}')} | {_f(s.get('fla_us'), '{:.1f}')} | "
        f"{_f(s['ref_us'], '{:.1f}')} | {_f(s.get('ours_over_fla'), '{:.2f}')} | "
        f"{_f(s.get('ours_vs_fla', {}).get('o'), '{:.2e}')} | {s['ours_vs_fp32_ref']['o']:.2e} |",
        "",
        "## Short conv and gated norm",
        "",
        "| op | ours us | torch ref us | rel err |",
        "|---|---|---|---|",
    ]
    for name, m in r["conv_and_norm"].items():
        err = m.get("ours_vs_fp32_ref", m.get("ours_vs_ref"))
        lines.append(f"| {name} | {m['ours_us']:.1f} | {m['ref_us']:.1f} | {err:.2e} |")
    skipped = [row["ref_note"] for row in r["chunk"] if row.get("ref_note")]
    if skipped:
        lines += ["", skipped[0] + "."]
    lines += ["", f"Run took {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
