"""The streaming loop: read → tile → infer → stitch → write, with inference overlapped with everything else.

Each OpenVINO infer request (an :class:`openvino.AsyncInferQueue` slot) owns one preallocated input buffer, shared
with OpenVINO without copies and refilled in place for every tile. While a request computes, the main thread stitches
the previous output of the next idle request (read straight from OpenVINO's output tensor) and fills its input with
the next tile. In-flight requests are drained at each new z-row of tiles, which is what lets the stitchers release
finished planes.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

import numpy as np
import openvino as ov
from volinfer.progress import progress_bar

from volinfer.run.tile_buffers import MAX_CACHED_CONSTANTS
from volinfer.run.feeder import TileFeeder
from volinfer.run.job import RowProgress, TileJob
from volinfer.tiling.geometry import Tile, TileGrid
from volinfer.model.tile_model import TileModel
from volinfer.io.reader import VolumeSource


class _BusyClock:
    """Union of the intervals during which at least one request was in flight.

    Each interval is [submission, submission + the request's own latency as OpenVINO measured it]. No Python
    completion callback is involved: OpenVINO's threads never need the GIL, so tearing a compiled model down can
    never wait on a callback that waits on the main thread.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def record(self, submitted: float, request: ov.InferRequest) -> None:
        self.spans.append((submitted, submitted + request.latency / 1000.0))

    def total(self) -> float:
        busy, end = 0.0, -np.inf
        for s, e in sorted(self.spans):
            if e <= end:
                continue
            busy += e - max(s, end)
            end = e
        return busy


class _Requests:
    """The infer requests (an :class:`openvino.AsyncInferQueue`), each with its preallocated input buffer shared
    with OpenVINO, and the tile it computes. Outputs are stitched in submission order, so blended sums are added in
    the same order however tiles are split into blocks or requests finish; outputs of constant tiles are cached."""

    def __init__(self, model: TileModel, job: TileJob, stitcher: Any) -> None:
        self.model, self.stitcher = model, stitcher
        self.queue = ov.AsyncInferQueue(model.compiled, max(1, job.requests))
        n = len(self.queue)
        self.buffers = [model.new_input_buffer() for _ in range(n)]
        for i, buf in enumerate(self.buffers):
            self.queue[i].set_input_tensor(ov.Tensor(buf, shared_memory=True))
        self.clock = _BusyClock()
        self.submitted = [0.0] * n
        self.tile: list[Tile | None] = [None] * n
        self.key: list[tuple[float, ...] | None] = [None] * n
        self.seq = [0] * n
        self.cache: dict[tuple[float, ...], np.ndarray] = {}
        self.mirrored = Mirror(model, job.mirror) if job.mirror else None

    def idle(self) -> int:
        """A request free for the next tile, its previous tile stitched (after every older one)."""
        i = self.queue.get_idle_request_id()
        if self.tile[i] is not None:
            if any(t is not None and self.seq[j] < self.seq[i] for j, t in enumerate(self.tile)):
                self.drain()  # an older tile finished after a newer one (several streams): wait for all, keep the order
            else:
                self._stitch(i)
        return i

    def in_flight(self) -> bool:
        return any(t is not None for t in self.tile)

    def submit(self, i: int, tile: Tile, key: tuple[float, ...] | None, seq: int) -> None:
        self.tile[i], self.key[i], self.seq[i] = tile, key, seq
        self.submitted[i] = time.perf_counter()
        self.queue.start_async()

    def drain(self) -> None:
        """Wait for every request; stitch their tiles in submission order."""
        self.queue.wait_all()
        for i in sorted((i for i, t in enumerate(self.tile) if t is not None), key=lambda i: self.seq[i]):
            self._stitch(i)

    def _stitch(self, i: int) -> None:
        self.clock.record(self.submitted[i], self.queue[i])
        out = self.model.output_view(self.queue[i])
        if self.mirrored is not None:
            out = self.mirrored(self.model.input_view(self.buffers[i]), out)
        key = self.key[i]
        if key is not None and key not in self.cache and len(self.cache) < MAX_CACHED_CONSTANTS:
            self.cache[key] = self.stitcher.keep(out)  # (post-processed once: this tile takes it too)
            self.stitcher.add(self.tile[i], self.cache[key], kept=True)
        else:
            self.stitcher.add(self.tile[i], out)
        self.tile[i] = self.key[i] = None


def _first_row(grid: TileGrid, stitcher: Any, start_row: int) -> int:
    """The first z-row of tiles a run resumed at ``start_row`` computes (blending replays the earlier rows that
    reach into planes not yet final, adding only to later planes); the stitcher told where final planes end."""
    if not start_row:
        return 0
    az = grid.axes[2]
    final_z = az.starts[start_row] if grid.mode == "blend" else az.cores[start_row][0]
    stitcher.start_at(final_z)
    if grid.mode != "blend":
        return start_row
    return min(r for r in range(start_row + 1) if az.starts[r] + az.tile > final_z)


def run_tiles(source: VolumeSource, model: TileModel, stitcher: Any, job: TileJob, *,
              tiles: Sequence[Tile] | None = None, rows: RowProgress = RowProgress()) -> tuple[float, int, int]:
    """Run every tile of ``job.grid`` (or ``tiles``, a subset in the grid's order: one block of a chunked volume,
    :mod:`volinfer.tiling.blocks`) through ``model`` into ``stitcher``
    (:func:`volinfer.tiling.stitch.make_stitcher`).

    Tiles whose input is constant (air, empty background, padding) are inferred once per distinct value; later ones
    reuse that output (identical input, identical output). Returns (seconds with inference in flight, tiles,
    tiles reused without inference). ``rows.start_row`` resumes an interrupted run whose first z-rows are final on
    disk; ``rows.on_row_done(r)`` is called once rows ``< r`` are written."""
    start_row, on_row_done = rows.start_row, rows.on_row_done
    grid, az = job.grid, job.grid.axes[2]
    feeder = TileFeeder(source, grid, job.normalizer, job.pad_mode, job.pad_value, job.nan_fill)
    slots = _Requests(model, job, stitcher)
    todo = list(tiles) if tiles is not None else grid
    first_row = _first_row(grid, stitcher, start_row)
    done = reused = 0
    bar = progress_bar(len(todo), "volinfer", "tile", initial=first_row * grid.axes[0].count * grid.axes[1].count,
                       disable=not rows.progress)
    t0, row = time.perf_counter(), None
    try:
        for tile in todo:
            if tile.index[2] < first_row:
                continue
            if row is not None and tile.index[2] != row:
                slots.drain()
                stitcher.end_row(az.starts[tile.index[2]] if grid.mode == "blend" else az.cores[tile.index[2]][0])
                if on_row_done and tile.index[2] > start_row:
                    on_row_done(tile.index[2])
            row = tile.index[2]
            i = slots.idle()
            view = model.input_view(slots.buffers[i])
            feeder.fill(tile, view)
            key = constant_value(view) if job.reuse_constant else None
            if key is not None and key in slots.cache:
                if grid.mode == "blend" and slots.in_flight():
                    slots.drain()  # blended sums are added in submission order, cached tiles included: reproducible
                stitcher.add(tile, slots.cache[key], kept=True)
                reused += 1
            else:
                slots.submit(i, tile, key, done)
            done += 1
            bar.update(1)
            if done % 4 == 0:
                rate = done / len(todo) * np.prod(grid.shape) / (time.perf_counter() - t0) / 1e6
                bar.set_postfix_str(f"{rate:.2f} Mvox/s", refresh=False)
        slots.drain()
        stitcher.finish()
    finally:
        slots.queue.wait_all()
        bar.close()
    return slots.clock.total(), done, reused


class Mirror:
    """Test-time mirroring, as nnU-Net and HD-BET do: the output of a tile averaged over the model's outputs for
    the tile flipped along every non-empty subset of ``axes`` (and unflipped), each flipped back. Flipped tiles lie
    on the same grid of the flipped padded volume, so crop stitching stays exact. Costs one extra infer request and
    one float32 output tile; the flips run on it synchronously while the queue's other requests compute."""

    def __init__(self, model: TileModel, axes: Sequence[int]) -> None:
        axes = sorted(set(int(a) for a in axes))
        self.flips = [tuple(a + 1 for a in combo) for r in range(1, len(axes) + 1)
                      for combo in itertools.combinations(axes, r)]
        self.model = model
        self.request = model.compiled.create_infer_request()
        self.buffer = model.new_input_buffer()
        self.request.set_input_tensor(ov.Tensor(self.buffer, shared_memory=True))
        self.acc: np.ndarray | None = None

    @property
    def inferences(self) -> int:
        return len(self.flips) + 1

    def __call__(self, tile_input: np.ndarray, output: np.ndarray) -> np.ndarray:
        if self.acc is None:
            self.acc = np.empty(output.shape, np.float32)
        acc = self.acc
        np.copyto(acc, output)
        dest = self.model.input_view(self.buffer)
        for axes in self.flips:
            np.copyto(dest, np.flip(tile_input, axes))
            self.request.infer(share_outputs=True)
            acc += np.flip(self.model.output_view(self.request), axes)
        acc /= self.inferences
        return acc


def constant_value(tile: np.ndarray) -> tuple[float, ...] | None:
    """The per-channel value of a tile whose every voxel is the same in each channel, else None."""
    key = []
    for ch in tile:
        lo = float(ch.min())
        if lo != float(ch.max()):
            return None
        key.append(lo)
    return tuple(key)
