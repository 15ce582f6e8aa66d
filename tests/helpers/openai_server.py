"""An OpenAI-compatible embeddings server on 127.0.0.1 for the tests, scripted to fail.

It serves POST /v1/embeddings like the real API: deterministic unit vectors derived
from a hash of each input (so the same text always gets the same vector), `dimensions`
honoured, float or base64 encoding, `index` on every row and `usage`. It checks the
request limits it is given, counts what it receives, and serves scripted failures:

    with OpenAIServer() as server:
        server.script = ["429", "500", "slow"]   # the next three requests fail this way
        server.fail_after_batches = 2            # then: 500 for good after two more successes
        OpenAIEncoder(base_url=server.base_url)  # OPENAI_API_KEY must equal server.api_key
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MODEL_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


def fake_embedding(model: str, text: str, dimensions: int) -> np.ndarray:
    """The unit vector the server returns for `text`: seeded by a SHA-256 of model and text."""
    seed = int.from_bytes(hashlib.sha256(f"{model}\0{text}".encode()).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vec / np.linalg.norm(vec)


class OpenAIServer:
    """The server, its counters and its failure script (see the module docstring)."""

    def __init__(
        self,
        api_key: str = "sk-test",
        max_inputs: int = 2048,
        max_request_tokens: int = 300_000,
        max_input_tokens: int = 8191,
        retry_after: str = "0.2",
        slow_s: float = 2.0,
    ):
        self.api_key = api_key
        self.max_inputs = max_inputs
        self.max_request_tokens = max_request_tokens  # counted as UTF-8 bytes, like the client's bound
        self.max_input_tokens = max_input_tokens
        self.retry_after = retry_after  # the Retry-After header of a scripted 429
        self.slow_s = slow_s  # how long a scripted "slow" request waits before answering
        self.script: list[str] = []  # "429", "500", "503", "slow", "401": served to the next requests in order
        self.fail_after_batches: int | None = None  # after this many successes every request is a 500
        self.requests = 0  # POSTs received, failed ones included
        self.statuses: list[int] = []  # the status of each request, in order
        self.times: list[float] = []  # time.monotonic() at each request
        self.batches: list[list[str]] = []  # the inputs of each successful request
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a "slow" request's thread must not hold up close()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def inputs(self) -> list[str]:
        """Every input embedded successfully, in order."""
        return [text for batch in self.batches for text in batch]

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def respond(self, body: dict, auth: str) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) for one request."""
        with self._lock:
            self.requests += 1
            self.times.append(time.monotonic())
            action = self.script.pop(0) if self.script else None
            if action is None and self.fail_after_batches is not None and len(self.batches) >= self.fail_after_batches:
                action = "500"
        if action == "slow":
            time.sleep(self.slow_s)
            action = None
        if action == "429":
            return (
                429,
                {"Retry-After": self.retry_after},
                _error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            )
        if action in ("500", "503"):
            return int(action), {}, _error("The server had an error while processing your request.", "server_error")
        if action == "401" or auth != f"Bearer {self.api_key}":
            return 401, {}, _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        model, texts, dims = body.get("model"), body.get("input"), body.get("dimensions")
        if model not in MODEL_DIMENSIONS:
            return (
                404,
                {},
                _error(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                ),
            )
        if isinstance(texts, str):
            texts = [texts]
        sizes = [len(t.encode("utf-8")) for t in texts] if isinstance(texts, list) else []
        if not sizes or not all(isinstance(t, str) and t for t in texts):
            return 400, {}, _error("'$.input' is invalid.", "invalid_request_error")
        if len(texts) > self.max_inputs or sum(sizes) > self.max_request_tokens or max(sizes) > self.max_input_tokens:
            return (
                400,
                {},
                _error(
                    f"Request over the limits: {len(texts)} inputs, {sum(sizes)} tokens, longest {max(sizes)}.",
                    "invalid_request_error",
                ),
            )
        dims = MODEL_DIMENSIONS[model] if dims is None else int(dims)
        data = []
        for i, text in enumerate(texts):
            vec = fake_embedding(model, text, dims)
            coded = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode()
                if body.get("encoding_format") == "base64"
                else vec.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": coded})
        data.reverse()  # rows may come in any order; `index` says which is which
        with self._lock:
            self.batches.append(list(texts))
        tokens = sum(sizes)
        return (
            200,
            {},
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/embeddings":
                    status, headers, payload = 404, {}, _error(f"Unknown path {self.path}", "invalid_request_error")
                    with server._lock:
                        server.requests += 1
                else:
                    status, headers, payload = server.respond(body, self.headers.get("Authorization", ""))
                with server._lock:
                    server.statuses.append(status)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {
                        "Content-Type": "application/json",
                        "Content-Length": str(len(data)),
                        **headers,
                    }.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        return Handler


def _error(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
