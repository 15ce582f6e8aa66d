"""What every map figure shows (matplotlib): axes in the raster's CRS, named with their units, and a
scale bar of a round ground length; shared by the heatmaps and the PCA pictures."""

from __future__ import annotations

import math

from rasterio.crs import CRS

NICE_LENGTHS_M = [1, 2, 5]  # a scale bar's length is one of these times a power of ten


def crs_name(crs: CRS) -> str:
    return f"EPSG:{crs.to_epsg()}" if crs.to_epsg() is not None else crs.to_string()


def label_axes(ax, crs: CRS) -> None:
    """Tick labels without offsets, and axis names with the CRS and its units."""
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(useOffset=False, style="plain")
    if crs.is_geographic:
        ax.set_xlabel(f"longitude (degrees, {crs_name(crs)})", fontsize=8)
        ax.set_ylabel("latitude (degrees)", fontsize=8)
    else:
        unit = crs.linear_units or "units"
        ax.set_xlabel(f"easting ({unit}, {crs_name(crs)})", fontsize=8)
        ax.set_ylabel(f"northing ({unit})", fontsize=8)


def scale_bar(ax, bounds, crs: CRS, colour: str = "black") -> None:
    """A bar of a round ground length, about a fifth of the map's width, in its lower left corner."""
    left, bottom, right, top = bounds
    width_units = right - left
    if crs.is_geographic:
        metres_per_unit = 111_320 * math.cos(math.radians((bottom + top) / 2))
    else:
        metres_per_unit = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    target_m = width_units * metres_per_unit / 5
    if not target_m > 0:
        return
    power = 10 ** math.floor(math.log10(target_m))
    length_m = max(n * power for n in NICE_LENGTHS_M if n * power <= target_m)
    length = length_m / metres_per_unit
    x0, y0 = left + width_units * 0.04, bottom + (top - bottom) * 0.05
    ax.plot([x0, x0 + length], [y0, y0], color=colour, linewidth=3, solid_capstyle="butt")
    text = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
    ax.annotate(text, (x0 + length / 2, y0), xytext=(0, 4), textcoords="offset points", ha="center",
                fontsize=8, color=colour)  # fmt: skip
