"""HTTP requests that cannot hang: a deadline for the answer's headers and a least rate for its body.

A socket timeout bounds each read, not the request: a host that sends a few bytes every few
seconds (a "slowloris") would keep a plain urllib request waiting forever. Here a watchdog
thread closes the connection when the headers take longer than the timeout, or when the body
brings less than MIN_RATE_BPS over any period of the timeout, and the caller gets one line.
GDAL's own requests (the tiles' blocks) are bounded by GDAL_HTTP_TIMEOUT, which curl applies to
the whole request. urllib (with the proxies of the environment) does the HTTP itself; only its
connections are watched.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from aether.core.errors import AetherError, shown

DEFAULT_TIMEOUT_S = 30.0  # as GDAL_HTTP_TIMEOUT, which also sets it here
MIN_RATE_BPS = 16 * 1024  # a body slower than this over a whole timeout period is given up
CHUNK_BYTES = 1 << 16


def env_number(name: str, default: float) -> float:
    """A number of the environment variable `name` (`default` when unset); one line when it is not one."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise AetherError(
            f"environment variable {name}={shown(value)} is not a positive number (of seconds for "
            f"timeouts, e.g. {name}={default:g}); fix or unset it"
        )
    return number


def timeout_s() -> float:
    """GDAL_HTTP_TIMEOUT, the seconds a request may wait (default 30)."""
    return env_number("GDAL_HTTP_TIMEOUT", DEFAULT_TIMEOUT_S)


class TooSlow(AetherError):
    """The host did not answer within the deadline, or sent its answer too slowly."""


class Unreachable(AetherError):
    """No connection could be made: the host does not resolve, or refuses (trying again soon will not help)."""


class _Watchdog:
    """Closes the watched connections when the request overruns: headers not complete within
    `limit_s`, or fewer than MIN_RATE_BPS x `limit_s` bytes of body within any `limit_s`."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.sockets: list[socket.socket] = []
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._body = False
        self._mark = time.monotonic()
        self._received = 0
        self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.reason is not None:
                _close(sock)

    def headers_received(self) -> None:
        with self._lock:
            self._body, self._mark, self._received = True, time.monotonic(), 0

    def received(self, n: int) -> None:
        with self._lock:
            self._received += n

    def _run(self) -> None:
        while not self._stop.wait(min(0.25, self.limit_s / 4)):
            with self._lock:
                elapsed = time.monotonic() - self._mark
                if elapsed < self.limit_s:
                    continue
                if not self._body:
                    self.reason = f"no answer within {self.limit_s:g} s"
                elif self._received < MIN_RATE_BPS * self.limit_s:
                    self.reason = (
                        f"it sent {self._received:,} bytes in {elapsed:.0f} s, less than {MIN_RATE_BPS // 1024} KiB/s"
                    )
                else:
                    self._mark, self._received = time.monotonic(), 0
                    continue
                for sock in self.sockets:
                    _close(sock)
                return

    def stop(self) -> None:
        self._stop.set()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(watch: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener whose connections report their sockets to `watch` (proxies as usual)."""

    class Connection(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            watch.add(self.sock)

    class SecureConnection(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            watch.add(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Connection, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(SecureConnection, req, context=self._context)

    return urllib.request.build_opener(Handler, SecureHandler)


class Response:
    """An answer being received: `status`, `headers`, and `chunks()` of its body under the watchdog."""

    def __init__(self, raw, watch: _Watchdog, url: str):
        self.raw, self.watch, self.url = raw, watch, url
        self.status, self.headers = raw.status, raw.headers

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self.raw.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise self._failure(exc) from None
            if not chunk:
                if self.watch.reason is not None:
                    raise self._failure(None)
                return
            self.watch.received(len(chunk))
            yield chunk

    def _failure(self, exc: BaseException | None) -> AetherError:
        if self.watch.reason is not None:
            return TooSlow(
                f"{self.url} answered too slowly ({self.watch.reason}); GDAL_HTTP_TIMEOUT sets the seconds to wait"
            )
        return AetherError(f"lost the connection to {self.url} ({exc})")


@contextmanager
def request(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", limit_s: float | None = None
) -> Iterator[Response]:
    """The answer to one HTTP request, within the deadlines above (`limit_s`: default
    GDAL_HTTP_TIMEOUT). An HTTP error status raises urllib's HTTPError (the caller knows what a
    304 or a 403 means); a host that cannot be reached, or answers too slowly, raises
    AetherError (TooSlow for the latter) naming it."""
    limit_s = timeout_s() if limit_s is None else limit_s
    watch = _Watchdog(limit_s)
    try:
        try:
            raw = _opener(watch).open(
                urllib.request.Request(url, headers=headers or {}, method=method), timeout=limit_s
            )
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if watch.reason is not None:
                raise TooSlow(
                    f"{url} answered too slowly ({watch.reason}); GDAL_HTTP_TIMEOUT sets the seconds to wait"
                ) from None
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach {url} ({reason})") from None
        watch.headers_received()
        with raw:
            yield Response(raw, watch, url)
    finally:
        watch.stop()
