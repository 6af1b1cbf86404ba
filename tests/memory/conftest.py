"""Shared by the memory tests: a tiny real OLMo Hybrid checkpoint whose engine snapshots the store keeps."""

import pytest

from tests.model.hf_models import OLMO_SHAPES, make_olmo_hybrid

VOCAB = 320


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmo")
    make_olmo_hybrid(d, vocab=VOCAB, **OLMO_SHAPES["olmo_gqa_rope"])
    return d
