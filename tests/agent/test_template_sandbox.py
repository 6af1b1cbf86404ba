"""A chat template comes with files people download (tokenizer_config.json, a GGUF's metadata): every path that
renders one does it in the sandbox. A template that reaches for Python internals fails with a clear error, and its
payload never runs. Checked through `deltamem generate --chat` and `deltamem run` subprocesses."""

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deltamem.model.gguf_file import smollm2_gguf
from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid
from tests.repos import git_repo
from tests.test_app import deltamem


def crafted(marker) -> str:
    """A template that, rendered without a sandbox, creates `marker` through os (the classic SSTI payload)."""
    return (
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )


@pytest.fixture()
def hf_dir(tmp_path):
    """A tiny OLMo Hybrid checkpoint with a byte-level BPE tokenizer trained here and a crafted template."""
    d = tmp_path / "model"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["hello world, a template test"] * 50, trainer)
    tok.save(str(d / "tokenizer.json"))
    make_olmo_hybrid(d, vocab=320, **OLMO_SHAPES["olmo_gqa_rope"])
    return d


def set_template(d, template):
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": template}))


def refused(r, marker):
    assert not marker.exists(), "the template's payload ran"
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "sandbox forbids" in r.stderr and "malicious" in r.stderr


def test_tokenizer_config_template_is_sandboxed(hf_dir, tmp_path):
    marker = tmp_path / "PWNED"
    set_template(hf_dir, crafted(marker))
    r = deltamem("generate", "--model", str(hf_dir), "--chat", "--max-new-tokens", "2", "hi")
    refused(r, marker)
    assert r.returncode == 4  # the model's template failed: a model error

    repo = git_repo(tmp_path / "repo", {"README.md": "# r\n"})
    r = deltamem("run", "--model", str(hf_dir), "--repo", str(repo), "--db", str(tmp_path / "m.db"), "hi")
    refused(r, marker)
    assert r.returncode == 4

    # a plain template renders as before
    set_template(hf_dir, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    r = deltamem("generate", "--model", str(hf_dir), "--chat", "--max-new-tokens", "2", "--json", "hi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == len(Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
                                                          .encode("<user>hi").ids)


def test_gguf_template_is_sandboxed(tmp_path):
    marker = tmp_path / "PWNED"
    gguf = tmp_path / "crafted.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_gguf()), str(gguf),
         "--chat-template", crafted(marker), "--force"],
        check=True, capture_output=True,
    )
    r = deltamem("generate", "--model", str(gguf), "--chat", "--max-new-tokens", "2", "hi")
    refused(r, marker)
