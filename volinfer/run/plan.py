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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


import numpy as np

from volinfer.errors import VolinferError
from volinfer.tiling.geometry import TileGrid

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in self.parts_mb.items() if v >= 0.5)
        lines = [f"engine: {self.stream}", "  with --engine tiles:"] if self.stream else []
        lines += [f"tile {'x'.join(map(str, self.tile))}: {self.tiles} tiles, predicted peak RSS "
                  f"{self.peak_rss_mb:.0f} MB ({parts} MB), about {self.time_s:.0f} s"]
        if self.norm_passes:
            lines.append(f"  {self.norm_passes} streamed normalisation-statistics pass(es) before the run (in the time)")
        if self.inferences_per_tile > 1:
            lines.append(f"  test-time mirroring: {self.inferences_per_tile} inferences per tile (in the time)")
        if self.exact is not None:
            lines.append("  " + (self.exact_meaning or "exact") if self.exact
                         else "  not exact: " + "; ".join(self.not_exact))
        if self.candidates and self.speed_source:
            lines.append(f"  per-voxel cost: {self.speed_source}")
        for c in self.candidates:
            when = "" if c.get("time_s") is None else f", predicted {c['time_s']:.1f} s"
            lines.append(f"  weighed tile {'x'.join(map(str, c['tile']))}: {c['tiles']} tiles, "
                         f"{c['evaluated_x']:.2f}x voxels evaluated{when}, ~{c['memory_mb']:.0f} MB model memory, "
                         f"{c['norm_passes']} statistics pass(es)"
                         + ("" if c.get("within_budget", True) else "  [over the speed budget]"))
        return "\n".join(lines)


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
    t = time.perf_counter(); req.infer(); times.append(time.perf_counter() - t)
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


def engine_buffers_mb(setup: Any, facts: "VolumeFacts", model_channels: int, requests: int) -> dict[str, float]:
    """The engine's memory beyond the compiled model, in MB, by part (see module docs), for a resolved run
    (:class:`volinfer.run.setup.RunSetup`) on a volume (:class:`VolumeFacts`)."""
    from volinfer.tiling.stitch import BlendStitcher

    grid, stitch, norm = setup.grid, setup.stitch, setup.normalizer
    in_channels, stored_itemsize, compressed = facts.channels, facts.itemsize, facts.compressed
    out_channels, out_itemsize = setup.spec.out_channels, setup.spec.dtype.itemsize
    scans, statistics = facts.floating or not norm.fitted, None if norm.fitted else norm.kind
    wide = facts.floating and facts.itemsize > 4
    X, Y, Z = grid.shape
    tx, ty, tz = grid.tile_shape
    parts: dict[str, float] = {}
    if compressed:
        parts["reader"] = in_channels * X * Y * min(tz, Z) * stored_itemsize / MB
    else:
        parts["reader"] = in_channels * X * min(ty, Y) * min(tz, Z) * stored_itemsize / MB
    if stitch == "crop":
        cy = max(c1 - c0 for c0, c1 in grid.axes[1].cores)
        cz = max(c1 - c0 for c0, c1 in grid.axes[2].cores)
        parts["stitch"] = (requests + 1) * out_channels * cy * cz * X * out_itemsize / MB
    else:  # float32 sums of the open tile row and of the planes the next z-row overlaps; one output plane strip
        parts["stitch"] = (BlendStitcher.buffer_bytes(grid, model_channels)
                           + out_channels * min(ty, Y) * X * out_itemsize + 2 * min(ty, Y) * X * 4) / MB
    parts["tile temporaries"] = 2 * model_channels * tx * ty * tz * 4 / MB / 4  # chunked post-processing, padding
    if scans:  # NaN/Inf scan and normalisation statistics, before the tile loop
        parts["statistics pass"] = statistics_pass_mb(grid.shape, tz, stored_itemsize, statistics, wide)
    return parts


def statistics_pass_mb(shape: tuple[int, int, int], depth: int, stored_itemsize: int, statistics: str | None,
                       wide: bool = False) -> float:
    """Peak memory of the streamed passes over the input before the tile loop, in MB, as they allocate.

    Each pass reads z-slabs of ``depth`` planes (at most :func:`volinfer.io.reader.scan_slabs`' voxel bound). The
    NaN/Inf scan holds a slab and its finite mask; :meth:`volinfer.run.normalize.Normalizer.fit` (``statistics`` is the
    kind it fits, None when nothing is fitted) a slab as stored, its float64 copy and one float64 temporary. For
    percentiles it also keeps a sample of the volume (float32, float64 for ``wide`` voxels) over every slab, then
    concatenates, clips and centres it in float64: 2 sample copies + 2 float64 ones at the end. Slab temporaries
    freed into the heap stay resident, so the sample adds to the slab rather than replacing it.
    """
    import inspect

    from volinfer.run.normalize import percentile_step
    from volinfer.io.reader import scan_slabs

    X, Y, Z = shape
    bound = inspect.signature(scan_slabs).parameters["voxels"].default
    planes = max(1, min(depth, bound // max(1, X * Y)))
    slab = min(planes, Z) * X * Y
    if statistics not in ("zscore", "minmax", "percentile"):
        return slab * (stored_itemsize + 1) / MB
    # measured (fresh process, VmHWM) since the pre-pass fuses the scans: a slab as stored plus one float64 working
    # copy; the sample as kept plus one float64 copy while clipping (concatenation reuses freed slab memory)
    mb = slab * (stored_itemsize + 8) / MB
    if statistics == "percentile":
        step = percentile_step(shape)
        n = -(-X // step) * -(-Y // step) * -(-Z // step)  # the sample's lattice
        mb += n * ((8 if wide else 4) + 8) / MB
    return mb


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


def parse_size_mb(text: str) -> float:
    """``600M``, ``1.5G``, ``800`` (MB) → MB."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}
    try:
        if t and t[-1] in scale:
            return float(t[:-1]) * scale[t[-1]]
        return float(t)
    except ValueError:
        raise VolinferError(f"memory size must look like 600M or 1.5G; got {text!r}") from None


def candidate_tiles(multiple: int, largest: int = 256, smallest: int = 32) -> list[int]:
    """Cubic tile sizes to try under a memory limit, largest first, all multiples of the model's size multiple."""
    step = max(multiple, 16)
    return [t for t in range(largest // step * step, smallest - 1, -step) if t % multiple == 0 and t > 0] or [multiple]


@dataclass
class VolumeFacts:
    shape: tuple[int, int, int]
    channels: int
    itemsize: int
    compressed: bool
    floating: bool  # stored as floats: the NaN/Inf pass runs


def volume_facts(paths: Sequence[str | Path]) -> VolumeFacts:
    """What the plan needs to know about the input files (NIfTI files, or one Zarr store), from their headers only.
    A Zarr store's shape is (z, y, x), the order its runs plan and tile in; its chunks are read region by region,
    never as whole streamed planes."""
    from volinfer.io.reader import StreamChannel, VolumeSource
    from volinfer.io.zarr_io import is_zarr, open_zarr_source

    if any(is_zarr(p) for p in paths):
        if len(paths) != 1:
            raise VolinferError("Zarr runs take one .zarr input (several channels: one (c, z, y, x) array)")
        zsrc, _ = open_zarr_source(paths[0])
        with zsrc:
            return VolumeFacts(tuple(zsrc.shape), zsrc.channels, max(r.dtype.itemsize for r in zsrc.readers),
                               False, any(r.dtype.kind == "f" for r in zsrc.readers))
    with VolumeSource.open(paths, depth=1) as src:
        return VolumeFacts(src.shape, src.channels, max(r.dtype.itemsize for r in src.readers),
                           any(isinstance(r, StreamChannel) for r in src.readers),
                           any(r.dtype.kind == "f" for r in src.readers))


def plan_run(paths: Sequence[str | Path], model_path: str | Path, settings: Any = None,
             **options: Any) -> Plan:
    """Predict peak RSS and time of ``volinfer run`` with these settings (see module docs): the same tile planning
    as the run (fidelity first), then the model measured at that tile in a fresh process. ``settings``: a
    :class:`volinfer.run.settings.RunSettings`; keyword ``options`` as for :func:`volinfer.predict` (``output=``
    here names the model output, ``options=`` is a dict of compile options)."""
    from volinfer.run.settings import RunSettings
    from volinfer.io.zarr_io import is_zarr

    if "output" in options:
        options["model_output"] = options.pop("output")
    s = RunSettings.from_kwargs(settings, **options)
    if s.tiling.norm_stats is None and any(is_zarr(p) for p in paths):
        s = RunSettings.from_kwargs(s, norm_stats="tile")  # what Zarr (block-wise) runs use: see volinfer.run.distributed
    facts = volume_facts(paths)
    tm, choice, setup = _plan_tiling(facts, model_path, s)
    opts = {k: v for k, v in s.runtime.compile_dict().items() if v is not None}
    parts = engine_buffers_mb(setup, facts, tm.out_channels, s.runtime.requests)
    cost = measure_model(model_path, tm.tile, s.runtime.layout, s.runtime.model_output, opts, s.runtime.requests)
    plan = _finish_plan(make_plan(setup.grid, cost, parts), facts, (tm, choice), setup, s)
    if choice.stream is not None:
        plan.engine = "stream"
        plan.stream = f"{choice.stream.describe(facts.shape[1], tm.multiple)}; predicted peak RSS " \
                      f"{choice.stream.peak_mb:.0f} MB"
        if choice.stream_passes:
            plan.stream += f"; after {choice.stream_passes} streamed normalisation-statistics pass(es)"
    return plan


def _plan_tiling(facts: Any, model_path: str | Path, s: Any) -> tuple[Any, Any, Any]:
    """The run's own tile planning and settings resolution, on the volume's facts (no voxel read)."""
    from volinfer.api import _overlap_for
    from volinfer.model.tile_model import TileModel
    from volinfer.run.setup import choose_stream, plan_tiling, resolve

    t, rt = s.tiling, s.runtime
    handle = TileModel(model_path, tile=t.tile, layout=rt.layout, output=rt.model_output,
                       options=rt.compile_options(), compile=False)
    choice = plan_tiling(handle, facts.shape, stitch=t.stitch, overlap=t.overlap, max_memory_mb=t.max_memory_mb,
                         norm_stats=t.norm_stats)
    choose_stream(handle, facts.shape, choice, s)  # sets choice.stream when the run would stream
    tm = TileModel(model_path, tile=choice.tile, layout=rt.layout, output=rt.model_output,
                   options=rt.compile_options(), compile=False)
    tm.multiple = handle.multiple
    overlap = t.overlap
    if overlap is None:
        overlap = list(choice.overlap) if choice.overlap is not None else _overlap_for(choice, tm)
    setup = resolve(tm, facts.shape, facts.channels, s, overlap=overlap)
    return tm, choice, setup


def _finish_plan(plan: Plan, facts: Any, planned: tuple[Any, Any], setup: Any, s: Any) -> Plan:
    """Mirroring, normalisation-statistics passes, the fidelity verdict and the weighed tilings (``planned``: the
    tile model and the planner's choice)."""
    tm, choice = planned
    from volinfer.run.norm_stats import waves
    from volinfer.run.setup import needs_norm_passes, verdict

    # the same count the run reports: layers that do not depend on each other share a pass
    passes = len(waves(tm.model, choice.norm_layers)) if needs_norm_passes(setup, choice) else 0
    fid = verdict(setup, choice, frozen=passes > 0)
    plan.inferences_per_tile = 2 ** len(s.tiling.mirror)
    plan.norm_passes = passes
    plan.time_s = round(plan.time_s * (plan.inferences_per_tile + 0.5 * passes), 1)
    plan.exact, plan.not_exact = fid.exact, fid.reasons
    plan.exact_meaning, plan.tiling_deviation = (fid.meaning, fid.deviation) if fid.exact else (None, None)
    vox = float(np.prod(facts.shape))
    plan.candidates = [{"tile": list(c.tile), "tiles": int(np.prod(c.counts)), "evaluated_x": c.evaluated / vox,
                        "memory_mb": c.memory_mb, "norm_passes": c.norm_passes, "within_budget": c.within_budget}
                       for c in choice.candidates]
    plan.speed_source = choice.speed_source
    _candidate_times(plan, choice.candidates)
    return plan


def _candidate_times(plan: Plan, weighed: Sequence[Any]) -> None:
    """Each weighed tiling's predicted time: evaluated voxels x the speed profile's per-voxel cost at its tile x
    (inferences per tile + half a run per statistics pass), as ``profile_time_s``; and as ``time_s``, the same
    scaled so that the chosen tiling's equals the plan's time (measured now at that tile): the profile ranks the
    shapes, the measurement gives this machine's seconds."""
    runs = plan.inferences_per_tile
    for c, t in zip(plan.candidates, weighed):
        c["profile_time_s"] = None if t.voxel_s is None else t.evaluated * t.voxel_s * (runs + 0.5 * t.norm_passes)
    chosen = next((c for c in plan.candidates if tuple(c["tile"]) == tuple(plan.tile)), None)
    scale = 1.0
    if chosen is not None and chosen["profile_time_s"] and plan.time_s > 0:
        scale = plan.time_s / chosen["profile_time_s"]
        plan.speed_source += (f"; times x{scale:.2f} to match the latency measured now at tile "
                              f"{'x'.join(map(str, plan.tile))}")
    for c in plan.candidates:
        raw = c["profile_time_s"]
        c["profile_time_s"] = None if raw is None else round(raw, 1)
        c["time_s"] = None if raw is None else round(raw * scale, 1)


def largest_fitting_tile(paths: Sequence[str | Path], model_path: str | Path, limit_mb: float,
                         **kwargs: Any) -> Plan:
    """The plan with the largest cubic tile whose predicted peak fits ``limit_mb``; refuses with the smallest need."""
    from volinfer.model.tile_model import TileModel

    tm = TileModel(model_path, layout=kwargs.get("layout"), tile=kwargs.get("tile") or 32,
                   output=kwargs.get("output"), compile=False)
    facts = volume_facts(paths)
    step = max(tm.multiple, 16)
    largest = min(256, -(-max(facts.shape) // step) * step)  # a tile beyond the volume only adds padding
    best: Plan | None = None
    for t in candidate_tiles(tm.multiple, largest=largest):
        kwargs["tile"] = t
        try:
            p = plan_run(paths, model_path, **kwargs)
        except VolinferError:
            continue  # the model rejects this size (or the overlap does not fit): try the next
        best = p
        if p.peak_rss_mb <= limit_mb:
            return p
    need = f"{best.peak_rss_mb:.0f} MB even at tile {best.tile[0]}" if best else "an unknown amount"
    raise VolinferError(f"no tile size fits in {limit_mb:.0f} MB: the run would need {need}")
