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
    r = deltamem("info", "--model", "random")
    got = json.loads(r.stdout)
    assert (got["device"], got["dtype"], got["kernels"]) == ("cuda:0", "bfloat16", "triton"), r.stderr


@gpu
def test_a_state_too_big_for_the_gpu_is_refused_before_loading(tmp_path):
    state = tmp_path / "s.snap"
    r = deltamem("generate", "--model", "random", "--window", "4000000000", "--state", str(state), "hi")
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
