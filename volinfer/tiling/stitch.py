"""Stitching tile outputs into finished output rows, holding only what overlapping tiles still need.

Both stitchers receive tiles z-row by z-row (the engine drains in-flight requests between z-rows) and hand finished
blocks, shaped ``(out_channels, nz, ny, X)`` and spanning the whole x axis, to a writer. A block spanning all of x is
contiguous on disk for every (channel, z) pair, so writers need one positioned write per plane.

* :class:`CropStitcher`: each tile's centre is post-processed straight into a strip buffer of the *output* dtype
  (``X * core_y * core_z``); no float accumulator at all, and each output voxel is written once.
* :class:`BlendStitcher`: float32 weighted sums of raw outputs, only where a later tile can still add: the current
  tile row (``tile_z * tile_y * X``, a ring over y) and the planes the next z-row overlaps (``overlap_z * Y * X``).
  Tiles must arrive in grid order (the engine stitches in submission order, cached constant tiles included); the
  sums are then bitwise those of a whole-volume accumulator. The normaliser is separable (see
  :mod:`volinfer.tiling.weights`), so no weight map is stored.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from volinfer.tiling.blockwise import blockwise
from volinfer.tiling.geometry import AxisPlan, Tile, TileGrid
from volinfer.tiling.weights import tile_weights_1d, weight_sum_1d


Region = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class PostProcess(Protocol):
    """What turns a block of raw model output into output values (activation, labels, dtype): the run's
    :class:`~volinfer.run.postprocess.OutputSpec`. Stitchers only combine; they call it on finished voxels."""

    out_channels: int
    dtype: np.dtype

    def __call__(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Write the post-processed ``raw`` block (C, ...) into ``out`` (out_channels, ...)."""


class BlockWriter(Protocol):
    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Store ``block`` (channels, nz, ny, X) at planes ``z0..`` and rows ``y0..`` (x from the region's start)."""


def whole(grid: TileGrid) -> Region:
    """The region covering all of ``grid``'s volume."""
    return tuple((0, n) for n in grid.shape)  # type: ignore[return-value]


def _clip(span: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    return max(span[0], box[0]), min(span[1], box[1])


class CropStitcher:
    """Exact crop stitching: each output voxel comes from the one tile whose centre holds it.

    With a ``region`` (one block of a chunked run, :mod:`volinfer.tiling.blocks`) only the tiles whose centre meets it are
    added, and only their voxels inside it are kept and written; x of written blocks starts at the region's start.
    """

    def __init__(self, grid: TileGrid, spec: PostProcess, writer: BlockWriter, region: Region | None = None) -> None:
        self.grid, self.spec, self.writer = grid, spec, writer
        self.region = region or whole(grid)
        (rx0, rx1), ry, rz = self.region
        self._open: dict[tuple[int, int], list] = {}  # row -> [strip view, tiles still missing, buffer]
        self._free: list[np.ndarray] = []  # strip buffers of the largest core size, reused for every row
        self._per_row = sum(1 for c in grid.axes[0].cores if c[0] < rx1 and rx0 < c[1])
        core_y = max(min(c1, ry[1]) - max(c0, ry[0]) for c0, c1 in grid.axes[1].cores)
        core_z = max(min(c1, rz[1]) - max(c0, rz[0]) for c0, c1 in grid.axes[2].cores)
        self._full = (spec.out_channels, core_z, core_y, rx1 - rx0)

    def keep(self, output: np.ndarray) -> np.ndarray:
        """A whole tile's ``output`` (C, x, y, z) as :meth:`add` takes it back with ``kept`` (a constant tile's,
        reused for the tiles after it): post-processed (per voxel, so any core of it is what :meth:`add` would
        write), (out_channels, z, y, x) in the written dtype: a byte a voxel for labels, against 4 a model channel."""
        kept = np.empty((self.spec.out_channels, *output.shape[:0:-1]), self.spec.dtype)
        self.spec(output.transpose(0, 3, 2, 1), kept)
        return kept

    def add(self, tile: Tile, output: np.ndarray, kept: bool = False) -> None:
        """Post-process the centre of ``output`` (C, x, y, z, a view of the request's buffer) into its strip;
        ``kept``: ``output`` is what :meth:`keep` made of a tile's, post-processed already."""
        (cx0, cx1), (cy0, cy1), (cz0, cz1) = (_clip(c, r) for c, r in zip(tile.core, self.region))
        sx, sy, sz = tile.start
        entry = self._open.get(tile.row)
        if entry is None:
            buf = self._free.pop() if self._free else np.empty(self._full, dtype=self.spec.dtype)
            # leading rows of each plane: every (channel, z) plane of the view stays contiguous for the writer
            entry = self._open[tile.row] = [buf[:, : cz1 - cz0, : cy1 - cy0], self._per_row, buf]
        rx0 = self.region[0][0]
        dest = entry[0][..., cx0 - rx0 : cx1 - rx0]
        if kept:
            np.copyto(dest, output[:, cz0 - sz : cz1 - sz, cy0 - sy : cy1 - sy, cx0 - sx : cx1 - sx])
        else:
            self.spec(output[:, cx0 - sx : cx1 - sx, cy0 - sy : cy1 - sy, cz0 - sz : cz1 - sz].transpose(0, 3, 2, 1),
                      dest)
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
    """Weighted blending (Gaussian or mean) of overlapping tiles, holding only sums that can still grow.

    Tiles arrive z-row by z-row, y-row by y-row, x innermost (submission order). Two float32 buffers hold every
    sum that a later tile may still add to:

    * the *strip* of the current (z-row, y-row): ``tile_z`` planes × ``tile_y`` rows × X, a ring over y (row ``y``
      lives in slot ``y % tile_y``; rows the next y-row overlaps stay where they are);
    * the *carry*: the planes the next z-row overlaps × the whole (x, y) cross-section (``overlap_z`` planes; more
      where the last tile, flush with the padded end, overlaps its neighbour by more).

    When a y-row is done, its rows up to the next y-row's start are complete for this z-row: the planes up to the
    next z-row's start are final (normalised, post-processed and written as blocks spanning the whole x axis) and
    the planes beyond go to the carry; a new row of the strip starts from the carry (or zero). Every voxel's sum
    therefore receives exactly the additions, in exactly the order, of a whole-volume accumulator — bitwise the
    same result as a whole-volume accumulator — in ``(tile_z·tile_y + overlap_z·Y)·X`` floats per model channel
    instead of ``tile_z·Y·X``. The normaliser is separable (see :mod:`volinfer.tiling.weights`).

    With a ``region`` (one block of a chunked run, :mod:`volinfer.tiling.blocks`) X and Y above are the region's, tiles add
    only their voxels inside it, only its planes are written, and the normaliser is the whole grid's: every kept
    voxel receives the same float32 additions in the same order as without a region, so the same bits.
    """

    CHUNK = 16  # planes weighted per step: small temporaries, cache-friendly transposes

    def __init__(self, grid: TileGrid, spec: PostProcess, writer: BlockWriter, mode: str, sigma: float = 0.125,
                 region: Region | None = None) -> None:
        self.grid, self.spec, self.writer = grid, spec, writer
        self.region = region or whole(grid)
        self._w = [tile_weights_1d(mode, t, sigma) for t in grid.tile_shape]  # wx, wy, wz (float32)
        self._norm = [1.0 / weight_sum_1d(a, w) for a, w in zip(grid.axes, self._w)]
        X, Y = (b - a for a, b in self.region[:2])
        Z = grid.shape[2]
        tx, ty, tz = grid.tile_shape
        self._depth, self._ring = min(tz, Z), min(ty, Y)
        self._carry_depth = carry_depth(grid.axes[2])
        self._strip: np.ndarray | None = None  # (C, depth, ring, X)
        self._carry: np.ndarray | None = None  # (C, carry_depth, Y, X)
        self._tmp: np.ndarray | None = None  # (C, CHUNK, ty, tx): one chunk of a weighted tile
        self._out = np.empty((spec.out_channels, 1, self._ring, X), dtype=spec.dtype)
        self._iz: int | None = None  # current z-row
        self._iy = -1  # current y-row
        self._y_open = self._y_done = self.region[1][0]  # rows < y_open are initialised; rows < y_done are closed
        self._carry_from: int | None = None  # the z-row whose contributions the carry holds
        self._carry_in = 0  # planes of the current z-row that started from the carry
        self._z0 = self.region[2][0]  # resuming (or a region): planes below z0 are not written

    @classmethod
    def buffer_bytes(cls, grid: TileGrid, channels: int) -> int:
        """Bytes of the float32 sums a blend over ``grid`` holds (strip, carry, one weighted chunk of a tile)."""
        X, Y, Z = grid.shape
        tx, ty, tz = grid.tile_shape
        floats = min(tz, Z) * min(ty, Y) * X + carry_depth(grid.axes[2]) * Y * X + cls.CHUNK * ty * tx
        return channels * floats * 4

    # -- the engine's interface -----------------------------------------------------------------------------------
    def keep(self, output: np.ndarray) -> np.ndarray:
        """A copy of a whole tile's ``output`` to :meth:`add` again (blending weighs the model's values)."""
        return output.copy()

    def add(self, tile: Tile, output: np.ndarray, kept: bool = False) -> None:
        """Add ``weights * output`` (C, x, y, z) to the open sums, closing rows no later tile can touch (``kept``:
        ``output`` came from :meth:`keep`, the same values)."""
        iz, iy = tile.index[2], tile.index[1]
        if self._iz is not None and iz != self._iz:
            if iz < self._iz:
                raise RuntimeError("blended tiles must be stitched in grid order")
            self._end_zrow()
        if self._iz is None:
            self._begin_zrow(iz, output.shape[0])
        if iy != self._iy:
            if iy < self._iy:
                raise RuntimeError("blended tiles must be stitched in grid order")
            (ay0, ay1), (ry0, ry1) = self.grid.axes[1].extent(iy), self.region[1]
            self._close_rows(min(max(ay0, ry0), ry1))
            self._open_rows(min(ay1, ry1))
            self._iy = iy
        self._accumulate(tile, output)

    def end_row(self, next_z: int) -> None:
        """The current z-row is complete: planes below ``next_z`` (where the next row starts) are final."""
        if self._iz is not None:
            self._end_zrow()

    def start_at(self, z: int) -> None:
        """Resume: planes below ``z`` are final on disk; replayed earlier rows only carry into planes from ``z``."""
        self._z0 = max(z, self.region[2][0])

    def finish(self) -> None:
        self.end_row(self.grid.shape[2])

    # -- rows and planes ------------------------------------------------------------------------------------------
    def _begin_zrow(self, iz: int, channels: int) -> None:
        X, Y = (b - a for a, b in self.region[:2])
        tx, ty, _ = self.grid.tile_shape
        if self._strip is None:
            self._strip = np.empty((channels, self._depth, self._ring, X), dtype=np.float32)
            self._carry = np.empty((channels, self._carry_depth, Y, X), dtype=np.float32)
            self._tmp = np.empty((channels, self.CHUNK, ty, tx), dtype=np.float32)
        az = self.grid.axes[2]
        ry0 = self.region[1][0]
        self._iz, self._iy, self._y_open, self._y_done = iz, -1, ry0, ry0
        self._carry_in = max(0, az.extent(iz - 1)[1] - az.starts[iz]) if iz and self._carry_from == iz - 1 else 0

    def _end_zrow(self) -> None:
        self._close_rows(self.region[1][1])
        last = self._iz == self.grid.axes[2].count - 1
        self._carry_from, self._iz = (None if last else self._iz), None

    def _slots(self, lo: int, hi: int):
        """Rows [lo, hi) as runs ``(row0, row1, slot0)`` of contiguous ring slots (at most two)."""
        while lo < hi:
            slot = lo % self._ring
            n = min(hi - lo, self._ring - slot)
            yield lo, lo + n, slot
            lo += n

    def _open_rows(self, hi: int) -> None:
        """Start rows [y_open, hi) of the current z-row: from the previous z-row's carry, zero elsewhere."""
        strip, k, ry0 = self._strip, self._carry_in, self.region[1][0]
        for a, b, s in self._slots(self._y_open, hi):
            strip[:, k:, s : s + b - a] = 0.0  # type: ignore[index]
            if k:
                strip[:, :k, s : s + b - a] = self._carry[:, :k, a - ry0 : b - ry0]  # type: ignore[index]
        self._y_open = max(self._y_open, hi)

    def _close_rows(self, hi: int) -> None:
        """Rows [y_done, hi) are complete for this z-row: write their final planes, carry the rest."""
        if hi <= self._y_done:
            return
        self._open_rows(hi)
        az = self.grid.axes[2]
        z0, z1 = az.extent(self._iz)  # type: ignore[arg-type]
        last = self._iz == az.count - 1
        final = z1 if last else az.starts[self._iz + 1]  # type: ignore[operator]
        for a, b, s in self._slots(self._y_done, hi):
            rows = self._strip[:, :, s : s + b - a]  # type: ignore[index]
            self._write(rows, z0, final, a, b)
            if not last:
                ry0 = self.region[1][0]
                self._carry[:, : z1 - final, a - ry0 : b - ry0] = rows[:, final - z0 : z1 - z0]  # type: ignore[index]
        self._y_done = hi

    def _write(self, rows: np.ndarray, z0: int, z1: int, y0: int, y1: int) -> None:
        """Normalise, post-process and write planes [z0, z1) of rows [y0, y1) (``rows`` starts at plane z0)."""
        nx_, ny_, nz_ = self._norm
        (rx0, rx1), _, (_, rz1) = self.region
        plane_norm = ny_[y0:y1, None] * nx_[None, rx0:rx1]
        out = self._out[:, :, : y1 - y0]
        for z in range(max(z0, self._z0), min(z1, rz1)):
            raw = rows[:, z - z0]
            raw *= plane_norm * nz_[z]
            self.spec(raw[:, None], out)
            self.writer.write(out, z, y0)

    def _accumulate(self, tile: Tile, output: np.ndarray) -> None:
        """strip[planes, rows, x0:x1] += output * (wz · wy · wx), chunk by chunk of planes, in plane order."""
        ext = [self.grid.axes[i].extent(tile.index[i]) for i in range(3)]
        (x0, x1), (y0, y1), (za, zb) = (_clip(e, r) for e, r in zip(ext, self.region))
        ox, ty0, z0 = x0 - ext[0][0], ext[1][0], ext[2][0]  # the kept part's x offset, the tile's y and z starts
        rx0 = self.region[0][0]
        wx, wy, wz = self._w
        nx = x1 - x0
        for k in range(za - z0, zb - z0, self.CHUNK):  # strip plane k is volume plane z0 + k; the region's only
            kz = min(self.CHUNK, zb - z0 - k)
            for a, b, s in self._slots(y0, y1):
                ya, yb = a - ty0, b - ty0
                w = wz[k : k + kz, None, None] * wy[None, ya:yb, None] * wx[None, None, ox : ox + nx]  # (wz*wy)*wx
                part = self._tmp[:, :kz, : b - a, :nx]  # type: ignore[index]
                blockwise(lambda o, ww, dst: np.multiply(o, ww, out=dst), part,
                          output[:, ox : ox + nx, ya:yb, k : k + kz].transpose(0, 3, 2, 1), w, step=16)
                self._strip[:, k : k + kz, s : s + b - a, x0 - rx0 : x1 - rx0] += part  # type: ignore[index]


def carry_depth(az: AxisPlan) -> int:
    """Most planes one z-row of blended tiles shares with the next (what the carry must hold)."""
    return max([az.extent(r)[1] - az.starts[r + 1] for r in range(az.count - 1)], default=0)


def make_stitcher(grid: TileGrid, spec: PostProcess, writer: BlockWriter, stitch: str, sigma: float = 0.125,
                  region: Region | None = None):
    """``crop`` → :class:`CropStitcher`; ``gaussian`` / ``mean`` → :class:`BlendStitcher`; ``region`` keeps one box
    of the volume (default: all of it)."""
    if stitch == "crop":
        return CropStitcher(grid, spec, writer, region)
    return BlendStitcher(grid, spec, writer, stitch, sigma, region)
