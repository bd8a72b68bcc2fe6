"""One path for every framework: convert → fix shapes → save → verify against the source → describe."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov

import volinfer
from volinfer import watchdog
from volinfer.errors import VolinferError
from volinfer.io.reader import VolumeSource
from volinfer.model import speed_profile as sp
from volinfer.model import tiling_check
from volinfer.model.activation import OUTPUT_KIND, graph_activation
from volinfer.model.graph_reach import stride_period
from volinfer.model.layout import Layout
from volinfer.model.memory import probe_multiple
from volinfer.model.precision import check_model
from volinfer.model.receptive_field import ReceptiveField, measure_receptive_field
from volinfer.model.settings import ModelSettings
from volinfer.model.tile_model import TileModel
from volinfer.run.normalize import Normalizer
from volinfer.run.own_size import SOURCE_SIZES_KEY
from volinfer.run.setup import resolve_activation

from .budget import budget_mb, fitting_tile
from .inputs import freeze_inputs, pick_image_input
from .messages import framework_errors, framework_message
from .parity import Int8Report, ParityReport, WeightsReport, compare, judge, judge_int8
from .settings import CheckSettings, ConvertSettings
from .sizes import as_fixed, fixed_size, source_sizes
from .source import ReferenceUnavailable, Source, require
from .sources import load

#: Graph ops that normalise with statistics of their own input: per-tile statistics differ from whole-volume ones.
PER_TILE_STAT_OPS = {"MVN", "GroupNormalization"}


@dataclass
class ConversionResult:
    path: Path
    parity: ParityReport | None
    settings: ModelSettings
    notes: list[str] = field(default_factory=list)
    int8: Int8Report | None = None
    weights: WeightsReport | None = None  # how the weights are stored (f16/f32/int8) and why


def probe_size_multiple(model: ov.Model, layout: str, channels: int, lo: int = 64, span: int = 64) -> int:
    """Smallest m such that the spatial sizes the model accepts in [lo, lo + span) are multiples of m
    (:func:`volinfer.model.memory.probe_multiple`, the probe runs use too); a one-line error when it accepts none."""
    m = probe_multiple(model, layout, channels, lo, span)
    if m is None:
        raise VolinferError(f"the model accepts no cubic input size between {lo} and {lo + span - 1}")
    return m


def _sha256(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _calibration_tiles(path: str, layout: str, channels: int, tile: Sequence[int],
                       normalization: dict[str, Any] | None, count: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Tile-sized crops of a real volume, normalised the way ``volinfer run`` will: the centre first, then seeded
    random positions (read in on-disk order)."""
    with VolumeSource.open([path], depth=max(tile)) as src:
        if src.channels != channels:
            raise VolinferError(f"{path}: calibration volume has {src.channels} channel(s), model expects {channels}")
        norm = Normalizer(normalization, channels)
        norm.fit(src, max(tile))
        rng = np.random.default_rng(seed)
        starts = [[max(0, (n - t) // 2) for n, t in zip(src.shape, tile)]]
        starts += [[int(rng.integers(0, max(1, n - t + 1))) for n, t in zip(src.shape, tile)] for _ in range(count - 1)]
        tiles = []
        for st in sorted(starts, key=lambda v: (v[2], v[1], v[0])):
            region = tuple((a, min(n, a + t)) for a, n, t in zip(st, src.shape, tile))
            x = np.zeros((channels, *tile), np.float32)
            for c, r in enumerate(src.readers):
                stored = src.read(c, region)  # type: ignore[arg-type]
                norm.to_float(stored, c, r.slope, r.inter, x[c][: stored.shape[0], : stored.shape[1], : stored.shape[2]])
            tiles.append(x[None] if Layout.of(layout).channels_first else np.moveaxis(x, 0, -1)[None])
    return tiles


def quantize_int8(model: ov.Model, tiles: list[np.ndarray]) -> ov.Model:
    """Post-training INT8 quantisation with NNCF, calibrated on real tiles (optional extra ``int8``)."""
    nncf = require("nncf", "int8")
    return nncf.quantize(model, nncf.Dataset(tiles), subset_size=len(tiles))


def check_parity(source: Source, ir_path: Path, x: np.ndarray, tolerance: float, output: int | None,
                 layout: str = "NCDHW", loose: float | None = None) -> ParityReport:
    """Run the source in its own framework and the saved IR (OpenVINO CPU, f32) on ``x``; see
    :mod:`converters.parity` for the criteria. A missing framework gives a report that says "not checked"."""
    try:
        ref = source.run(x)
    except ReferenceUnavailable as e:
        return ParityReport(None, None, tolerance, list(x.shape), source.reference_note, None, checked=False,
                            reason=str(e))
    with framework_errors(f"{ir_path.name}: OpenVINO cannot compile the converted model"):
        compiled = ov.Core().compile_model(str(ir_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled(x)
    pairs = list(zip(ref, [np.asarray(got[o]) for o in compiled.outputs]))
    if output is not None:
        pairs = [pairs[output]]
    for r, g in pairs:
        if r.shape != g.shape:
            raise VolinferError(f"IR output shape {g.shape} differs from the source's {r.shape}")
    max_abs, max_rel, agreement = compare(pairs, layout)
    passed, criterion = judge(max_rel, agreement, tolerance, loose)
    return ParityReport(max_abs, max_rel, tolerance, list(x.shape), source.reference_note, passed,
                        agreement=agreement, criterion=criterion)


def check_int8(f32: ov.Model, int8: ov.Model, tiles: list[np.ndarray], output: int | None,
               layout: str) -> Int8Report:
    """INT8 against f32 on the calibration tiles: label agreement and Dice (see :mod:`converters.parity`)."""
    core = ov.Core()
    with framework_errors("OpenVINO cannot compile the model for the INT8 check"):
        a = core.compile_model(f32, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        b = core.compile_model(int8, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    k = output or 0
    pairs = [(np.asarray(a(t)[a.outputs[k]]), np.asarray(b(t)[b.outputs[k]])) for t in tiles]
    return judge_int8(pairs, layout)


def convert(model: str, output: str | os.PathLike, settings: ConvertSettings | None = None,
            **options: Any) -> ConversionResult:
    """Convert ``model`` (any supported framework; see :func:`converters.sources.kind_of`) to an OpenVINO IR at
    ``output``, verify it against the source run in its own framework, and store the run settings in it.
    ``settings`` (:class:`converters.settings.ConvertSettings`) says how; keyword ``options`` (``weights=``,
    ``tile=``, ``activation=``, ``int8=``, ... every field of its parts) override single fields. ``inputs`` names
    the image input (``--input``), ``fixed`` freezes other inputs to constants (``--set``). Nothing is left at
    ``output`` when any step fails. Weights are stored as FP16 when they pass parity, else as FP32 when those pass
    (``fp16=True`` refuses instead, ``fp16=False`` stores FP32 without trying FP16). Returns the saved path, the
    parity report, the stored settings and how the weights are stored (``weights``)."""
    cs = ConvertSettings.from_kwargs(settings, **options)
    out = Path(output)
    _check_output_path(out, cs.overwrite)
    src = load(model, **cs.source.load_kwargs())
    notes: list[str] = []
    if cs.source.random_weights:
        notes.append("converted with the factory's own (random) weights: --random-weights")
    g = _Graph(src, (cs.shape.layout or src.layout or _stored_layout(src) or "NCDHW").upper(),
               budget=budget_mb(cs.check.max_memory_mb))
    inputs = cs.source.inputs
    g.model, g.old, g.channels, g.tile, g.multiple = _prepare(src, g.layout, cs.shape.channels, cs.shape.tile,
                                                              cs.shape.static, inputs[0] if inputs else None)
    if not cs.shape.static and fixed_size(g.model, g.layout, g.channels, g.tile, g.multiple):
        g.multiple = as_fixed(g.model, g.layout, g.channels, g.tile, g.multiple, notes)  # runs only at its tile: static
    _align_to_strides(g, notes)
    g.per_tile = sorted({op.get_type_name() for op in g.model.get_ops()} & PER_TILE_STAT_OPS)
    if g.per_tile:
        notes.append(f"model normalises per input ({', '.join(g.per_tile)}): `volinfer run` freezes these layers to "
                     f"whole-volume statistics (streamed passes) unless --norm-stats tile")
    g.out_index = _select_output(g.model, cs.source.select_output, notes)
    settings_ = _describe(g, cs, notes)
    int8 = None
    if cs.check.int8:
        f32_model = g.model
        int8 = _Int8Check(f32_model, _quantize(g, cs, settings_, notes))
    parity, int8_report, weights = _save_checked(g, cs, out, int8)
    return ConversionResult(out, parity, settings_, notes, int8_report, weights)


@dataclass
class _Graph:
    """The converted graph and what was found about it on the way (layout, channels, tile, size multiple, ...)."""

    src: Source
    layout: str
    model: Any = None
    old: ModelSettings | None = None  # the settings an IR being re-described already stores
    channels: int = 1
    tile: list[int] = field(default_factory=list)
    multiple: int | None = None
    per_tile: list[str] = field(default_factory=list)
    out_index: int | None = None
    budget: float = 0.0  # MB every stage must fit (--max-memory, default as for `run`)

    def check_tile(self, copies: float) -> list[int]:
        """The tile a check runs at: the stored tile, or a smaller one when ``copies`` models at it would not fit
        the budget."""
        return fitting_tile(self.model, self.layout, self.channels, self.tile, self.multiple, self.budget, copies)


def _align_to_strides(g: _Graph, notes: list[str]) -> None:
    """Raise the size multiple of a model that accepts any size to its stride period (read from the graph): crop
    tiles start at multiples of the size multiple, and a tile starting elsewhere pools other voxels together than
    whole-volume inference does (a stride-2 pooling at an odd offset moved probabilities by 0.98)."""
    if not g.multiple:
        return  # a static input: one tile shape, tiles at its multiples
    period = stride_period(g.model, g.layout, g.channels, g.tile)
    if not period or all(g.multiple % p == 0 for p in period):
        return
    m = math.lcm(g.multiple, *period)
    notes.append(f"size multiple {m} (the model accepts any size, but its strides repeat every {max(period)} "
                 f"voxels: tiles start at multiples of it, as whole-volume inference pools)")
    g.multiple = m
    g.tile = [-(-int(t) // m) * m for t in g.tile]


def _describe(g: _Graph, cs: ConvertSettings, notes: list[str]) -> ModelSettings:
    """The settings stored in the IR (kept from a re-described IR where not given), its activation, receptive
    field and precision verdict, written into the graph."""
    st, src = cs.stored, g.src
    settings = ModelSettings(
        layout=g.layout, in_channels=g.channels, channel_names=list(st.channel_names) if st.channel_names else None,
        tile=g.tile, size_multiple=g.multiple or None, overlap=st.overlap,
        stitch=st.stitch, normalization=st.normalization, activation=st.activation,
        labels=list(st.labels) if st.labels else None, spacing=list(st.spacing) if st.spacing else None,
        orientation=st.orientation,
        output=str(g.out_index) if g.out_index is not None else None, instance_norm=bool(g.per_tile) or None,
        source_framework=src.framework, source_file=src.path.name if src.path else None,
        source_sha256=_sha256(src.path), volinfer_version=volinfer.__version__,
    )
    if g.old is not None:  # re-describing an IR: keep what it already stores
        for k, v in g.old.as_dict().items():
            if getattr(settings, k, None) is None and k in settings.__dataclass_fields__:
                setattr(settings, k, v)
        settings.extra.update(g.old.extra)
    if cs.source.fixed:
        settings.extra["frozen_inputs"] = dict(cs.source.fixed)
    _record_activation(g.model, g.out_index or 0, g.layout, st.activation, settings, notes)
    if cs.check.measure_rf:
        _measure_rf(g.model, g.tile, settings, notes, g.budget)
        _check_tiling(g.model, g.tile, settings, notes, cs.check.calibration_volume, g.budget)
    if not cs.check.int8:
        _check_precision(g, cs, settings, notes)
    _speed_profile(g, cs.check, settings, notes)
    sizes = source_sizes(g.src, g.model, g.layout, g.channels, g.check_tile(3.0), g.multiple, notes) \
        if cs.check.check else None
    if sizes is not None:  # runs padding other sizes report not exact (volinfer.run.own_size)
        settings.extra[SOURCE_SIZES_KEY] = sizes
    settings.to_model(g.model)
    return settings


def _quantize(g: _Graph, cs: ConvertSettings, settings: ModelSettings, notes: list[str]) -> list[np.ndarray]:
    """Quantise ``g.model`` to INT8 on tiles of the calibration volume (``g.model`` becomes the INT8 graph); the
    calibration tiles, for the INT8-against-FP32 check."""
    c = cs.check
    if not c.calibration_volume:
        raise VolinferError("--int8 needs --calibration-volume (real tiles to calibrate the quantisation on)")
    tiles = _calibration_tiles(c.calibration_volume, g.layout, g.channels, g.tile, cs.stored.normalization,
                               count=c.calibration_tiles, seed=c.seed)
    g.model = quantize_int8(g.model.clone(), tiles)
    settings.extra["quantization"] = f"int8 (NNCF, {c.calibration_tiles} calibration tiles)"
    settings.to_model(g.model)
    notes.append("INT8 weights and activations: parity below is against the FP32 source and reported only; "
                 "the INT8 check against FP32 on the calibration tiles decides")
    return tiles


def _check_output_path(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".xml":
        raise VolinferError(f"{out}: output must be an OpenVINO IR path ending in .xml")
    if out.exists() and not overwrite:
        raise VolinferError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise VolinferError(f"{out.parent}: output directory does not exist")


def _prepare(src: Source, layout: str, channels: int | None, tile: int | Sequence[int] | None, static: bool,
             image: str | None) -> tuple[ov.Model, ModelSettings | None, int, list[int], int | None]:
    """Convert, freeze ``--set`` inputs, check the single 5-D image input, fix channels/tile/size multiple."""
    t3 = None if tile is None else ([int(tile)] * 3 if isinstance(tile, (int, np.integer)) else [int(v) for v in tile])
    probe_tile = t3 or [64, 64, 64]
    if channels is None and src.framework.startswith(("pytorch", "torch")):
        channels = _guess_torch_channels(src, [*probe_tile, 64, 32, 128])
    conv_shape = None
    if channels is not None:
        conv_shape = Layout.of(layout).tensor_shape(channels, probe_tile)
        if not static:
            conv_shape = Layout.of(layout).tensor_shape(channels, [-1, -1, -1])
    ov_model = _convert_with_examples(src, conv_shape, layout, channels or 1, [*probe_tile, 64, 128, 96, 32])
    old = ModelSettings.from_model(ov_model) if src.framework == "openvino" else None
    if t3 is None and old is not None and old.tile is not None:  # re-describing an IR: keep its tile unless asked
        t3 = [int(old.tile)] * 3 if isinstance(old.tile, int) else [int(v) for v in old.tile]
    ov_model = freeze_inputs(ov_model, src.pending_fixed)
    ov_model = pick_image_input(ov_model, image if src.pending_fixed or not src.framework.startswith(
        ("pytorch", "torch")) else None)
    ps = ov_model.input(0).get_partial_shape()
    if ps.rank.is_dynamic or ps.rank.get_length() != 5:
        raise VolinferError(f"model input is {ps}; expected 5-D (N, C, D, H, W) or (N, D, H, W, C)")
    cdim = ps[Layout.of(layout).channel_axis]
    if channels is None:
        if cdim.is_dynamic:
            raise VolinferError("cannot tell the input channel count: pass --channels")
        channels = cdim.get_length()
    spatial = [ps[i] for i in Layout.of(layout).spatial_axes]
    if all(d.is_static for d in spatial) and t3 is None:
        t3 = [d.get_length() for d in spatial]
    # the model's own batch/channel dims are fixed; spatial dims dynamic unless --static
    with framework_errors("OpenVINO cannot reshape the model to a 5-D tile input"):
        ov_model.reshape({0: ov.PartialShape(Layout.of(layout).tensor_shape(channels, t3 or probe_tile) if static
                                             else (Layout.of(layout).tensor_shape(channels, [-1, -1, -1])))})
    multiple = probe_size_multiple(ov_model, layout, channels) if not static else None
    if multiple and old is not None and old.size_multiple:  # shape inference can miss a stored constraint: keep it
        multiple = multiple * old.size_multiple // gcd(multiple, old.size_multiple)
    if t3 is None:
        t3 = [max(64, multiple or 1)] * 3 if (multiple or 1) <= 64 else [multiple] * 3  # type: ignore[list-item]
    if multiple and any(v % multiple for v in t3):
        raise VolinferError(f"tile {'x'.join(map(str, t3))} rejected: this model needs sizes divisible by {multiple}")
    ov.layout_helpers.set_layout(ov_model.input(0), ov.Layout(layout))
    return ov_model, old, channels, t3, multiple


def _select_output(ov_model: ov.Model, select_output: str | int | None, notes: list[str]) -> int | None:
    out_names = [sorted(o.get_names()) for o in ov_model.outputs]
    if select_output is None:
        if len(ov_model.outputs) > 1:
            notes.append(f"model has {len(ov_model.outputs)} outputs; using output 0 (choose with --output-name)")
        return None
    if isinstance(select_output, int) or str(select_output).isdigit():
        index = int(select_output)
        if index >= len(ov_model.outputs):
            raise VolinferError(f"output {index} does not exist; the model has {len(ov_model.outputs)}")
        return index
    hits = [i for i, n in enumerate(out_names) if select_output in n]
    if not hits:
        raise VolinferError(f"no output named {select_output!r}; outputs: {out_names}")
    return hits[0]


def _record_activation(model: ov.Model, index: int, layout: str, activation: str | None,
                       settings: ModelSettings, notes: list[str]) -> None:
    """A graph that already ends in Softmax/Sigmoid/LogSoftmax outputs (log-)probabilities: store
    ``activation="none"`` and ``outputs`` so that ``run`` applies no second one. An explicit ``--activation`` wins."""
    found = graph_activation(model, index, channel_axis=Layout.of(layout).channel_axis)
    if found is None:
        if activation is None and settings.extra.get("outputs") is None:
            settings.extra["outputs"] = "logits"
        return
    settings.extra["outputs"] = OUTPUT_KIND.get(found, "probabilities")
    if activation is None:
        settings.activation = "none"
        notes.append(f"the graph already ends in {found}: stored activation none (outputs "
                     f"{settings.extra['outputs']}), so no second activation is applied")
    elif activation != "none":
        notes.append(f"the graph already ends in {found}, and --activation {activation} applies another on top "
                     f"(stored as asked)")


def _stored_layout(src: Source) -> str | None:
    """The layout an IR being re-described already stores (re-describing must not reset it to NCDHW)."""
    if src.framework != "openvino" or src.path is None:
        return None
    try:
        return ModelSettings.from_model(ov.Core().read_model(str(src.path))).layout
    except Exception:
        return None


def _check_precision(g: _Graph, cs: ConvertSettings, settings: ModelSettings, notes: list[str]) -> None:
    """Store whether this CPU's native reduced precision (bf16/f16) keeps the model's outputs faithful, for
    ``--precision auto`` (see :mod:`volinfer.model.precision`); measured on a calibration crop when one is given.
    Runs at a tile where two models fit the budget."""
    c, tile = cs.check, g.check_tile(2.0)
    x = _calibration_tiles(c.calibration_volume, g.layout, g.channels, tile, cs.stored.normalization)[0] \
        if c.calibration_volume else None
    probabilities = settings.extra.get("outputs") in ("probabilities", "log-probabilities")
    try:
        verdict = check_model(g.model, g.layout, g.channels, list(tile), g.out_index or 0, probabilities, x,
                              {"device": c.device, "precision": c.precision, "threads": c.threads})
    except Exception as e:  # a model the reduced precision cannot compile: auto stays f32
        notes.append(f"reduced precision not checked ({framework_message(e)[:120]}); --precision auto runs f32")
        return
    if verdict is None:
        return
    settings.extra["precision_check"] = verdict
    word = "faithful" if verdict["faithful"] else "NOT faithful"
    notes.append(f"{verdict['precision']} is {word} for this model (labels {verdict['label_agreement']:.4%} equal, "
                 f"probabilities within {verdict['prob_max_abs']:.3g}): --precision auto runs "
                 f"{verdict['precision'] if verdict['faithful'] else 'f32'}")


def _speed_profile(g: "_Graph", check: Any, settings: ModelSettings, notes: list[str]) -> None:
    """Store the model's speed profile for the planner (:mod:`volinfer.model.speed_profile`), unless
    ``--no-speed-profile`` (then none, also not one kept from a re-described IR). Never fails the conversion: a
    profile that cannot be measured leaves a note saying why."""
    for key in (sp.KEY, sp.NOTE_KEY):  # an old profile (re-described IR) is measured afresh or dropped
        settings.extra.pop(key, None)
        if g.model.has_rt_info(["volinfer", key]):
            g.model.set_rt_info("null", ["volinfer", key])  # rt_info keys cannot be removed one by one
    if not getattr(check, "speed_profile", True):
        return
    if check.int8:
        settings.extra[sp.NOTE_KEY] = "not measured: INT8 models are quantised after this stage"
        return
    _measure_speed(g, check, settings, notes)


def _measure_speed(g: "_Graph", check: Any, settings: ModelSettings, notes: list[str]) -> None:
    """The timed part of :func:`_speed_profile` (its own progress stage)."""
    try:
        prof = sp.profile_model(g.model, g.layout, g.channels, g.check_tile(1.0), g.multiple,
                                {"device": check.device, "threads": check.threads, "max_memory_mb": g.budget},
                                settings.extra.get("precision_check"))
    except Exception as e:  # noqa: BLE001 - a speed profile is an optimisation, never a reason to fail
        why = framework_message(e)[:160]
        settings.extra[sp.NOTE_KEY] = f"not measured: {why}"
        notes.append(f"speed profile not measured ({why}); the planner assumes a constant per-voxel cost")
        return
    settings.extra[sp.KEY] = prof.as_dict()
    notes.append(f"speed: {prof.summary(here=prof.cpu)}")


def _measure_rf(ov_model: ov.Model, t3: list[int], settings: ModelSettings, notes: list[str],
                budget: float | None = None) -> None:
    """Store the receptive-field radius and how it was obtained (from the graph, else by a probe within
    ``budget`` MB), or None with a note when it cannot be found (then crop margins come from --overlap)."""
    reason = None
    try:
        described = ov_model.clone()
        settings.to_model(described)  # the output a run reads (deep supervision: the full-size head, not output 0)
        rf = measure_receptive_field(TileModel(described, tile=t3, compile=False), max_memory_mb=budget)
    except Exception as e:  # noqa: BLE001 - any failure means "not measured", said in a note
        rf, reason = None, framework_message(e)
    if rf is not None and not getattr(rf, "measured", True):
        rf, reason = None, getattr(rf, "reason", "") or "the probe could not run"
    if rf is not None and not any(rf.radius) and _has_spatial_kernels(ov_model):
        rf, reason = None, "the probe saw no spread although the graph has spatial kernels"
    if rf is None:
        settings.receptive_field = None
        settings.extra["receptive_field_note"] = f"not measured: {reason}"
        notes.append(f"receptive field could not be measured ({reason}); crop margins will come from --overlap")
        return
    settings.receptive_field = list(rf.radius)
    settings.extra["receptive_field_method"] = rf.how()
    if not rf.bounded:
        settings.extra["receptive_field_bounded"] = False
        notes.append(f"receptive field {rf}: only a tile covering the whole (padded) volume is exact; `volinfer "
                     f"run` plans one when it fits the memory budget")


def _check_tiling(ov_model: ov.Model, t3: list[int], settings: ModelSettings, notes: list[str],
                  calibration_volume: str | None = None, budget: float | None = None) -> None:
    """Store how far crop tiling with margins equal to the measured receptive field moves the outputs (tiled vs
    whole on a small probe, :mod:`volinfer.model.tiling_check`), or why it was not measured; one note either way.
    The probe is a crop of ``calibration_volume`` (normalised as runs are) when given, else random normal."""
    rf = None
    if settings.receptive_field:
        bounded = settings.extra.get("receptive_field_bounded", True) not in (False, "false")
        rf = ReceptiveField(tuple(int(v) for v in settings.receptive_field), bool(bounded))  # type: ignore[arg-type]
    try:
        described = ov_model.clone()
        settings.to_model(described)  # layout, size multiple, output, activation: as a run will read them
        tm = TileModel(described, tile=t3, compile=False)
        activation = resolve_activation(tm, None)[0]
        probe_input = _calibration_probe(calibration_volume, tm, settings.normalization) if calibration_volume \
            else None
        record = tiling_check.check_tiling(tm, rf, activation, probe_input, max_memory_mb=budget)
        if record.get("measured"):
            probabilities = activation != "none" or settings.extra.get("outputs") == "probabilities"
            record["space"] = "probabilities" if probabilities else "outputs"
    except Exception as e:  # noqa: BLE001 - never fails a conversion: recorded as not measured
        record = {"measured": False, "reason": framework_message(e)[:200]}
    settings.extra[tiling_check.KEY] = record
    notes.append(f"tiling check: {tiling_check.note(record)}")


def _calibration_probe(path: str, tm: TileModel, normalization: dict[str, Any] | None) -> Any:
    """The tiling check's probe input: the centre crop of a real volume, normalised as `volinfer run` will."""
    def make(probe: list[int]) -> tuple[np.ndarray, str]:
        x = _calibration_tiles(path, tm.layout, tm.in_channels, probe, normalization)[0]
        return x, f"the centre crop of {Path(path).name}"
    return make


def _has_spatial_kernels(model: ov.Model) -> bool:
    """Whether any convolution / pooling in the graph spans more than one voxel."""
    for op in model.get_ops():
        kind = op.get_type_name()
        if "Convolution" in kind and op.get_input_size() > 1:
            ps = op.input(1).get_partial_shape()
            if ps.rank.is_static and ps.rank.get_length() >= 3 and any(
                    d.is_static and d.get_length() > 1 for d in list(ps)[-3:]):
                return True
        if "Pool" in kind and any(int(k) > 1 for k in op.get_attributes().get("kernel", [])):
            return True
    return False


@dataclass(frozen=True)
class _Int8Check:
    """What the INT8 check compares: the FP32 graph the quantised one was made from, and the calibration tiles."""

    f32_model: ov.Model
    tiles: list[np.ndarray]


def _save_checked(g: _Graph, cs: ConvertSettings, out: Path, int8: _Int8Check | None = None
                  ) -> tuple[ParityReport | None, Int8Report | None, WeightsReport]:
    """Save ``g.model`` to temporary names, check parity (and INT8 against FP32), then move into place; nothing is
    left at ``out`` when a check fails."""
    tmp_xml = out.with_name(f".{out.stem}.partial.xml")
    tmp_bin = tmp_xml.with_suffix(".bin")
    int8_report = None
    with watchdog.partial(tmp_xml, tmp_bin):  # removed even if a signal cannot unwind this in time
        try:
            parity, weights = _save_verified(g, cs, tmp_xml, out)
            if cs.check.int8 and int8 is not None and int8.tiles:
                int8_report = _check_saved_int8(g, int8, tmp_xml)
            os.replace(tmp_bin, out.with_suffix(".bin"))
            os.replace(tmp_xml, out)
        finally:
            for p in (tmp_xml, tmp_bin):
                if p.exists():
                    p.unlink()
    return parity, int8_report, weights


def _save_verified(g: _Graph, cs: ConvertSettings, tmp_xml: Path, out: Path) -> tuple[ParityReport | None,
                                                                                        WeightsReport]:
    """Save to ``tmp_xml`` and check parity: FP16 weights unless ``--no-fp16``. FP16 weights that parity rejects
    are saved again as FP32 (over the same files: one copy on disk, one compiled model at a time) and kept when
    those pass, said in the report; an explicit ``--fp16`` refuses instead, as does an FP32 retry that fails."""
    c = cs.check
    fp16 = c.fp16 is not False
    _save(g.model, tmp_xml, out, fp16)
    if not c.check:
        return None, _weights(c, None)
    src, x = _reusing_reference(g.src), _parity_input(g, cs)  # the source runs once for both tries
    parity = _check_saved(g, cs, src, x, tmp_xml, fp16)
    if parity.passed is not False:  # passed, or not checked (the source's framework is missing)
        return parity, _weights(c, parity)
    if c.fp16 is not None or c.int8:  # FP16 or FP32 asked for explicitly, or INT8: no other weights to try
        raise VolinferError(f"conversion rejected, {parity}; loosen with --tolerance"
                            + (" or use --no-fp16" if fp16 else ""))
    _save(g.model, tmp_xml, out, False)
    f32 = _check_saved(g, cs, src, x, tmp_xml, False)
    if not f32.passed:
        raise VolinferError(f"conversion rejected, {f32} with FP32 weights (FP16 weights failed first: "
                            f"{parity.brief()}); loosen with --tolerance")
    return f32, WeightsReport("f32", f"FP16 weights failed parity ({parity.brief()}), FP32 weights passed "
                                     f"(--no-fp16 skips the FP16 try; --fp16 refuses instead)", parity)


def _save(model: ov.Model, path: Path, out: Path, fp16: bool) -> None:
    with framework_errors(f"{out}: OpenVINO cannot save the model"):
        ov.save_model(model, str(path), compress_to_fp16=fp16)


def _weights(c: CheckSettings, parity: ParityReport | None) -> WeightsReport:
    """How the weights were stored when no FP32 retry was needed."""
    if c.int8:
        return WeightsReport("int8", "quantised with NNCF (--int8)")
    if c.fp16 is False:
        return WeightsReport("f32", "--no-fp16")
    verdict = "not verified (--no-check)" if parity is None else "passed parity" if parity.passed else \
        "parity not checked"
    return WeightsReport("f16", f"FP16 weights ({'--fp16' if c.fp16 else 'the default'}), {verdict}")


def _reusing_reference(src: Source) -> Source:
    """``src`` whose ``run`` computes the reference once and returns it to every later call (the FP32 retry checks
    the same input as the FP16 try)."""
    outputs: list[list[np.ndarray]] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        if not outputs:
            outputs.append(src.run(x))
        return outputs[0]

    return dataclasses.replace(src, run=run)


def _parity_input(g: _Graph, cs: ConvertSettings) -> np.ndarray:
    """The parity check's input, at a tile where three models fit the budget: a calibration crop, else seeded
    random normal."""
    c, at = cs.check, g.check_tile(3.0)
    if c.calibration_volume:
        return _calibration_tiles(c.calibration_volume, g.layout, g.channels, at, cs.stored.normalization)[0]
    return np.random.default_rng(c.seed).standard_normal(Layout.of(g.layout).tensor_shape(g.channels, at)).astype(np.float32)


def _check_saved(g: _Graph, cs: ConvertSettings, src: Source, x: np.ndarray, saved: Path,
                 fp16: bool) -> ParityReport:
    """Parity of the saved IR against the source on ``x``, at the tolerance of its weights (or ``--tolerance``)."""
    c = cs.check
    tol = c.tolerance if c.tolerance is not None else (float("inf") if c.int8 else 1e-2 if fp16 else 1e-4)
    return check_parity(src, saved, x, tol, g.out_index, g.layout,
                        loose=10 * c.tolerance if c.tolerance is not None else None)


def _check_saved_int8(g: _Graph, int8: _Int8Check, saved: Path) -> Int8Report:
    """The saved INT8 IR against the FP32 graph on the calibration tiles; raises when it fails."""
    report = check_int8(int8.f32_model, ov.Core().read_model(str(saved)), int8.tiles, g.out_index, g.layout)
    if not report.passed:
        raise VolinferError(f"INT8 rejected, {report}: calibrate on more tiles (--calibration-tiles) or convert "
                            f"without --int8")
    return report


def _convert_with_examples(src: Source, shape: list[int] | None, layout: str, channels: int,
                           sizes: list[int]) -> ov.Model:
    """Convert, tracing at the first example size the model accepts (a rejected tile is explained later, once the
    size multiple is known)."""
    error: VolinferError | None = None
    for size in dict.fromkeys(sizes):
        try:
            return src.to_openvino(shape, Layout.of(layout).tensor_shape(channels, [size] * 3))
        except VolinferError as e:
            error = e
    assert error is not None
    raise error


def _guess_torch_channels(src: Source, sizes: list[int]) -> int | None:
    """Input channels of a torch module: try each in-channel count its 3-D convolutions use, smallest first,
    on a small input; the first that runs is the answer."""
    module = src.extras.get("module")
    if module is None:
        return None
    candidates = sorted({int(p.shape[1]) for p in module.parameters() if p.ndim == 5})
    for size in dict.fromkeys(sizes):
        for c in candidates:
            try:
                src.run(np.zeros((1, c, size, size, size), np.float32))
                return c
            except Exception:
                continue
    return None
