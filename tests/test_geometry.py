import itertools

import numpy as np
import pytest

from volinfer.tiling.geometry import GeometryError, TileGrid, padded_size, plan_axis_blend, plan_axis_crop
from volinfer.tiling.weights import tile_weights_1d, weight_sum_1d


@pytest.mark.parametrize("size,tile,multiple,margin", [
    (157, 32, 4, 8), (131, 48, 16, 10), (97, 64, 16, 0), (20, 32, 4, 8), (32, 32, 4, 4), (33, 32, 4, 4),
    (1, 16, 16, 0), (500, 128, 16, 40),
])
def test_crop_cores_partition_the_axis_with_enough_context(size, tile, multiple, margin):
    plan = plan_axis_crop(size, tile, multiple, margin)
    covered = np.zeros(size, int)
    for s, (c0, c1) in zip(plan.starts, plan.cores):
        assert s % multiple == 0
        assert 0 <= s and s + tile <= plan.padded
        covered[c0:c1] += 1
        # every kept voxel has `margin` of context inside the tile, except at the volume's own borders
        assert c0 - s >= margin or s == 0
        assert s + tile - c1 >= margin or s + tile == plan.padded
    assert (covered == 1).all()
    assert plan.padded == max(tile, -(-size // multiple) * multiple)


def test_crop_margin_too_large_is_refused():
    with pytest.raises(GeometryError, match="margin"):
        plan_axis_crop(100, 32, 16, 9)


def test_blend_tiles_cover_every_voxel_with_required_overlap():
    plan = plan_axis_blend(157, 32, 4, 8)
    cover = np.zeros(157, int)
    for s in plan.starts:
        cover[s : min(s + 32, 157)] += 1
    assert (cover >= 1).all()
    assert all(b - a <= 32 - 8 for a, b in zip(plan.starts, plan.starts[1:]))


def test_grid_iterates_in_on_disk_order():
    grid = TileGrid.build((70, 50, 40), (32, 32, 32), (4, 4, 4), (8, 8, 8), "crop")
    idx = [t.index for t in grid]
    assert len(idx) == len(grid)
    assert idx == sorted(idx, key=lambda i: (i[2], i[1], i[0]))
    # the cores of all tiles partition the volume exactly once
    hit = np.zeros(grid.shape, int)
    for t in grid:
        (x0, x1), (y0, y1), (z0, z1) = t.core
        hit[x0:x1, y0:y1, z0:z1] += 1
    assert (hit == 1).all()


def test_separable_weight_sum_matches_brute_force():
    grid = TileGrid.build((45, 37, 29), (16, 16, 16), (1, 1, 1), (6, 6, 6), "blend")
    w = [tile_weights_1d("gaussian", 16) for _ in range(3)]
    brute = np.zeros(grid.shape)
    for t in grid:
        ext = [a.extent(i) for a, i in zip(grid.axes, t.index)]
        w3 = np.einsum("i,j,k->ijk", *[wi[: e1 - e0] for wi, (e0, e1) in zip(w, ext)])
        brute[ext[0][0] : ext[0][1], ext[1][0] : ext[1][1], ext[2][0] : ext[2][1]] += w3
    sums = [weight_sum_1d(a, wi) for a, wi in zip(grid.axes, w)]
    np.testing.assert_allclose(np.einsum("i,j,k->ijk", *sums), brute, rtol=1e-5)


def test_padded_size():
    assert [padded_size(n, 32, 16) for n in (1, 31, 32, 33, 48, 49)] == [32, 32, 32, 48, 48, 64]
    assert list(itertools.islice((padded_size(n, 8, 1) for n in range(8, 11)), 3)) == [8, 9, 10]
