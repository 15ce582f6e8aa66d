"""Remote rasters through GDAL's virtual file systems, against a range-request HTTP server on
127.0.0.1: pooling a few POIs reads only the blocks around them, and results equal local reads."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from aether.config.load import load_config
from aether.geo.gdal import gdal_path
from aether.geo.pooling import pool_points
from aether.geo.raster import open_raster
from aether.infer.pipeline import embed_raster
from aether.infer.spec import EmbedOptions
from tests.helpers.fixtures import ORIGIN, unit_field, write_config, write_raster, write_untrained_checkpoint
from tests.helpers.range_server import RangeServer

SIZE_PX, BLOCK_PX = 768, 256  # 3 x 3 blocks of 4 MiB (64 int8 bands)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bucket")
    write_raster(folder / "tile.tif", unit_field(SIZE_PX, SIZE_PX, seed=2, smooth=16), block=BLOCK_PX, bottom_up=True)
    with RangeServer(folder) as server:
        yield server, folder / "tile.tif"


def test_url_names():
    assert gdal_path("https://data.source.coop/tiles/a.tif") == "/vsicurl/https://data.source.coop/tiles/a.tif"
    assert gdal_path("s3://bucket/key.tif") == "/vsis3/bucket/key.tif"
    assert gdal_path("gs://bucket/key.tif") == "/vsigs/bucket/key.tif"
    assert gdal_path("/vsicurl/http://x/a.tif") == "/vsicurl/http://x/a.tif"
    assert gdal_path("data/AE/a.tif") == "data/AE/a.tif"


def test_pooling_a_few_pois_reads_only_their_blocks(served, capsys):
    server, local = served
    rng = np.random.default_rng(0)
    # five POIs around the middle of the centre block (rows and columns 352..416 of 768)
    x = ORIGIN[0] + rng.uniform(352, 416, 5) * 10.0
    y = ORIGIN[1] - rng.uniform(352, 416, 5) * 10.0
    server.bytes_sent = 0
    remote = pool_points(open_raster(f"{server.url}/tile.tif"), x, y, [45.0, 95.0])
    sent = server.bytes_sent
    here = pool_points(open_raster(str(local)), x, y, [45.0, 95.0])
    size = local.stat().st_size
    with capsys.disabled():
        print(
            f"\nremote pooling of 5 POIs read {sent:,} of {size:,} bytes ({sent / size:.1%}) "
            f"in {len(server.requests)} requests"
        )
    assert remote.valid.all()
    for a, b in zip(remote.views, here.views):
        np.testing.assert_array_equal(a, b)
    assert sent < 0.25 * size, f"read {sent} of {size} bytes: more than the blocks around the POIs"


def test_inference_from_a_url_equals_local(served, tmp_path):
    server, local = served
    ckpt = write_untrained_checkpoint(tmp_path / "best.pt")
    a = embed_raster(
        f"{server.url}/tile.tif",
        str(ckpt),
        str(tmp_path / "remote.tif"),
        progress=False,
        options=EmbedOptions(precision="fp32"),
    )
    b = embed_raster(
        str(local), str(ckpt), str(tmp_path / "local.tif"), progress=False, options=EmbedOptions(precision="fp32")
    )
    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        assert ra.transform == rb.transform and ra.crs == rb.crs
        np.testing.assert_array_equal(ra.read(), rb.read())


def test_config_keeps_urls_as_they_are(tmp_path):
    poi = tmp_path / "pois.geojson"
    poi.write_text('{"type": "FeatureCollection", "features": []}')
    cfg = load_config(write_config(tmp_path / "cfg.yaml", "https://example.org/tiles/a.tif", poi))
    assert cfg.data.ae_tif == "https://example.org/tiles/a.tif"
