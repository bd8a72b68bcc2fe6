"""Predicting a run's peak memory and time before it starts.

The model's share is *measured*: a fresh child process imports volinfer, compiles the model at the tile shape with
the run's device/precision, creates the run's infer requests and runs them; its high-water mark (``VmHWM``) and tile
latency are what the real run will pay. The engine's own buffers are computed from the geometry (they are the only
things that scale with the volume, see the README's "Memory"): the reader's strip or gzip window, the crop stitcher's
output strips or the blend window, and the transient slabs of statistics passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence


import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.reader import slab_planes, stored_as
from volinfer.io.sources import open_paths
from volinfer.io.formats import is_tiff_output, is_zarr, is_zarr_output
from volinfer.io.zarr_io import ROW_CACHE_BYTES, open_zarr_source
from volinfer.model.memory import RUNTIME_FLOOR_MB, activation_bytes_per_voxel, weights_mb
from volinfer.model.tile_model import TileModel
from volinfer.options import format_mb
from volinfer.run import pipeline
from volinfer.run.checks import needs_value_scan
from volinfer.run.norm_stats import waves
from volinfer.run.normalize import percentile_step
from volinfer.run import zarr_route
from volinfer.run.pipeline import open_source
from volinfer.run.settings import RunSettings
from volinfer.run.setup import (guard_for, make_normalizer, needs_input_scan, needs_norm_passes, resolve, scan_input,
                                storing_receptive_field, tile_buffers, verdict)
from volinfer.tiling.geometry import TileGrid
from volinfer.tiling.stitch import BlendStitcher

MB = 2**20


@dataclass
class ModelCost:
    peak_mb: float  # VmHWM of a process that compiled the model and ran all its requests (compilation included)
    steady_mb: float  # its resident size afterwards: what stays while tiles run
    tile_s: float  # median latency of one tile


@dataclass
class Plan:
    tile: tuple[int, int, int]
    tiles: int
    peak_rss_mb: float
    time_s: float
    parts_mb: dict[str, float] = field(default_factory=dict)
    exact: bool | None = None
    not_exact: list[str] = field(default_factory=list)
    exact_meaning: str | None = None  # as the run reports it (volinfer.run.fidelity.explain_exact)
    tiling_deviation: dict[str, Any] | None = None
    norm_passes: int = 0  # streamed statistics passes before the tile loop
    inferences_per_tile: int = 1  # 2^axes with test-time mirroring
    candidates: list[dict[str, Any]] = field(default_factory=list)  # tilings the planner weighed
    speed_source: str = ""  # where the candidates' per-voxel cost came from (the model's speed profile)
    engine: str = "tiles"  # "stream": the run streams layer by layer (volinfer.run.stream); tile figures then apply
    stream: str | None = None  # to --engine tiles; this says what the streamed run does and its predicted peak
    stream_peak_mb: float | None = None  # the streamed run's predicted peak RSS and time (engine "stream")
    stream_time_s: float | None = None
    budget_mb: float | None = None  # the memory budget the planner chose within (--max-memory, else the default)
    probe_mb: float | None = None  # predicted peak of the run-time receptive-field probe (none stored in the model)
    measured_tile: list[int] | None = None  # where the model was measured (a streamed run's tiling: estimated from it)
    tiles_unavailable: str | None = None  # a streamed plan without tile figures: why (--engine tiles refused, ...)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in self.parts_mb.items() if v >= 0.5)
        lines = []
        if self.stream:
            when = "" if self.stream_time_s is None else f", about {_seconds(self.stream_time_s)}"
            lines += [f"engine: {self.stream}; predicted peak RSS {self.stream_peak_mb:.0f} MB{when}",
                      "  with --engine tiles:" + (f" {self.tiles_unavailable}" if self.tiles_unavailable else "")]
        if self.tiles_unavailable is None:
            lines += self._tile_lines(parts)
        if self.candidates:
            budget = f" within {format_mb(self.budget_mb)}" if self.budget_mb else ""
            lines.append(f"  candidates weighed (least predicted time{budget}; within 10% of it, the leanest):")
            if self.speed_source:
                lines.append(f"  per-voxel cost: {self.speed_source}")
        lines += [_candidate_line(c) for c in self.candidates]
        return "\n".join(lines)

    def _tile_lines(self, parts: str) -> list[str]:
        """The tiling's own lines: tiles, peak and time, how the model was measured, extra passes, the verdict."""
        lines = [f"tile {'x'.join(map(str, self.tile))}: {self.tiles} tiles, predicted peak RSS "
                 f"{self.peak_rss_mb:.0f} MB ({parts} MB), about {_seconds(self.time_s)}"]
        if self.budget_mb and self.peak_rss_mb > self.budget_mb:  # the planner's model estimate, not measured
            lines.append(f"  over the {format_mb(self.budget_mb)} budget it was planned within: the model measured "
                         f"here takes more than the planner's estimate of it")
        if self.measured_tile and tuple(self.measured_tile) != tuple(self.tile):
            lines.append(f"  (model figures estimated from its measurement at tile "
                         f"{'x'.join(map(str, self.measured_tile))})")
        if self.norm_passes:
            lines.append(f"  {self.norm_passes} streamed normalisation-statistics pass(es) before the run (in the time)")
        if self.inferences_per_tile > 1:
            lines.append(f"  test-time mirroring: {self.inferences_per_tile} inferences per tile (in the time)")
        if self.exact is not None:
            lines.append("  " + (self.exact_meaning or "exact") if self.exact
                         else "  not exact: " + "; ".join(self.not_exact))
        return lines


def _seconds(s: float) -> str:
    """A predicted time as `volinfer plan` prints it: tenths below 10 s (a one-tile run is often under a second)."""
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _candidate_line(c: dict[str, Any]) -> str:
    """One weighed candidate as `volinfer plan` prints it: ``*`` marks the chosen one."""
    mark = "*" if c.get("chosen") else " "
    when = "" if c.get("time_s") is None else f", predicted {c['time_s']:.1f} s"
    if c.get("engine") == "stream":
        kind = " skewed" if c.get("skewed") else ""
        what = ("layer stream" + ("" if c["tiles"] == 1 else f" in {c['tiles']}{kind} bands along y")
                + (f", {c['spilled']} skip(s) spilled" if c.get("spilled") else ""))
    else:
        what = f"tile {'x'.join(map(str, c['tile']))}: {c['tiles']} tiles"
    over = "" if c.get("within_budget", True) else "  [over the memory budget]"
    passes = f", {c['norm_passes']} statistics pass(es)" if c.get("norm_passes") else ""
    return (f"  {mark} {what}, {c['evaluated_x']:.2f}x voxels evaluated{when}, ~{c['memory_mb']:.0f} MB "
            f"predicted peak{passes}{over}")


_PROBE = r"""
import json, sys, time
import numpy as np
import openvino as ov
import volinfer  # the same imports a run has
from volinfer.model.tile_model import CompileOptions, TileModel
a = json.loads(sys.argv[1])
tm = TileModel(a["model"], tile=a["tile"], layout=a["layout"], output=a["output"], options=CompileOptions(**a["options"]))
q = ov.AsyncInferQueue(tm.compiled, a["requests"])
bufs = [tm.new_input_buffer() for _ in range(len(q))]
for i, b in enumerate(bufs):
    np.random.default_rng(i).standard_normal(out=b, dtype=np.float32)  # in place: no temporaries
    q[i].set_input_tensor(ov.Tensor(b, shared_memory=True))
for _ in range(len(q)):
    q.start_async()
q.wait_all()
times = []
req = q[0]
for _ in range(3):
    t = time.perf_counter(); req.infer(share_outputs=True); times.append(time.perf_counter() - t)
from volinfer.portable import memory_status  # VmHWM/VmRSS on Linux, fallbacks elsewhere
st = memory_status()
if st["peak_mb"] is None:
    raise SystemExit("cannot measure memory use on this system: install psutil (pip install psutil)")
print(json.dumps({"peak_mb": st["peak_mb"], "steady_mb": st["rss_mb"], "tile_s": sorted(times)[1]}))
"""


def measure_model(model: str | Path, tile: Sequence[int], layout: str | None, output: str | int | None,
                  options: dict[str, Any], requests: int) -> ModelCost:
    """Compile and run the model at ``tile`` in a fresh process; return its peak RSS and tile latency."""
    args = json.dumps({"model": str(model), "tile": list(tile), "layout": layout, "output": output,
                       "options": options, "requests": requests})
    p = subprocess.run([sys.executable, "-c", _PROBE, args], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit code {p.returncode}"
        raise VolinferError(msg.split("VolinferError: ")[-1])
    data = json.loads(p.stdout.strip().splitlines()[-1])
    return ModelCost(data["peak_mb"], data["steady_mb"], data["tile_s"])


def engine_buffers_mb(setup: Any, facts: "VolumeFacts", tm: TileModel, s: RunSettings) -> dict[str, float]:
    """The engine's memory beyond the compiled model ``tm``, in MB, by part (see module docs), for a resolved run
    (:class:`volinfer.run.setup.RunSetup`, its settings ``s``) on a volume (:class:`VolumeFacts`): the planner's own
    account (:func:`volinfer.run.setup.tile_buffers`), with the blend stitcher's window where the run blends."""
    grid, stitch, norm = setup.grid, setup.stitch, setup.normalizer
    model_channels = tm.out_channels
    buffers = tile_buffers(tm, grid.shape, s, (facts.itemsize, facts.reader_holds))
    scans, statistics = facts.floating or not norm.fitted, None if norm.fitted else norm.kind
    wide = facts.floating and facts.itemsize > 4
    X, Y, Z = grid.shape
    tx, ty, tz = grid.tile_shape
    parts: dict[str, float] = {"reader": buffers.reader_mb(ty, tz)}
    if stitch == "crop":
        parts["stitch"] = buffers.crop_stitch_mb(max(c1 - c0 for c0, c1 in grid.axes[1].cores),
                                                 max(c1 - c0 for c0, c1 in grid.axes[2].cores),
                                                 [a.count for a in grid.axes])
    else:  # float32 sums of the open tile row and of the planes the next z-row overlaps; one output plane strip
        parts["stitch"] = (BlendStitcher.buffer_bytes(grid, model_channels)
                           + buffers.out_channels * min(ty, Y) * X * buffers.out_itemsize + 2 * min(ty, Y) * X * 4) / MB
    parts["tile temporaries"] = buffers.temporaries_mb(grid.tile_shape)
    constants = buffers.constants_mb(grid.tile_shape, len(grid), stitch == "crop")
    if constants:
        parts["constant tiles"] = constants
    if buffers.mirror:
        parts["mirroring"] = buffers.mirror_mb(grid.tile_shape)
    if scans:  # NaN/Inf scan and normalisation statistics, before the tile loop
        parts["statistics pass"] = statistics_pass_mb(grid.shape, tz, facts.itemsize, statistics, wide,
                                                        facts.floating) + \
            row_cache_mb(grid.shape, facts.depth, facts.itemsize)
    return parts


def statistics_pass_mb(shape: tuple[int, int, int], depth: int, stored_itemsize: int, statistics: str | None,
                       wide: bool = False, floating: bool = True) -> float:
    """Peak memory of the streamed passes over the input before the tile loop, in MB, as they allocate.

    Each pass reads z-slabs of ``depth`` planes (at most :func:`volinfer.io.reader.scan_slabs`' voxel bound), the
    next one while the last is scanned (:func:`volinfer.run.prepass.read_ahead`): three slabs as stored at most
    (scanned, waiting, being read). The NaN/Inf scan adds a finite mask; :meth:`volinfer.run.normalize.Normalizer.fit`
    (``statistics`` is the kind it fits, None when nothing is fitted) one float64 working copy of a ``floating``
    slab (integers are summed through a small buffer). For percentiles it also keeps a sample of the volume
    (float32, float64 for ``wide`` voxels) over every slab, then concatenates, clips and centres it in float64: 2
    sample copies + 2 float64 ones at the end. Slab temporaries freed into the heap stay resident, so the sample
    adds to the slab rather than replacing it.
    """
    X, Y, Z = shape
    slab = min(slab_planes(shape, depth), Z) * X * Y
    if statistics not in ("zscore", "minmax", "percentile"):
        return slab * (3 * stored_itemsize + 1) / MB
    mb = slab * (3 * stored_itemsize + (8 if floating else 0)) / MB
    if statistics == "percentile":
        step = percentile_step(shape)
        n = -(-X // step) * -(-Y // step) * -(-Z // step)  # the sample's lattice
        mb += n * ((8 if wide else 4) + 8) / MB
    return mb


def row_cache_mb(shape: tuple[int, int, int], depth: int, itemsize: int) -> float:
    """The chunk row a Zarr store's reader keeps while a pass reads it (:meth:`volinfer.io.zarr_io.ZarrChannel.planes`),
    MB; 0 for files read plane by plane and for rows too large to keep."""
    row = shape[0] * shape[1] * depth * itemsize
    return row / MB if depth > 1 and row <= ROW_CACHE_BYTES else 0.0


def make_plan(grid: TileGrid, cost: ModelCost, parts: dict[str, float]) -> Plan:
    """Peak = the larger of compilation's own peak and (steady model memory + the engine's buffers); the statistics
    pass runs before the tile loop, so the larger of the two counts, not their sum."""
    scan = parts.get("statistics pass", 0.0)
    loop = sum(v for k, v in parts.items() if k != "statistics pass")
    peak = max(cost.peak_mb, cost.steady_mb + max(loop, scan))
    return Plan(tile=grid.tile_shape, tiles=len(grid), peak_rss_mb=round(peak, 1),
                time_s=round(len(grid) * cost.tile_s * 1.05, 1),
                parts_mb={"model (steady)": round(cost.steady_mb, 1), "compile peak": round(cost.peak_mb, 1),
                          **{k: round(v, 1) for k, v in parts.items()}})


@dataclass
class VolumeFacts:
    shape: tuple[int, int, int]
    channels: int
    itemsize: int
    reader_holds: str  # what the readers keep between reads (volinfer.io.reader.read_buffer)
    floating: bool  # stored as floats: the NaN/Inf pass runs
    blocks: bool = False  # a Zarr store: run block by block (no strips spanning the volume)
    depth: int = 1  # planes the storage keeps together (a Zarr chunk's depth: what a stream reads at a time)


def volume_facts(paths: Sequence[str | Path]) -> VolumeFacts:
    """What the plan needs to know about the input files (NIfTI files, or one Zarr store), from their headers only.
    A Zarr store's shape is (x, y, z) like every input's (its axes read by name); its chunks are read region by
    region, never as whole streamed planes. TIFF, MHA/MHD and NRRD files open through their readers."""
    if any(is_zarr(p) for p in paths):
        if len(paths) != 1:
            raise VolinferError("Zarr runs take one .zarr input (several channels: one (c, z, y, x) array)")
        zsrc, _ = open_zarr_source(paths[0])
        with zsrc:
            return VolumeFacts(tuple(zsrc.shape), zsrc.channels, *stored_as(zsrc.readers),
                               any(r.dtype.kind == "f" for r in zsrc.readers), blocks=True, depth=zsrc.stored_depth)
    with open_paths(paths, depth=1) as src:
        return VolumeFacts(src.shape, src.channels, *stored_as(src.readers),
                           any(r.dtype.kind == "f" for r in src.readers))


def plan_run(paths: Sequence[str | Path], model_path: str | Path, settings: Any = None,
             target: str | Path | None = None, **options: Any) -> Plan:
    """Predict peak RSS and time of ``volinfer run`` with these settings (see module docs): the same tile planning
    as the run (fidelity first), then the model measured at that tile in a fresh process. ``settings``: a
    :class:`volinfer.run.settings.RunSettings`; keyword ``options`` as for :func:`volinfer.predict` (``output=``
    here names the model output, ``options=`` is a dict of compile options). ``target``: the file or store the run
    would write (``run -o``): a Zarr store keeps whole cross-sections, so the plan is the one the run makes for it;
    None plans as for a NIfTI output."""
    if "output" in options:
        options["model_output"] = options.pop("output")
    s = RunSettings.from_kwargs(settings, **options)
    if target is not None:
        check_target_format(target)
    facts = volume_facts(paths)
    handle, via = _handle(model_path, s), None
    banded = target is None or not is_zarr_output(target)  # a Zarr output takes no bands of y rows
    if facts.blocks:
        handle, facts, banded, via = _zarr_route(paths[0], handle, facts, s, target)
    handle = _run_precision(handle, paths, s)
    if facts.blocks and s.tiling.norm_stats is None:
        s = RunSettings.from_kwargs(s, norm_stats="tile")  # what Zarr block runs use: see volinfer.run.distributed
    tm, choice, setup = _plan_tiling(handle, facts, s, banded)
    if choice.stream is None:
        plan = _tiles_plan(model_path, facts, (tm, choice, setup), s, estimate=False)
    else:  # the tile figures say what --engine tiles would run: the tiling the tiles engine plans, not the bands
        plan = _engine_tiles_plan(model_path, facts, handle, s, choice)
    _weigh(plan, choice, facts.shape, tm.multiple)  # what the run itself weighed (with --engine auto: the stream too)
    if choice.stream is not None:
        stream = next((c for c in plan.candidates if c["engine"] == "stream" and c["chosen"]), {})
        plan.engine, plan.stream = "stream", choice.stream.describe(facts.shape[1], tm.multiple)
        # the run-time receptive-field probe (a model storing none) runs first: the planner's estimate of its peak
        plan.stream_peak_mb, plan.stream_time_s = round(max(choice.stream.peak_mb, choice.probe_mb or 0.0), 1), \
            stream.get("time_s")
        if choice.stream_passes:
            plan.stream += f"; after {choice.stream_passes} streamed normalisation-statistics pass(es)" + (
                f" (checkpointed: at most {choice.stream_checkpoint_mb:.0f} MB of disk)"
                if choice.stream_checkpoint_mb else "")
        if via:
            plan.stream += f"; {via}"
    return plan


def check_target_format(target: str | Path) -> None:
    """Refuse, as ``volinfer run`` does, an output that is none of the formats a run writes (``plan -o``: nothing
    is written, so whether it exists does not matter)."""
    name = Path(target).name.lower()
    if not (is_zarr_output(target) or is_tiff_output(target) or name.endswith((".nii", ".nii.gz"))):
        raise VolinferError(f"{target}: output must end in .nii or .nii.gz (or .tif/.tiff, or .zarr)")


def _zarr_route(path: str | Path, handle: TileModel, facts: VolumeFacts, s: RunSettings,
                target: str | Path | None) -> tuple[TileModel, VolumeFacts, bool, str | None]:
    """Where a local ``volinfer run`` takes a Zarr store for this output (:func:`volinfer.run.zarr_route.decide`,
    the run's own decision). Returns the model to plan with (a streamed one stores the receptive field its plan
    measured), the facts (``blocks`` False in this process), whether the output takes bands of y rows (not a Zarr
    store, or the banded route into a NIfTI file), and what the plan adds about the route (None: nothing)."""
    route = zarr_route.decide(path, lambda: handle, s, target)
    banded = route.way == "bands" or target is None or not is_zarr_output(target)
    via = ("into a temporary NIfTI file, then written to the Zarr store slab by slab (its whole cross-sections "
           "would not fit the budget)") if route.way == "bands" else None
    return route.handle or handle, replace(facts, blocks=not route.in_process), banded, via


def _engine_tiles_plan(model_path: str | Path, facts: Any, handle: TileModel, s: Any, streamed: Any) -> Plan:
    """For a streamed run (its planner's choice ``streamed``), the plan ``--engine tiles`` would run, planned as that
    run plans it (the receptive field the stream's planning measured is not measured again); without tile figures
    (``tiles_unavailable`` says why) when that run would be refused or its model cannot be measured."""
    tiles = RunSettings.from_kwargs(s, engine="tiles")
    try:
        tm, choice, setup = _plan_tiling(storing_receptive_field(handle, streamed.rf), facts, tiles)
    except VolinferError as e:  # no tiling fits the budget: the stream is the only plan
        return _no_tiles(f"refused ({e})")
    choice.probe_mb = streamed.probe_mb  # the run-time probe (of a model storing no receptive field) is the same
    try:
        return _tiles_plan(model_path, facts, (tm, choice, setup), tiles, estimate=True)
    except Exception as e:  # the stream's plan stands without the alternative's figures
        return _no_tiles(f"not estimated ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _no_tiles(why: str) -> Plan:
    """A streamed run's plan without tile figures (``why``: what ``--engine tiles`` would do instead)."""
    return Plan(tile=(0, 0, 0), tiles=0, peak_rss_mb=0.0, time_s=0.0, tiles_unavailable=why)


def _tiles_plan(model_path: str | Path, facts: Any, planned: tuple[Any, Any, Any], s: Any, estimate: bool) -> Plan:
    """The tile engine's plan for ``planned`` (tile model, planner's choice, setup): its model cost measured in a
    probe process, the engine's buffers, the verdict and the weighed candidates. ``estimate``: the run streams, so the
    tiling is only what ``--engine tiles`` would run: the model is measured at its own tile, never compiled as large
    as the budget allows (:func:`_model_cost`)."""
    tm, choice, setup = planned
    opts = {k: v for k, v in s.runtime.compile_dict().items() if v is not None}
    opts["precision"] = tm.options.precision  # f32 where the run's precision guard will choose it
    parts = engine_buffers_mb(setup, facts, tm, s)
    # a request that never runs a tile never gets its output tensors: a grid of fewer tiles uses fewer requests
    requests = max(1, min(s.runtime.requests, len(setup.grid)))
    cost, measured_at = _model_cost(model_path, tm, choice, s, (opts, requests), estimate)
    plan = make_plan(setup.grid, cost, parts)
    plan.measured_tile = list(measured_at)
    plan = _finish_plan(plan, facts, (tm, choice), setup, s)
    if choice.probe_mb is not None:  # the receptive-field probe runs before anything else: the larger peak counts
        _add_probe(plan, choice.probe_mb, tm, cost)
    return plan


def _model_cost(model_path: str | Path, tm: Any, choice: Any, s: Any, how: tuple[dict[str, Any], int],
                estimate: bool) -> tuple[ModelCost, tuple[int, ...]]:
    """The model's cost at the planned tile, measured in a probe process (``how``: compile options, requests), and
    the tile it was measured at. With ``estimate`` (the run streams) the tiling is only what ``--engine tiles`` would run: the
    model is measured at its own, smaller tile and the planned tile's figures estimated from it (memory: the
    measurement plus the planner's estimate of the difference; latency: scaled by voxels x per-voxel cost), so that
    planning a stream never compiles a tile as large as the budget allows."""
    opts, requests = how
    at = tuple(choice.preferred or tm.tile)
    if not estimate or np.prod(at) >= np.prod(tm.tile):
        at = tuple(tm.tile)
    cost = measure_model(model_path, at, s.runtime.layout, s.runtime.model_output, opts, requests)
    if at == tuple(tm.tile):
        return cost, at
    per_voxel = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, at)
    extra = per_voxel * float(np.prod(tm.tile) - np.prod(at)) / MB
    unit = choice.voxel_cost or (lambda v: 1.0)
    ratio = float(np.prod(tm.tile)) * unit(float(np.prod(tm.tile))) / (float(np.prod(at)) * unit(float(np.prod(at))))
    return ModelCost(cost.peak_mb + extra, cost.steady_mb + extra, cost.tile_s * ratio), at


def _add_probe(plan: Plan, probe_mb: float, tm: Any, cost: ModelCost) -> None:
    """The run-time receptive-field probe's peak (``probe_mb``, the planner's estimate) in the plan: its excess over
    the planner's estimate for the model at the run's tile, added to the model's measured memory (both estimates
    share the planner's conservative runtime floor); the plan's peak is the larger of the two phases."""
    per_voxel = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, tm.tile)
    at_tile = RUNTIME_FLOOR_MB + weights_mb(tm.model) + per_voxel * float(np.prod(tm.tile)) / MB
    probe = round(cost.steady_mb + max(0.0, probe_mb - at_tile), 1)
    plan.parts_mb["receptive-field probe"] = probe
    plan.peak_rss_mb = max(plan.peak_rss_mb, probe)
    plan.probe_mb = probe


def _handle(model_path: str | Path, s: Any) -> TileModel:
    """The model as the run opens it (not compiled)."""
    t, rt = s.tiling, s.runtime
    return TileModel(model_path, tile=t.tile, layout=rt.layout, output=rt.model_output, options=rt.compile_options(),
                     compile=False)


def _plan_tiling(handle: TileModel, facts: Any, s: Any, banded: bool = True) -> tuple[Any, Any, Any]:
    """The run's own plan (:func:`volinfer.run.pipeline.plan`) and settings resolution, on the volume's facts, for
    ``handle`` in the precision the run will use (:func:`_run_precision`). A Zarr store run block by block
    (``facts.blocks``) is tiled: its blocks stream no layers (:func:`volinfer.run.distributed.run_zarr`).
    ``banded``: the output takes bands of y rows (not a Zarr store)."""
    planned = pipeline.plan(handle, facts.shape, s, stream=not facts.blocks, banded=banded,
                            stored=None if facts.blocks else (facts.itemsize, facts.reader_holds),
                            stored_depth=facts.depth)
    setup = resolve(planned.model, facts.shape, facts.channels, s, overlap=planned.overlap,
                    stream=planned.choice.stream)
    return planned.model, planned.choice, setup


def _run_precision(handle: Any, paths: Sequence[str | Path], s: Any) -> Any:
    """``handle`` in the precision the run will use, after the run's own checks of the input's values: wherever the
    run's pre-pass looks at the values (float voxels, which may hold NaN/Inf; a range the model's input type may not
    hold: :func:`volinfer.run.checks.needs_value_scan`), or ``--precision auto`` chose a reduced precision whose
    stored check the input's range may overrule, the input is scanned as the run scans it (one pass over its voxels),
    so that the plan refuses what the run refuses (NaN/Inf without ``--nan-value``), in the same words, and the
    run's precision guard is applied (:func:`volinfer.run.setup.guard_for`)."""
    if not paths:
        return handle
    zarr_input = any(is_zarr(p) for p in paths)
    source = open_zarr_source(paths[0])[0] if zarr_input else open_source(list(paths), handle.tile[2])
    with source:
        if not (needs_input_scan(handle) or needs_value_scan(source.readers, handle.input_dtype)):
            return handle
        scan = scan_input(handle, source, make_normalizer(handle, s, source.channels), s.input.nan_value)
    return guard_for(handle, scan.input_abs_max)


def _finish_plan(plan: Plan, facts: Any, planned: tuple[Any, Any], setup: Any, s: Any) -> Plan:
    """Mirroring, normalisation-statistics passes and the fidelity verdict (``planned``: the tile model and the
    planner's choice)."""
    tm, choice = planned
    # the same count the run reports: layers that do not depend on each other share a pass
    passes = len(waves(tm.model, choice.norm_layers)) if needs_norm_passes(setup, choice) else 0
    fid = verdict(setup, choice, frozen=passes > 0)
    plan.inferences_per_tile = 2 ** len(s.tiling.mirror)
    plan.norm_passes = passes
    plan.time_s = round(plan.time_s * (plan.inferences_per_tile + 0.5 * passes), 1)
    plan.exact, plan.not_exact = fid.exact, fid.reasons
    plan.exact_meaning, plan.tiling_deviation = (fid.meaning, fid.deviation) if fid.exact else (None, None)
    return plan


def _weigh(plan: Plan, choice: Any, shape: Sequence[int], multiple: int) -> None:
    """The plans the run's planner weighed (``choice``), with their predicted times, and the budget and speed
    source it weighed them by."""
    plan.candidates = _candidates(choice, shape, multiple)
    plan.speed_source, plan.budget_mb = choice.speed_source, choice.budget_mb
    _candidate_times(plan, choice)


def _candidates(choice: Any, shape: Sequence[int], multiple: int) -> list[dict[str, Any]]:
    """Every plan the planner weighed (:class:`volinfer.run.setup.TilingChoice`): tilings on the time/memory front,
    the fastest beyond the budget, and the layer stream when it was weighed; the chosen one marked."""
    vox = float(np.prod(shape))
    streams = choice.stream is not None
    out = [{"engine": "tiles", "tile": list(c.tile), "tiles": int(np.prod(c.counts)), "evaluated_x": c.evaluated / vox,
            "memory_mb": c.memory_mb, "norm_passes": c.norm_passes, "within_budget": c.within_budget,
            "chosen": not streams and c == choice.planned, "cost": c.cost, "voxel_s": c.voxel_s}
           for c in choice.candidates]
    if choice.stream_option is not None:  # the stream weighed against the tiling, and the other bands it weighed
        weighed = [(*choice.stream_option, streams)] + [(sp, cost, False) for sp, cost in choice.stream_alternatives]
        for sp, cost, chosen in weighed:
            out.append({"engine": "stream", "tile": [sp.padded[0], sp.band, sp.out_planes],
                        "tiles": sp.bands(shape[1], multiple).count,
                        "evaluated_x": sp.evaluated_voxels(shape[1], multiple) / vox,
                        "memory_mb": round(sp.peak_mb, 1), "norm_passes": 0, "within_budget": True,
                        "chosen": chosen, "skewed": sp.skew is not None, "spilled": len(sp.spill),
                        "cost": cost, "voxel_s": choice.voxel_cost is not None})
    return sorted(out, key=lambda c: c["cost"])


def _fallback_raw(plan: Plan, choice: Any) -> float | None:
    """The planner's cost of the tiling the plan measured when it is none of the candidates (no exact tiling fits the
    budget: the most faithful one runs), in the candidates' raw units; None without a speed profile or a tiling."""
    if choice.voxel_cost is None or not plan.tiles or plan.time_s <= 0:
        return None
    vox = float(np.prod(plan.tile))
    return plan.tiles * vox * choice.voxel_cost(vox) * (plan.inferences_per_tile + 0.5 * plan.norm_passes)


def _candidate_times(plan: Plan, choice: Any) -> None:
    """Each candidate's predicted time: the planner's cost (:attr:`volinfer.run.fidelity.Tiling.cost`: seconds from
    the speed profile, else evaluated voxels) x inferences per tile, as ``profile_time_s`` when the profile gave
    seconds; and as ``time_s``, scaled so that the planned tiling's equals the plan's time (measured now at that
    tile): the planner's costs rank the plans, the measurement gives this machine's seconds. Where no tiling was
    measured (a stream chosen), ``time_s`` is the profile's seconds, so every candidate still shows a time."""
    runs = plan.inferences_per_tile
    for c in plan.candidates:
        c["raw"] = c.pop("cost") * (runs + 0.5 * c["norm_passes"]) / (1.0 + 0.5 * c["norm_passes"]) \
            if c["engine"] == "tiles" else c.pop("cost")
        c["profile_time_s"] = round(c["raw"], 1) if c.pop("voxel_s") else None
    planned = choice.planned
    measured = next((c for c in plan.candidates if c["engine"] == "tiles" and planned is not None
                     and tuple(c["tile"]) == tuple(planned.tile) == tuple(plan.tile)), None)
    raw = measured["raw"] if measured is not None else _fallback_raw(plan, choice)
    scale = plan.time_s / raw if raw and raw > 0 < plan.time_s else None
    if scale is not None and plan.speed_source:
        voxels = all(c["profile_time_s"] is None for c in plan.candidates)  # costs in voxels: the scale is s/voxel
        plan.speed_source += (f"; {scale:.3g} s per evaluated voxel" if voxels else f"; times x{scale:.3g}") + \
            f" to match the latency measured now at tile {'x'.join(map(str, plan.measured_tile or plan.tile))}"
    for c in plan.candidates:
        raw = c.pop("raw")
        c["time_s"] = c["profile_time_s"] if scale is None else round(raw * scale, 1)
