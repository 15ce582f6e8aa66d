"""A real `aether serve` app on 127.0.0.1 (uvicorn in a thread) over a small AETHER raster made by
the real inference from an untrained checkpoint with the packaged text model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers.fixtures import poi_records, unit_field, write_geojson, write_raster, write_untrained_checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def aether(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", *args], env=ENV, capture_output=True, text=True, timeout=300
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(base URL, inputs folder, checkpoint, AETHER raster): a live server for the session."""
    import uvicorn

    from aether.serve.app import ServeOptions, create_app

    tmp = tmp_path_factory.mktemp("serve")
    ae = write_raster(tmp / "ae.tif", unit_field(70, 90, seed=9))
    ckpt = write_untrained_checkpoint(tmp / "ckpt.pt")
    emb = tmp / "aether.tif"
    done = aether("infer", "--ae_tif", str(ae), "--ckpt", str(ckpt), "--out", str(emb), "--no-progress")
    assert done.returncode == 0, done.stderr
    pois = write_geojson(tmp / "pois.geojson", poi_records(30, 70, 90, seed=2))
    work = tmp / "work"
    work.mkdir()
    app = create_app(ServeOptions(str(ckpt), str(emb), str(ae), str(pois), top_k=5, nms_m=50.0), work)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", tmp, ckpt, emb
    server.should_exit = True
    thread.join(timeout=10)
    app.state.book.close()
