"""The look-up before the first reply (agent/retrieve.py) and grounded answers (agent/runner.py): which names a task
is looked up by, on a real repository; the looked-up turn as the model sees it (results equal to running the tools
directly); the one retry of an answer that cites no file the tools showed, lists one twice in a row or loops; and
--no-tools."""

import json

import pytest

from deltamem.agent.parse import format_tool_call
from deltamem.agent.retrieve import lookup_calls
from deltamem.agent.runner import Agent
from deltamem.agent.session import LOOP_MARKER
from deltamem.memory.store import Store
from deltamem.model import load_model
from deltamem.tools import ToolContext, default_tools, run_tool
from tests.repos import git_repo
from tests.test_app import deltamem

FILES = {
    "shop/cart.py": "MAX_ITEMS = 40\n\nclass Cart:\n    def total(self):\n        return 0\n\n\n"
    "def checkout(cart):\n    return cart.total()\n",
    "shop/api.js": "import { checkout } from './cart'\nexport function refund(order) { return checkout(order) }\n",
    "notes/terms.md": "# Terms\nThe late fee for Bramble Ltd is 4 percent.\n",
    "shop/util.py": "def value(x):\n    return x\n\n\ndef use(plugin):\n    return plugin\n\n\n"
    "def error(msg):\n    raise ValueError(msg)\n",
}


@pytest.fixture()
def repo(tmp_path):
    return git_repo(tmp_path / "shop", FILES)


def test_names_the_code_defines_are_looked_up_code_shaped_first(repo):
    assert lookup_calls(repo, "Where is the class `Cart` defined?") == [("definition", {"name": "Cart"})]
    assert lookup_calls(repo, "Which files use `Cart`?") == [("references", {"name": "Cart"})]
    # a bare word is a name where the code defines it; MAX_ITEMS (code-shaped) before checkout
    assert lookup_calls(repo, "Does checkout read MAX_ITEMS?") == [
        ("definition", {"name": "MAX_ITEMS"}), ("definition", {"name": "checkout"})]
    assert lookup_calls(repo, "Who calls checkout?") == [("references", {"name": "checkout"})]
    # what it raises or does: its lines too, as the definition spans them
    assert lookup_calls(repo, "What does `checkout` raise?") == [
        ("definition", {"name": "checkout"}), ("read_file", {"path": "shop/cart.py", "start_line": 8, "end_line": 9})]
    assert lookup_calls(repo, "What does `Cart.total` return?")[0] == ("definition", {"name": "total"})
    # the words a question is asked in are no names, even where the code defines them (a `value` parameter)
    assert lookup_calls(repo, "Which value does the constant `MAX_ITEMS` have?") == [
        ("definition", {"name": "MAX_ITEMS"})]
    # nor are the words that ask for uses or errors (a `use` and an `error` function here), unless quoted
    assert lookup_calls(repo, "Which files use Cart?") == [("references", {"name": "Cart"})]
    assert lookup_calls(repo, "What error does checkout throw?")[0] == ("definition", {"name": "checkout"})
    assert ("definition", {"name": "error"}) not in lookup_calls(repo, "What error does checkout throw?")
    assert lookup_calls(repo, "Which files call `use`?") == [("references", {"name": "use"})]
    # nothing defined: the key words, for a ranked search
    assert lookup_calls(repo, "Which document gives the late fee for Bramble Ltd?") == [
        ("search", {"query": "late fee Bramble Ltd"})]
    assert lookup_calls(repo, "what is it?") == lookup_calls(repo, "Thanks!") == []


def test_a_search_of_the_key_words_finds_the_passage_a_paraphrase_names(repo):
    (name, args), = lookup_calls(repo, "Where do the case files state the late fee for Bramble Ltd?")
    ok, out = run_tool(ToolContext(root=repo), default_tools(), name, args)
    assert ok and "notes/terms.md:2: The late fee for Bramble Ltd is 4 percent." in out


def scripted(agent, *replies):
    """The model's replies, in order; records the conversation each reply was asked for."""
    seen, it = [], iter(replies)

    def respond(messages, on_piece):
        seen.append(list(messages))
        return next(it)

    agent.session.respond = respond
    return seen


def test_the_looked_up_turn_precedes_the_first_reply_and_an_ungrounded_answer_is_asked_once_more(repo, tmp_path):
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "shop", repo, max_new_tokens=2)
        seen = scripted(agent, "It is somewhere in the shop.", "`shop/cart.py`, line 3.")
        result = agent.run("Where is the class `Cart` defined?")
        first = seen[0]
        assert [m["role"] for m in first] == ["system", "user", "assistant", "tool"]
        want = run_tool(ToolContext(root=repo), default_tools(), "definition", {"name": "Cart"})[1]
        assert want == "Cart is defined in shop/cart.py (line 3):\nshop/cart.py:3: class Cart"
        assert first[3]["content"] == f"[definition] {want}"
        syntax = agent.session.template.syntax_with(agent.tools)
        assert first[2]["content"] == format_tool_call("definition", {"name": "Cart"}, syntax)
        # the answer named no file the results showed: one retry, with the hint as a user turn
        hint = seen[1][-1]
        assert hint["role"] == "user" and "shop/cart.py" in hint["content"]
        assert len(seen) == 2 and result.answer == "`shop/cart.py`, line 3." and result.grounded is True
        assert result.retried == hint["content"]
        assert [c["auto"] for c in result.tool_calls] == [True]
        roles = [t["role"] for t in store.turns(agent.session_id)]
        assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("first", "says"),
    [
        ("`checkout` is used in 2 files: `shop/api.js` and `shop/api.js`.", "lists shop/api.js twice"),
        ("`checkout` is used in `shop/api.js`, `shop/api.js`, `shop/api.js`" + LOOP_MARKER, "repeated itself"),
    ],
)
def test_an_answer_that_lists_a_file_twice_or_loops_is_asked_once_more(repo, tmp_path, first, says):
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "shop", repo, max_new_tokens=2)
        better = "`checkout` is used in 2 files: `shop/api.js` and `shop/cart.py`."
        seen = scripted(agent, first, better, "never asked")
        result = agent.run("Which files use `checkout`?")
        hint = seen[1][-1]["content"]
        assert says in hint and "shop/api.js" in hint and "shop/cart.py" in hint  # the files the results showed
        assert len(seen) == 2 and result.answer == better and result.grounded is True


def test_a_file_named_twice_but_not_in_a_row_is_no_repeat(repo, tmp_path):
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "shop", repo, max_new_tokens=2)
        answer = "`checkout` is defined in `shop/cart.py` (line 8) and used in `shop/cart.py` and `shop/api.js`."
        seen = scripted(agent, answer, "never asked")
        assert agent.run("Where is `checkout` defined and used?").answer == answer and len(seen) == 1


def test_a_grounded_answer_is_not_retried_and_no_tools_offers_none(repo, tmp_path):
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "shop", repo, max_new_tokens=2)
        seen = scripted(agent, "In shop/cart.py.")
        result = agent.run("Where is `checkout` defined?")
        assert result.grounded is True and result.retried is None and len(seen) == 1
        bare = Agent(load_model("random", window=64), store, "bare", repo, tools=False)
        seen = scripted(bare, "From memory: the cart module.")
        result = bare.run("Where is `checkout` defined?")
        assert result.tool_calls == [] and result.grounded is None and len(seen) == 1
        assert "Tools:\n(none)" in seen[0][0]["content"] and bare.session.guide is None


def test_run_json_reports_auto_calls_and_grounding(repo, tmp_path):
    db = tmp_path / "m.db"
    args = ["run", "--model", "random", "--repo", str(repo), "--db", str(db), "--json", "--max-new-tokens", "2",
            "--no-compile"]
    r = deltamem(*args, "What does `checkout` return?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(c["tool"], c["auto"]) for c in out["tool_calls"][:1]] == [("definition", True)]
    assert out["grounded"] in (True, False)  # the random model's words: whether they name a file is chance
    assert (out["retried"] is None) == (out["grounded"] is True)  # a random answer naming no file is asked again
    r = deltamem(*args, "--no-retrieve", "--no-tools", "--session", "other", "What does `checkout` return?")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["tool_calls"] == [] and out["grounded"] is None


def test_the_list_guide_sees_the_files_of_its_own_run(repo, tmp_path):
    """What ListGuide may count as listed or missing: the files this run's tool results showed, not an earlier
    run's (the runner's cache of them starts afresh with each run)."""
    with Store(tmp_path / "memory.db") as store:
        agent = Agent(load_model("random", window=64), store, "shop", repo, max_new_tokens=2)
        seen_paths = []

        def respond(messages, on_piece):
            seen_paths.append(list(agent._shown_so_far()))
            return "`shop/cart.py`, line 3."

        agent.session.respond = respond
        agent.run("Where is the class `Cart` defined?")  # looks up Cart: shop/cart.py
        agent.run("Where is `refund` defined?")  # looks up refund: shop/api.js
        assert seen_paths[0] == ["shop/cart.py"] and seen_paths[-1] == ["shop/api.js"]
