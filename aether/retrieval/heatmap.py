"""A query's similarity map as a PNG: averaged to at most HEATMAP_MAX_PX across, at its ground
shape, with a colour bar, axes in the raster's CRS and the best places marked."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import rasterio

from aether.core.files import temp_file_beside
from aether.geo.figures import label_axes, scale_bar

HEATMAP_MAX_PX = 1024  # longer side of the PNG heatmap's image


def write_heatmap(tif: Path, path: Path, query: str, hits: list[dict], temps: list[Path]) -> Path:
    """The similarity map, read at most HEATMAP_MAX_PX across (averaged), with a colour bar and the hits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rasterio.enums import Resampling

    with rasterio.open(tif) as src:
        scale = max(src.width, src.height) / HEATMAP_MAX_PX
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else src.shape
        img = src.read(1, out_shape=shape, resampling=Resampling.average, masked=True).filled(np.nan)
        b, crs = src.bounds, src.crs
    # a degree of longitude is cos(latitude) of a degree of latitude: draw a geographic map at its ground shape
    aspect = 1 / math.cos(math.radians((b.bottom + b.top) / 2)) if crs.is_geographic else 1.0
    height_in = 7 * aspect * (b.top - b.bottom) / max(b.right - b.left, 1e-12)
    fig, ax = plt.subplots(figsize=(7, min(max(height_in, 2.5), 14) + 0.6), dpi=110)
    cmap = plt.get_cmap("magma").with_extremes(bad="#d0d0d0")
    finite = img[np.isfinite(img)]
    vmin, vmax = np.percentile(finite, [2, 99.8]) if finite.size else (0.0, 1.0)
    im = ax.imshow(
        img, cmap=cmap, vmin=vmin, vmax=vmax, extent=(b.left, b.right, b.bottom, b.top), interpolation="nearest"
    )
    if hits:
        ax.scatter(
            [h["x"] for h in hits],
            [h["y"] for h in hits],
            s=60,
            facecolors="none",
            edgecolors="#00e5ff",
            linewidths=1.5,
        )
        for h in hits:
            ax.annotate(
                str(h["rank"]),
                (h["x"], h["y"]),
                xytext=(4, 4),
                textcoords="offset points",
                color="#00e5ff",
                fontsize=8,
                weight="bold",
            )
    ax.set_title(query if len(query) <= 70 else query[:67] + "...", fontsize=11)
    ax.set_aspect(aspect)
    label_axes(ax, crs)
    scale_bar(ax, (b.left, b.bottom, b.right, b.top), crs, colour="white")
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)  # as tall as the map, never taller
    fig.colorbar(im, cax=cax, label="cosine similarity")
    fd, tmp = temp_file_beside(path, ".partial.png")
    os.close(fd)
    temps.append(tmp)
    with warnings.catch_warnings():  # a glyph the font lacks (an emoji in the query) is drawn as a box, quietly
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return tmp
