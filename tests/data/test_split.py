import numpy as np

from aether.data.dataset import spatial_split
from aether.geo.raster import metres_per_degree


def test_spatial_split_uses_whole_blocks_and_is_reproducible():
    rng = np.random.default_rng(0)
    lon = 24.9 + rng.uniform(0, 0.05, 2000)
    lat = 60.15 + rng.uniform(0, 0.03, 2000)
    val = spatial_split(lon, lat, 250.0, 0.2, seed=0)
    assert 0.2 <= val.mean() < 0.3
    np.testing.assert_array_equal(val, spatial_split(lon, lat, 250.0, 0.2, seed=0))
    assert not np.array_equal(val, spatial_split(lon, lat, 250.0, 0.2, seed=1))
    m_lat, m_lon = metres_per_degree(np.asarray(lat.mean()))
    block = np.floor(lon * m_lon / 250).astype(int) * 100000 + np.floor(lat * m_lat / 250).astype(int)
    for b in np.unique(block):  # every block is wholly train or wholly validation
        assert len(set(val[block == b])) == 1


def test_spatial_split_small_sets():
    assert spatial_split(np.array([24.9]), np.array([60.1]), 250, 0.2, 0).tolist() == [False]
    val = spatial_split(np.array([24.9, 24.99]), np.array([60.1, 60.1]), 250, 0.5, 0)
    assert val.sum() == 1
    one_block = spatial_split(np.full(5, 24.9), np.full(5, 60.1), 250, 0.2, 0)
    assert not one_block.any()  # never everything in validation
