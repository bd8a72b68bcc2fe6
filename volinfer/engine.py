"""The streaming loop: read → tile → infer → stitch → write, with inference overlapped with everything else.

Each OpenVINO infer request (an :class:`openvino.AsyncInferQueue` slot) owns one preallocated input buffer, shared
with OpenVINO without copies and refilled in place for every tile. While a request computes, the main thread stitches
the previous output of the next idle request (read straight from OpenVINO's output tensor) and fills its input with
the next tile. In-flight requests are drained at each new z-row of tiles, which is what lets the stitchers release
finished planes.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import openvino as ov
from tqdm import tqdm

from .feeder import TileFeeder
from .geometry import TileGrid
from .model import TileModel
from .normalize import Normalizer
from .postprocess import OutputSpec
from .reader import VolumeSource
from .stitch import BlockWriter, make_stitcher


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, as the OS counts it (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


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
    extra: dict[str, Any] = field(default_factory=dict)

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

    def summary(self) -> str:
        sx = "x".join(map(str, self.shape))
        lines = [
            f"volume      {sx} x {self.channels} channel(s), {self.voxels / 1e6:.1f} Mvoxels",
            f"tiles       {self.tiles} of {'x'.join(map(str, self.tile))} ({'x'.join(map(str, self.grid))} grid), "
            f"{self.stitch} stitching, overlap {'/'.join(map(str, self.overlap))} voxels",
            f"model       {self.layout}, {self.device} {self.precision}, {self.requests} infer request(s)",
            f"time        {self.wall_s:.2f} s wall, {self.infer_busy_s:.2f} s inference "
            f"(wall/inference {self.overhead_ratio:.2f}), {self.voxels / max(self.wall_s, 1e-9) / 1e6:.2f} Mvox/s",
            f"peak RSS    {self.peak_rss_mb:.0f} MB",
        ]
        for k, v in self.extra.items():
            lines.append(f"{k:<11} {v}")
        if self.output:
            lines.append(f"output      {self.output} ({self.output_kind}, {self.output_dtype})")
        return "\n".join(lines)


class _BusyClock:
    """Union of the intervals during which at least one request was in flight."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def callback(self, request: ov.InferRequest, started: float) -> None:
        self.spans.append((started, time.perf_counter()))

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
    on_tile: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Run every tile of ``grid`` through ``model`` and stitch the results into ``writer``.

    Returns (seconds with inference in flight, tiles run).
    """
    feeder = TileFeeder(source, grid, normalizer, pad_mode, pad_value)
    stitcher = make_stitcher(grid, spec, writer, stitch, sigma)
    queue = ov.AsyncInferQueue(model.compiled, max(1, requests))
    clock = _BusyClock()
    queue.set_callback(clock.callback)
    buffers = [model.new_input_buffer() for _ in range(len(queue))]
    for i, buf in enumerate(buffers):
        queue[i].set_input_tensor(ov.Tensor(buf, shared_memory=True))
    pending: list[Any] = [None] * len(queue)

    def harvest(i: int) -> None:
        if pending[i] is not None:
            stitcher.add(pending[i], model.output_view(queue[i]))
            pending[i] = None

    done = 0
    bar = tqdm(total=len(grid), unit="tile", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc="volinfer", leave=False)
    t0 = time.perf_counter()
    row = None
    try:
        for tile in grid:
            if row is not None and tile.index[2] != row:
                queue.wait_all()
                for i in range(len(queue)):
                    harvest(i)
            row = tile.index[2]
            i = queue.get_idle_request_id()
            harvest(i)
            feeder.fill(tile, model.input_view(buffers[i]))
            pending[i] = tile
            queue.start_async(userdata=time.perf_counter())
            done += 1
            bar.update(1)
            if done % 4 == 0 or done == len(grid):
                rate = done / len(grid) * np.prod(grid.shape) / (time.perf_counter() - t0) / 1e6
                bar.set_postfix_str(f"{rate:.2f} Mvox/s", refresh=False)
            if on_tile:
                on_tile(done)
        queue.wait_all()
        for i in range(len(queue)):
            harvest(i)
        stitcher.finish()
    finally:
        queue.wait_all()
        bar.close()
    return clock.total(), done
