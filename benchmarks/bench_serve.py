"""`aether serve` in a real browser: how soon the map shows, how soon a new question's heatmap tiles
appear, how long its top-k list takes against `aether retrieve`, and two tabs asking at once.

    python benchmarks/bench_serve.py [--sizes example 4096]

Cases: "example" (the bundled AlphaEarth stand-in embedded with bench_inference.py's random-weight
aether checkpoint) and "4096" (bench_zonal.py's 4096 x 4096 x 128 int8 AETHER raster and its mlp
checkpoint). Each runs the real `aether serve` on 127.0.0.1 and the system Chromium (headless,
driven by Playwright) in a 1200 x 800 window. Timings start after the server answers (the model
loaded); a question's are taken in the page, from the click on Ask.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench_inference import checkpoint
from bench_zonal import aether_raster
from common import OUT, machine

from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["quiet cafes near water", "a park with trees", "a shopping street with many shops"]
# In the page, the browser's own clock: when the Ask button is clicked, and when the page marks a
# question's overlay loaded (every visible tile drawn: Leaflet's "load") and its places listed.
# Playwright's waits poll at 0, 20, 70, 170, 270, 770, 1270 ms..., so a wall clock around them
# reads 0.3-0.8 s as about 0.85 s.
MARKS = """() => {
  window.marks = {};
  const clicked = () => { window.marks.click = performance.now(); };
  document.querySelector("#ask button").addEventListener("click", clicked, true);
  new MutationObserver(() => {
    for (const what of ["overlay", "places"]) {
      const id = document.body.dataset[what];
      if (id && !(`${what} ${id}` in window.marks)) window.marks[`${what} ${id}`] = performance.now();
    }
  }).observe(document.body, { attributes: true });
}"""


def example_raster() -> tuple[Path, Path]:
    ckpt = checkpoint("aether")
    out = OUT / "example_aether_int16.tif"
    if not out.exists():
        embed_raster(
            str(REPO / "data/AE/helsinki_standin_ae_int8.tif"), str(ckpt), str(out), EmbedOptions(), progress=False
        )
    return out, ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(emb: Path, ckpt: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aether.cli.main", "serve", "--ckpt", str(ckpt), "--emb", str(emb), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        try:
            httpx.get(url + "/api/info", timeout=2)
            break
        except httpx.HTTPError:
            if proc.poll() is not None:
                sys.exit(f"aether serve stopped: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
    return proc, url, time.perf_counter() - started


def retrieve_seconds(emb: Path, ckpt: Path, query: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "aether.cli.main", "retrieve", "--ckpt", str(ckpt), "--emb", str(emb), "--query",
             query, "--out", out, "--no-progress"], capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        return time.perf_counter() - t0


def measure(name: str, emb: Path, ckpt: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    proc, url, load_s = serve(emb, ckpt)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("body[data-ready='true']", timeout=120_000)
            page.wait_for_function(
                "() => document.querySelectorAll('.leaflet-tile-loaded').length > 0 && "
                "document.querySelectorAll('.leaflet-tile:not(.leaflet-tile-loaded)').length === 0",
                timeout=600_000,
            )
            map_s = time.perf_counter() - t0
            page.evaluate(MARKS)
            tiles, places = [], []
            for i, query in enumerate(QUERIES, start=1):
                page.fill("#query", query)
                page.click("#ask button")
                page.wait_for_selector(f"body[data-places='{i}']", timeout=600_000)
                marks = page.evaluate("window.marks")
                tiles.append((marks[f"overlay {i}"] - marks["click"]) / 1000)
                places.append((marks[f"places {i}"] - marks["click"]) / 1000)
            browser.close()
        # two tabs (clients) at once
        answers, t0 = [], time.perf_counter()

        def tab(text: str) -> None:
            with httpx.Client(base_url=url, timeout=600) as client:
                qid = client.post("/api/query", json={"text": text}).json()["id"]
                while (body := client.get(f"/api/query/{qid}").json())["status"] == "searching":
                    time.sleep(0.2)
                answers.append((body["status"], len(body["places"]), time.perf_counter() - t0))

        threads = [threading.Thread(target=tab, args=(q,)) for q in ("a quiet square", "a busy road")]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    cli = retrieve_seconds(emb, ckpt, QUERIES[0])
    print(f"  {name}: server ready {load_s:.1f} s (model and PCA sample loaded); map shown {map_s:.2f} s after")
    print(f"    a new question's visible heatmap tiles: {', '.join(f'{s:.2f} s' for s in tiles)}")
    print(
        f"    its top-k list: {', '.join(f'{s:.1f} s' for s in places)}; `aether retrieve` for one query: {cli:.1f} s"
    )
    print("    two tabs at once: " + "; ".join(f"{s} with {n} places after {t:.1f} s" for s, n, t in answers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["example", "4096"])
    args = parser.parse_args()
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if chromium is None:
        sys.exit("no Chromium here (apt-get install chromium): the map's timings need a real browser")
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; browser: {version}")
    for size in args.sizes:
        if size == "example":
            emb, ckpt = example_raster()
        else:
            emb, ckpt = aether_raster(int(size)), checkpoint("mlp")
        measure(size, emb, ckpt, chromium)


if __name__ == "__main__":
    main()
