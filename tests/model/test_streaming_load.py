"""Loading streams a (sharded) safetensors checkpoint tensor by tensor onto the target device in the target dtype:
the logits match transformers' model on a sharded checkpoint, the fingerprint does not depend on sharding or dtype,
and the host's peak memory stays near the model's own size (the float32 state dict is never held whole)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltamem.model import load_model

ROOT = Path(__file__).resolve().parents[2]
SHAPES = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=1536, linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=64,
    linear_value_head_dim=128, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random model (about 240 MB in float32) saved by transformers whole and in 100 MB shards."""
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(OlmoHybridConfig(**SHAPES)).eval()
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d / "whole", max_shard_size="2GB")
    model.save_pretrained(d / "sharded", max_shard_size="100MB")
    return model, d / "whole", d / "sharded"


def test_sharded_checkpoint_matches_transformers(checkpoints):
    ref, whole, sharded = checkpoints
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    ids = torch.randint(0, SHAPES["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    engine = load_model(sharded, window=None, device="cpu", dtype="float32")
    with torch.no_grad():
        want = ref(ids).logits[0]
    torch.testing.assert_close(engine.feed(ids[0]), want, rtol=1e-4, atol=1e-4)
    assert engine.fingerprint == load_model(whole, device="cpu", dtype="bfloat16").fingerprint


PEAK = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from deltamem.model.config import ModelConfig
    from deltamem.model.layers import HybridLM
    from deltamem.model.weights import SafetensorsFiles, build

    cfg = ModelConfig.from_file(Path(sys.argv[1]) / "config.json")
    with torch.device("meta"):  # the meta device's own first-use imports (sympy, ...): not the load's memory
        HybridLM(cfg)

    def status(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts at the current resident size
    before = status("VmRSS")
    model, _ = build(cfg, SafetensorsFiles(Path(sys.argv[1])), torch.bfloat16, "cpu")
    peak = status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(peak - before, weights, next(model.parameters()).dtype)
    """
)


def test_peak_host_memory_stays_near_the_model_size(checkpoints):
    """Measured 1.09x the bfloat16 model on this machine kind; reading the float32 shards whole and casting
    afterwards (the loader before streaming) took 3x."""
    _, _, sharded = checkpoints
    r = subprocess.run([sys.executable, "-c", PEAK, str(sharded)], capture_output=True, text=True, timeout=300,
                       cwd=checkpoints[2].parent)
    assert r.returncode == 0, r.stderr
    grew, weights, dtype = r.stdout.split()
    grew, weights = int(grew), int(weights)
    assert dtype == "torch.bfloat16" and weights > 100e6
    assert grew < 1.3 * weights, (grew, weights)  # the model plus about one float32 tensor in flight
