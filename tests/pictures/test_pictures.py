"""Pictures: PCA false colour of embedding rasters and training curves, on tiny generated data.

The PCA is checked against an SVD of the same pixels read independently; orientation, shared colours
(--fit-on) and refusals run through real GeoTIFFs, real PNGs and the real plot.py.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rasterio.transform import from_origin

from aether.core.errors import AetherError
from aether.pictures import curves
from aether.pictures import pca as pictures
from tests.helpers.fixtures import run_script_in_process, stored_values, unit_field, write_raster

render_plain = functools.partial(pictures.render_pca, frame=False)  # the picture's pixels alone

ROOT = Path(__file__).resolve().parents[2]
HEIGHT, WIDTH = 45, 33  # 45 rows divide by a decimation step of 3


def two_regions(bands: int = 64, seed: int = 1) -> np.ndarray:
    """(bands, h, w): the west half near one unit vector, the east half near another, a nodata corner."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, bands))
    values = np.empty((bands, HEIGHT, WIDTH), dtype=np.float32)
    values[:, :, : WIDTH // 2] = a[:, None, None]
    values[:, :, WIDTH // 2 :] = b[:, None, None]
    values += 0.05 * rng.standard_normal(values.shape)
    values /= np.linalg.norm(values, axis=0, keepdims=True)
    values[:, :5, :4] = np.nan
    return values


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGBA"
        return np.asarray(img)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_two_regions_get_distinct_colours_and_nodata_is_transparent(tmp_path):
    values = two_regions()
    tif = write_raster(tmp_path / "regions.tif", values)
    image = pictures.pca_image(tif)
    assert image.shape == (HEIGHT, WIDTH, 4)
    invalid = np.isnan(values).any(axis=0)
    assert (image[..., 3][invalid] == 0).all() and (image[..., 3][~invalid] == 255).all()
    west = image[5:, : WIDTH // 2, :3].reshape(-1, 3).astype(float)
    east = image[:, WIDTH // 2 + 1 :, :3].reshape(-1, 3).astype(float)
    assert np.linalg.norm(west.mean(axis=0) - east.mean(axis=0)) > 150
    # the first component (red) separates the regions completely; the others show the noise within them
    assert west[:, 0].max() < east[:, 0].min() or east[:, 0].max() < west[:, 0].min()


def test_pca_matches_svd_of_all_pixels_with_deterministic_signs(tmp_path):
    values = unit_field(HEIGHT, WIDTH, seed=3)
    values[:, 10:14, 20:25] = np.nan
    tif = write_raster(tmp_path / "field.tif", values)
    fit = pictures.fit_pca(tif)
    stored, invalid = stored_values(tif)  # independent reading: every valid pixel (the sample is all of them here)
    pixels = stored[:, ~invalid].T
    mean = pixels.mean(axis=0)
    reference = np.linalg.svd(pixels - mean, full_matrices=False)[2][:3]
    assert fit.n_samples == len(pixels)
    np.testing.assert_allclose(fit.mean, mean, atol=1e-6)
    cosines = np.sum(fit.components * reference, axis=1)
    np.testing.assert_allclose(np.abs(cosines), 1.0, atol=1e-5)
    largest = np.argmax(np.abs(fit.components), axis=1)
    assert (fit.components[np.arange(3), largest] > 0).all()

    flipped = write_raster(tmp_path / "negated.tif", -values)  # same covariance, opposite eigenvector signs
    np.testing.assert_allclose(pictures.fit_pca(flipped).components, fit.components, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, crs, max_px",
    [
        ("int8", "EPSG:32635", 1024),
        ("float32", "EPSG:4326", 1024),
        ("int8", "EPSG:32635", 15),
        ("float32", "EPSG:32635", 12),
    ],
)
def test_bottom_up_copy_gives_the_north_up_picture(tmp_path, dtype, crs, max_px):
    values = unit_field(HEIGHT, WIDTH, seed=5)
    values[:, 30:, :6] = np.nan
    grid = from_origin(24.9, 60.17, 1e-4, 1e-4) if crs == "EPSG:4326" else None
    nodata = float("nan") if dtype == "float32" else None
    kwargs = dict(dtype=dtype, crs=crs, transform=grid, nodata=nodata)
    north = pictures.pca_image(write_raster(tmp_path / "north.tif", values, **kwargs), max_px=max_px)
    south = pictures.pca_image(write_raster(tmp_path / "south.tif", values, bottom_up=True, **kwargs), max_px=max_px)
    if crs == "EPSG:4326":  # square degrees at 60.17 N: a pixel's ground width is cos(60.17) of its height
        assert north.shape == (HEIGHT, round(WIDTH * np.cos(np.radians(60.17 - HEIGHT * 1e-4 / 2))), 4)
    else:
        assert north.shape == {1024: (HEIGHT, WIDTH, 4), 15: (15, 11, 4), 12: (12, 9, 4)}[max_px]
    assert (north[-1, 0, 3] == 0) and (north[0, 0, 3] == 255)  # the nodata block is in the south-west
    assert (north == south).all()


def test_decimated_strips_stitch_and_stay_under_max_px(tmp_path, monkeypatch):
    tif = write_raster(tmp_path / "field.tif", unit_field(HEIGHT, WIDTH, seed=7), block=16)
    whole = pictures.pca_image(tif, max_px=20)
    assert whole.shape[:2] == (20, 15)  # the longer side brought to max_px, the shape kept
    monkeypatch.setattr(pictures, "STRIP_BYTES", 1)  # one picture row per read
    assert (pictures.pca_image(tif, max_px=20) == whole).all()


def test_fit_on_itself_equals_default_and_fit_on_other_shares_colours(tmp_path):
    values = two_regions()
    tif = write_raster(tmp_path / "a.tif", values)
    plain = render_plain(tif, tmp_path / "plain.png")
    itself = render_plain(tif, tmp_path / "itself.png", fit_on=tif)
    assert (read_png(plain) == read_png(itself)).all()

    mirrored = write_raster(tmp_path / "b.tif", values[:, :, ::-1])  # east and west swapped
    shared = read_png(render_plain(mirrored, tmp_path / "shared.png", fit_on=tif))
    assert (shared == read_png(plain)[:, ::-1]).all()
    assert not partials(tmp_path)


def test_scale_repeats_pixels(tmp_path):
    tif = write_raster(tmp_path / "a.tif", two_regions())
    one = read_png(render_plain(tif, tmp_path / "one.png", scale=1))
    three = read_png(render_plain(tif, tmp_path / "three.png", scale=3))
    assert three.shape == (3 * HEIGHT, 3 * WIDTH, 4)
    assert (three[::3, ::3] == one).all()


def test_small_rasters_are_enlarged_and_geographic_ones_drawn_at_their_ground_shape(tmp_path):
    """Default scale: whole pixels repeated until the longer side reaches MIN_PX. EPSG:4326 with square
    degree pixels at 60 N: half as wide on the ground as tall, so the picture is half as wide."""
    from rasterio.transform import from_origin

    tif = write_raster(tmp_path / "a.tif", two_regions())
    side = max(HEIGHT, WIDTH)
    auto = read_png(render_plain(tif, tmp_path / "auto.png"))
    k = -(-pictures.MIN_PX // side)
    assert auto.shape[:2] == (k * HEIGHT, k * WIDTH) and max(auto.shape[:2]) >= pictures.MIN_PX
    geo = write_raster(
        tmp_path / "geo.tif", unit_field(40, 40), crs="EPSG:4326", transform=from_origin(24.0, 60.002, 1e-4, 1e-4)
    )
    picture = read_png(render_plain(geo, tmp_path / "geo.png", scale=1))
    assert picture.shape[:2] == (40, 20)  # cos(60 degrees) = 0.5


def run_plot(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "plot.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def assert_one_error_line(code: int, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr


def test_fit_on_with_other_band_count_is_refused_by_the_script(tmp_path):
    ae = write_raster(tmp_path / "ae.tif", unit_field(HEIGHT, WIDTH, bands=64))
    aether = write_raster(tmp_path / "aether.tif", unit_field(HEIGHT, WIDTH, bands=128))
    out = tmp_path / "out.png"
    code, stderr = run_plot(["pca", "--tif", str(aether), "--fit-on", str(ae), "--out", str(out)])
    assert_one_error_line(code, stderr, "with a PCA fitted on")
    assert "(128 bands)" in stderr and "(64 bands)" in stderr
    assert not out.exists() and not partials(tmp_path)


METRICS = [
    {
        "epoch": e,
        "train_loss": 5.0 - 0.2 * e,
        "train_ae_ae": 4.5 - 0.3 * e,
        "train_ae_poi": 5.2 - 0.1 * e,
        "val_loss": 5.2 - 0.1 * e,
        "val_ae_ae": 4.6 - 0.2 * e,
        "val_ae_poi": 5.4 - 0.05 * e,
        **{f"val_{d}_r{k}": 0.01 * k * e for d in ("t2ae", "ae2t") for k in (1, 5, 10)},
        "lr": 1e-3 / e,
        "temperature": 0.07,
        "elapsed_s": 1.0,
    }
    for e in range(1, 5)
]


@pytest.mark.parametrize("with_val", [True, False])
def test_training_curves_png(tmp_path, with_val):
    rows = [row if with_val else {k: v for k, v in row.items() if not k.startswith("val_")} for row in METRICS]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = curves.plot_training_curves(metrics, tmp_path / "curves.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1350, 430)
        image = np.asarray(img.convert("RGB"))
    assert image.std() > 10  # something was drawn
    assert not partials(tmp_path)


BAD_METRICS = [
    ("empty.jsonl", "\n", "is empty"),
    ("broken.jsonl", '{"epoch": 1, "train_loss": 5.0}\n{"epoch": 2,\n', "line 2 is not JSON"),
    ("no_epoch.jsonl", '{"train_loss": 5.0}\n', "line 1 has no numeric 'epoch'"),
]


@pytest.mark.parametrize("name, text, expected", BAD_METRICS, ids=[b[0] for b in BAD_METRICS])
def test_bad_metrics_are_refused(tmp_path, name, text, expected):
    metrics = tmp_path / name
    metrics.write_text(text, encoding="utf-8")
    out = tmp_path / "curves.png"
    with pytest.raises(AetherError, match=expected):
        curves.plot_training_curves(metrics, out)
    assert not out.exists() and not partials(tmp_path)


def test_malformed_metrics_exit_2_through_the_script(tmp_path, monkeypatch, capsys):
    """In this interpreter (the band-count refusal above runs a real subprocess): plot.py's main under cli.run."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "train_loss": 5.0}\nnot json\n', encoding="utf-8")
    out = tmp_path / "curves.png"
    code, _, err = run_script_in_process(
        "plot.py", ["curves", "--metrics", str(metrics), "--out", str(out)], monkeypatch, capsys
    )
    assert_one_error_line(code, err, "line 2 is not JSON")
    assert not out.exists() and not partials(tmp_path)


def test_max_px_is_the_longer_side_of_the_ground_shaped_picture(tmp_path):
    """A geographic raster of 139 x 100 square-degree pixels at 44.3 N is about 100 x 100 on the
    ground: with --max-px 120 its picture is 100 x 100, not decimated to half (a step of 2 columns)."""
    geo = write_raster(
        tmp_path / "geo.tif",
        unit_field(100, 139, seed=3),
        crs="EPSG:4326",
        transform=from_origin(-88.8, 44.3, 1e-5, 1e-5),
    )
    assert pictures.pca_image(geo, max_px=120).shape[:2] == (100, 100)
    assert pictures.pca_image(geo, max_px=50).shape[:2] == (50, 50)


def test_the_framed_picture_has_a_title_axes_and_the_whole_map(tmp_path):
    """The default picture: the map's pixels one to one inside a figure (title, axes, scale bar)."""
    tif = write_raster(tmp_path / "a.tif", two_regions())
    plain = read_png(render_plain(tif, tmp_path / "plain.png", scale=4))
    framed = read_png(pictures.render_pca(tif, tmp_path / "framed.png", scale=4))
    assert framed.shape[0] > plain.shape[0] and framed.shape[1] > plain.shape[1]
    # the map's colours appear in the figure
    colours = {tuple(c) for c in plain[..., :3].reshape(-1, 3)[::97]}
    found = {tuple(c) for c in framed[..., :3].reshape(-1, 3)}
    assert len(colours & found) >= 0.9 * len(colours)
    code, stderr = run_plot(["pca", "--tif", str(tif), "--out", str(tmp_path / "cli.png")])
    assert code == 0, stderr
