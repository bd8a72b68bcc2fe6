"""What is specific to blocks: how a volume is split, which tiles touch a block, where a block's output goes.

A block is a box of the output processed on its own (the unit of work of chunked Zarr runs and Dask tasks). It runs
exactly the tiles of the *global* grid that touch it, in the grid's order, through the same stitchers as a
one-process run (:mod:`volinfer.tiling.stitch`) restricted to the block's region, so its voxels are bitwise those of a
one-process run whatever the split: crop keeps each voxel from the one tile whose centre owns it; Gaussian/mean
blending adds the same float32 contributions in the same order and divides by the whole grid's normaliser.

Splitting (:func:`plan_blocks`):

* chunk-aligned blocks (whole output chunks, so no two blocks share a chunk): tiles whose centre (crop) or extent
  (blending) crosses a block border run once for every block they touch;
* core-aligned blocks, crop only (:func:`plan_core_blocks`): borders follow the grid's tile centres, so every tile
  runs exactly once; blocks may then share output chunks, which the writer handles
  (:func:`volinfer.run.distributed.write_block`).

:func:`redundancy` is the exact count of tile runs a split costs against the grid's own tile count.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterator, Sequence

import numpy as np

from volinfer.tiling.geometry import AxisPlan, Tile, TileGrid
from volinfer.tiling.stitch import PostProcess, make_stitcher

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Block:
    """A box of the output, in volume coordinates (axis order of the array)."""

    index: tuple[int, int, int]
    box: Box

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.box)  # type: ignore[return-value]


def _blocks(ranges: Sequence[Sequence[tuple[int, int]]]) -> list[Block]:
    return [Block(idx, tuple(ranges[a][i] for a, i in enumerate(idx)))  # type: ignore[arg-type]
            for idx in product(*(range(len(r)) for r in ranges))]


def plan_blocks(shape: Sequence[int], chunks: Sequence[int], block: Sequence[int]) -> list[Block]:
    """Split ``shape`` into blocks of whole ``chunks`` (each block about ``block`` voxels per axis)."""
    per = [max(1, round(b / c)) * c for b, c in zip(block, chunks)]
    return _blocks([[(s, min(n, s + p)) for s in range(0, n, p)] for n, p in zip(shape, per)])


def core_spans(axis: AxisPlan, block: int) -> list[tuple[int, int]]:
    """Consecutive crop centres of ``axis`` grouped into spans of about ``block`` voxels (at least one centre each):
    a span closes before the centre that would take it past ``block`` further than stopping short does."""
    spans: list[tuple[int, int]] = []
    lo = end = 0
    for _, c1 in axis.cores:
        if end > lo and c1 - lo > block and c1 - lo - block > block - (end - lo):
            spans.append((lo, end))
            lo = end
        end = c1
    spans.append((lo, end))
    return spans


def plan_core_blocks(grid: TileGrid, block: Sequence[int]) -> list[Block]:
    """Crop grids: blocks of whole tile centres (about ``block`` voxels per axis), so each tile runs exactly once."""
    if grid.mode != "crop":
        raise ValueError("core-aligned blocks exist for crop grids only (blended tiles overlap every border)")
    return _blocks([core_spans(ax, b) for ax, b in zip(grid.axes, block)])


def _spans(grid: TileGrid, a: int) -> list[tuple[int, int]]:
    """Per tile index along axis ``a``: what the tile writes (its centre for crop, its in-volume extent to blend)."""
    ax = grid.axes[a]
    return list(ax.cores) if grid.mode == "crop" else [ax.extent(i) for i in range(ax.count)]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def block_tiles(grid: TileGrid, block: Block) -> Iterator[Tile]:
    """The global grid's tiles that write into ``block``, in the grid's order."""
    hit = [{i for i, s in enumerate(_spans(grid, a)) if _overlaps(s, block.box[a])} for a in range(3)]
    for tile in grid:
        if all(tile.index[a] in hit[a] for a in range(3)):
            yield tile


def redundancy(grid: TileGrid, blocks: Sequence[Block]) -> tuple[int, int]:
    """(tile runs the split costs, tiles in the grid): each block runs every tile that writes into it.

    Blocks form a Cartesian split, so the count is separable: per axis, the (tile, block-range) pairs that overlap;
    the product over the three axes is the total."""
    total = 1
    for a in range(3):
        ranges = sorted({b.box[a] for b in blocks})
        total *= sum(_overlaps(s, r) for s in _spans(grid, a) for r in ranges)
    return total, len(grid)


class BlockArray:
    """A :class:`volinfer.tiling.stitch.BlockWriter` into one block held in RAM: ``out`` (C, *block.shape), array order."""

    def __init__(self, block: Block, channels: int, dtype: np.dtype) -> None:
        self.block = block
        self.out = np.zeros((channels, *block.shape), dtype=dtype)
        self._zyx = self.out.transpose(0, 3, 2, 1)  # the stitchers' (C, z, y, x) view of the same memory

    def write(self, rows: np.ndarray, z0: int, y0: int) -> None:
        """Store ``rows`` (C, nz, ny, nx; grid axes 2, 1, 0) at planes ``z0..``, rows ``y0..`` of the volume."""
        (_, _), (by0, _), (bz0, _) = self.block.box
        nz, ny, nx = rows.shape[1:]
        self._zyx[:, z0 - bz0 : z0 - bz0 + nz, y0 - by0 : y0 - by0 + ny, :nx] = rows


def make_block_stitcher(grid: TileGrid, block: Block, spec: PostProcess, stitch: str, sigma: float = 0.125):
    """The one-process stitcher for ``stitch``, restricted to ``block``; returns (stitcher, its BlockArray)."""
    writer = BlockArray(block, spec.out_channels, spec.dtype)
    return make_stitcher(grid, spec, writer, stitch, sigma, region=block.box), writer
