"""What a run did and cost (:class:`RunReport`): printed as the command line's summary and as ``--json``, returned
by :func:`volinfer.predict` and the Zarr runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from volinfer import portable


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
    spill: dict[str, Any] | None = None  # planes spilled to disk by the stream (StreamPlan.spill_summary); None: none

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
                     f"{self.grid[1]} bands of up to {self.tile[0]}x{self.tile[1]} along y")
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
        if self.spill:  # spill
            sp = self.spill
            what = (f"{sp['tensors']} skip connection(s) and the rows where bands meet" if sp.get("strips_mb") else
                    f"{sp['tensors']} skip connection(s)")
            lines.append(f"{'spill':<11} {what} to {sp['disk_mb']:.0f} MB of disk: "
                         f"{sp['written_mb']:.0f} MB written, {sp['read_mb']:.0f} MB read back, "
                         f"{sp['ram_saved_mb']:.0f} MB of RAM saved (files in {sp['directory']}, deleted)")
        if self.output:
            lines.append(f"output      {self.output} ({self.output_kind}, {self.output_dtype})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Work:
    """What an engine did: wall and inference-busy seconds, tiles (or segment calls) run, constant tiles reused,
    streamed normalisation-statistics passes made before it, and which engine."""

    wall_s: float
    busy_s: float
    tiles: int
    reused: int = 0
    passes: int = 0
    engine: str = "tiles"


def build_report(setup: Any, tm: Any, source: Any, settings: Any, work: Work, output: str | None) -> RunReport:
    """The one report of every way of running (:func:`volinfer.predict`, Zarr blocks): the resolved run
    (:class:`volinfer.run.setup.RunSetup`), the model at its tile, the volume, the run settings and the work done;
    the verdict and notes are added by the caller."""
    grid = setup.grid
    rep = RunReport(
        shape=tuple(source.shape), channels=source.channels, tile=tm.tile,  # type: ignore[arg-type]
        grid=tuple(a.count for a in grid.axes), tiles=work.tiles, stitch=setup.stitch,  # type: ignore[arg-type]
        overlap=setup.overlap, layout=tm.layout, device=tm.options.device, precision=tm.precision,
        requests=settings.runtime.requests, normalization=setup.normalizer.describe(),
        output_kind=settings.output.kind, output_dtype=str(setup.spec.dtype), wall_s=work.wall_s,
        infer_busy_s=work.busy_s, peak_rss_mb=peak_rss_mb(), output=output,
        input_passes=setup.input_passes + work.passes, engine=work.engine)
    if work.reused:
        rep.extra["constant"] = f"{work.reused} of {work.tiles} tiles were constant and reused one cached inference"
    if setup.nonfinite:
        rep.extra["nan/inf"] = f"{setup.nonfinite} voxel(s) replaced by {settings.input.nan_value}"
    return rep
