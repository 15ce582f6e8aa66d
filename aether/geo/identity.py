"""What a run reads, by content, so that a resume can tell whether it changed since the run began."""

from __future__ import annotations

import hashlib
import urllib.error

import rasterio

from aether.core.errors import AetherError, first_line
from aether.core.http import request
from aether.geo.gdal import gdal_path, remote_hint
from aether.geo.raster import raster_files


def content_identity(path: str) -> dict[str, str]:
    """What a run reads from the raster `path`, by content, so that a resume can tell whether it
    changed: for each local file it reads (`raster_files`: the raster, and a VRT's sources) the
    SHA-256 of its bytes (a file replaced by another of the same size and time differs); for an
    http(s) raster its ETag or Last-Modified; for other remote rasters (/vsis3/, /vsigs/, ...)
    the stored sizes of its blocks."""
    files = raster_files(path)
    if files:
        identity = {}
        for name in files:
            try:
                with open(name, "rb") as f:
                    identity[name] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as exc:
                identity[name] = f"unreadable: {exc.strerror}"
        return identity
    return {str(path): remote_identity(str(path))}


def remote_identity(path: str) -> str:
    """An identity of a remote raster's content: ETag or Last-Modified from an HTTP HEAD for
    http(s) URLs, else (or when the host gives neither) `block_sizes_identity`."""
    url = path[len("/vsicurl/") :] if path.startswith("/vsicurl/") else path
    if url.startswith(("http://", "https://")):
        try:
            with request(url, method="HEAD") as answer:
                for header in ("ETag", "Last-Modified"):
                    if answer.headers.get(header):
                        return f"{header}: {answer.headers[header]}"
        except urllib.error.HTTPError:
            pass  # a host that refuses HEAD: the blocks tell
    return block_sizes_identity(path)


def block_sizes_identity(path: str) -> str:
    """A digest of a raster's shape and its blocks' stored sizes: cheap (the file's header and block
    index), and for a compressed raster (AlphaEarth's tiles) it changes with the content."""
    digest = hashlib.sha256()
    try:
        with rasterio.open(gdal_path(path)) as src:
            bands = range(1, src.count + 1) if src.interleaving == rasterio.enums.Interleaving.band else [1]
            rows = -(-src.height // src.block_shapes[0][0])
            cols = -(-src.width // src.block_shapes[0][1])
            digest.update(f"{src.width} {src.height} {src.count} {src.dtypes[0]} {src.transform}".encode())
            for b in bands:
                for i in range(rows):
                    for j in range(cols):
                        digest.update(src.block_size(b, i, j).to_bytes(8, "little"))
    except (rasterio.errors.RasterioError, ValueError) as exc:
        raise AetherError(f"cannot read raster {path}: {first_line(exc)}{remote_hint(path)}") from None
    return "block sizes sha256:" + digest.hexdigest()
