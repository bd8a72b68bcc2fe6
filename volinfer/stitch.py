"""Stitching tile outputs into finished output rows, holding only what overlapping tiles still need.

Both stitchers receive tiles z-row by z-row (the engine drains in-flight requests between z-rows) and hand finished
blocks, shaped ``(out_channels, nz, ny, X)`` and spanning the whole x axis, to a writer. A block spanning all of x is
contiguous on disk for every (channel, z) pair, so writers need one positioned write per plane.

* :class:`CropStitcher`: each tile's centre is post-processed straight into a strip buffer of the *output* dtype
  (``X * core_y * core_z``); no float accumulator at all, and each output voxel is written once.
* :class:`BlendStitcher`: weighted sums of raw outputs in a float32 ring of ``tile_z`` planes over the whole (x, y)
  cross-section (finished planes are written and their slot reused, nothing is shifted); the normaliser is separable
  (see :mod:`volinfer.weights`), so no weight map is stored.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .blockwise import blockwise
from .geometry import Tile, TileGrid
from .postprocess import OutputSpec
from .weights import tile_weights_1d, weight_sum_1d


class BlockWriter(Protocol):
    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Store ``block`` (channels, nz, ny, X) at planes ``z0..`` and rows ``y0..``."""


class CropStitcher:
    """Exact crop stitching: each output voxel comes from the one tile whose centre holds it."""

    def __init__(self, grid: TileGrid, spec: OutputSpec, writer: BlockWriter) -> None:
        self.grid, self.spec, self.writer = grid, spec, writer
        self._open: dict[tuple[int, int], list] = {}  # row -> [strip view, tiles still missing, buffer]
        self._free: list[np.ndarray] = []  # strip buffers of the largest core size, reused for every row
        self._per_row = grid.axes[0].count
        core_y = max(c1 - c0 for c0, c1 in grid.axes[1].cores)
        core_z = max(c1 - c0 for c0, c1 in grid.axes[2].cores)
        self._full = (spec.out_channels, core_z, core_y, grid.shape[0])

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Post-process the centre of ``output`` (C, x, y, z, a view of the request's buffer) into its strip."""
        (cx0, cx1), (cy0, cy1), (cz0, cz1) = tile.core
        sx, sy, sz = tile.start
        entry = self._open.get(tile.row)
        if entry is None:
            buf = self._free.pop() if self._free else np.empty(self._full, dtype=self.spec.dtype)
            # leading rows of each plane: every (channel, z) plane of the view stays contiguous for the writer
            entry = self._open[tile.row] = [buf[:, : cz1 - cz0, : cy1 - cy0], self._per_row, buf]
        core = output[:, cx0 - sx : cx1 - sx, cy0 - sy : cy1 - sy, cz0 - sz : cz1 - sz]
        self.spec(core.transpose(0, 3, 2, 1), entry[0][..., cx0:cx1])
        entry[1] -= 1
        if entry[1] == 0:
            self.writer.write(entry[0], cz0, cy0)
            self._free.append(self._open.pop(tile.row)[2])

    def end_row(self, next_z: int) -> None:
        """All tiles of the current z-row have been added: every strip of it is written."""
        if self._open:
            raise RuntimeError(f"{len(self._open)} strip(s) of a finished row never completed")

    def start_at(self, z: int) -> None:
        """Resume: planes below ``z`` are final on disk (crop needs nothing rebuilt)."""

    def finish(self) -> None:
        self.end_row(self.grid.shape[2])


class BlendStitcher:
    """Weighted blending (Gaussian or mean) of overlapping tiles, in a sliding window of whole z-planes."""

    def __init__(self, grid: TileGrid, spec: OutputSpec, writer: BlockWriter, mode: str, sigma: float = 0.125) -> None:
        self.grid, self.spec, self.writer = grid, spec, writer
        tx, ty, tz = grid.tile_shape
        X, Y, Z = grid.shape
        self._w = [tile_weights_1d(mode, t, sigma) for t in (tx, ty, tz)]
        self._norm = [1.0 / weight_sum_1d(a, w) for a, w in zip(grid.axes, self._w)]
        wz, wy, wx = self._w[2], self._w[1], self._w[0]
        self._w3 = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)  # (z, y, x)
        self._acc: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._depth = min(tz, Z)
        self._z0 = 0  # planes [z0, z0 + depth) are open; plane z lives in ring slot z % depth
        self._out = np.empty((spec.out_channels, 1, Y, X), dtype=spec.dtype)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Add ``weights * output`` (C, x, y, z) to the window, finishing planes no later tile can touch."""
        c = output.shape[0]
        X, Y, _ = self.grid.shape
        if self._acc is None:
            self._acc = np.zeros((c, self._depth, Y, X), dtype=np.float32)
            self._scratch = np.empty((c, *self._w3.shape), dtype=np.float32)
        (x0, x1), (y0, y1), (z0, z1) = (self.grid.axes[i].extent(tile.index[i]) for i in range(3))
        skip = max(0, self._z0 - z0)  # resuming: planes below the window are already final on disk
        nx, ny, nz = x1 - x0, y1 - y0, z1 - z0
        if skip >= nz:
            return
        part = self._scratch[:, : nz - skip, :ny, :nx]  # type: ignore[index]
        blockwise(lambda o, w, dst: np.multiply(o, w, out=dst), part,
                  output[:, :nx, :ny, skip:nz].transpose(0, 3, 2, 1), self._w3[skip:nz, :ny, :nx], step=16)
        lo = z0 + skip
        while lo < z1:  # the tile's planes map to at most two contiguous runs of ring slots
            slot = lo % self._depth
            n = min(z1 - lo, self._depth - slot)
            self._acc[:, slot : slot + n, y0:y1, x0:x1] += part[:, lo - z0 - skip : lo - z0 - skip + n]
            lo += n

    def end_row(self, next_z: int) -> None:
        """The current z-row is complete; planes below ``next_z`` (where the next row starts) are final."""
        if self._acc is not None and next_z > self._z0:
            self._finalize(next_z)

    def start_at(self, z: int) -> None:
        """Resume: planes below ``z`` are final on disk; later tiles only add to planes from ``z`` on."""
        self._z0 = z

    def _finalize(self, upto: int) -> None:
        """Normalise, post-process and write planes [z0, upto), then slide the window to start at ``upto``."""
        acc = self._acc
        assert acc is not None
        nx_, ny_, nz_ = self._norm
        plane_norm = ny_[:, None] * nx_[None, :]
        for z in range(self._z0, upto):
            raw = acc[:, z % self._depth]
            raw *= plane_norm * nz_[z]
            self.spec(raw[:, None], self._out)
            self.writer.write(self._out, z, 0)
            raw[...] = 0.0  # the slot is reused for plane z + depth
        self._z0 = upto

    def finish(self) -> None:
        self.end_row(self.grid.shape[2])


def make_stitcher(grid: TileGrid, spec: OutputSpec, writer: BlockWriter, stitch: str, sigma: float = 0.125):
    """``crop`` → :class:`CropStitcher`; ``gaussian`` / ``mean`` → :class:`BlendStitcher`."""
    if stitch == "crop":
        return CropStitcher(grid, spec, writer)
    return BlendStitcher(grid, spec, writer, stitch, sigma)
