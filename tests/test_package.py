"""The house: imports run one way between the rooms (import-linter's contracts in pyproject.toml),
no module imports another of the package inside a function (where it would hide a cycle or an
upward import), the code is formatted and linted (ruff), importing the library changes nothing in
the process, and a Dask worker imports aether as an installed package."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aether"


def test_rooms_import_one_way_and_without_cycles():
    # in its own process: import-linter configures logging as a program does (disabling the
    # loggers that exist), which would silence the library's messages for the tests after this one
    lint = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert lint is not None, "import-linter is not installed (pip install -e '.[dev]')"
    done = subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def inner_imports(path: Path) -> list[str]:
    """`aether` imports inside functions of the module at `path`, as file:line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = []
            if isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            elif isinstance(inner, ast.ImportFrom):
                names = [inner.module or ""] if inner.level == 0 else ["aether (relative)"]
            if any(n == "aether" or n.startswith("aether.") or n.startswith("aether ") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    return found


def test_no_module_imports_another_inside_a_function():
    found = [where for path in sorted(PACKAGE.rglob("*.py")) for where in inner_imports(path)]
    assert found == [], found


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
    ruff = shutil.which("ruff", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert ruff, "ruff is one of the dev extra's tools"
    done = subprocess.run(
        [ruff, *args, "aether", "tests", "benchmarks", "scripts", *map(str, ROOT.glob("*.py"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_library_changes_nothing_in_the_process():
    """Every module imported: the environment (beyond what rasterio itself sets when imported),
    logging's handlers and torch's thread count are as they were, and nothing was printed."""
    code = (
        "import json, logging, os, pkgutil, importlib, torch, rasterio, pyproj, geopandas  # what they do is theirs\n"
        "env, threads = dict(os.environ), torch.get_num_threads()\n"
        "handlers = {n: list(logging.getLogger(n).handlers) for n in ('', 'aether', 'rasterio')}\n"
        "import aether\n"
        "names = [m.name for m in pkgutil.walk_packages(aether.__path__, 'aether.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "after = {n: list(logging.getLogger(n).handlers) for n in ('', 'aether', 'rasterio')}\n"
        "print(json.dumps({'modules': len(names), 'env': sorted(set(os.environ.items()) ^ set(env.items())),\n"
        "                  'threads': [threads, torch.get_num_threads()], 'handlers': after == handlers}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] > 60 and report["env"] == [] and report["handlers"]
    assert report["threads"][0] == report["threads"][1]
    assert done.stdout.strip().splitlines()[:-1] == [] and done.stderr == ""


def test_a_dask_worker_imports_aether_as_an_installed_package(tmp_path):
    """A worker started elsewhere (another working folder, no PYTHONPATH) runs an AETHER task: the
    package it imports is the installed one, not the checkout's folder."""
    pytest.importorskip("distributed")
    code = (
        "import json\n"
        "from distributed import Client, LocalCluster\n"
        "def where():\n"
        "    import aether, os\n"
        "    return json.dumps([aether.__file__, os.getcwd(), 'PYTHONPATH' in os.environ])\n"
        "with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:\n"
        "    with Client(cluster) as client:\n"
        "        print(client.submit(where).result())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    module, cwd, has_path = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(module).name == "__init__.py" and Path(module).parent.name == "aether"
    assert not has_path and Path(cwd) != ROOT
