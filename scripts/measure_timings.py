"""How long the README's commands take, measured from a fresh clone in fresh virtual environments,
written to docs/timings.md with the date, the machine and the commit: the one place the docs take
timings of these commands from.

    python scripts/measure_timings.py [--skip-tests] [--out docs/timings.md]

Steps (each timed by wall clock, in order, on a clone of this repository's HEAD):
1. the first README command: a venv, `pip install .`, `aether train --cfg config.yaml`;
2. `aether train` again (`--overwrite`: every description comes from the text cache);
3. the example's next commands: `aether infer`, `aether retrieve` (three queries), `aether evaluate`;
4. `bash scripts/example_tour.sh` (into a scratch folder);
5. the second README command: a venv, `pip install -e '.[dev]'`, `python -m pytest -q -n 2`.
Needs the package index (pip) but no other network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, {platform.system()}"


class Steps:
    def __init__(self, clone: Path):
        self.clone, self.rows = clone, []

    def run(self, label: str, command: str) -> str:
        """Run `command` in bash in the clone; record its wall time; return its output."""
        print(f"-- {label}: {command}", flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": ""}
        done = subprocess.run(["bash", "-c", command], cwd=self.clone, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            sys.exit(f"{label} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        self.rows.append((label, command, seconds))
        print(f"   {seconds:.1f} s", flush=True)
        return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="leave out step 5 (the test suite)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "timings.md")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "aether"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        steps = Steps(clone)
        venv = "python3 -m venv .venv && . .venv/bin/activate"
        steps.run("install (`pip install .`, fresh venv)", f"{venv} && pip install -q .")
        steps.run("train the example, first run", ". .venv/bin/activate && aether train --cfg config.yaml")
        steps.run(
            "train the example again (text from the cache)",
            ". .venv/bin/activate && aether train --cfg config.yaml --overwrite",
        )
        metrics = [json.loads(line) for line in (clone / "ckpts/helsinki/metrics.jsonl").read_text().splitlines()]
        ae = "data/AE/helsinki_standin_ae_int8.tif"
        steps.run(
            "embed the example raster",
            f". .venv/bin/activate && aether infer --ae_tif {ae} --ckpt ckpts/helsinki/best.pt "
            "--out ckpts/helsinki/aether.tif --no-progress",
        )
        steps.run(
            "three retrieval queries",
            ". .venv/bin/activate && aether retrieve --ckpt ckpts/helsinki/best.pt --emb ckpts/helsinki/aether.tif "
            "--queries docs/example_queries.txt --out ckpts/helsinki/retrieval --no-progress",
        )
        steps.run(
            "evaluate the example",
            ". .venv/bin/activate && aether evaluate --ckpt ckpts/helsinki/best.pt "
            "--landuse data/landuse/helsinki_landuse.geojson --no-progress",
        )
        steps.run("the example tour", f". .venv/bin/activate && bash scripts/example_tour.sh --out {tmp}/tour")
        tests = ""
        if not args.skip_tests:
            steps.run(
                "install with the test tools (`pip install -e '.[dev]'`, fresh venv)",
                f"rm -rf .venv && {venv} && pip install -q -e '.[dev]'",
            )
            out = steps.run("the test suite", ". .venv/bin/activate && python -m pytest -q -n 2")
            tests = re.findall(r"^=*\s*(\d+ passed.*?) in [\d.]+s", out, re.M)[-1:] or [""]
            tests = tests[0].strip(" =")
    last, best = metrics[-1], max(metrics, key=lambda m: m.get("val_t2ae_r10", -1))
    lines = [
        "# Timings",
        "",
        f"Generated by `python scripts/measure_timings.py` on {datetime.date.today().isoformat()}, commit "
        f"{commit.stdout.strip()}, from a fresh clone: {machine()}, Python {platform.python_version()}. "
        "Wall-clock seconds, one run each; on this machine kind timings vary by 20% or more from run to run.",
        "",
        "| step | command | seconds |",
        "|---|---|---|",
    ]
    for label, command, seconds in steps.rows:
        shown = command.replace(f"{tmp}/tour", "SCRATCH").rsplit("activate && ", 1)[-1]
        lines.append(f"| {label} | `{shown}` | {seconds:.1f} |")
    lines += [
        "",
        f"The example's training (seed 0): validation text-to-AE Recall@10 {last['val_t2ae_r10']:.3f} at the last "
        f"epoch, {best['val_t2ae_r10']:.3f} at best (epoch {best['epoch']}, kept in `best.pt`); Recall@1 / @5 at the "
        f"last epoch {last['val_t2ae_r1']:.3f} / {last['val_t2ae_r5']:.3f}.",
    ]
    if tests:
        lines += ["", f"The test suite: {tests}."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
