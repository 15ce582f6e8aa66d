"""A static file server on 127.0.0.1 that answers HTTP range requests and counts the bytes it sends,
standing in for a Cloud Storage bucket or the Source Cooperative mirror of AlphaEarth."""

from __future__ import annotations

import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    """Serves the files of `root` at http://127.0.0.1:PORT/NAME; `bytes_sent` and `requests` count traffic
    (`bytes_by_path` per file). Files carry an ETag and Last-Modified, and a GET with a matching
    If-None-Match is answered 304; `delay_s` slows every GET down (to interrupt a client mid-way)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.bytes_sent = 0
        self.requests: list[str] = []
        self.bytes_by_path: dict[str, int] = {}
        self.delay_s = 0.0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _file(self) -> Path | None:
                path = server.root / self.path.lstrip("/").split("?")[0]
                return path if path.is_file() else None

            def do_HEAD(self):
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self._validators(path)
                self.end_headers()

            def _validators(self, path: Path) -> str:
                st = path.stat()
                etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
                return etag

            def do_GET(self):
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                time.sleep(server.delay_s)
                st = path.stat()
                if self.headers.get("If-None-Match") == f'"{st.st_size:x}-{st.st_mtime_ns:x}"':
                    self.send_response(304)
                    self._validators(path)
                    self.end_headers()
                    with server._lock:
                        server.requests.append("not modified")
                    return
                size = st.st_size
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start, end = (0, size - 1) if match is None else (int(match[1]), int(match[2] or size - 1))
                end = min(end, size - 1)
                with path.open("rb") as f:
                    f.seek(start)
                    body = f.read(end - start + 1)
                self.send_response(200 if match is None else 206)
                if match is not None:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self._validators(path)
                self.end_headers()
                self.wfile.write(body)
                with server._lock:
                    server.bytes_sent += len(body)
                    name = self.path.lstrip("/").split("?")[0]
                    server.bytes_by_path[name] = server.bytes_by_path.get(name, 0) + len(body)
                    server.requests.append(self.headers.get("Range", "whole file"))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
