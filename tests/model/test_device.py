"""--device/--dtype: what auto picks, what is refused before anything is loaded or written (exit 1), what `info`
reports, and snapshots across dtypes (refused, or converted on request and recorded). GPU cases run on a CUDA
machine only; the CPU ones everywhere (the CUDA-absent ones only where there is no GPU)."""

import json

import pytest
import torch

from deltamem.model import load_model
from deltamem.model.device import resolve
from deltamem.model.errors import DeviceChoiceError, SnapshotError
from tests.repos import git_repo
from tests.test_app import deltamem

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_names_and_refusals():
    assert resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve("cpu", "float16") == (torch.device("cpu"), torch.float16)
    for device, dtype, message in [("tpu", "auto", "unknown device"), ("cpu", "int8", "unknown dtype"),
                                   ("cpu", torch.int8, "not supported")]:
        with pytest.raises(DeviceChoiceError, match=message):
            resolve(device, dtype)


@no_gpu
def test_auto_is_the_cpu_in_float32_without_a_gpu(tmp_path):
    assert resolve() == (torch.device("cpu"), torch.float32)
    state = tmp_path / "s.snap"
    r = deltamem("generate", "--model", "random", "--device", "cuda", "--state", str(state), "hi")
    assert r.returncode == 1 and "no CUDA GPU is available" in r.stderr and "Traceback" not in r.stderr
    assert not state.exists()
    r = deltamem("run", "--model", "random", "--device", "cuda:1", "--repo", str(tmp_path), "--db",
                 str(tmp_path / "m.db"), "hi")
    assert r.returncode == 1 and "no CUDA GPU" in r.stderr and not (tmp_path / "m.db").exists()


def test_info_reports_device_dtype_weights_and_kernels():
    def info(*args):
        r = deltamem("info", "--model", "random", "--device", "cpu", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    f32, bf16 = info(), info("--dtype", "bfloat16")
    assert (f32["device"], f32["dtype"], bf16["dtype"]) == ("cpu", "float32", "bfloat16")
    assert f32["weight_bytes"] == 4 * f32["parameters"] and bf16["weight_bytes"] == 2 * bf16["parameters"]
    assert f32["kernels"] == "torch reference" and f32["fingerprint"] == bf16["fingerprint"]


def test_a_state_of_another_dtype_is_refused_or_converted_and_recorded(tmp_path):
    state = tmp_path / "s.snap"
    r = deltamem("generate", "--model", "random", "--device", "cpu", "--dtype", "bfloat16", "--state", str(state),
                 "--max-new-tokens", "2", "hello")
    assert r.returncode == 0, r.stderr
    saved = state.read_bytes()
    r = deltamem("generate", "--model", "random", "--device", "cpu", "--state", str(state), "again")
    assert r.returncode == 1 and "state is bfloat16, this engine runs float32" in r.stderr
    assert "--convert-state" in r.stderr and state.read_bytes() == saved  # nothing written

    r = deltamem("generate", "--model", "random", "--device", "cpu", "--state", str(state), "--convert-state",
                 "--json", "--max-new-tokens", "2", "again")
    assert r.returncode == 0 and "converted from bfloat16" in r.stderr
    engine = load_model("random", device="cpu", window=4096)
    engine.restore(state.read_bytes())  # saved anew in float32: restores without conversion
    with pytest.raises(SnapshotError, match="state is float32, this engine runs bfloat16"):
        load_model("random", device="cpu", dtype="bfloat16", window=4096).restore(state.read_bytes())

    # the agent: the conversion is recorded as a turn of the session, committed with the next run
    from deltamem.agent.runner import Agent
    from deltamem.memory.store import Store

    repo = git_repo(tmp_path / "notes", {"README.md": "# Notes\n"})
    with Store(tmp_path / "m.db") as store:
        Agent(load_model("random", dtype="bfloat16", window=64), store, "notes", repo, max_new_tokens=2).run("hi")
        with pytest.raises(SnapshotError):
            Agent(load_model("random", window=64), store, "notes", repo)
        agent = Agent(load_model("random", window=64), store, "notes", repo, max_new_tokens=2, convert_state=True)
        agent.run("and again")
        events = [t["text"] for t in store.turns("notes") if t["role"] == "event"]
        assert len(events) == 1 and "converted from bfloat16 to float32" in events[0]


@gpu
def test_auto_is_cuda_in_bfloat16_and_the_triton_kernels():
    assert resolve() == (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    r = deltamem("info", "--model", "random", "--device", "auto")  # the tests' DELTAMEM_DEVICE is cpu
    got = json.loads(r.stdout)
    assert (got["device"], got["dtype"], got["kernels"]) == ("cuda:0", "bfloat16", "triton"), r.stderr


@gpu
def test_a_state_too_big_for_the_gpu_is_refused_before_loading(tmp_path):
    state = tmp_path / "s.snap"
    r = deltamem("generate", "--model", "random", "--device", "auto", "--window", "4000000000", "--state", str(state),
                 "hi")
    assert r.returncode == 1 and "needs about" in r.stderr and "GiB are free" in r.stderr, r.stderr
    assert not state.exists()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cpu_gpu_restore_is_exact(dtype):
    gpu_engine = load_model("random", device="cuda", dtype=dtype, window=64)
    ids = list(range(1000, 1300))  # past the window: the ring has wrapped
    gpu_engine.feed(ids, logits="none")
    blob = gpu_engine.snapshot()
    cpu_engine = load_model("random", device="cpu", dtype=dtype, window=64)
    cpu_engine.restore(blob)
    assert cpu_engine.snapshot() == blob  # every state tensor bit-identical on the CPU
    back = load_model("random", device="cuda", dtype=dtype, window=64)
    back.restore(cpu_engine.snapshot())
    assert back.snapshot() == blob
    nxt = [7, 8, 9]
    assert torch.equal(back.feed(nxt), gpu_engine.feed(nxt))  # and it continues exactly on the GPU


@gpu
@pytest.mark.parametrize("seen", [40, 300])  # window 64: partly filled, and wrapped several times
def test_restore_then_continue_is_exact_after_graph_decode(seen):
    """DESIGN invariant 3 on the GPU: prefill, decode through the CUDA graph, snapshot; then the same next tokens
    from the live engine, from the same engine restored, and from a fresh one restored: bit-identical logits."""
    engine = load_model("random", device="cuda", dtype="bfloat16", window=64)
    gen = torch.Generator().manual_seed(seen)
    prompt = torch.randint(0, 50000, (seen,), generator=gen).tolist()
    list(engine.generate(prompt, max_new_tokens=16))  # the last 15 of them through the decode graph
    assert engine._graph is not None
    blob = engine.snapshot()
    live_pos = [st.pos.clone() for st in engine.states if hasattr(st, "pos")]
    nxt = torch.randint(0, 50000, (8,), generator=gen).tolist()
    want = engine.feed(nxt)
    engine.restore(blob)
    assert [torch.equal(a, st.pos) for a, st in zip(live_pos, [s for s in engine.states if hasattr(s, "pos")],
                                                    strict=True)] == [True] * len(live_pos)
    again = engine.feed(nxt)
    fresh = load_model("random", device="cuda", dtype="bfloat16", window=64)
    fresh.restore(blob)
    other = fresh.feed(nxt)
    assert (again - want).abs().max().item() == 0 and (other - want).abs().max().item() == 0


OLMO_7B = {  # OLMo Hybrid 7B's shapes (its config.json)
    "model_type": "olmo_hybrid", "vocab_size": 100352, "hidden_size": 3840, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 30, "num_key_value_heads": 30, "linear_num_key_heads": 30,
    "linear_num_value_heads": 30, "linear_key_head_dim": 96, "linear_value_head_dim": 192,
    "linear_conv_kernel_dim": 4, "rope_parameters": {"rope_type": "default", "rope_theta": None},
}


@pytest.fixture(scope="module")
def engine_7b():
    """A 7B-shaped engine with random bf16 weights made on the GPU (about 15 GB), window 4096 + 4 sinks."""
    if not torch.cuda.is_available() or torch.cuda.mem_get_info()[0] < 24 << 30:
        pytest.skip("needs a CUDA GPU with 24 GiB free")
    from deltamem.model.config import ModelConfig
    from deltamem.model.engine import Engine
    from deltamem.model.layers import HybridLM

    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_hf(OLMO_7B)).to(torch.bfloat16)
    model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape, device="cuda").uniform_(1, 16, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.fill_(-4.0)
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return Engine(model.eval(), None, window=4096, sink=4, fingerprint="random-7b")


@pytest.mark.parametrize("seen", [1000, 6000])  # window partly filled; full and wrapped
def test_7b_restore_then_continue_is_bit_identical(engine_7b, seen):
    """Invariant 3 at 7B shapes on the GPU: after a prefill and CUDA-graph decode, the same next tokens give the
    same logits from the live engine, from it restored (twice: the outcome must not depend on what ran before),
    and from a fresh engine restored, fed in one chunk and token by token."""
    eng = engine_7b
    eng.reset()
    gen = torch.Generator().manual_seed(seen)
    vocab = eng.config.vocab_size
    logits = eng.feed(torch.randint(0, vocab, (seen,), generator=gen).tolist(), logits="last")
    eng.decode(logits, 16)
    assert eng._graph is not None and eng._graph.graph is not None
    blob = eng.snapshot()
    nxt = torch.randint(0, vocab, (8,), generator=gen).tolist()
    want = eng.feed(nxt)
    fresh = eng.sibling()
    for e in (eng, eng, fresh):
        e.restore(blob)
        assert torch.equal(e.feed(nxt), want)
    by_token = []
    for e in (eng, eng, fresh):
        e.restore(blob)
        by_token.append(torch.cat([e.feed([t]) for t in nxt]))
    assert all(torch.equal(b, by_token[0]) for b in by_token)
