"""Resolving a run's settings against a model and a volume, once, for every way of running (file, array, Zarr,
plan): stitching, activation, output spec, overlap, grid, and the whole-volume passes (NaN/Inf, statistics, range)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from volinfer import validate
from volinfer.model.activation import graph_activation
from volinfer.run.checks import check_input_range, check_nonfinite, needs_value_scan
from volinfer.run.prepass import ContentDigest, PrePass, ValueScan
from volinfer.errors import VolinferError
from volinfer.run.fidelity import (Fidelity, Tiling, accepts, activation_bytes_per_voxel, default_budget_mb,
                                   explain_exact, fmt_tile, judge, plan_exact, probe_multiple)
from volinfer.run.fidelity import SPEED_HEADROOM_MB, RUNTIME_FLOOR_MB, weights_mb
from volinfer.model.receptive_field import ReceptiveField, measure_receptive_field
from volinfer.model.spatial_norm import NormLayer, find_norm_layers, frozen_like
from volinfer.model.tiling_check import stored as stored_tiling_check
from volinfer.tiling.geometry import GeometryError, TileGrid
from volinfer.model.tile_model import TileModel
from volinfer.run.normalize import Normalizer
from volinfer.run.postprocess import OutputSpec
from volinfer.run.stream_stats import statistics_cost
from volinfer.io.reader import VolumeSource

STITCH_MODES = ("crop", "gaussian", "mean")
NORM_STATS = ("volume", "tile")
DEFAULT_OVERLAP = 0.25


def parse_overlap(value: Any) -> list[float] | None:
    """``0.25`` / ``"0.25"`` (fraction of the tile), ``32`` (voxels), ``"32,32,16"`` (per axis) → 3 numbers."""
    return validate.overlap(value)  # values < 1 are fractions, whole numbers >= 1 voxels, the rest refused


def overlap_voxels(items: list[float], tile: Sequence[int]) -> tuple[int, int, int]:
    """Fractions (< 1) are of the tile size; values >= 1 are voxels."""
    return tuple(int(round(v * t)) if v < 1 else int(v) for v, t in zip(items, tile))  # type: ignore[return-value]


def default_overlap(model: TileModel, stitch: str) -> list[float]:
    """Stored overlap, else (crop) twice the stored receptive-field radius when it fits, else a quarter tile."""
    s = model.settings
    if s.overlap is not None:
        return parse_overlap(s.overlap)  # type: ignore[return-value]
    if stitch == "crop" and s.receptive_field:
        rf = [int(v) for v in s.receptive_field]
        if all(2 * r + model.multiple <= t for r, t in zip(rf, model.tile)):
            return [float(2 * r) for r in rf]
    return [DEFAULT_OVERLAP] * 3


@dataclass
class RunSetup:
    stitch: str
    activation: str
    spec: OutputSpec
    overlap: tuple[int, int, int]
    grid: TileGrid
    normalizer: Normalizer
    nonfinite: int = 0
    nan_fill: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    input_passes: int = 0  # streamed passes over the input before inference (the pre-pass: 0 or 1)
    digests: list[str] | None = None  # content fingerprint of each channel, when asked for
    input_abs_max: float | None = None  # largest |value| the model's input will see (after normalisation), if scanned


def resolve(tm: TileModel, shape: Sequence[int], channels: int, settings: Any = None, *,
            overlap: Any = None) -> RunSetup:
    """Everything that follows from the run's settings (:class:`volinfer.run.settings.RunSettings`), the model's
    stored settings and the volume's shape (no I/O). ``overlap``: the planned one, else the settings'."""
    from volinfer.run.settings import RunSettings

    s = settings or RunSettings()
    o = s.output
    stitch, keep, normalize = s.tiling.stitch, o.channels, s.input.normalize
    overlap = s.tiling.overlap if overlap is None else overlap
    st = tm.settings
    stitch = stitch or st.stitch or "crop"
    if stitch not in STITCH_MODES:
        raise VolinferError(f"stitch must be one of {', '.join(STITCH_MODES)}; got {stitch!r}")
    if channels != tm.in_channels:
        raise VolinferError(f"the volume has {channels} channel(s) but the model expects {tm.in_channels} "
                            f"(give one 3-D file per channel, or one 4-D file)")
    activation, note = resolve_activation(tm, o.activation)
    spec = OutputSpec(tm.out_channels, kind=o.kind, activation=activation,
                      keep=tuple(keep) if keep is not None else None, threshold=o.threshold, float_dtype=o.prob_dtype)
    ov_vox = overlap_voxels(parse_overlap(overlap) or default_overlap(tm, stitch), tm.tile)
    try:
        grid = TileGrid.build(shape, tm.tile, [tm.multiple] * 3, ov_vox, "crop" if stitch == "crop" else "blend")
    except GeometryError as e:
        raise VolinferError(str(e)) from None
    normalizer = Normalizer(normalize if normalize is not None else st.normalization, channels)
    return RunSetup(stitch, activation, spec, ov_vox, grid, normalizer, notes=[note] if note else [])


def scan_volume(setup: RunSetup, tm: TileModel, source: VolumeSource, nan_value: float | None,
                fingerprint: bool = False) -> None:
    """Everything that needs the whole input before inference, in ONE streamed pass (none when nothing asks):
    NaN/Inf policy and value range (:mod:`volinfer.run.checks`), normalisation statistics, and the content fingerprint
    that keys ``--resume`` (``fingerprint``). Sets ``setup.input_passes`` and ``setup.digests``."""
    pre = PrePass(source, tm.tile[2])
    wanted = needs_value_scan(source.readers, tm.input_dtype) or tm.auto_reduced  # the range guards auto precision
    values = ValueScan(source.channels) if wanted else None
    digest = ContentDigest(source.channels) if fingerprint else None
    pre.add(values)
    pre.add(setup.normalizer.statistics(source))
    pre.add(digest)
    setup.input_passes = pre.run()
    setup.digests = digest.digests if digest else None
    if values is not None:
        setup.nonfinite = check_nonfinite(values, nan_value)
        check_input_range(values, source.readers, setup.normalizer, tm.input_dtype)
        setup.input_abs_max = _normalised_abs_max(values, source, setup.normalizer)
    if setup.nonfinite:
        setup.nan_fill = [setup.normalizer.normalized(nan_value, c) for c in range(source.channels)]  # type: ignore[arg-type]


def _normalised_abs_max(values: ValueScan, source: VolumeSource, normalizer: Normalizer) -> float | None:
    ends = [abs(normalizer.normalized(v * r.slope + r.inter, c))
            for c, r in enumerate(source.readers) if values.lo[c] <= values.hi[c] for v in (values.lo[c], values.hi[c])]
    return max(ends) if ends else None


def guard_precision(tm: TileModel, setup: RunSetup, compile: bool = True) -> TileModel:
    """``--precision auto`` chose a reduced precision from a verdict measured on calibration inputs; when this
    volume's normalised values reach far beyond those, the verdict does not cover it: f32 instead, saying why
    (:func:`volinfer.model.precision.outside_checked`)."""
    from volinfer.model.precision import outside_checked

    if setup.input_abs_max is None or not tm.auto_reduced:
        return tm
    why = outside_checked(tm.settings.extra.get("precision_check"), setup.input_abs_max)
    if why is None:
        return tm
    return tm.with_precision("f32", f"{tm.precision} not verified for this input: {why}; store a normalisation "
                                    f"(`volinfer convert --normalize`) or check on such data (`--calibration-volume`)",
                             compile=compile)


def resolve_activation(tm: TileModel, explicit: str | None) -> tuple[str, str | None]:
    """The activation to apply, read from the graph before any default: a model that already ends in Softmax or
    Sigmoid gets none (a second one changes labels and probabilities); LogSoftmax outputs get softmax, which is
    exactly exp() of them. ``--activation`` always wins. Returns (activation, note for the summary)."""
    if explicit:
        return explicit, None
    graph = graph_activation(tm.model, tm.output_index, channel_axis=1 if tm.layout == "NCDHW" else 4)
    if graph in ("softmax", "sigmoid"):
        return "none", f"the model ends in {graph}: its output is used as probabilities (no second activation)"
    if graph == "logsoftmax":
        return "softmax", "the model ends in LogSoftmax: probabilities are exp() of its output"
    stored = tm.settings.activation
    if stored:
        return stored, None
    if tm.settings.extra.get("outputs") == "probabilities":
        return "none", None
    return ("softmax" if tm.out_channels > 1 else "sigmoid"), None


@dataclass
class TilingChoice:
    """What the planner decided before the model is compiled: tile, overlap (None: the usual default), the receptive
    field and normalisation layers it planned with, and how many statistics passes the run will make."""

    tile: tuple[int, int, int]
    overlap: tuple[int, int, int] | None
    rf: ReceptiveField | None
    norm_layers: list[NormLayer]
    global_ops: list[str]
    norm_stats: str
    notes: list[str] = field(default_factory=list)
    candidates: list[Tiling] = field(default_factory=list)
    tiling_check: dict[str, Any] | None = None  # tiled-vs-whole deviation stored at convert, for this receptive field
    speed_source: str = ""  # where the planner's per-voxel cost came from (the model's speed profile), in words
    stream: Any = None  # the volinfer.run.stream.StreamPlan when the run streams layer by layer (choose_stream)
    stream_passes: int = 0  # streamed normalisation-statistics passes before a streamed run
    exact_fits: bool = True  # False: the planner found no exact tiling within the budget


def stored_receptive_field(tm: TileModel) -> ReceptiveField | None:
    """The receptive field stored in the model's settings, if any."""
    s = tm.settings
    if not s.receptive_field:
        return None
    bounded = s.extra.get("receptive_field_bounded", True) not in (False, "false")
    return ReceptiveField(tuple(int(v) for v in s.receptive_field), bool(bounded))  # type: ignore[arg-type]


def model_norm_layers(tm: TileModel) -> tuple[list[NormLayer], list[str]]:
    """Spatial normalisation layers (and unfreezable spatial reductions) of the model, found at its tile."""
    try:
        return find_norm_layers(tm.model, tm.layout, tm.in_channels, tm.tile)
    except Exception:  # a fixed-shape model cannot be probed at other sizes: count the ops instead
        names = [f"{op.get_type_name()} {op.get_friendly_name()}" for op in tm.model.get_ordered_ops()
                 if op.get_type_name() in ("MVN", "GroupNormalization")]
        return [], names


def plan_tiling(tm: TileModel, shape: Sequence[int], *, stitch: str | None, overlap: Any,
                max_memory_mb: float | None, norm_stats: str | None) -> TilingChoice:
    """Faithfulness first: unless the tile was fixed by the caller, the fastest exact crop tiling within the memory
    budget (growing the tile up to the whole padded volume); see :mod:`volinfer.run.fidelity`."""
    mode = norm_stats or tm.settings.extra.get("norm_stats") or "volume"
    if mode not in NORM_STATS:
        raise VolinferError(f"norm-stats must be one of {', '.join(NORM_STATS)}; got {mode!r}")
    rf = stored_receptive_field(tm)
    notes: list[str] = []
    if rf is None:
        rf = measure_receptive_field(tm)
        notes.append(f"receptive field {rf} measured now (not stored in the model; `volinfer convert` stores it)")
    layers, global_ops = model_norm_layers(tm)
    if tm.settings.size_multiple is None and not tm.declared_input.is_static:
        tm.multiple = probe_multiple(tm.model, tm.layout, tm.in_channels)
    # a tile longer than the volume padded to the size multiple would show the model more padding than whole-volume
    # inference does (features computed from padding are not the zeros a convolution pads with): clamp it
    whole = [-(-n // tm.multiple) * tm.multiple for n in shape]
    clamped = tuple(min(t, w) for t, w in zip(tm.tile, whole))
    if clamped != tm.tile and not accepts(tm.model, tm.layout, tm.in_channels, clamped):
        clamped = tm.tile
    choice = TilingChoice(clamped, None, rf, layers, global_ops, mode, notes)  # type: ignore[arg-type]
    choice.tiling_check = stored_tiling_check(tm.settings.extra, rf.radius if rf.measured else None)
    fixed = tm.tile_given or tm.declared_input.is_static or (stitch or tm.settings.stitch or "crop") != "crop"
    if fixed or overlap not in (None, "") or not rf.measured:
        return choice
    per_voxel = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, tm.tile)
    w_mb = weights_mb(tm.model)
    budget = max_memory_mb if max_memory_mb else default_budget_mb()
    preferred = RUNTIME_FLOOR_MB + w_mb + per_voxel * float(np.prod(tm.tile)) / 2**20
    speed = max_memory_mb if max_memory_mb else min(budget, preferred + SPEED_HEADROOM_MB)
    cost, choice.speed_source = planner_voxel_cost(tm)
    best = plan_exact(shape, tm.multiple, rf, tm.tile, per_voxel, w_mb, budget, speed, len(layers),
                      bool(global_ops), mode == "volume", weighed=choice.candidates, voxel_cost=cost)
    if best is None:
        choice.exact_fits = False
        choice.tile = _largest_fitting(tm, per_voxel, w_mb, budget, shape, start=whole)
        choice.overlap = widest_margins(choice.tile, whole, rf, tm.multiple)
        notes.append(f"no exact tiling fits in {budget:.0f} MB: the most faithful tiling within it instead, tile "
                     f"{fmt_tile(choice.tile)} with crop margins {fmt_tile([o // 2 for o in choice.overlap])} "
                     f"(receptive field {rf})" + (", whole-volume statistics" if layers and mode == "volume" else ""))
        return choice
    choice.tile, choice.overlap = best.tile, best.overlap
    if best.tile != tm.tile:
        notes.append(f"tile {fmt_tile(best.tile)} chosen for an exact run (receptive field {rf}, predicted "
                     f"{best.memory_mb:.0f} MB, {best.evaluated / float(np.prod(shape)):.2f}x the volume evaluated)")
    return choice


def planner_voxel_cost(tm: TileModel) -> tuple[Any, str]:
    """The per-voxel cost the planner weighs tilings with, from the model's stored speed profile in the run's
    precision (None: constant), and where it came from (see :func:`volinfer.model.speed_profile.voxel_cost`)."""
    from volinfer.model import speed_profile as sp

    profile = sp.stored(tm.settings.extra)
    here = sp.device_name(tm.core, tm.options.device) if profile is not None else None
    return sp.voxel_cost(profile, tm.precision, tm.options.device, here)


def _largest_fitting(tm: TileModel, per_voxel: float, w_mb: float, budget: float, shape: Sequence[int],
                     start: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The largest tile, at most ``start`` (default: the preferred tile) per axis, predicted to fit ``budget``
    (the longest axis shrinks first); refuses when none does."""
    m = tm.multiple
    tile = [min(t, -(-n // m) * m) for t, n in zip(start or tm.tile, shape)]
    while True:
        need = RUNTIME_FLOOR_MB + w_mb + per_voxel * float(np.prod(tile)) / 2**20
        if need <= budget:
            return tuple(tile)  # type: ignore[return-value]
        if max(tile) <= m:
            raise VolinferError(f"--max-memory {budget:.0f} MB is too small: the smallest tile needs about "
                                f"{need:.0f} MB")
        big = max(tile)
        tile = [max(m, (t - m) if t == big else t) for t in tile]


def widest_margins(tile: Sequence[int], whole: Sequence[int], rf: ReceptiveField,
                   multiple: int) -> tuple[int, int, int]:
    """Overlaps (twice the crop margin) for a tiling that cannot be exact: on every axis cut into tiles, a margin as
    close to the receptive field as a quarter of the tile allows (half of each tile stays its core, so at most twice
    the voxels are evaluated per axis); none on an axis one tile covers."""
    out = []
    for t, w, r in zip(tile, whole, rf.radius):
        reach = r if rf.bounded else t
        out.append(0 if t >= w else 2 * max(0, min(reach, t // 4, (t - multiple) // 2)))
    return tuple(out)  # type: ignore[return-value]


def needs_norm_passes(setup: RunSetup, choice: TilingChoice) -> bool:
    """Whole-volume statistics are gathered in streamed passes only where they change anything: normalisation
    layers, ``volume`` statistics, crop stitching and more than one tile."""
    return bool(choice.norm_layers) and choice.norm_stats == "volume" and setup.stitch == "crop" and \
        len(setup.grid) > 1


def verdict(setup: RunSetup, choice: TilingChoice, frozen: bool) -> Fidelity:
    """Whether the resolved run is exact, and why not."""
    counts = tuple(a.count for a in setup.grid.axes)
    stats = "volume" if frozen else ("tile" if choice.norm_stats == "tile" else "blend")
    fid = judge(setup.overlap, counts, setup.stitch, choice.rf, len(choice.norm_layers), bool(choice.global_ops),
                stats if choice.norm_layers else "volume")
    if fid.exact:
        fid.meaning, fid.deviation = explain_exact(counts, choice.rf, choice.tiling_check,
                                                   unnormalised=setup.normalizer.kind == "none")
    return fid


#: ``--engine auto`` streams only when tiling would evaluate at least this many times the volume: streamed layers
#: run each voxel once but can cost more per voxel than a fused tile (the reference U-Net's, bf16: about 1.5x with
#: planar planes, before planes were stored channels-last; not re-measured since).
STREAM_MIN_EVALUATED = 1.5


def choose_stream(tm: TileModel, shape: Sequence[int], choice: TilingChoice, settings: Any,
                  banded: bool = True) -> None:
    """Set ``choice.stream`` to the :class:`volinfer.run.stream.StreamPlan` this run streams with (left None: tile by
    tile); says why in ``choice.notes`` when auto-selection passes over a streamable model. ``--engine stream`` that
    cannot stream is a one-line error. ``banded``: the output takes bands of y rows (not Zarr stores, which keep
    z-slabs until every row of them is written)."""
    t = settings.tiling
    if t.engine == "tiles":
        return
    asked = t.engine == "stream"
    conflicts = [name for name, on in (("--tile", tm.tile_given), ("--overlap", t.overlap not in (None, "")),
                                       ("--stitch " + str(t.stitch), (t.stitch or "crop") != "crop"),
                                       ("--mirror", bool(t.mirror))) if on]
    per_tile_stats = bool(choice.norm_layers) and choice.norm_stats != "volume"
    if conflicts or choice.global_ops or per_tile_stats:
        if asked:
            why = ", ".join(conflicts) or ("--norm-stats tile (per-tile statistics)" if per_tile_stats else
                                           "reductions over whole tiles (global pooling/statistics)")
            raise VolinferError(f"--engine stream computes whole-volume inference layer by layer; it does not combine "
                                f"with {why} (use --engine tiles)")
        return
    planned = next((c for c in choice.candidates if c.tile == choice.tile and c.overlap == choice.overlap), None)
    evaluated = planned.evaluated / float(np.prod(shape)) if planned is not None else None  # the exact tiling's
    tiled = None if planned is None else evaluated * (1.0 + 0.5 * planned.norm_passes)  # type: ignore[operator]
    stats = _stream_statistics(tm, shape, choice) if choice.norm_layers else (0, 0.0)
    streamed = STREAM_MIN_EVALUATED * (1.0 + stats[1])  # a stream's cost in the same units, before bands
    if not asked and (tiled is None and choice.exact_fits or tiled is not None and tiled < streamed):
        return
    plan = _fit_stream(_planning_model(tm, choice), shape, choice, t.max_memory_mb, asked, banded)
    if plan is None:
        return
    rows = plan.bands(shape[1], tm.multiple)
    redundancy = rows.count * rows.tile / shape[1]  # bands recompute their y margins
    if not asked and tiled is not None and tiled < streamed * redundancy:
        choice.notes.append(f"layer streaming in bands would evaluate {redundancy:.2f}x the rows: tiles instead")
        return
    choice.notes.append(f"{plan.describe(shape[1], tm.multiple)}; predicted peak {plan.peak_mb:.0f} MB"
                        + (f" (tiling would evaluate {evaluated:.2f}x the volume)" if evaluated else "")
                        + ("" if choice.exact_fits else " (no exact tiling fits the memory budget)"))
    if choice.norm_layers:
        choice.notes.append(f"{len(choice.norm_layers)} normalisation layer(s) get whole-volume statistics from "
                            f"{stats[0]} streamed pass(es) of the network before the run (about {stats[1]:.1f}x a "
                            f"run's computation: each pass recomputes the layers before it)")
    choice.stream, choice.stream_passes = plan, stats[0]


def _planning_model(tm: TileModel, choice: TilingChoice) -> TileModel:
    """``tm``, or for a model with normalisation layers the same network with placeholder statistics: the structure
    the stream will run once the statistics are frozen (:func:`volinfer.model.spatial_norm.frozen_like`)."""
    if not choice.norm_layers:
        return tm
    return tm.at(tm.tile, model=frozen_like(tm.model, choice.norm_layers), compile=False)


def _stream_statistics(tm: TileModel, shape: Sequence[int], choice: TilingChoice) -> tuple[int, float]:
    """(passes, cost in runs) of the statistics passes a streamed run of a model with normalisation layers makes
    (:func:`volinfer.run.stream_stats.statistics_cost`); (0, inf) when the model cannot be analysed at the volume."""
    padded = [-(-n // tm.multiple) * tm.multiple for n in shape]
    try:
        return statistics_cost(tm.model, choice.norm_layers, tm.input_shape_for(padded))
    except Exception:  # noqa: BLE001  (a model that rejects the whole volume: the stream plan says why)
        return 0, float("inf")


def _fit_stream(tm: TileModel, shape: Sequence[int], choice: TilingChoice, max_memory_mb: float | None, asked: bool,
                banded: bool) -> Any:
    """The stream plan within the memory budget (whole cross-section, else bands of y rows with margins covering the
    receptive field), its predicted peak set; None (with a note) when auto cannot stream within it."""
    from volinfer.model.stream_graph import NotStreamable
    from volinfer.run.stream import plan_stream

    fixed = RUNTIME_FLOOR_MB + weights_mb(tm.model)
    cap = max_memory_mb or min(default_budget_mb(), stream_default_cap_mb(tm))
    rf = choice.rf
    margin = rf.radius[1] if banded and rf is not None and rf.measured and rf.bounded else None
    try:
        plan = plan_stream(tm, tuple(shape), tm.precision, fits=lambda p: fixed + p.memory_mb <= cap,  # type: ignore
                           margin_y=margin)
    except NotStreamable as e:
        if asked:
            raise VolinferError(f"--engine stream: this model cannot be streamed ({e}); use --engine tiles") from None
        choice.notes.append(f"layer streaming not possible ({e}): tiles instead")
        return None
    plan.peak_mb = fixed + plan.memory_mb
    if plan.peak_mb > cap and not asked:
        choice.notes.append(f"layer streaming would need about {plan.peak_mb:.0f} MB (> {cap:.0f} MB): tiles instead")
        return None
    if asked and max_memory_mb and plan.peak_mb > max_memory_mb:
        raise VolinferError(f"--engine stream needs about {plan.peak_mb:.0f} MB for this cross-section, more than "
                            f"--max-memory {max_memory_mb:.0f} MB (use --engine tiles)")
    return plan


def stream_verdict(setup: RunSetup, choice: TilingChoice) -> Fidelity:
    """A streamed run's verdict. One band over the whole cross-section is whole-volume inference (on the volume padded
    to the size multiple, as tiling's reference is): no tiling deviation to quote. Bands along y are tiles along y
    with crop margins covering the receptive field: the tiled verdict, with its measured deviation."""
    if setup.grid.axes[1].count == 1:
        return Fidelity(True, meaning="exact: whole-volume inference, computed layer by layer along z (every voxel "
                                      "of every layer once; no tile margins)")
    counts = (1, setup.grid.axes[1].count, 1)  # rows of output planes along z are not tiles: only y is cut
    fid = judge(setup.overlap, counts, setup.stitch, choice.rf, 0, False, "volume")
    if fid.exact:
        meaning, fid.deviation = explain_exact(counts, choice.rf, choice.tiling_check,
                                               unnormalised=setup.normalizer.kind == "none")
        fid.meaning = f"layer by layer along z in {counts[1]} bands along y; {meaning}"
    return fid


#: What a default streamed run may take above the runtime and the weights (plane buffers plus OpenVINO's memory for
#: the segments): a 512³ volume through the reference U-Net streams in about 540 MB of it.
STREAM_HEADROOM_MB = 768.0


def stream_default_cap_mb(tm: TileModel) -> float:
    """A default streamed run's memory cap (without --max-memory): the runtime, the weights and
    :data:`STREAM_HEADROOM_MB`; larger cross-sections run tile by tile."""
    return RUNTIME_FLOOR_MB + weights_mb(tm.model) + STREAM_HEADROOM_MB
