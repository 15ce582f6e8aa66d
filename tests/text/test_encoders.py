"""The real packaged all-MiniLM-L6-v2 model, offline, and the on-disk cache."""

import numpy as np
import pytest

from aether.core.errors import AetherError
from aether.text.cache import EmbeddingCache, encode_texts
from aether.text.encoders import SentenceTransformerEncoder, build_text_encoder


class CountingEncoder(SentenceTransformerEncoder):
    def __init__(self):
        super().__init__()
        self.calls = []

    def encode_batch(self, texts):
        self.calls.append(list(texts))
        return super().encode_batch(texts)


def test_minilm_encodes_offline_and_cache_skips_second_run(tmp_path):
    texts = [
        "A place of cafe, a type of amenity, named Regatta.",
        "A quiet park by the sea.",
        "A place of cafe, a type of amenity, named Regatta.",
    ]
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    emb, n = encode_texts(enc, texts, cache, batch_size=1, progress=False)
    assert n == 2 and len(enc.calls) == 2  # the duplicate was encoded once
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])
    related = enc.encode_batch(["A coffee shop."])[0]
    assert related @ emb[0] > related @ emb[1]  # the model is real: a coffee shop is nearer a cafe
    cache.close()

    again = CountingEncoder()
    cache = EmbeddingCache(tmp_path)
    emb2, n2 = encode_texts(again, texts, cache, progress=False)
    assert n2 == 0 and again.calls == [] and again._st is None  # nothing encoded, model not even loaded
    np.testing.assert_array_equal(emb, emb2)


def test_cache_key_separates_encoders():
    a = EmbeddingCache.key({"backend": "openai", "model": "m", "dimensions": 256}, "t")
    b = EmbeddingCache.key({"backend": "openai", "model": "m", "dimensions": 512}, "t")
    c = EmbeddingCache.key({"backend": "sentence-transformers", "model": "m", "dimensions": None}, "t")
    assert len({a, b, c}) == 3


def test_encoder_choices():
    assert (
        build_text_encoder("sentence-transformers", "all-MiniLM-L6-v2").identity["model"]
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
    with pytest.raises(AetherError, match="openai backend only"):
        build_text_encoder("sentence-transformers", "all-MiniLM-L6-v2", dimensions=64)
    with pytest.raises(AetherError, match="'/nonexistent/model' is not available offline"):
        build_text_encoder("sentence-transformers", "/nonexistent/model").encode_batch(["x"])


def test_a_model_that_is_not_here_is_refused_at_once(tmp_path, monkeypatch):
    """Neither a folder nor in the Hugging Face cache: refused by check(), before any download is
    tried (which, offline, used to fail after about a minute with a line about huggingface.co)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    encoder = build_text_encoder("sentence-transformers", "all-mpnet-base-v2")
    with pytest.raises(AetherError, match="not available offline.*packaged all-MiniLM-L6-v2"):
        encoder.check()
    build_text_encoder("sentence-transformers", "all-MiniLM-L6-v2").check()  # the packaged one is here
    (tmp_path / "my_model").mkdir()
    build_text_encoder("sentence-transformers", str(tmp_path / "my_model")).check()  # a local folder passes check
