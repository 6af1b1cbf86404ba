"""The Qwen families on the device-side decode path (model/cuda_graph.py): output-gated attention with partial
rotary (sink queries clamped), the MoE's gathered-expert step and Qwen's DeltaNet, against feed() on the CPU (the
step run eagerly, float32) and, on CUDA (skipped without it), the captured graph against eager decode and against
the CPU float32 engine, and restore into a bound graph."""

import pytest
import torch

from deltamem.model import load_model
from tests.model.hf_models import QWEN_SHAPES, make_qwen
from tests.model.test_gpu_engine import (
    check_graph_against_eager_and_cpu,
    decode_after_restore,
    step_matches_feed,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NAMES = ["qwen3_5_gqa", "qwen3_5_moe", "qwen3_next"]


@pytest.fixture(params=NAMES)
def checkpoint(request, tmp_path):
    family, kw = QWEN_SHAPES[request.param]
    make_qwen(tmp_path, family, **kw)
    return tmp_path


def test_step_matches_feed_across_the_window(checkpoint):
    """Window 24 + 4 sinks, 60 decode steps: the ring wraps twice, the sink queries switch to clamped rotary."""
    step_matches_feed(load_model(checkpoint, window=24), load_model(checkpoint, window=24))


@cuda
def test_cuda_graph_matches_eager_and_the_cpu(checkpoint):
    a = load_model(checkpoint, device="cuda", dtype="bfloat16", window=32)
    a.fast_decode = False
    check_graph_against_eager_and_cpu(
        a,
        load_model(checkpoint, device="cuda", dtype="bfloat16", window=32),
        load_model(checkpoint, device="cpu", dtype="float32", window=32),
        load_model(checkpoint, device="cpu", dtype="bfloat16", window=32),
    )


@cuda
def test_cuda_restore_then_decode_equals_continuous_decode(checkpoint):
    eng = load_model(checkpoint, device="cuda", dtype="bfloat16", window=32)
    decode_after_restore(eng)
    assert eng._graph.graph is not None
