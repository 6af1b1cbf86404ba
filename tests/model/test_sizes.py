"""`deltamem info --model DIR` on a config alone: parameters as transformers counts them, the state an engine
actually holds, and the GPU memory it would need; nothing is loaded."""

import json

import torch

from deltamem.model import load_model
from tests.model.hf_models import QWEN_SHAPES, make_qwen
from tests.test_app import deltamem


def test_info_on_a_config_alone(tmp_path):
    family, kw = QWEN_SHAPES["qwen3_5_moe"]
    ref = make_qwen(tmp_path / "full", family, **kw)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    out = deltamem("info", "--model", str(tmp_path / "cfg"), "--dtype", "float32", "--window", "64")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["weights"].startswith("absent")
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())  # transformers' own count
    cfg = ref.config
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert info["active_parameters"] == info["parameters"] - 4 * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    eng = load_model(tmp_path / "full", window=64, dtype=torch.float32)
    assert info["state_bytes"] == eng.state_bytes()  # what a loaded engine holds
    assert info["weight_bytes"] == 4 * info["parameters"]
    assert info["gpu_bytes"] > info["weight_bytes"] + info["state_bytes"]
    assert info["recurrent_state_bytes"] < info["turn_bytes"] <= info["state_bytes"]
    loaded = json.loads(deltamem("info", "--model", str(tmp_path / "full"), "--window", "64").stdout)
    assert loaded["parameters"] == info["parameters"] and loaded["state_bytes_empty"] == info["state_bytes"]
