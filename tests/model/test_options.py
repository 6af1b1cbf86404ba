"""One set of model options (model/options.py) for the CLI, the TUI, ChatDeltamem and load_model: the same defaults
everywhere, taken from the DELTAMEM_* environment variables where set, and the same refusals."""

import pytest

from deltamem.agent.chat_model import ChatDeltamem
from deltamem.cli import parser
from deltamem.cli.options import model_options
from deltamem.model import load_model
from deltamem.model.options import ModelOptions
from deltamem.ui.app import DeltamemApp


@pytest.fixture
def env(monkeypatch):
    for name, value in {"MODEL": "random", "DEVICE": "cpu", "DTYPE": "float32", "QUANT": "f16", "COMPILE": "0"}.items():
        monkeypatch.setenv(f"DELTAMEM_{name}", value)


def test_every_entry_point_takes_the_same_defaults_from_the_environment(env, tmp_path):
    expected = ModelOptions("random", "cpu", "float32", "f16", False, "auto", 4)
    assert ModelOptions() == expected
    assert ChatDeltamem().options == expected
    assert DeltamemApp(tmp_path / "m.db", tmp_path).options == expected
    for argv in (["run", "task"], ["tui"], ["serve"], ["generate", "x"], ["info"], ["ingest"], ["chat"]):
        assert model_options(parser().parse_args(argv)) == expected, argv
    engine = load_model()  # what the environment names: the random model, its linear weights in half precision
    assert engine.config.arch == load_model("random", quant="none").config.arch and engine.quant == "f16"
    assert not engine.compile_decode


def test_the_command_line_overrides_the_environment(env):
    args = parser().parse_args(["run", "--quant", "none", "--no-compile", "--window", "64", "--sink", "2", "t"])
    assert model_options(args) == ModelOptions("random", "cpu", "float32", "none", False, 64, 2)
    assert model_options(parser().parse_args(["run", "--full-attention", "t"])).window is None


def test_without_the_environment_everything_is_auto(monkeypatch):
    for name in ("MODEL", "DEVICE", "DTYPE", "QUANT", "COMPILE"):
        monkeypatch.delenv(f"DELTAMEM_{name}", raising=False)
    assert ModelOptions() == ModelOptions("default", "auto", "auto", "auto", "auto", "auto", 4)
    assert ChatDeltamem().options == ModelOptions()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"window": 0}, "--window must be >= 1"),
        ({"sink": -1}, "--sink must be >= 0"),
        ({"quant": "int3"}, "--quant must be one of"),
        ({"compile": "yes"}, "compile must be True, False or 'auto'"),
    ],
)
def test_bad_options_are_refused_wherever_they_come_from(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelOptions(**kw)
    if "compile" not in kw:  # pydantic reads "yes" as True
        with pytest.raises(ValueError, match=message):
            _ = ChatDeltamem(**kw).options
