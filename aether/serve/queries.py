"""The questions a map server is asked: each a text (or a clicked place's vector) turned into a
latent vector at once, so its heatmap tiles draw immediately, and searched for its top-k places in
the background by `aether.retrieval.search.retrieve`, exactly as `aether retrieve` does, into a
folder of its own: the list the page shows and the files it offers are retrieve's own."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aether.core.errors import AetherError, first_line
from aether.model.embed import embed_texts, text_encoder_of
from aether.model.projector import Projector
from aether.retrieval.search import SearchOptions, retrieve

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 300
MAX_IN_FLIGHT = 4  # searches running or waiting at once; more are refused (429) until one ends
MAX_KEPT = 64  # queries remembered; the oldest finished ones are forgotten beyond this


SEARCH_DELAY_S = 0.5  # a search waits at least this long, and until no tile was drawn for QUIET_S, so
QUIET_S = 0.4  # the question's visible tiles are drawn first (the search would slow them down)
MAX_WAIT_S = 5.0  # but no longer than this, while someone pans the map
SEARCH_NICE = 10  # how much lower the background search runs than the tile requests (Linux thread niceness)


def lower_priority() -> None:
    """Run this thread (and the threads it starts) at a lower CPU priority, where the OS allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEARCH_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: the search runs as it is
        pass


class Busy(Exception):
    """Too many searches in flight."""


@dataclass
class Query:
    id: int
    text: str
    vector: np.ndarray
    low: float
    high: float
    folder: Path
    status: str = "searching"  # then "done" or "failed"
    places: list[dict] = field(default_factory=list)
    tif: Path | None = None
    geojson: Path | None = None
    error: str | None = None

    def summary(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "status": self.status,
            "range": [self.low, self.high],
            "places": self.places,
            "error": self.error,
        }


class QueryBook:
    """Queries by id: made at once (`ask`, `like`), searched in the background, at most
    MAX_IN_FLIGHT at a time."""

    def __init__(self, projector: Projector, ckpt: str, emb_tif: str, layer, folder: Path, options: SearchOptions):
        self.projector, self.ckpt, self.emb_tif, self.layer = projector, ckpt, emb_tif, layer
        self.folder, self.options = folder, options
        self.queries: dict[int, Query] = {}
        self.lock = threading.Lock()
        self.next_id = 1
        self.in_flight = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")  # searches use every core
        # one text encoder for every question (building one takes 0.1-0.3 s; encoding a question 0.02 s),
        # used by one thread at a time (a fast tokenizer can fail, "Already borrowed", when two use it at once)
        self.encoder = text_encoder_of(projector.checkpoint)
        self.encoder_lock = threading.Lock()

    def warm_up(self) -> None:
        """Encode a throwaway text now (the kept encoder's first call is the slow one), so the first
        question is answered as fast as the next."""
        self._encode("a place")

    def _encode(self, text: str) -> np.ndarray:
        with self.encoder_lock:
            return embed_texts(self.projector, [text], encoder=self.encoder)[0]

    def ask(self, text: str) -> Query:
        text = " ".join(str(text).split())
        if not text:
            raise AetherError("the query is empty")
        if len(text) > MAX_QUERY_CHARS:
            raise AetherError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS}")
        self._reserve()
        try:
            vector = self._encode(text)
        except BaseException:
            self._release()
            raise
        return self._start(text, vector)

    def like(self, lon: float, lat: float) -> Query:
        vector = self.layer.vector_at(lon, lat)
        if vector is None:
            raise AetherError(f"no valid pixel at lon {lon:.5f}, lat {lat:.5f}")
        self._reserve()
        return self._start(f"places like {lat:.5f}, {lon:.5f}", vector)

    def _reserve(self) -> None:
        with self.lock:
            if self.in_flight >= MAX_IN_FLIGHT:
                raise Busy(f"{self.in_flight} searches are running; try again when one ends")
            self.in_flight += 1

    def _release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _start(self, text: str, vector: np.ndarray) -> Query:
        low, high = self.layer.score_range(vector)
        with self.lock:
            qid = self.next_id
            self.next_id += 1
            query = Query(qid, text, vector.astype(np.float32), low, high, self.folder / f"q{qid}")
            self.queries[qid] = query
            self._forget_old()
        self.pool.submit(self._search, query)
        return query

    def _forget_old(self) -> None:
        done = [q for q in self.queries.values() if q.status != "searching"]
        for q in done[: max(0, len(self.queries) - MAX_KEPT)]:
            del self.queries[q.id]
            self.layer.cache.drop(f"q{q.id}")

    def _search(self, query: Query) -> None:
        lower_priority()  # the tiles in view first: the map is what the user waits on
        time.sleep(SEARCH_DELAY_S)  # and the page's first tiles of this question before the search starts
        self.layer.wait_until_quiet(QUIET_S, MAX_WAIT_S)
        try:
            results = retrieve(
                [query.text],
                self.ckpt,
                str(query.folder),
                emb_tif=self.emb_tif,
                options=self.options,
                progress=False,
                query_vectors=query.vector[None, :],
            )
            query.places = results[0].hits
            query.tif, query.geojson = results[0].tif, results[0].geojson
            query.status = "done"
        except Exception as exc:  # reported to the page, one line in the log, no traceback
            query.status, query.error = "failed", first_line(exc)
            logger.warning(f"query {query.id} failed: {query.error}")
        finally:
            self._release()

    def get(self, qid: int) -> Query | None:
        with self.lock:
            return self.queries.get(qid)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
