"""The prefix state cache (server/prefix.py) on its own: which known state a prompt restores."""

from deltamem.model import load_model
from deltamem.server.prefix import PrefixCache


def test_the_longest_known_state_that_begins_the_prompt_is_restored_exactly():
    """States kept in memory along two branches of one conversation, and the engine's own: each prompt restores
    the longest state whose ids begin it (never a longer one of the other branch, never one of another session),
    and the engine then holds exactly what a fresh engine fed those ids holds."""
    engine = load_model("random", window=64)
    cache = PrefixCache(engine, None, byte_budget=1 << 30)
    trunk = list(range(2, 22))
    a, b = trunk + list(range(30, 50)), trunk + list(range(60, 90))  # two branches after 20 tokens

    def keep(ids, session="s"):
        engine.reset()
        engine.feed(ids, logits="none")
        cache.consumed(ids)
        cache.save(session)

    for ids in (trunk[:10], trunk, a, b[:25]):
        keep(ids)
    keep(a + [7, 7, 7], session="other")  # another session's longer state: never this one's
    fresh = load_model("random", window=64)

    def restored(prompt, want_n, want_source):
        hit = cache.restore_longest(prompt, "s")
        assert (hit.tokens, hit.source) == (want_n, want_source)
        fresh.reset()
        if want_n:
            fresh.feed(prompt[:want_n], logits="none")
        assert engine.snapshot() == fresh.snapshot()
        cache.consumed(prompt[:want_n])

    restored(a + [7, 7, 7, 1], len(a), "memory")  # not the other session's a + [7, 7, 7]
    restored(a + [1, 2], len(a), "engine")  # the engine holds it now: no copy
    restored(b + [1], 25, "memory")  # b's first 25, not a (longer, another branch)
    restored(trunk + [99, 98], len(trunk), "memory")
    restored(trunk[:15] + [5], 10, "memory")
    restored([3, 4, 5], 0, "none")
    restored(a, len(trunk), "memory")  # a whole: one token is left to feed, so not a's own state
