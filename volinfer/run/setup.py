"""Resolving a run's settings against a model and a volume, once, for every way of running (file, array, Zarr,
plan): stitching, activation, output spec, overlap, grid, and the whole-volume passes (NaN/Inf, statistics, range)."""

from __future__ import annotations

import math
import time
from functools import partial
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from volinfer import portable
from volinfer.model.activation import graph_activation
from volinfer.run.checks import check_input_range, check_nonfinite, needs_value_scan
from volinfer.run.prepass import ContentDigest, PrePass, ValueScan
from volinfer.errors import VolinferError
from volinfer.run.fidelity import (Fidelity, Tiling, TilingProblem, explain_exact, fmt_tile, judge, leanest_near_fastest,
                                   plan_exact)
from volinfer.model.memory import (RUNTIME_FLOOR_MB, accepts, activation_bytes_per_voxel, default_budget_mb,
                                   probe_multiple, weights_mb)
from volinfer.model.graph_reach import stride_period
from volinfer.model.receptive_field import ReceptiveField, measure_receptive_field
from volinfer.model.spatial_norm import (POSITION_OPS, NormLayer, find_norm_layers, fixed_shape_global_ops,
                                         frozen_like)
from volinfer.model.tiling_check import stored as stored_tiling_check, unfaithful
from volinfer.tiling.geometry import GeometryError, TileGrid, plan_axis_crop
from volinfer.model.layout import Layout
from volinfer.model.tile_model import TileModel
from volinfer.run.normalize import Normalizer
from volinfer.run.own_size import judged
from volinfer.run.postprocess import OutputSpec
from volinfer.run.stream import NOMINAL_VOXEL_S
from volinfer.run.stream_stats import StatsPlan, statistics_plan
from volinfer.run.tile_buffers import TileBuffers, tile_need_mb
from volinfer.io.reader import VolumeSource
from volinfer.options import NORM_STATS, STITCH_MODES, format_mb, parse_overlap
from volinfer.run.settings import RunSettings, TilingSettings
from volinfer.model.precision import outside_checked
from volinfer.model import speed_profile
from volinfer.model.stream_graph import NotStreamable
from volinfer.run.stream import fixed_mb, output_rows_mb, plan_stream, staging_mb
from volinfer.run import skewed_bands
from volinfer.run.skewed_bands import SKEW_VOXEL_COST, skew_options

DEFAULT_OVERLAP = 0.25


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
    mirror: tuple[int, ...] = ()  # volume axes of test-time mirroring


def resolve(tm: TileModel, shape: Sequence[int], channels: int, settings: Any = None, *,
            overlap: Any = None, normalizer: Normalizer | None = None, stream: Any = None) -> RunSetup:
    """Everything that follows from the run's settings (:class:`volinfer.run.settings.RunSettings`), the model's
    stored settings and the volume's shape (no I/O). ``overlap``: the planned one, else the settings'. ``stream``:
    the stream plan, if the run streams (its bands along y are the grid's y axis).
    ``normalizer``: the one the input scan fitted (:func:`scan_input`), else a new one."""
    s = settings or RunSettings()
    o = s.output
    stitch = s.tiling.stitch
    overlap = s.tiling.overlap if overlap is None else overlap
    st = tm.settings
    stitch = stitch or st.stitch or "crop"
    if stitch not in STITCH_MODES:
        raise VolinferError(f"stitch must be one of {', '.join(STITCH_MODES)}; got {stitch!r}")
    if s.tiling.sigma is not None and stitch != "gaussian":
        why = "" if s.tiling.stitch else " (stored in the model)" if st.stitch else " (the default)"
        raise VolinferError(f"--sigma shapes gaussian stitching's weights; this run stitches by {stitch}{why}: drop "
                            f"--sigma, or pass --stitch gaussian")
    if channels != tm.in_channels:
        raise VolinferError(f"the volume has {channels} channel(s) but the model expects {tm.in_channels} "
                            f"(give one 3-D file per channel, or one 4-D file)")
    spec, note = output_spec(tm, o)
    activation = spec.activation
    ov_vox = overlap_voxels(parse_overlap(overlap) or default_overlap(tm, stitch), tm.tile)
    try:
        grid = TileGrid.build(shape, tm.tile, [tm.multiple] * 3, ov_vox, "crop" if stitch == "crop" else "blend")
    except GeometryError as e:
        raise VolinferError(str(e)) from None
    if stream is not None:  # a stream's bands along y are its own (skewed bands need not be of equal width)
        grid = replace(grid, axes=(grid.axes[0], stream.bands(shape[1], tm.multiple), grid.axes[2]))
    normalizer = normalizer or make_normalizer(tm, s, channels)
    return RunSetup(stitch, activation, spec, ov_vox, grid, normalizer, notes=[note] if note else [],
                    mirror=tuple(s.tiling.mirror))


def output_spec(tm: TileModel, o: Any) -> tuple[OutputSpec, str | None]:
    """What the run writes (``o``: the settings' :class:`volinfer.run.settings.OutputSettings`), and the note saying
    where its activation came from (None when nothing needs saying)."""
    activation, note = resolve_activation(tm, o.activation)
    spec = OutputSpec(tm.out_channels, kind=o.kind, activation=activation,
                      keep=tuple(o.channels) if o.channels is not None else None, threshold=o.labels_threshold,
                      float_dtype=o.prob_dtype)
    _refuse_unused_output_options(spec, o)
    return spec, note


def _refuse_unused_output_options(spec: OutputSpec, o: Any) -> None:
    """``--threshold`` and ``--channels`` where they cannot change the output, refused in one line rather than
    ignored: labels of several softmax (or raw) channels are their argmax, which neither a threshold nor a choice
    of channels enters; probabilities and raw outputs are never thresholded."""
    channels = (f"this model's {spec.model_channels} channels ("
                f"{spec.activation if spec.activation != 'none' else 'activation none'})")
    if o.threshold is not None and not spec.masks:
        why = (f"--kind {spec.kind} is not thresholded" if spec.kind != "labels" else
               f"labels of {channels} are their argmax")
        raise VolinferError(f"--threshold applies to one-channel or sigmoid labels; {why}: drop --threshold")
    if o.channels is not None and spec.kind == "labels" and not spec.masks:
        raise VolinferError(f"--channels selects the channels of probabilities or raw outputs (or of sigmoid labels); "
                            f"labels of {channels} are the argmax over all of them: drop --channels, or pass --kind "
                            f"probabilities")


def tile_buffers(tm: TileModel, shape: Sequence[int], settings: Any, stored: tuple[int, str]) -> TileBuffers:
    """The tiles engine's buffers for a run of ``tm`` on a volume of ``shape`` stored as ``stored`` (bytes a voxel,
    what its readers hold: :func:`volinfer.io.reader.read_buffer`): the output it writes as :func:`resolve` will set
    it, the requests, constant-tile reuse and mirroring the settings ask for."""
    s = settings or RunSettings()
    spec = output_spec(tm, s.output)[0]
    return TileBuffers(tuple(int(n) for n in shape), tm.in_channels, stored[0], stored[1],  # type: ignore[arg-type]
                       spec.out_channels, spec.dtype.itemsize, tm.out_channels, max(1, s.runtime.requests),
                       s.tiling.reuse_constant, bool(s.tiling.mirror))


def written_bytes(tm: TileModel, settings: Any) -> int:
    """Bytes a voxel of the output the run writes (its channels times their item size: 1 for labels)."""
    spec = output_spec(tm, (settings or RunSettings()).output)[0]
    return spec.out_channels * spec.dtype.itemsize


def make_normalizer(tm: TileModel, settings: Any, channels: int) -> Normalizer:
    """The run's input normalisation: ``--normalize``, else the model's stored one (not fitted yet)."""
    normalize = settings.input.normalize
    return Normalizer(normalize if normalize is not None else tm.settings.normalization, channels)


@dataclass
class InputScan:
    """What the one pre-pass over the input found (:func:`scan_input`), before anything is planned: the fitted
    normaliser, NaN/Inf count and fill, the largest normalised |value|, content digests, passes made."""

    normalizer: Normalizer
    nonfinite: int = 0
    nan_fill: list[float] | None = None
    input_abs_max: float | None = None
    digests: list[str] | None = None
    input_passes: int = 0

    def apply(self, setup: RunSetup) -> None:
        """Hand the findings to the resolved run."""
        setup.normalizer, setup.nonfinite, setup.nan_fill = self.normalizer, self.nonfinite, self.nan_fill
        setup.input_abs_max, setup.digests, setup.input_passes = self.input_abs_max, self.digests, self.input_passes


def scan_input(tm: TileModel, source: VolumeSource, normalizer: Normalizer, nan_value: float | None,
               fingerprint: bool = False) -> InputScan:
    """Everything that needs the whole input before inference, in ONE streamed pass (none when nothing asks):
    NaN/Inf policy and value range (:mod:`volinfer.run.checks`), normalisation statistics, and the content fingerprint
    that keys ``--resume`` (``fingerprint``). Independent of the tiling, so it runs before planning: the precision
    guard (:func:`guard_for`) decides from it, and the run is planned in the precision that will run."""
    pre = PrePass(source, tm.tile[2])
    wanted = needs_value_scan(source.readers, tm.input_dtype) or tm.auto_reduced  # the range guards auto precision
    values = ValueScan(source.channels) if wanted else None
    digest = ContentDigest(source.channels) if fingerprint else None
    pre.add(values)
    pre.add(normalizer.statistics(source))
    pre.add(digest)
    scan = InputScan(normalizer, input_passes=pre.run(), digests=digest.digests if digest else None)
    if values is not None:
        scan.nonfinite = check_nonfinite(values, nan_value)
        check_input_range(values, source.readers, normalizer, tm.input_dtype)
        scan.input_abs_max = _normalised_abs_max(values, source, normalizer)
    if scan.nonfinite:
        scan.nan_fill = [normalizer.normalized(nan_value, c) for c in range(source.channels)]  # type: ignore[arg-type]
    return scan


def _normalised_abs_max(values: ValueScan, source: VolumeSource, normalizer: Normalizer) -> float | None:
    ends = [abs(normalizer.normalized(v * r.slope + r.inter, c))
            for c, r in enumerate(source.readers) if values.lo[c] <= values.hi[c] for v in (values.lo[c], values.hi[c])]
    return max(ends) if ends else None


def guard_for(tm: TileModel, input_abs_max: float | None, compile: bool = False) -> TileModel:
    """``--precision auto`` chose a reduced precision from a verdict measured on calibration inputs; when this
    volume's normalised values (largest |value| ``input_abs_max``, from :func:`scan_input`) reach far beyond those,
    the verdict does not cover it: f32 instead, saying why (:func:`volinfer.model.precision.outside_checked`).
    Decided before planning: memory and time are planned in the precision that runs."""
    if input_abs_max is None or not tm.auto_reduced:
        return tm
    why = outside_checked(tm.settings.extra.get("precision_check"), input_abs_max)
    if why is None:
        return tm
    return tm.with_precision("f32", f"{tm.precision} not verified for this input: {why}; store a normalisation "
                                    f"(`volinfer convert --normalize`) or check on such data (`--calibration-volume`)",
                             compile=compile)


def needs_input_scan(tm: TileModel) -> bool:
    """Whether planning must see the input first: ``--precision auto`` chose a reduced precision that the input's
    range may overrule (:func:`guard_for`)."""
    return tm.auto_reduced and bool(tm.settings.extra.get("precision_check"))


def resolve_activation(tm: TileModel, explicit: str | None) -> tuple[str, str | None]:
    """The activation to apply, read from the graph before any default: a model that already ends in Softmax or
    Sigmoid gets none (a second one changes labels and probabilities); LogSoftmax outputs get softmax, which is
    exactly exp() of them. ``--activation`` always wins. Returns (activation, note for the summary)."""
    if explicit:
        return explicit, None
    graph = graph_activation(tm.model, tm.output_index, channel_axis=Layout.of(tm.layout).channel_axis)
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
    budget_mb: float | None = None  # the memory budget planned in (--max-memory, else the machine's default)
    voxel_cost: Any = None  # the planner's per-voxel cost (planner_voxel_cost), None: constant
    planned: Tiling | None = None  # the tiling the planner chose (None: a fixed tile, or none fits)
    stream_option: Any = None  # (StreamPlan, predicted cost) weighed against ``planned``, chosen or not
    stream_alternatives: list[Any] = field(default_factory=list)  # (StreamPlan, cost): other bands it beat
    tile_note: str | None = None  # the note saying which tile was planned (dropped when the run streams instead)
    probe_mb: float | None = None  # predicted peak of the largest receptive-field probe made while planning
    preferred: tuple[int, int, int] | None = None  # the model's own tile (clamped to the volume)
    stream_passes: int = 0  # streamed normalisation-statistics passes before a streamed run
    stream_checkpoint_mb: float = 0.0  # the most disk their checkpoints hold at once (0: they recompute)
    exact_fits: bool = True  # False: the planner found no exact tiling within the budget
    refusal: str | None = None  # no tile fits --max-memory: the error, raised unless the run streams instead
    padding: Any = None  # the volume's own size against the size multiple (volinfer.run.own_size.Padding), None: none


def stored_receptive_field(tm: TileModel) -> ReceptiveField | None:
    """The receptive field stored in the model's settings, if any."""
    s = tm.settings
    if not s.receptive_field:
        return None
    bounded = s.extra.get("receptive_field_bounded", True) not in (False, "false")
    radius = tuple(int(v) for v in s.receptive_field)
    why = unfaithful(stored_tiling_check(s.extra, radius))  # then only one tile (or the stream) is exact
    return ReceptiveField(radius, bool(bounded) and why is None, reason=why or "")  # type: ignore[arg-type]


#: Receptive fields measured in this process, by model file and budget (:func:`_measured_key`): a command that plans
#: one volume twice (a Zarr store weighed for the stream, then run block by block) probes a model storing none once.
_MEASURED: dict[tuple, ReceptiveField] = {}


def _measured_key(tm: TileModel, budget: float) -> tuple | None:
    """What a measured receptive field depends on: the model file (path, size, modification time), its layout and
    output, the tile it was probed from, the budget; None for a model that is no file (not cached)."""
    if tm.path is None:
        return None
    try:
        st = tm.path.stat()
    except OSError:
        return None
    return str(tm.path.resolve()), st.st_size, st.st_mtime_ns, tm.layout, tm.output_index, tuple(tm.tile), budget


def _measure_once(tm: TileModel, budget: float, probed: list[float], notes: list[str]) -> ReceptiveField:
    """The receptive field of a model that stores none, probed within ``budget`` (the probes' predicted peaks into
    ``probed``) unless this process already did (:data:`_MEASURED`); said in ``notes``."""
    t0 = time.perf_counter()
    key = _measured_key(tm, budget)
    rf = _MEASURED.get(key) if key is not None else None
    if rf is None:
        rf = measure_receptive_field(tm, max_memory_mb=budget, fits=probe_fits(tm, budget, probed))
        if key is not None:
            _MEASURED[key] = rf
    notes.append(f"receptive field {rf} measured now in {time.perf_counter() - t0:.1f} s (not stored in the "
                 f"model; `volinfer convert` stores it)")
    return rf


def storing_receptive_field(handle: TileModel, rf: ReceptiveField | None) -> TileModel:
    """``handle`` storing the receptive field ``rf`` that planning measured (as `volinfer convert` stores one), so
    that planning it again does not measure it again; ``handle`` itself when it stores one already."""
    if rf is None or not rf.measured or stored_receptive_field(handle) is not None:
        return handle
    model = handle.model.clone()
    st = handle.settings
    replace(st, receptive_field=list(rf.radius),
            extra={**st.extra, "receptive_field_bounded": bool(rf.bounded)}).to_model(model)
    return handle.at(handle.tile, model=model, compile=False)


#: The largest tile edge the normalisation-layer search reshapes the model to (:func:`model_norm_layers`).
NORM_PROBE_EDGE = 256


def model_norm_layers(tm: TileModel) -> tuple[list[NormLayer], list[str]]:
    """Spatial normalisation layers (and unfreezable spatial reductions) of the model, found at its tile (at most
    :data:`NORM_PROBE_EDGE` a side: which axes an op reduces does not depend on the size, and shape inference at a
    forced ``--tile 2000`` and twice that ran out of memory)."""
    m = max(1, tm.multiple)
    tile = [t if t <= NORM_PROBE_EDGE else max(m, NORM_PROBE_EDGE // m * m) for t in tm.tile]
    try:
        return find_norm_layers(tm.model, tm.layout, tm.in_channels, tile)
    except Exception:  # a fixed-shape model cannot be probed at other sizes: read the ops at its own shape instead
        return [], fixed_shape_global_ops(tm.model, tm.layout)


def plan_tiling(tm: TileModel, shape: Sequence[int], tiling: TilingSettings, *, norm_stats: str | None = None,
                defer_refusal: bool = False, buffers: TileBuffers | None = None) -> TilingChoice:
    """Faithfulness first: unless the tile was fixed, the fastest exact crop tiling within the memory budget, counting
    the tiles engine's ``buffers`` (:func:`tile_buffers`); see :mod:`volinfer.run.fidelity`. ``tiling``: the run's
    settings (``norm_stats`` overrides its own); test-time mirroring runs one tile (frozen statistics are not exact
    with it). ``defer_refusal``: when no tile fits ``--max-memory``, the smallest tile with ``choice.refusal`` set
    (the caller raises it unless the run streams within the budget)."""
    stitch, overlap, max_memory_mb, mirror = tiling.stitch, tiling.overlap, tiling.max_memory_mb, bool(tiling.mirror)
    mode = norm_stats or tiling.norm_stats or tm.settings.extra.get("norm_stats") or "volume"
    if mode not in NORM_STATS:
        raise VolinferError(f"norm-stats must be one of {', '.join(NORM_STATS)}; got {mode!r}")
    rf = stored_receptive_field(tm)
    notes: list[str] = []
    probed: list[float] = []  # predicted peaks of the receptive-field probes made
    budget = max_memory_mb if max_memory_mb else default_budget_mb(weights_mb(tm.model))
    if rf is None:
        rf = _measure_once(tm, budget, probed, notes)
    notes += [n for n in [unconverted_note(tm)] if n]
    layers, global_ops = model_norm_layers(tm)
    tm = with_run_multiple(tm)  # (the caller's model is left as it is: volinfer.run.pipeline.plan sizes it first)
    check_overlap_fits(tm, overlap, stitch or tm.settings.stitch or "crop")
    # a tile longer than the volume padded to the size multiple would show the model more padding than whole-volume
    # inference does (features computed from padding are not the zeros a convolution pads with): clamp it
    whole = [-(-n // tm.multiple) * tm.multiple for n in shape]
    clamped = tuple(min(t, w) for t, w in zip(tm.tile, whole))
    if clamped != tm.tile and not accepts(tm.model, tm.layout, tm.in_channels, clamped):
        clamped = tm.tile
    choice = TilingChoice(clamped, None, rf, layers, global_ops, mode, notes)  # type: ignore[arg-type]
    choice.probe_mb, choice.preferred = max(probed, default=None), clamped
    choice.tiling_check = stored_tiling_check(tm.settings.extra, rf.radius if rf.measured else None)
    if tm.tile_given or tm.declared_input.is_static or (stitch or tm.settings.stitch or "crop") != "crop":
        return choice  # a fixed tile
    per_voxel, w_mb = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, tm.tile), weights_mb(tm.model)
    if overlap not in (None, "") or not rf.measured:  # nothing to plan for exactness; the budget still holds
        spec = parse_overlap(overlap) or default_overlap(tm, "crop")
        need = _tile_need(per_voxel, w_mb, buffers, partial(overlap_voxels, spec), tm.multiple)
        if need(choice.tile) > budget:
            choice.tile = _largest_fitting(tm, need, budget, shape, bool(max_memory_mb),
                                           defer_to=choice if defer_refusal else None)
        return choice
    cost, choice.speed_source = planner_voxel_cost(tm)
    best = plan_exact(TilingProblem(shape, tm.multiple, rf, tm.tile, per_voxel, w_mb, budget, len(layers),
                                    bool(global_ops), mode == "volume" and not mirror, cost, buffers),
                      choice.candidates)
    choice.budget_mb, choice.voxel_cost, choice.planned = budget, cost, best
    if best is None:
        choice.exact_fits = False
        need = _tile_need(per_voxel, w_mb, buffers, lambda t: widest_margins(t, whole, rf, tm.multiple), tm.multiple)
        choice.tile = _largest_fitting(tm, need, budget, shape, bool(max_memory_mb), start=whole,
                                       defer_to=choice if defer_refusal else None)
        choice.overlap = widest_margins(choice.tile, whole, rf, tm.multiple)
        _note_most_faithful(choice, budget, bool(layers) and mode == "volume")
        return choice
    choice.tile, choice.overlap = best.tile, best.overlap
    if best.tile != tm.tile:
        _note_planned(choice, best, shape)
    return choice


def _note_most_faithful(choice: TilingChoice, budget: float, whole_stats: bool) -> None:
    """Say that no exact tiling fits and which tiling runs instead (the note goes if the run streams instead)."""
    choice.tile_note = (f"no exact tiling fits in {budget:.0f} MB: the most faithful tiling within it instead, tile "
                        f"{fmt_tile(choice.tile)} with crop margins {fmt_tile([o // 2 for o in choice.overlap])} "
                        f"(receptive field {choice.rf})" + (", whole-volume statistics" if whole_stats else ""))
    choice.notes.append(choice.tile_note)


def _note_planned(choice: TilingChoice, best: Tiling, shape: Sequence[int]) -> None:
    """Say which tile the planner chose (the note goes if the run streams instead)."""
    evaluated = best.evaluated / float(np.prod(shape))
    choice.tile_note = (f"tile {fmt_tile(best.tile)} chosen for an exact run (receptive field {choice.rf}, predicted "
                        f"{best.memory_mb:.0f} MB, {evaluated:.2f}x the volume evaluated)")
    choice.notes.append(choice.tile_note)


def check_overlap_fits(tm: TileModel, overlap: Any, stitch: str) -> None:
    """An ``--overlap`` that leaves no room in the tile asked for is a wrong option, refused whatever the volume;
    checked against the tile before it is clamped to a small volume (where one tile per axis needs no margin, see
    :func:`volinfer.tiling.geometry.plan_axis_crop`)."""
    items = parse_overlap(overlap)
    if not items:
        return
    for axis, (item, o, t) in enumerate(zip(items, overlap_voxels(items, tm.tile), tm.tile)):
        room = (t - 2 * (o // 2)) // tm.multiple * tm.multiple if stitch == "crop" else t - o
        if room <= 0:
            given = f"{item:g} ({o} voxels)" if item < 1 else f"{o}"  # a fraction as typed, with what it came to
            raise VolinferError(f"--overlap {given} leaves no room in a tile of {t} along {'xyz'[axis]}: need tile - "
                                f"overlap >= {tm.multiple if stitch == 'crop' else 1}; give a smaller overlap")


#: Bytes per voxel and output channel the receptive-field probe holds beside the compiled model: the output tensor
#: (f32) and the probe's float64 base output, perturbed output, their difference and its absolute value.
PROBE_OUTPUT_BYTES = 4 + 4 * 8


def probe_fits(tm: TileModel, budget_mb: float, probed: list[float] | None = None) -> Any:
    """Whether a receptive-field probe at a tile fits ``budget_mb``: the runtime, the weights, the model's live
    tensors in f32 (the probe runs f32) and the probe's own copies of the output (:data:`PROBE_OUTPUT_BYTES`).
    ``probed`` receives the predicted peak of each tile that fits (the probe measures every such tile)."""
    try:
        per_voxel = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, tm.tile)
    except Exception:  # a model that cannot be reshaped: the probe says so itself
        return None
    fixed = RUNTIME_FLOOR_MB + weights_mb(tm.model)
    per_voxel += PROBE_OUTPUT_BYTES * tm.out_channels + 4 * tm.in_channels

    def fits(tile: Sequence[int]) -> bool:
        need = fixed + per_voxel * float(np.prod(tile)) / 2**20
        if need <= budget_mb and probed is not None:
            probed.append(need)
        return need <= budget_mb

    return fits


def unconverted_note(tm: TileModel) -> str | None:
    """Why a model file that `volinfer convert` did not write (an ONNX file, a plain IR) costs more to run than its
    converted IR: what convert measures once and stores is probed or assumed on every run. None when nothing is
    missing."""
    s = tm.settings
    missing = [what for what, absent in (
        ("receptive field (probed now, every run)", not s.receptive_field),
        ("size multiple (probed now)", s.size_multiple is None and not tm.declared_input.is_static),
        ("precision verdict (auto runs f32)", tm.options.precision == "auto" and not s.extra.get("precision_check")),
        ("speed profile (tilings ranked by voxels alone)", speed_profile.stored(s.extra) is None)) if absent]
    if len(missing) < 2:
        return None
    name = tm.path.name if tm.path is not None else "the model"
    return (f"{name} stores none of what `volinfer convert` measures once: {', '.join(missing)}; a converted IR "
            f"runs without these costs (`volinfer convert {name} -o model.xml`)")


def with_run_multiple(tm: TileModel) -> TileModel:
    """``tm`` with the size multiple runs plan with: the stored one, else (an ONNX file, a plain IR) the one found
    by :func:`run_multiple`."""
    return tm if tm.multiple_known else tm.with_multiple(run_multiple(tm))


def run_multiple(tm: TileModel) -> int:
    """The size multiple of a model that stores none (an ONNX file, a plain IR): the smallest size step it accepts,
    raised to its stride period read from the graph (:func:`volinfer.model.graph_reach.stride_period`), as `volinfer
    convert` stores it: a model that accepts any size still pools fixed voxel groups, and crop tiles starting
    between them are not whole-volume inference (an odd offset moved outputs by 0.4 of a 1.2 range)."""
    m = probe_multiple(tm.model, tm.layout, tm.in_channels) or 1
    period = stride_period(tm.model, tm.layout, tm.in_channels, tm.tile)
    return math.lcm(m, *period) if period else m


def overlap_for(choice: TilingChoice, tm: TileModel) -> list[float] | None:
    """With a fixed tile and no overlap asked for: twice the receptive field (crop margins that cover it) when it
    fits in the tile, else None (the stored or default overlap)."""
    rf = choice.rf
    if rf is None or not rf.measured or not rf.bounded or tm.settings.overlap is not None:
        return None
    if all(2 * r + tm.multiple <= t for r, t in zip(rf.radius, tm.tile)):
        return [float(2 * r) for r in rf.radius]
    return None


def planner_voxel_cost(tm: TileModel) -> tuple[Any, str]:
    """The per-voxel cost the planner weighs tilings with, from the model's stored speed profile in the run's
    precision (None: constant), and where it came from (see :func:`volinfer.model.speed_profile.voxel_cost`)."""
    profile = speed_profile.stored(tm.settings.extra)
    here = speed_profile.device_name(tm.core, tm.options.device) if profile is not None else None
    cost, source = speed_profile.voxel_cost(profile, tm.precision, tm.options.device, here)
    if cost is None or profile is None:
        return cost, source
    largest = float(max(v for v, _ in profile.points))

    def bounded(voxels: float) -> float:
        """Beyond the largest tile measured the profile has no data, and huge tiles do cost more per voxel: rising
        linearly in log2(voxels) to :data:`HUGE_TILE_COST` x the last measured cost over
        :data:`UNMEASURED_DOUBLINGS` doublings, flat after."""
        beyond = min(1.0, max(0.0, np.log2(max(voxels, 1.0) / largest)) / UNMEASURED_DOUBLINGS)
        return cost(voxels) * (1.0 + (HUGE_TILE_COST - 1.0) * beyond)

    return bounded, source + f"; beyond the largest tile measured ({largest / 1e6:.1f} Mvox) rising to " \
                             f"{HUGE_TILE_COST:g}x over {UNMEASURED_DOUBLINGS} doublings"


def _crop_counts(shape: Sequence[int], tile: Sequence[int], overlap: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Crop tiles of ``tile`` with ``overlap`` along each axis of ``shape``, as the tile grid places them (an axis
    the geometry refuses, which the run's grid then refuses in one line, counts its tiles without overlap)."""
    counts = []
    for n, t, o in zip(shape, tile, overlap):
        try:
            counts.append(plan_axis_crop(n, t, multiple, o // 2).count)
        except GeometryError:
            counts.append(max(1, -(-n // max(1, t))))
    return tuple(counts)


def _tile_need(per_voxel: float, w_mb: float, buffers: TileBuffers | None,
               overlap_of: Callable[[Sequence[int]], Sequence[int]], multiple: int) -> Callable[[Sequence[int]], float]:
    """A tiling's predicted memory (MB) at a tile: the model's estimate (``per_voxel`` bytes a tile voxel, ``w_mb`` of
    weights), plus the tiles engine's ``buffers`` for the crop overlap ``overlap_of(tile)`` (None: the model alone)
    on a grid of the size ``multiple``."""
    def need(tile: Sequence[int]) -> float:
        if buffers is None:
            return tile_need_mb(per_voxel, w_mb, None, tile, (0, 0, 0), (1, 1, 1))
        overlap = overlap_of(tile)
        return tile_need_mb(per_voxel, w_mb, buffers, tile, overlap,
                            _crop_counts(buffers.shape, tile, overlap, multiple))
    return need


def _largest_fitting(tm: TileModel, need_at: Callable[[Sequence[int]], float], budget: float, shape: Sequence[int],
                     given: bool, start: Sequence[int] | None = None,
                     defer_to: TilingChoice | None = None) -> tuple[int, int, int]:
    """The largest tile, at most ``start`` (default: the preferred tile) per axis, whose predicted memory
    (``need_at``: :func:`_tile_need`) fits ``budget`` (the longest axis shrinks first). When none does: refused under a ``given`` budget (``--max-memory``; ``defer_to``: the
    refusal left in its ``refusal`` with the smallest tile); under the default one, the smallest tile still runs
    when it fits the machine's memory (:func:`volinfer.portable.machine_mb`): a run is refused only when it cannot
    fit what the machine has."""
    m = tm.multiple
    tile = [min(t, -(-n // m) * m) for t, n in zip(start or tm.tile, shape)]
    while True:
        need = need_at(tile)
        if need <= budget:
            return tuple(tile)  # type: ignore[return-value]
        if max(tile) <= m:
            if given:
                refusal = f"--max-memory {format_mb(budget)} is too small: the smallest tile needs about {need:.0f} MB"
                if defer_to is None:
                    raise VolinferError(refusal)
                defer_to.refusal = refusal
                return tuple(tile)  # type: ignore[return-value]
            if need > portable.machine_mb():
                raise VolinferError(f"this model needs about {need:.0f} MB even at tile {fmt_tile(tile)}, more than "
                                    f"this machine's {portable.machine_mb():.0f} MB")
            return tuple(tile)  # type: ignore[return-value]
        tile = _shrink_one(tile, m, need_at)


def _shrink_one(tile: Sequence[int], m: int, need_at: Callable[[Sequence[int]], float]) -> list[int]:
    """The next tile down :func:`_largest_fitting`'s search: the longest axis shortened by one size multiple ``m``;
    where several axes are the longest, only the one whose shortening frees the most memory (``need_at``). Shortening
    every tied axis at once stepped from 32³ to 24³ (2.4x fewer voxels, 308 tiles instead of 48) where a probabilities
    run's buffers put 32³ 0.8 MB over the budget that a labels run's fitted: the fallback then depended on --kind far
    more than its memory does."""
    big = max(tile)
    options = [[t - m if a == i else t for a, t in enumerate(tile)] for i in range(len(tile)) if tile[i] == big]
    return min(options, key=need_at)


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
    if setup.mirror and choice.norm_layers and any(c > 1 for c in counts):
        # each flip of the volume has its own statistics (flipped kernels, a strided layer's other sampling grid),
        # which whole-volume mirrored inference uses; tiles can only use the unflipped volume's (or their own)
        fid.exact = False
        fid.reasons.append(f"test-time mirroring with {len(choice.norm_layers)} normalisation layer(s): each flip "
                           f"of the volume has its own statistics, tiles use the unflipped volume's (one tile over "
                           f"the volume is exact)")
    if fid.exact:
        fid.meaning, fid.deviation = explain_exact(counts, choice.rf, choice.tiling_check,
                                                   unnormalised=setup.normalizer.kind == "none")
    return judged(fid, choice.padding, [a.padded for a in setup.grid.axes])


#: Doublings of the tile's voxels beyond the largest tile the speed profile measured over which the planner raises
#: the per-voxel cost to HUGE_TILE_COST x the last measured one (the profile clamps; huge tiles are slower per
#: voxel: reference U-Net, 512³ bf16, the same loaded 2-core machine: 2 tiles of 512x512x304 busy 54.9 s for 159 M
#: evaluated voxels, the stream 28.2 s for 134 M; the profile measured up to 128³ predicted the tiles 1.26x faster).
UNMEASURED_DOUBLINGS = 3.0
#: See UNMEASURED_DOUBLINGS. (Checked since: the reference U-Net's one 256³ tile, bf16, predicted 1.1 s against
#: 1.20-1.23 s of inference measured.)
HUGE_TILE_COST = 1.5

#: A streamed voxel's cost over a tiled voxel's at the model's tile: the stream's predicted time is this x the voxels
#: it evaluates x the tile's per-voxel cost (then its bands' calls and file traffic). Fitted to the reference U-Net's
#: inference (bf16, channels-last planes, one fresh process each, this 2-core machine, code cd2cde5), against the
#: voxels x the cost at its 128³ tile that ``volinfer plan`` scales to the latency it measures: 256³ 0.81-0.97 s
#: (0.71-0.85x), 512³ 6.5-6.8 s (0.77-0.81x), 2048³ in 8 bands 409.4-409.9 s (0.74x, 1.05x the voxels' cost for
#: skewed bands); f32 at 128³ and 192³ 0.2 and 0.8 s (0.67 and 0.8x; benchmarks/plan_vs_run.py). It was 1.5 until
#: the stream's planes went channels-last and its copies into one buffer: the planner then ranked one 256³ tile (2.3-
#: 2.4 s, 901 MiB) before the stream (2.0-2.3 s, 256 MiB).
STREAM_VOXEL_COST = 0.75


#: Seconds a segment call costs besides its voxels (Python's bookkeeping around it, OpenVINO's own per call), counted
#: for every call a stream makes (a band streams the volume's whole depth through every segment, so N bands make N
#: times the calls of one, each over 1/N of the rows). Measured on the reference U-Net, bf16, forced band counts,
#: fresh processes alternating (benchmarks/band_counts.py, code 138ed2d): 2048x2048x512 in 8 bands unspilled, 12 and
#: 16 spilled took 142.7/139.4, 147.3/143.9 and 146.6/138.7 s for 23808, 35328 and 47488 calls (inference
#: 104.9/104.8, 105.5/103.4, 104.9/100.5 s); 2048x2048x128 in 8, 12 and 16 spilled 38.4-39.2, 39.0-40.2 and 37.4-43.0
#: s for 5952, 8832 and 11872 calls. Less the spills' predicted traffic, -0.1 and +0.3 ms a call: 0.2 ms taken. At
#: 256³ (976 calls, one band) the stream's wall beyond its inference exceeded one tile's by 0.19 s (code cd2cde5).
#: (The two fits subtracted all traffic at the disk's rate; at the cached rate now applied there, the first gives -0.2
#: ms: within the noise of single runs. The 256³ check holds either way.)
#: (0.85 ms was fitted when OpenVINO copied every segment's region of several planes into its own request.)
STREAM_CALL_S = 0.2e-3


def choose_stream(tm: TileModel, shape: Sequence[int], choice: TilingChoice, settings: Any,
                  banded: bool = True, stage: tuple[int, int] = (1, 0)) -> None:
    """Set ``choice.stream`` to the :class:`volinfer.run.stream.StreamPlan` this run streams with (left None: tile by
    tile). ``--engine auto`` weighs the stream (its whole cross-section, else bands of y rows, within the budget)
    against the planned tiling by the planner's one objective (:func:`volinfer.run.fidelity.leanest_near_fastest`)
    and says why in ``choice.notes``; ``--engine stream`` that cannot stream is a one-line error. ``banded``: the
    output takes bands of y rows (not Zarr stores, which keep z-slabs until every row of them is written).
    ``stage``: planes the input's storage keeps together and its bytes a voxel (a Zarr store's chunk depth: read
    that deep at a time, :func:`volinfer.run.stream.staging_mb`)."""
    t = settings.tiling
    if t.engine == "tiles":
        return
    asked = t.engine == "stream"
    conflicts = [name for name, on in (("--tile", tm.tile_given), ("--overlap", t.overlap not in (None, "")),
                                       ("--stitch " + str(t.stitch), (t.stitch or "crop") != "crop"),
                                       ("--mirror", bool(t.mirror)),
                                       ("a fixed input shape", tm.declared_input.is_static)) if on]
    per_tile_stats = bool(choice.norm_layers) and choice.norm_stats != "volume"
    # ops that depend on positions in the tile (align_corners interpolation) make every tiling inexact; the stream
    # computes them on the whole volume (its analysis refuses what it cannot compute)
    global_ops = [g for g in choice.global_ops if g.split()[0] not in POSITION_OPS]
    if conflicts or global_ops or per_tile_stats:
        if asked:
            why = ", ".join(conflicts) or ("--norm-stats tile (per-tile statistics)" if per_tile_stats else
                                           "reductions over whole tiles (global pooling/statistics)")
            raise VolinferError(f"--engine stream computes whole-volume inference layer by layer; it does not combine "
                                f"with {why} (use --engine tiles)")
        return
    planned = choice.planned
    if not asked and planned is None and choice.exact_fits:  # nothing planned for exactness to weigh against
        return
    plan = _fit_stream(_planning_model(tm, choice), shape, choice, t.max_memory_mb, asked, banded,
                       (*stage, written_bytes(tm, settings)))
    if plan is None:
        return
    stats = _stream_statistics(tm, shape, choice) if choice.norm_layers else StatsPlan(0, 0.0)
    io_s = stats.io_s * plan.bands_count * plan.band / plan.padded[1]  # checkpoints: file traffic, every band
    cost = (stream_cost(tm, shape, plan, choice.voxel_cost) * (1.0 + stats.runs)  # statistics passes: runs' worth
            + (io_s if choice.voxel_cost is not None else io_s / NOMINAL_VOXEL_S))
    choice.stream_option = (plan, cost)
    if not asked and planned is not None:
        pick = leanest_near_fastest([("tiles", planned.cost, planned.memory_mb), ("stream", cost, plan.peak_mb)],
                                    lambda c: c[1], lambda c: c[2])
        if pick[0] != "stream":
            choice.notes.append(f"tiles instead of layer streaming: predicted {cost / planned.cost:.2f}x the "
                                f"tiling's time, {plan.peak_mb:.0f} MB against {planned.memory_mb:.0f} MB")
            return
    if choice.tile_note in choice.notes:
        choice.notes.remove(choice.tile_note)
    choice.notes.append(_stream_note(plan, cost, choice, shape, tm.multiple))
    if choice.norm_layers:
        how = ("each pass recomputes the layers before it" if not stats.checkpointed else
               f"each pass streams its own layers from the checkpoints the pass before it left on disk: at most "
               f"{stats.disk_bytes * plan.bands_count * plan.band / plan.padded[1] / 2**20:.0f} MB of disk, about "
               f"{io_s:.1f} s of file traffic; recomputing instead where the disk is short")
        choice.notes.append(f"{len(choice.norm_layers)} normalisation layer(s) get whole-volume statistics from "
                            f"{stats.passes} streamed pass(es) of the network before the run (about "
                            f"{stats.runs:.1f}x a run's computation: {how})")
    choice.stream, choice.stream_passes = plan, stats.passes
    choice.stream_checkpoint_mb = stats.disk_bytes * plan.bands_count * plan.band / plan.padded[1] / 2**20


def _stream_note(plan: Any, cost: float, choice: TilingChoice, shape: Sequence[int], multiple: int) -> str:
    """What the stream runs and its predicted peak, against the tiling it was weighed with (``cost``: the stream's
    predicted time in the tilings' units)."""
    planned = choice.planned
    against = "" if planned is None else (
        f" (the planned tiling: {planned.evaluated / float(np.prod(shape)):.2f}x the volume evaluated, predicted "
        f"{planned.cost / cost:.2f}x the stream's time, {planned.memory_mb:.0f} MB)")
    return (f"{plan.describe(shape[1], multiple)}; predicted peak {plan.peak_mb:.0f} MB" + against
            + ("" if choice.exact_fits else " (no exact tiling fits the memory budget)"))


def _planning_model(tm: TileModel, choice: TilingChoice) -> TileModel:
    """``tm``, or for a model with normalisation layers the same network with placeholder statistics: the structure
    the stream will run once the statistics are frozen (:func:`volinfer.model.spatial_norm.frozen_like`)."""
    if not choice.norm_layers:
        return tm
    return tm.at(tm.tile, model=frozen_like(tm.model, choice.norm_layers), compile=False)


def _stream_statistics(tm: TileModel, shape: Sequence[int], choice: TilingChoice) -> StatsPlan:
    """The statistics passes a streamed run of a model with normalisation layers makes (passes, cost in runs,
    checkpoints' disk and traffic at the whole volume: :func:`volinfer.run.stream_stats.statistics_plan`); inf
    runs when the model cannot be analysed at the volume."""
    padded = [-(-n // tm.multiple) * tm.multiple for n in shape]
    storage = 2 if tm.precision in ("bf16", "f16") else 4
    try:
        return statistics_plan(tm.model, choice.norm_layers, tm.input_shape_for(padded), storage)
    except Exception:  # noqa: BLE001  (a model that rejects the whole volume: the stream plan says why)
        return StatsPlan(0, float("inf"))


def stream_cost(tm: TileModel, shape: Sequence[int], plan: Any, voxel_cost: Any) -> float:
    """A stream plan's predicted time in the tilings' units (:attr:`volinfer.run.fidelity.Tiling.cost`): the padded
    voxels its bands evaluate (bands recompute their y margins) x :data:`STREAM_VOXEL_COST` x the per-voxel cost
    at the model's tile, its segment calls x :data:`STREAM_CALL_S`, and its file traffic (spilled skip connections,
    skewed bands' strips: :attr:`volinfer.run.stream.StreamPlan.spill_s`)."""
    voxels = plan.evaluated_voxels(shape[1], tm.multiple)
    unit = 1.0 if voxel_cost is None else voxel_cost(float(np.prod(tm.tile)))
    cost = STREAM_VOXEL_COST * voxels * unit + plan.spill_cost(voxel_cost is not None)  # spill: file traffic
    if plan.skew is not None:  # skewed bands: calls that copy in regions of their inputs
        cost += (SKEW_VOXEL_COST - 1.0) * STREAM_VOXEL_COST * voxels * unit
    call_s = STREAM_CALL_S if voxel_cost is not None else STREAM_CALL_S / NOMINAL_VOXEL_S
    return cost + call_s * plan.calls_per_band * plan.bands_count  # every band makes all the calls, over its rows


def _fit_stream(tm: TileModel, shape: Sequence[int], choice: TilingChoice, max_memory_mb: float | None, asked: bool,
                banded: bool, held: tuple[int, int, int]) -> Any:
    """The stream plan within the memory budget (whole cross-section, else bands of y rows with margins covering the
    receptive field), its predicted peak set; None (with a note) when auto cannot stream within it. ``held``: the
    input's stored depth and bytes a voxel (its staging slab), and the written output's bytes a voxel (the rows
    post-processed for the writer): both follow the band."""
    base = fixed_mb(weights_mb(tm.model))
    fixed = lambda p: (base + staging_mb(p, *held[:2])  # noqa: E731
                       + output_rows_mb(p, tuple(shape), held[2]))
    cap = max_memory_mb or choice.budget_mb or default_budget_mb(weights_mb(tm.model))
    rf = choice.rf
    margin = rf.radius[1] if banded and rf is not None and rf.measured and rf.bounded else None
    try:
        plan = plan_stream(tm, tuple(shape), tm.precision, fits=lambda p: fixed(p) + p.memory_mb <= cap,  # type: ignore
                           margin_y=margin, cost=lambda p: stream_cost(tm, shape, p, choice.voxel_cost))  # spill
    except NotStreamable as e:
        if asked:
            raise VolinferError(f"--engine stream: this model cannot be streamed ({e}); use --engine tiles") from None
        choice.notes.append(f"layer streaming not possible ({e}): tiles instead")
        return None
    plan.peak_mb = fixed(plan) + plan.memory_mb
    if banded and not choice.norm_layers:
        plan = _with_skewed_bands(tm, shape, choice, plan, fixed, cap)
    if plan.peak_mb > cap and not asked:
        choice.notes.append(f"layer streaming would need about {plan.peak_mb:.0f} MB (> {cap:.0f} MB): tiles instead")
        return None
    if asked and max_memory_mb and plan.peak_mb > max_memory_mb:
        raise VolinferError(f"--engine stream needs about {plan.peak_mb:.0f} MB for this cross-section, more than "
                            f"--max-memory {format_mb(max_memory_mb)} (use --engine tiles)")
    return plan


def _with_skewed_bands(tm: TileModel, shape: Sequence[int], choice: TilingChoice, plan: Any,
                       fixed: Callable[[Any], float], cap: float) -> Any:
    """``plan``, or the skewed bands (:mod:`volinfer.run.skewed_bands`) the planner's objective prefers among those
    within the budget: the least predicted time, the leanest within 10% of it (skewed bands compute what one band
    does, in less memory; each band adds a little time)."""
    options = [o for o in skew_options(tm, tuple(shape), tm.precision) if fixed(o) + o.memory_mb <= cap]
    if not options:
        return plan
    cands = options + ([plan] if plan.peak_mb <= cap and not skewed_bands.FORCE_COUNT else [])
    weighed = [(o, stream_cost(tm, shape, o, choice.voxel_cost)) for o in cands]
    best = leanest_near_fastest(weighed, lambda w: w[1], lambda w: w[0].memory_mb)[0]
    for o in cands:
        o.peak_mb = fixed(o) + o.memory_mb
    choice.stream_alternatives = [w for w in weighed if w[0] is not best]
    return best


def stream_verdict(setup: RunSetup, choice: TilingChoice) -> Fidelity:
    """A streamed run's verdict. One band over the whole cross-section is whole-volume inference (on the volume padded
    to the size multiple, as tiling's reference is): no tiling deviation to quote. Bands along y are tiles along y
    with crop margins covering the receptive field: the tiled verdict, with its measured deviation."""
    if setup.grid.axes[1].count == 1:
        return judged(Fidelity(True, meaning="exact: whole-volume inference, computed layer by layer along z (every "
                                             "voxel of every layer once; no tile margins)"), choice.padding,
                      [a.padded for a in setup.grid.axes])
    if choice.stream is not None and choice.stream.skew is not None:
        return judged(Fidelity(True, meaning=f"exact: whole-volume inference, computed layer by layer along z in "
                                             f"{setup.grid.axes[1].count} skewed bands along y (every voxel of every "
                                             f"layer once; the rows where bands meet passed between them)"),
                      choice.padding, [a.padded for a in setup.grid.axes])
    counts = (1, setup.grid.axes[1].count, 1)  # rows of output planes along z are not tiles: only y is cut
    fid = judge(setup.overlap, counts, setup.stitch, choice.rf, 0, False, "volume")
    if fid.exact:
        meaning, fid.deviation = explain_exact(counts, choice.rf, choice.tiling_check,
                                               unnormalised=setup.normalizer.kind == "none")
        fid.meaning = f"layer by layer along z in {counts[1]} bands along y; {meaning}"
    return judged(fid, choice.padding, [a.padded for a in setup.grid.axes])
