"""Text embeddings computed once: an on-disk cache keyed by encoder and text, and the ways a run
fills it (here, on a Dask cluster's workers, or shared out among the processes of a torchrun
launch). Identical texts are encoded once; a finished batch is in the cache before the next."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aether.core import collective
from aether.core.cluster import run_tasks
from aether.core.errors import AetherError
from aether.core.ranks import local_rank
from aether.text.encoders import SentenceTransformerEncoder, TextEncoder

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Text embeddings on disk (SQLite), keyed by encoder identity and text.

    Several processes may use one cache at once (the ranks of a torchrun launch): a writer that
    finds the file locked waits up to `lock_timeout_s` for the other's transaction to end.
    """

    lock_timeout_s = 120.0

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self._db = None
        existing = self.cache_dir / "text_embeddings.sqlite"
        if existing.exists():
            self._connect()
            return
        ancestor = self.cache_dir  # checked now, not at the first write, after a batch was paid for
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise AetherError(
                f"cannot use text cache folder {self.cache_dir}: {ancestor} is "
                f"{'not a folder' if not ancestor.is_dir() else 'not writable'}"
            )

    def _connect(self) -> None:
        """Open (creating it, and its folder, on the first write) the cache file: a run that stops
        before encoding anything leaves no cache behind."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.cache_dir / "text_embeddings.sqlite", timeout=self.lock_timeout_s)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise AetherError(f"cannot use text cache folder {self.cache_dir}: {exc}") from None

    @staticmethod
    def key(identity: dict, text: str) -> str:
        blob = json.dumps([identity["backend"], identity["model"], identity["dimensions"], text], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        if self._db is None:
            if not (self.cache_dir / "text_embeddings.sqlite").exists():  # another process may have made it
                return {}
            self._connect()
        found = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            for k, v in self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", part):
                found[k] = np.frombuffer(v, dtype=np.float32)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        if self._db is None:
            self._connect()
        with self._db:  # one transaction: a batch is either all in the cache or not at all
            self._db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


TEXTS_PER_TASK = 4096  # unique texts per Dask task when a cluster encodes


def uncached_texts(encoder: TextEncoder, texts: list[str], cache: EmbeddingCache) -> list[str]:
    """The unique texts of `texts` (first-seen order) that `cache` holds no embedding of for `encoder`:
    the work that parallel encoding shares out."""
    unique = list(dict.fromkeys(texts))
    keys = [EmbeddingCache.key(encoder.identity, t) for t in unique]
    cached = cache.get(keys)
    return [t for t, k in zip(unique, keys) if k not in cached]


def encode_texts_on_cluster(
    client,
    encoder: TextEncoder,
    texts: list[str],
    cache: EmbeddingCache,
    batch_size: int = 64,
    progress: bool = True,
    texts_per_task: int = TEXTS_PER_TASK,
) -> tuple[np.ndarray, int]:
    """What `encode_texts` returns, with the texts not yet in the cache encoded as Dask tasks of
    `texts_per_task` texts on `client`'s workers (each loads the model once, on its GPU when it has
    one). This process is the cache's only writer: each task's vectors go in as it ends, so a
    failure keeps what finished."""
    todo = uncached_texts(encoder, texts, cache)
    chunks = [todo[i : i + texts_per_task] for i in range(0, len(todo), texts_per_task)]

    def store(i: int, vectors: np.ndarray) -> None:
        cache.put({EmbeddingCache.key(encoder.identity, t): v for t, v in zip(chunks[i], vectors)})

    run_tasks(
        client,
        _encode_task,
        [(encoder, chunk, batch_size) for chunk in chunks],
        [len(c) for c in chunks],
        desc="encoding texts",
        unit="text",
        progress=progress,
        on_result=store,
    )
    vectors, _ = encode_texts(encoder, texts, cache, batch_size, progress=False)  # all cached by now
    return vectors, len(todo)


_WORKER_ENCODERS: dict[str, TextEncoder] = {}  # in a Dask worker: one loaded model per encoder, for all its tasks


def _encode_task(encoder: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """One Dask task: embeddings of `texts`, in order, by this process's copy of `encoder`."""
    key = f"{type(encoder).__name__}{sorted(encoder.__getstate__().items())}"  # its settings, not its model
    encoder = _WORKER_ENCODERS.setdefault(key, encoder)
    vectors, _ = encode_texts(encoder, texts, None, batch_size, progress=False)
    return vectors


def encode_texts(
    encoder: TextEncoder,
    texts: list[str],
    cache: EmbeddingCache | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Embeddings (N, D) float32 for `texts`, and how many unique texts had to be encoded.

    Each unique text is encoded once; a finished batch is in the cache before the next
    batch is sent, so an interrupted run pays only for what was not yet cached. Batches
    hold at most `batch_size` texts and whatever else the encoder's limits ask for. Texts
    the encoder truncates are counted in one line; the cache keys them by the full text.
    """
    unique = list(dict.fromkeys(texts))
    keys = {t: EmbeddingCache.key(encoder.identity, t) for t in unique}
    vectors = cache.get(list(keys.values())) if cache is not None else {}
    todo = [t for t in unique if keys[t] not in vectors]
    n_truncated = sum(encoder.fit(t) != t for t in todo)
    if n_truncated:
        logger.info(
            f"text: truncated {n_truncated} of {len(todo)} texts to the {encoder.max_input_tokens}-token input "
            f"limit of {encoder.model} (tokens counted as UTF-8 bytes, a safe upper bound)"
        )
    bar = tqdm(total=len(todo), desc="encoding texts", unit="text", disable=not progress or not todo)
    for batch in encoder.batches(todo, batch_size):
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
        raise AetherError(
            f"text cache holds embeddings of different sizes {sorted(dims)} for one encoder; delete the cache"
        )
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), 0
    return np.stack([vectors[keys[t]] for t in texts]), len(todo)


def encode_texts_sharded(
    encoder: TextEncoder, texts: list[str], cache: EmbeddingCache, batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, int]:
    """What `encode_texts` returns, with the work split across the ranks of a process group.

    The unique texts not yet in the cache are dealt out to the ranks; each encodes its share (on
    GPU LOCAL_RANK when a sentence-transformers encoder runs on CUDA) into the one shared cache;
    after a barrier every rank reads every vector from the cache. Each text is encoded once in all.
    Without a process group this is `encode_texts`.
    """
    if not collective.active():
        return encode_texts(encoder, texts, cache, batch_size, progress)
    import torch

    if (
        isinstance(encoder, SentenceTransformerEncoder)
        and encoder.device in ("auto", "cuda")
        and torch.cuda.device_count() > local_rank()
    ):
        encoder.device = f"cuda:{local_rank()}"  # not the first GPU for every rank (takes effect before loading)
    todo = uncached_texts(encoder, texts, cache)
    collective.barrier()  # every rank has read the same cache before any rank writes to it
    error = None
    rank, world = collective.rank(), collective.world_size()
    try:
        encode_texts(encoder, todo[rank::world], cache, batch_size, progress and rank == 0)
    except AetherError as exc:
        error = str(exc)
    collective.raise_if_any_failed(error)
    vectors, _ = encode_texts(encoder, texts, cache, batch_size, progress=False)  # all cached by now
    return vectors, len(todo)
