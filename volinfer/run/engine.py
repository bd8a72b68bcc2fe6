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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import openvino as ov
from volinfer.progress import progress_bar

from volinfer import portable
from volinfer.run.feeder import TileFeeder
from volinfer.tiling.geometry import Tile, TileGrid
from volinfer.model.tile_model import TileModel
from volinfer.run.normalize import Normalizer
from volinfer.run.postprocess import OutputSpec
from volinfer.io.reader import VolumeSource
from volinfer.tiling.stitch import BlockWriter, make_stitcher


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, as the OS counts it (MB); 0.0 where the OS does not say (see
    :func:`volinfer.portable.peak_rss_mb`)."""
    return portable.peak_rss_mb() or 0.0


@dataclass
class RunReport:
    """What a run did and cost; printed as the CLI summary and as ``--json``."""

    shape: tuple[int, int, int]
    channels: int
    tile: tuple[int, int, int]
    grid: tuple[int, int, int]
    tiles: int
    stitch: str
    overlap: tuple[int, int, int]
    layout: str
    device: str
    precision: str
    requests: int
    normalization: dict[str, Any]
    output_kind: str
    output_dtype: str
    wall_s: float = 0.0
    infer_busy_s: float = 0.0
    peak_rss_mb: float = 0.0
    output: str | None = None
    exact: bool | None = None  # crop margins cover the receptive field, or one tile (see volinfer.run.fidelity)
    not_exact: list[str] = field(default_factory=list)  # why not, when exact is False
    exact_meaning: str | None = None  # what exact means for this run, with the measured deviation when stored
    tiling_deviation: dict[str, Any] | None = None  # tiled vs whole, measured at convert (volinfer.model.tiling_check)
    input_passes: int = 0  # streamed passes over the input before the tile loop (normalisation statistics)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    engine: str = "tiles"  # or "stream": layer by layer (volinfer.run.stream); tiles then counts segment calls

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def overhead_ratio(self) -> float:
        """End-to-end time over the time OpenVINO had a tile in flight (1.0 = everything else fully hidden)."""
        return self.wall_s / self.infer_busy_s if self.infer_busy_s else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(voxels=self.voxels, overhead_ratio=round(self.overhead_ratio, 3),
                 mvox_per_s=round(self.voxels / self.wall_s / 1e6, 3) if self.wall_s else None)
        return d

    def set_fidelity(self, fid: Any) -> None:
        """Copy a :class:`volinfer.run.fidelity.Fidelity` verdict into the report."""
        self.exact, self.not_exact = fid.exact, list(fid.reasons)
        self.exact_meaning = fid.meaning if fid.exact else None
        self.tiling_deviation = fid.deviation if fid.exact else None

    def summary(self) -> str:
        sx = "x".join(map(str, self.shape))
        if self.engine == "stream":
            where = (f"the whole {self.tile[0]}x{self.tile[1]} cross-section" if self.grid[1] == 1 else
                     f"{self.grid[1]} bands of {self.tile[0]}x{self.tile[1]} along y")
            work = (f"engine      layer streaming along z: {self.tiles} segment calls, {self.grid[2]} rows of "
                    f"{self.tile[2]} output planes over {where}")
        else:
            work = (f"tiles       {self.tiles} of {'x'.join(map(str, self.tile))} ({'x'.join(map(str, self.grid))} "
                    f"grid), {self.stitch} stitching, overlap {'/'.join(map(str, self.overlap))} voxels")
        lines = [
            f"volume      {sx} x {self.channels} channel(s), {self.voxels / 1e6:.1f} Mvoxels",
            work,
            f"model       {self.layout}, {self.device} {self.precision}, {self.requests} infer request(s)",
            f"time        {self.wall_s:.2f} s wall, {self.infer_busy_s:.2f} s inference "
            f"(wall/inference {self.overhead_ratio:.2f}), {self.voxels / max(self.wall_s, 1e-9) / 1e6:.2f} Mvox/s",
            f"peak RSS    {self.peak_rss_mb:.0f} MB",
        ]
        if self.exact is not None:
            lines.append(f"{'fidelity':<11} " + ((self.exact_meaning or "exact") if self.exact
                                                  else "not exact: " + "; ".join(self.not_exact)))
        for note in self.notes:
            lines.append(f"{'note':<11} {note}")
        for k, v in self.extra.items():
            lines.append(f"{k:<11} {v}")
        if self.output:
            lines.append(f"output      {self.output} ({self.output_kind}, {self.output_dtype})")
        return "\n".join(lines)


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


def run_tiles(
    source: VolumeSource,
    model: TileModel,
    spec: OutputSpec,
    writer: BlockWriter,
    *,
    grid: TileGrid,
    stitch: str,
    normalizer: Normalizer,
    sigma: float = 0.125,
    pad_mode: str = "constant",
    pad_value: float = 0.0,
    requests: int = 2,
    progress: bool = True,
    reuse_constant: bool = True,
    nan_fill: list[float] | None = None,
    start_row: int = 0,
    on_row_done: Callable[[int], None] | None = None,
    tiles: Sequence[Tile] | None = None,
    stitcher: Any = None,
    mirror: Sequence[int] = (),
) -> tuple[float, int, int]:
    """Run every tile of ``grid`` through ``model`` and stitch the results into ``writer``.

    Tiles whose input is constant (air, empty background, padding) are inferred once per distinct value; later ones
    reuse that output (identical input, identical output). Returns (seconds with inference in flight, tiles,
    tiles reused without inference).

    ``start_row`` resumes an interrupted run whose first ``start_row`` z-rows are final on disk (blending replays
    the earlier rows that overlap it, adding only to later planes); ``on_row_done(r)`` is called once rows ``< r``
    are written. ``tiles`` / ``stitcher`` run a subset of the grid into another stitcher (one block of a chunked
    volume, see :mod:`volinfer.tiling.blocks`); tiles must keep the grid's order. ``mirror`` (volume axes 0-2) averages
    each tile's output over its flips along every subset of those axes (test-time augmentation, see
    :class:`Mirror`).
    """
    feeder = TileFeeder(source, grid, normalizer, pad_mode, pad_value, nan_fill)
    stitcher = stitcher or make_stitcher(grid, spec, writer, stitch, sigma)
    todo = list(tiles) if tiles is not None else grid
    queue = ov.AsyncInferQueue(model.compiled, max(1, requests))
    clock = _BusyClock()
    submitted = [0.0] * len(queue)
    buffers = [model.new_input_buffer() for _ in range(len(queue))]
    for i, buf in enumerate(buffers):
        queue[i].set_input_tensor(ov.Tensor(buf, shared_memory=True))
    pending: list[Any] = [None] * len(queue)
    pending_key: list[Any] = [None] * len(queue)
    pending_seq: list[int] = [0] * len(queue)
    cache: dict[tuple[float, ...], np.ndarray] = {}
    mirrored = Mirror(model, mirror) if mirror else None

    def harvest(i: int) -> None:
        """Stitch request ``i``'s tile, after every older tile: stitching order is always submission order, so
        blended sums are added in the same order however tiles are split into blocks or requests finish."""
        if pending[i] is None:
            return
        older = [j for j in range(len(queue)) if pending[j] is not None and pending_seq[j] < pending_seq[i]]
        if older:  # an older tile finished after a newer one (several streams): wait for all, keep the order
            drain()
            return
        _stitch(i)

    def _stitch(i: int) -> None:
        clock.record(submitted[i], queue[i])
        out = model.output_view(queue[i])
        if mirrored is not None:
            out = mirrored(model.input_view(buffers[i]), out)
        key = pending_key[i]
        if key is not None and key not in cache and len(cache) < MAX_CACHED_CONSTANTS:
            cache[key] = out.copy()
        stitcher.add(pending[i], out)
        pending[i] = pending_key[i] = None

    def drain() -> None:
        queue.wait_all()
        for i in sorted((i for i in range(len(queue)) if pending[i] is not None), key=lambda i: pending_seq[i]):
            _stitch(i)

    az = grid.axes[2]
    first_row = start_row
    if start_row:
        final_z = az.starts[start_row] if grid.mode == "blend" else az.cores[start_row][0]
        stitcher.start_at(final_z)
        if grid.mode == "blend":  # replay earlier rows whose tiles reach into non-final planes
            first_row = min(r for r in range(start_row + 1) if az.starts[r] + az.tile > final_z)
    per_row = grid.axes[0].count * grid.axes[1].count
    done = reused = 0
    bar = progress_bar(len(todo), "volinfer", "tile", initial=first_row * per_row, disable=not progress)
    t0 = time.perf_counter()
    row = None
    try:
        for tile in todo:
            if tile.index[2] < first_row:
                continue
            if row is not None and tile.index[2] != row:
                drain()
                stitcher.end_row(az.starts[tile.index[2]] if grid.mode == "blend" else az.cores[tile.index[2]][0])
                if on_row_done and tile.index[2] > start_row:
                    on_row_done(tile.index[2])
            row = tile.index[2]
            i = queue.get_idle_request_id()
            harvest(i)
            view = model.input_view(buffers[i])
            feeder.fill(tile, view)
            key = constant_value(view) if reuse_constant else None
            if key is not None and key in cache:
                if grid.mode == "blend" and any(p is not None for p in pending):
                    drain()  # blended sums are added in submission order, cached tiles included: bitwise reproducible
                stitcher.add(tile, cache[key])
                reused += 1
            else:
                pending[i], pending_key[i], pending_seq[i] = tile, key, done
                submitted[i] = time.perf_counter()
                queue.start_async()
            done += 1
            bar.update(1)
            if done % 4 == 0:
                rate = done / len(todo) * np.prod(grid.shape) / (time.perf_counter() - t0) / 1e6
                bar.set_postfix_str(f"{rate:.2f} Mvox/s", refresh=False)
        drain()
        stitcher.finish()
    finally:
        queue.wait_all()
        bar.close()
    return clock.total(), done, reused


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
            self.request.infer()
            acc += np.flip(self.model.output_view(self.request), axes)
        acc /= self.inferences
        return acc


#: Distinct constant tiles whose output is kept (each costs one tile of output memory).
MAX_CACHED_CONSTANTS = 2


def constant_value(tile: np.ndarray) -> tuple[float, ...] | None:
    """The per-channel value of a tile whose every voxel is the same in each channel, else None."""
    key = []
    for ch in tile:
        lo = float(ch.min())
        if lo != float(ch.max()):
            return None
        key.append(lo)
    return tuple(key)
