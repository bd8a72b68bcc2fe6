"""Blocks (issue 12 item 2, issue 14 item 6): one stitcher for every path, each crop tile run once, exact redundancy.

* the stitchers of :mod:`volinfer.tiling.stitch` restricted to any split into regions give, voxel for voxel, the bits of
  the whole-volume stitcher (crop, Gaussian, mean; split borders anywhere, not only on chunk or tile borders);
* :func:`volinfer.tiling.blocks.redundancy` equals a brute-force count over voxel masks;
* a Zarr run in crop mode computes each tile of the grid exactly once (the run report's tile count);
* Zarr block runs equal the one-process (NIfTI) engine bit for bit for crop, Gaussian and mean, with constant
  regions (cached tiles) and probabilities (post-processing applied to block-sized pieces).
"""

from itertools import product

import numpy as np
import pytest
from models import save_unet2

from volinfer.tiling.blocks import (Block, BlockArray, block_tiles, plan_blocks, plan_core_blocks, redundancy)
from volinfer.tiling.geometry import TileGrid
from volinfer.run.postprocess import OutputSpec
from volinfer.tiling.stitch import make_stitcher

zarr = pytest.importorskip("zarr")


class Volume:
    """A writer holding the whole (C, x, y, z) output, for the whole-volume stitcher."""

    def __init__(self, shape, channels, dtype):
        self.out = np.zeros((channels, *shape), dtype=dtype)

    def write(self, rows, z0, y0):
        nz, ny, nx = rows.shape[1:]
        self.out.transpose(0, 3, 2, 1)[:, z0 : z0 + nz, y0 : y0 + ny, :nx] = rows


def _feed(stitcher, grid, tiles, outputs):
    """What the engine does: tiles in order, ``end_row`` at each new z-row, ``finish`` at the end."""
    row = None
    az = grid.axes[2]
    for t in tiles:
        if row is not None and t.index[2] != row:
            stitcher.end_row(az.starts[t.index[2]] if grid.mode == "blend" else az.cores[t.index[2]][0])
        row = t.index[2]
        stitcher.add(t, outputs[t.index])
    stitcher.finish()


def _splits(shape, rng):
    """Random Cartesian splits of ``shape`` into 2-3 pieces per axis, borders anywhere."""
    ranges = []
    for n in shape:
        cuts = sorted(rng.choice(np.arange(1, n), size=int(rng.integers(1, 3)), replace=False))
        edges = [0, *cuts, n]
        ranges.append(list(zip(edges[:-1], edges[1:])))
    return [Block(idx, tuple(ranges[a][i] for a, i in enumerate(idx)))
            for idx in product(*(range(len(r)) for r in ranges))]


@pytest.mark.parametrize("stitch", ["crop", "gaussian", "mean"])
@pytest.mark.parametrize("kind", ["raw", "probabilities", "labels"])
def test_region_stitchers_equal_whole_volume_stitcher_bitwise(stitch, kind):
    rng = np.random.default_rng(3)
    shape, tile = (41, 27, 33), (16, 12, 16)
    grid = TileGrid.build(shape, tile, (4, 4, 4), (6, 6, 8), "crop" if stitch == "crop" else "blend")
    spec = OutputSpec(3, kind=kind)
    outputs = {t.index: rng.standard_normal((3, *tile)).astype(np.float32) * 4 for t in grid}
    whole = Volume(shape, spec.out_channels, spec.dtype)
    _feed(make_stitcher(grid, spec, whole, stitch), grid, list(grid), outputs)
    for blocks in (_splits(shape, rng), plan_blocks(shape, (8, 8, 8), (16, 16, 16))):
        got = np.full_like(whole.out, 77)
        for b in blocks:
            arr = BlockArray(b, spec.out_channels, spec.dtype)
            _feed(make_stitcher(grid, spec, arr, stitch, region=b.box), grid, list(block_tiles(grid, b)), outputs)
            got[(slice(None), *(slice(a, c) for a, c in b.box))] = arr.out
        np.testing.assert_array_equal(got, whole.out)  # bitwise, every voxel written
    assert np.unique(whole.out).size > 2


def _brute_force_runs(grid, blocks):
    """Tile runs by voxel masks: a block runs a tile when the tile's written region (centre for crop, extent for
    blending, recomputed here from starts) shares a voxel with the block."""
    runs = 0
    for t in grid:
        mask = np.zeros(grid.shape, bool)
        if grid.mode == "crop":
            mask[tuple(slice(a, b) for a, b in t.core)] = True
        else:
            mask[tuple(slice(s, s + n) for s, n in zip(t.start, grid.tile_shape))] = True
        runs += sum(bool(mask[tuple(slice(a, b) for a, b in blk.box)].any()) for blk in blocks)
    return runs


@pytest.mark.parametrize("mode", ["crop", "blend"])
def test_redundancy_equals_brute_force_count(mode):
    rng = np.random.default_rng(5)
    for shape, tile, ov, block, chunks in [((40, 37, 29), 16, 8, 16, 8), ((64, 50, 33), 16, 4, 24, 8),
                                            ((30, 30, 30), 8, 4, 10, 5)]:
        grid = TileGrid.build(shape, (tile,) * 3, (4, 4, 4), (ov,) * 3, mode)
        splits = [plan_blocks(shape, (chunks,) * 3, (block,) * 3), _splits(shape, rng)]
        if mode == "crop":
            splits.append(plan_core_blocks(grid, (block,) * 3))
        for blocks in splits:
            runs, tiles = redundancy(grid, blocks)
            assert tiles == len(grid)
            assert runs == _brute_force_runs(grid, blocks) == sum(len(list(block_tiles(grid, b))) for b in blocks)


def test_core_blocks_partition_the_volume_and_run_each_tile_once():
    for shape in [(512, 384, 256), (70, 61, 53), (17, 100, 9)]:
        big = shape[0] > 100
        grid = TileGrid.build(shape, (128 if big else 16,) * 3, (16 if big else 4,) * 3, (32 if big else 8,) * 3,
                              "crop")
        blocks = plan_core_blocks(grid, (256 if big else 24,) * 3)
        assert len(blocks) > 1
        cover = np.zeros(shape, np.int8) if np.prod(shape) < 1e6 else None
        if cover is not None:
            for b in blocks:
                cover[tuple(slice(a, c) for a, c in b.box)] += 1
            assert (cover == 1).all()
        assert redundancy(grid, blocks) == (len(grid), len(grid))
        seen = [t.index for b in blocks for t in block_tiles(grid, b)]
        assert sorted(seen) == sorted(t.index for t in grid)


def test_readme_configurations_redundancy():
    """The figures the README quotes: 128³ tiles, overlap 0.25 (32 voxels), 256³ blocks of 64³ chunks."""
    got = {}
    for n in (256, 384, 512):
        for mode in ("crop", "blend"):
            grid = TileGrid.build((n,) * 3, (128,) * 3, (16,) * 3, (32,) * 3, mode)
            got[n, mode] = redundancy(grid, plan_blocks((n,) * 3, (64,) * 3, (256,) * 3))
        assert redundancy(grid := TileGrid.build((n,) * 3, (128,) * 3, (16,) * 3, (32,) * 3, "crop"),
                          plan_core_blocks(grid, (256,) * 3))[0] == len(grid)
    assert got == {(256, "crop"): (27, 27), (256, "blend"): (27, 27), (384, "crop"): (125, 64),
                   (384, "blend"): (125, 64), (512, "crop"): (216, 125), (512, "blend"): (216, 125)}


# -- end to end: Zarr blocks against the one-process engine -------------------------------------------------------

SHAPE = (37, 29, 23)  # odd: no axis a multiple of the chunks, tile or size multiple
OPTS = dict(tile=16, overlap=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blocks")
    xml = save_unet2(tmp / "m.xml")
    vol = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
    vol[:18] = 0.0  # constant slab: tiles reused from the constant cache, in blocks and in one process
    z = zarr.create_array(store=str(tmp / "in.zarr"), shape=SHAPE, chunks=(8, 8, 8), dtype="float32",
                          dimension_names=["x", "y", "z"])  # stored (x, y, z), named so
    z[:] = vol
    return tmp, xml, vol


@pytest.mark.parametrize("stitch,kind", [("crop", "labels"), ("crop", "raw"), ("gaussian", "probabilities"),
                                         ("gaussian", "raw"), ("mean", "raw")])
def test_zarr_blocks_equal_one_process_bitwise(data, stitch, kind):
    from volinfer import predict
    from volinfer.run.distributed import run_zarr

    tmp, xml, vol = data
    ref = predict(vol, str(xml), stitch=stitch, kind=kind, **OPTS)
    out = tmp / f"{stitch}_{kind}.zarr"
    rep = run_zarr(tmp / "in.zarr", xml, out, stitch=stitch, kind=kind, block=16, chunks=8, overwrite=True,
                   **OPTS)
    got = zarr.open_group(str(out))["0"][:]
    got = got.transpose(2, 1, 0) if got.ndim == 3 else np.moveaxis(got.transpose(0, 3, 2, 1), 0, -1)  # (c, z, y, x)
    assert int(rep.extra["blocks"].split()[0]) >= 8 and "constant" in rep.extra
    np.testing.assert_array_equal(got, ref)
    if stitch == "crop":  # every tile of the grid inferred exactly once across all blocks
        assert rep.tiles == int(np.prod(rep.grid)) and "split along tile centres" in rep.extra["blocks"]
        assert rep.extra["tile runs"] == f"{rep.tiles} computed for {rep.tiles} in the grid (1.00x)"
    else:
        words = rep.extra["tile runs"].split()
        runs, tiles = int(words[0]), int(words[3])
        assert rep.tiles == runs > tiles == int(np.prod(rep.grid))
