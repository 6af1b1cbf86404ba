"""AgentSession on the real default model and a real store: append-only feeding, and the roll-back to the newest
snapshot that is a prefix when the prompt no longer extends what the state consumed (logged, never silent)."""

import logging

import pytest
import torch

from deltamem.agent.prompt import ChatTemplate, TemplateError
from deltamem.agent.session import AgentSession
from deltamem.cli.agent import _run_task
from deltamem.cli.errors import EXIT_MODEL, failure
from deltamem.memory.store import Store
from deltamem.model import load_model


def state(engine):
    return {k: v.clone() for k, v in engine._state_tensors().items()}


def test_prompt_that_rewrites_history_rolls_back_to_a_prefix_snapshot(tmp_path, caplog):
    engine = load_model("random", window=256)
    with Store(tmp_path / "m.db") as store:
        s = AgentSession.open(engine, store, "s")
        base = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first file contents"}]
        s.feed(base)
        s.save([{"role": "user", "text": "first"}])
        at_snapshot = s.text
        s.feed([*base, {"role": "user", "content": "a message that will be edited"}])
        edited = [*base, {"role": "user", "content": "the edited message"}]
        with caplog.at_level(logging.WARNING, logger="deltamem.agent"):
            fed = s.feed(edited)
        assert "differs from what the model state consumed" in caplog.text
        assert s.restored_from == store.snapshots("s")[0]["id"]

        # the state equals a fresh engine fed the snapshot's ids and then the same new part
        ref = load_model("random", window=256)
        ref.feed(store.load_tokens("s", s.restored_from), logits="none")
        rendered = s.template.render(edited, add_generation_prompt=False)
        new = ref.tokenizer.encode(rendered[len(at_snapshot) :])
        ref.feed(new, logits="none")
        assert fed == len(new) and s.text == rendered
        got, want = state(engine), state(ref)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

        # appending to it again feeds only the appended part
        more = [*edited, {"role": "user", "content": "and more"}]
        fed2 = s.feed(more)
        assert fed2 == len(ref.tokenizer.encode(s.template.render(more, False)[len(rendered) :]))


def test_model_error_is_exit_code_4(tmp_path):
    from deltamem.agent.runner import Agent

    (tmp_path / "p").mkdir()
    with Store(tmp_path / "m.db") as store:
        agent = Agent(load_model("random", window=64), store, "s", tmp_path / "p", max_new_tokens=2)
        agent.session.template = ChatTemplate("{{ raise_exception('this template is broken') }}")
        with pytest.raises(TemplateError) as failed:
            _run_task(agent, "hello", False, None)
    assert failure(failed.value) == (EXIT_MODEL, "model error: this template is broken")


def test_a_failure_inside_the_run_is_a_model_error_and_chat_goes_on(tmp_path):
    from deltamem.agent.runner import Agent
    from deltamem.model.errors import GenerationError

    (tmp_path / "p").mkdir()
    with Store(tmp_path / "m.db") as store:
        agent = Agent(load_model("random", window=64), store, "s", tmp_path / "p", max_new_tokens=2)
        real = agent.session.engine.feed

        def broken(*a, **kw):
            raise RuntimeError("the forward pass broke")

        agent.session.engine.feed = broken
        with pytest.raises(GenerationError) as failed:
            _run_task(agent, "hello", True, None)
        assert failure(failed.value) == (EXIT_MODEL, "model error: RuntimeError: the forward pass broke")
        agent.back_to_last_save()
        agent.session.engine.feed = real
        assert _run_task(agent, "hello", True, None) in (0, 3) and store.turns("s")  # the next turn works
