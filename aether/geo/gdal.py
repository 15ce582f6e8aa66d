"""GDAL's side of AETHER: which paths are remote and how GDAL opens them, and the settings remote
reads need. Importing this changes nothing; `configure()` applies the settings to the process
(the command line calls it; a notebook may too)."""

from __future__ import annotations

import os

import rasterio

URL_SCHEMES = ("http://", "https://", "s3://", "gs://")  # what a user may give where a raster is taken
# GDAL's virtual file systems that go over the network (a path may nest them: /vsizip//vsicurl/...)
NETWORK_FILE_SYSTEMS = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs")
_OBJECT_STORES = (("s3://", "/vsis3/"), ("gs://", "/vsigs/"))
# A server that accepts a connection and never answers must not hang a run: each HTTP request gives
# up after these seconds and is retried a few times, then the read fails with one line. The
# environment overrides them (e.g. GDAL_HTTP_TIMEOUT=120 for a slow link). Opening a remote file
# must not list its "folder" (a bucket can hold thousands of tiles).
DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_CONNECTTIMEOUT": "30",
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}

# GDAL's block cache where blocks pass through once (pooling chunks, scoring tiles, joining bands):
# a small cache bounds memory, and a larger one buys nothing
STREAMING_CACHE_MB = 64


def streaming_cache() -> rasterio.Env:
    """The GDAL settings of a read or copy whose blocks pass through once: STREAMING_CACHE_MB of cache."""
    return rasterio.Env(GDAL_CACHEMAX=STREAMING_CACHE_MB * 2**20)


def configure() -> None:
    """Give this process AETHER's GDAL settings (DEFAULTS) where its environment sets none. GDAL
    reads them from the environment in every thread, which `rasterio.Env` (per thread) would not
    reach: the reading threads of inference and retrieval are others than the caller's."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_remote(path: str) -> bool:
    """Not a local file's path: a URL, or any GDAL virtual file system path (/vsicurl/, /vsis3/, ...)."""
    return str(path).startswith(("/vsi", *URL_SCHEMES))


def over_network(path: str) -> bool:
    """Does reading `path` go over the network (a URL, or a network file system anywhere in it)?"""
    path = str(path)
    return path.startswith(URL_SCHEMES) or any(fs in path for fs in NETWORK_FILE_SYSTEMS)


def remote_hint(path: str) -> str:
    """For a raster read over the network, what an error message adds: how long GDAL waited, and
    how to wait longer."""
    if not over_network(path):
        return ""
    timeout = os.environ.get("GDAL_HTTP_TIMEOUT", DEFAULTS["GDAL_HTTP_TIMEOUT"])
    retries = os.environ.get("GDAL_HTTP_MAX_RETRY", DEFAULTS["GDAL_HTTP_MAX_RETRY"])
    return (
        f" (each request waits up to GDAL_HTTP_TIMEOUT = {timeout} s and is retried GDAL_HTTP_MAX_RETRY = "
        f"{retries} times; set them in the environment for a slow server)"
    )


def gdal_path(path: str) -> str:
    """The name GDAL opens: http(s):// URLs become /vsicurl/ paths and s3:// and gs:// URLs /vsis3/
    and /vsigs/ paths, which read only the byte ranges (COG blocks) that are needed; anything else
    is unchanged."""
    path = str(path)
    if path.startswith(("http://", "https://")):
        return "/vsicurl/" + path
    for prefix, vsi in _OBJECT_STORES:
        if path.startswith(prefix):
            return vsi + path[len(prefix) :]
    return path


def local_absolute(path: str) -> str:
    """A local path made absolute (a Dask worker or a VRT elsewhere may have another working
    folder); URLs and /vsi paths unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)
