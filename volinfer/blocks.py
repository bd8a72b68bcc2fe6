"""Processing one block of a volume on its own: the unit of work for chunked (Zarr) and distributed runs.

A block is a box of whole output chunks. It runs exactly the tiles of the *global* grid that touch it, in the global
order, and keeps only its own voxels, so its output does not depend on how the volume is split:

* crop: each voxel comes from the one tile whose centre owns it, as in a single-process run;
* gaussian/mean: each voxel receives the same weighted contributions in the same order, and is divided by the same
  separable normaliser, with the same float32 operations as :class:`volinfer.stitch.BlendStitcher`: bitwise equal.

Memory per block is the block itself (output dtype for crop, float32 per model channel for blending) plus the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterator, Sequence

import numpy as np

from .geometry import Tile, TileGrid
from .postprocess import OutputSpec
from .weights import tile_weights_1d, weight_sum_1d

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Block:
    """A box of the output, in volume coordinates (axis order of the array)."""

    index: tuple[int, int, int]
    box: Box

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in self.box)  # type: ignore[return-value]


def plan_blocks(shape: Sequence[int], chunks: Sequence[int], block: Sequence[int]) -> list[Block]:
    """Split ``shape`` into blocks of whole ``chunks`` (each block about ``block`` voxels per axis)."""
    per = [max(1, round(b / c)) * c for b, c in zip(block, chunks)]
    ranges = [[(s, min(n, s + p)) for s in range(0, n, p)] for n, p in zip(shape, per)]
    return [Block(idx, tuple(ranges[a][i] for a, i in enumerate(idx)))  # type: ignore[arg-type]
            for idx in product(*(range(len(r)) for r in ranges))]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def block_tiles(grid: TileGrid, block: Block) -> Iterator[Tile]:
    """The global grid's tiles that write into ``block``, in the grid's order."""
    for tile in grid:
        spans = tile.core if grid.mode == "crop" else tuple(
            grid.axes[a].extent(tile.index[a]) for a in range(3))
        if all(_overlaps(s, b) for s, b in zip(spans, block.box)):
            yield tile


def _cut(span: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    return max(span[0], box[0]), min(span[1], box[1])


class BlockCropStitcher:
    """Crop stitching into one block held in RAM in the output dtype."""

    def __init__(self, grid: TileGrid, block: Block, spec: OutputSpec) -> None:
        self.grid, self.block, self.spec = grid, block, spec
        self.out = np.zeros((spec.out_channels, *block.shape), dtype=spec.dtype)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        src, dst = [], []
        for a in range(3):
            lo, hi = _cut(tile.core[a], self.block.box[a])
            src.append(slice(lo - tile.start[a], hi - tile.start[a]))
            dst.append(slice(lo - self.block.box[a][0], hi - self.block.box[a][0]))
        self.spec(output[(slice(None), *src)], self.out[(slice(None), *dst)])

    def end_row(self, next_z: int) -> None:
        pass

    def finish(self) -> None:
        pass


class BlockBlendStitcher:
    """Gaussian/mean blending into one block, with exactly the float32 operations of the streaming stitcher."""

    def __init__(self, grid: TileGrid, block: Block, spec: OutputSpec, mode: str, sigma: float = 0.125) -> None:
        self.grid, self.block, self.spec = grid, block, spec
        tx, ty, tz = grid.tile_shape
        wx, wy, wz = (tile_weights_1d(mode, t, sigma) for t in (tx, ty, tz))
        # same expression (and so the same rounding) as BlendStitcher: (wz * wy) * wx, laid out (z, y, x)
        self._w3 = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32).transpose(2, 1, 0)
        self._norm = [1.0 / weight_sum_1d(a, w) for a, w in zip(grid.axes, (wx, wy, wz))]
        self._acc: np.ndarray | None = None
        self.out = np.zeros((spec.out_channels, *block.shape), dtype=spec.dtype)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        if self._acc is None:
            self._acc = np.zeros((output.shape[0], *self.block.shape), dtype=np.float32)
        src, dst = [], []
        for a in range(3):
            lo, hi = _cut(self.grid.axes[a].extent(tile.index[a]), self.block.box[a])
            src.append(slice(lo - tile.start[a], hi - tile.start[a]))
            dst.append(slice(lo - self.block.box[a][0], hi - self.block.box[a][0]))
        part = output[(slice(None), *src)] * self._w3[tuple(src)]
        self._acc[(slice(None), *dst)] += part

    def end_row(self, next_z: int) -> None:
        pass

    def finish(self) -> None:
        if self._acc is None:
            return
        (x0, x1), (y0, y1), (z0, z1) = self.block.box
        nx_, ny_, nz_ = self._norm
        plane = ny_[y0:y1, None] * nx_[None, x0:x1]  # (y, x), as BlendStitcher's plane_norm
        norm = (plane[None, :, :] * nz_[z0:z1, None, None]).transpose(2, 1, 0)  # (plane * nz[z]), then (x, y, z)
        self._acc *= norm
        self.spec(self._acc, self.out)


def make_block_stitcher(grid: TileGrid, block: Block, spec: OutputSpec, stitch: str, sigma: float = 0.125):
    if stitch == "crop":
        return BlockCropStitcher(grid, block, spec)
    return BlockBlendStitcher(grid, block, spec, stitch, sigma)
