"""The OpenAI backend over real HTTP: the official client against a loopback server (tests/openai_server.py)."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aether.core.errors import AetherError
from aether.model.checkpoint import Checkpoint, TextSpec
from aether.text.cache import EmbeddingCache, encode_texts
from aether.text.encoders import OpenAIEncoder
from tests.helpers.fixtures import poi_records, unit_field, write_config, write_csv, write_raster
from tests.helpers.openai_server import OpenAIServer, fake_embedding

ROOT = Path(__file__).resolve().parents[2]
MODEL = "text-embedding-3-small"
TEXTS = [f"A place of cafe, a type of amenity, named Place {i}." for i in range(10)]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with OpenAIServer() as srv:
        yield srv


def encoder(server: OpenAIServer, model: str = MODEL, **options) -> OpenAIEncoder:
    """An encoder with short timeouts (the client's own backoff waits 0.5 s, then 1 s, 2 s ...)."""
    options = {"max_retries": 3, "request_timeout_s": 2.0, **options}
    return OpenAIEncoder(model, dimensions=8, base_url=server.base_url, **options)


def expected(texts: list[str], dims: int = 8) -> np.ndarray:
    return np.stack([fake_embedding(MODEL, t, dims) for t in texts])


def test_batches_respect_input_and_token_limits(server):
    texts = [f"text number {i:03d}" for i in range(25)]  # 15 bytes each
    enc = encoder(server)
    enc.max_inputs_per_request = server.max_inputs = 4
    emb, n = encode_texts(enc, texts + texts[:5], progress=False)
    assert n == 25 and server.requests == math.ceil(25 / 4) == 7
    assert max(len(b) for b in server.batches) == 4 and server.inputs == texts
    np.testing.assert_allclose(emb, expected(texts + texts[:5]), atol=1e-6)  # dimensions honoured, rows in order

    enc.max_inputs_per_request = 2048
    enc.max_tokens_per_request = server.max_request_tokens = 50
    encode_texts(enc, texts, progress=False, batch_size=1000)
    assert [len(b) for b in server.batches[7:]] == [3] * 8 + [1]  # 3 x 15 bytes fit in 50 tokens, 4 do not

    # encode_batch alone (the query path of inference) splits an over-long list into requests too
    assert enc.encode_batch(texts[:7]).shape == (7, 8) and server.requests == 7 + 9 + 3


def test_rate_limit_burst_honours_retry_after(server):
    server.script = ["429", "429", "429"]
    server.retry_after = "0.2"
    start = time.monotonic()
    emb = encoder(server).encode_batch(TEXTS)  # Retry-After, not the client's backoff, sets the wait
    elapsed = time.monotonic() - start
    assert server.statuses == [429, 429, 429, 200] and server.inputs == TEXTS
    assert all(b - a >= 0.19 for a, b in zip(server.times, server.times[1:]))
    assert 0.6 <= elapsed < 2.0  # the client's backoff (0.5 s, 1 s, 2 s, less jitter) would take over 2.6 s
    np.testing.assert_allclose(emb, expected(TEXTS), atol=1e-6)


def test_server_errors_and_timeout_are_retried(server):
    server.script = ["500", "503", "slow"]
    server.slow_s = 30.0
    start = time.monotonic()
    emb = encoder(server, request_timeout_s=0.3).encode_batch(TEXTS)
    assert server.requests == 4 and server.statuses[:2] == [500, 503] and server.inputs == TEXTS
    assert time.monotonic() - start < 8.0  # the slow request was abandoned at the client's timeout
    np.testing.assert_allclose(emb, expected(TEXTS), atol=1e-6)


def test_retries_run_out_with_one_line(server):
    server.script = ["500"] * 10
    with pytest.raises(AetherError) as err:
        encoder(server, max_retries=2).encode_batch(TEXTS)
    assert server.requests == 3
    assert str(err.value).startswith("OpenAI embeddings request still failing after 3 tries (HTTP 500")
    assert "finished batches stay cached" in str(err.value) and "\n" not in str(err.value)


def test_bad_key_unknown_model_and_bad_request_fail_at_once(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(AetherError, match=r"^OpenAI rejected the API key \(401\).*OPENAI_API_KEY$"):
        encoder(server).encode_batch(TEXTS)
    assert server.requests == 1

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(AetherError, match=r"^OpenAI has no embedding model 'text-embedding-9' \(404\)") as err:
        encoder(server, model="text-embedding-9").encode_batch(TEXTS)
    assert server.requests == 2 and "\n" not in str(err.value)

    server.max_inputs = 2  # a request the server finds invalid (400) is not retried either
    with pytest.raises(AetherError, match=r"^OpenAI rejected the embeddings request \(400\): Request over the limits"):
        encoder(server).encode_batch(TEXTS)
    assert server.requests == 3


def test_failure_half_way_then_rerun_sends_only_unfinished(server, tmp_path):
    server.fail_after_batches = 2
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(AetherError, match="still failing after 2 tries"):
        encode_texts(encoder(server, max_retries=1), TEXTS, cache, batch_size=2, progress=False)
    assert server.requests == 4 and server.inputs == TEXTS[:4]  # two batches done, the third tried twice

    server.fail_after_batches = None
    emb, n = encode_texts(encoder(server), TEXTS, cache, batch_size=2, progress=False)
    assert n == 6 and server.requests == 4 + 3
    assert server.batches[2:] == [TEXTS[4:6], TEXTS[6:8], TEXTS[8:10]]  # nothing finished was sent again
    np.testing.assert_allclose(emb, expected(TEXTS), atol=1e-6)

    _, n = encode_texts(encoder(server), TEXTS, cache, batch_size=2, progress=False)
    assert n == 0 and server.requests == 7
    cache.close()


def test_over_long_texts_are_truncated_and_counted(server, tmp_path, capsys):
    long_ascii = "x" * 10_000
    long_utf8 = "é" * 5000  # 10,000 bytes; the cut must not split a character
    texts = ["short", long_ascii, long_utf8]
    cache = EmbeddingCache(tmp_path)
    emb, _ = encode_texts(encoder(server), texts, cache, progress=False)
    sent = server.batches[0]
    assert sent[0] == "short" and sent[1] == "x" * 8191 and sent[2] == "é" * 4095  # 8190 bytes
    assert (
        "text: truncated 2 of 3 texts to the 8191-token input limit of text-embedding-3-small"
        in capsys.readouterr().out
    )
    np.testing.assert_allclose(emb, expected(sent), atol=1e-6)

    _, n = encode_texts(encoder(server), texts, cache, progress=False)  # cached under the full text
    assert n == 0 and server.requests == 1
    cache.close()


def test_a_host_that_cannot_be_reached_is_one_line_at_once(monkeypatch):
    """Connection refused: no retries, no backoff; the line names the host and what still works."""
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    enc = OpenAIEncoder(MODEL, dimensions=8, base_url=f"http://127.0.0.1:{port}/v1", max_retries=6)
    start = time.monotonic()
    with pytest.raises(AetherError) as err:
        enc.encode_batch(TEXTS)
    assert time.monotonic() - start < 2.0
    message = str(err.value)
    assert message.startswith("cannot connect to the OpenAI API at 127.0.0.1 (") and "\n" not in message
    assert "needs the network" in message


def test_train_py_with_openai_backend(server, tmp_path):
    raster = write_raster(tmp_path / "ae.tif", unit_field(30, 30, seed=4))
    records = poi_records(30, 30, 30, seed=5)
    pois = write_csv(tmp_path / "pois.csv", records)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        raster,
        pois,
        train={"epochs": 1},
        text={"backend": "openai", "model": MODEL, "dimensions": 32, "base_url": server.base_url, "batch_size": 8},
    )
    server.script = ["429"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "train.py", "--cfg", str(cfg), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"text: encoded 30 of 30 unique descriptions with {MODEL}" in run.stdout
    assert server.statuses == [429] + [200] * 4 and sorted(server.inputs) == sorted(r["description"] for r in records)
    ckpt = Checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt.text == TextSpec("openai", MODEL, 32, 32)


def test_retry_settings_in_config():
    from aether.config.load import load_config

    cfg = load_config(None, ["text.max_retries=2", "text.request_timeout_s=5"], check_files=False)
    assert (cfg.text.max_retries, cfg.text.request_timeout_s) == (2, 5.0)
    with pytest.raises(AetherError, match=r"^config text.max_retries: must be >= 0, got -1$"):
        load_config(None, ["text.max_retries=-1"], check_files=False)
    with pytest.raises(AetherError, match=r"^config text.request_timeout_s: must be > 0 seconds"):
        load_config(None, ["text.request_timeout_s=0"], check_files=False)
