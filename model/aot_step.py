"""The CPU decode step compiled ahead of time (--compile): DecodeGraph's step exported with torch.export and built
by AOTInductor into a shared library, kept in the start-up cache (model/startup_cache.py).

Against torch.compile (what --compile ran before), a launch loads the library in milliseconds instead of compiling
(about 7 s from inductor's cache, 30 s without), and each step runs with no Python at all: no guard checks (about
1 ms a step with the model's ~400 weights), no Python call per kernel. Same kernels: the library is inductor's code.

The library holds code only: the weights are the loaded model's own tensors (AOTInductor's user-managed constants),
and the state tensors are inputs that the step updates in place, so a step reads and writes exactly what the eager
step would. An entry is keyed by everything the code depends on: the model's fingerprint and --quant, the state's
shapes, torch's version, the CPU and the instruction set torch runs, and the thread count (inductor's OpenMP
regions are sized when compiled). On load, one step on copies of the state is checked against the eager step; a
library that fails to load or to agree is dropped and built again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from deltamem.model.startup_cache import cache_root

log = logging.getLogger(__name__)
VERSION = 1
RTOL = 2e-3  # the compiled int8 product sums in another order than the eager kernel (float32 rounding only)


class _Step(torch.nn.Module):
    """forward(ids, pos, *state tensors) -> logits [1, vocab]: the DecodeGraph step over state tensors passed as
    inputs (the graph's own are put back after tracing)."""

    def __init__(self, graph):
        super().__init__()
        self.model = graph.model
        self.graph = graph

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        g = self.graph
        held, saved = g.state_tensors(), (g.ids, g.pos)
        _put(g, tensors)
        g.ids, g.pos = ids, pos
        try:
            return g.eager_step()
        finally:
            _put(g, held)
            g.ids, g.pos = saved


def _put(g, tensors) -> None:
    it = iter(tensors)
    for d in g.deltas:
        d.conv, d.recurrent = next(it), next(it)
    for kv in g.kvs:
        kv.k, kv.v, kv.pos = next(it), next(it), next(it)


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def key(fingerprint: str | None, quant: str, window: int | None, sink: int, dtype: torch.dtype) -> str:
    """What the compiled code depends on, hashed: computable before a model is loaded, so that a launch can choose
    its --quant by whether the compiled step is there."""
    parts = {
        "version": VERSION,
        "fingerprint": fingerprint,
        "quant": quant,
        "window": window,
        "sink": sink,
        "dtype": str(dtype),
        "code": _code_hash(),
        "torch": torch.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "march": os.environ.get("TORCHINDUCTOR_CPP_MARCH"),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@functools.cache
def _code_hash() -> str:
    """The model code (any change compiles again), hashed once a process: the code it runs, not later edits."""
    code = hashlib.sha256()
    for src in sorted(Path(__file__).parent.glob("*.py")):
        code.update(src.read_bytes())
    return code.hexdigest()


def package(fingerprint: str | None, quant: str, window: int | None, sink: int, dtype: torch.dtype) -> Path | None:
    """Where the compiled step of that model is kept (None: the cache is off)."""
    root = cache_root()
    return None if root is None else root / "aot" / f"step-{key(fingerprint, quant, window, sink, dtype)}.pt2"


def _constants(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


def build(graph, path: Path) -> None:
    """Export the step and compile it into the package `path` (written whole, then renamed)."""
    step = _Step(graph)
    args = (graph.ids.clone(), graph.pos.clone(), *(t.clone() for t in graph.held))
    with torch.inference_mode(), warnings.catch_warnings():  # inference tensors: trace and lower in the same mode
        # torch 2.13's own export code still tests isinstance(treespec, LeafSpec), which it deprecated: not the user's
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        ep = torch.export.export(step, args)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt2")
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=tmp, inductor_configs={"aot_inductor.package_constants_in_so": False}
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _load(graph, path: Path) -> Callable[..., torch.Tensor]:
    # torch's C++ loader itself: torch._inductor.aoti_load_package first imports inductor and probes the CPU's
    # vector ISAs by compiling test programs (1.7 s a launch together); the cache key already pins CPU and ISA
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    consts = _constants(_Step(graph))
    # user-managed: the library reads the model's own weight tensors (no copy); check_full_update: every one given
    loader.load_constants({n: consts[n] for n in loader.get_constant_fqns()}, False, True, True, False)

    def step(ids: torch.Tensor, pos: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        return loader.boxed_run([ids, pos, *state])[0]

    return step


@torch.inference_mode()
def _agrees(graph, runner) -> bool:
    """One step of the library and of the eager code, each on its own copy of the state: same logits and state."""
    ids, pos = graph.ids.clone(), graph.pos.clone()
    mine = [t.clone() for t in graph.held]
    got = runner(ids, pos, *mine)
    ref_state = [t.clone() for t in graph.held]
    ref = _Step(graph)(graph.ids.clone(), graph.pos.clone(), *ref_state)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() <= RTOL * max(1.0, float(b.abs().max())))

    return (
        pos.item() == graph.pos.item() + 1
        and close(got, ref)
        and all(close(a, b) for a, b in zip(mine, ref_state, strict=True))
    )


def compiled_step(graph, aot_key: tuple) -> Callable[..., torch.Tensor]:
    """The step of `graph` as a loaded library, run as step(ids, pos, *graph.held): from the cache, else built now
    (and cached, unless the cache is off). aot_key: package()'s arguments for the graph's model. Raises what
    building raises (no C++ compiler, an op inductor cannot take)."""
    path = package(*aot_key)
    if path is None:
        with tempfile.TemporaryDirectory(prefix="deltamem-aot-") as d:
            return _build_and_load(graph, Path(d) / "step.pt2")
    if path.is_file():
        try:
            runner = _load(graph, path)
            if _agrees(graph, runner):
                return runner
            log.warning("the compiled decode step %s disagrees with the eager step; compiling it again", path)
        except Exception as e:  # a damaged or foreign file: build it again
            log.warning("could not load the compiled decode step %s (%s); compiling it again", path, e)
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _build_and_load(graph, path)


def _build_and_load(graph, path: Path) -> Callable[..., torch.Tensor]:
    t0 = time.perf_counter()
    # a notice, not a fault: shown (at the CLI's level) because the first decode waits for it
    log.warning("compiling the decode step for this CPU: about a minute, once (then kept in the start-up cache; "
                "--no-compile decodes without it)")  # fmt: skip
    build(graph, path)
    runner = _load(graph, path)
    if not _agrees(graph, runner):
        path.unlink(missing_ok=True)
        raise RuntimeError("the compiled decode step does not agree with the eager step")
    log.info("compiled the decode step in %.1f s", time.perf_counter() - t0)
    return runner


def compiler() -> str | None:
    """The C++ compiler inductor would call ($CXX, else g++ or c++ on the PATH), if this machine has it. Looked up
    on the PATH, not through inductor, whose import alone costs a launch about a second."""
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)
    return next((path for path in found if path), None)
