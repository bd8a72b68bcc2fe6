"""One path for every framework: convert → fix shapes → save → verify against the source → describe."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov

import volinfer
from volinfer.errors import VolinferError
from volinfer.model import TileModel
from volinfer.receptive_field import measure_receptive_field
from volinfer.settings import ModelSettings

from .sources import Source, load

#: Graph ops that normalise with statistics of their own input: per-tile statistics differ from whole-volume ones.
PER_TILE_STAT_OPS = {"MVN", "GroupNormalization"}


@dataclass
class ParityReport:
    """Source vs IR on the same input: the conversion's accuracy."""

    max_abs: float
    max_rel: float
    tolerance: float
    shape: list[int]
    reference: str
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"parity {verdict}: max |diff| {self.max_abs:.3g}, relative {self.max_rel:.3g} "
                f"({'reported only' if self.tolerance == float('inf') else f'tolerance {self.tolerance:g}'}) "
                f"on input {self.shape}, reference {self.reference}")


@dataclass
class ConversionResult:
    path: Path
    parity: ParityReport | None
    settings: ModelSettings
    notes: list[str] = field(default_factory=list)


def _spatial_axes(layout: str) -> list[int]:
    return [2, 3, 4] if layout == "NCDHW" else [1, 2, 3]


def _shape(layout: str, channels: int, tile: Sequence[int]) -> list[int]:
    return [1, channels, *tile] if layout == "NCDHW" else [1, *tile, channels]


def _accepts(model: ov.Model, layout: str, channels: int, size: int) -> bool:
    m = model.clone()
    try:
        m.reshape({0: ov.PartialShape(_shape(layout, channels, [size] * 3))})
    except Exception:
        return False
    for out in m.outputs:
        ps = out.get_partial_shape()
        if ps.rank.is_static and ps.rank.get_length() == 5:
            spatial = [ps[i] for i in _spatial_axes(layout)]
            if any(d.is_static and d.get_length() != size for d in spatial):
                return False
    return True


def probe_size_multiple(model: ov.Model, layout: str, channels: int, lo: int = 64, span: int = 64) -> int:
    """Smallest m such that spatial sizes that are multiples of m are accepted and others are not, found by trying
    every size in [lo, lo + span) (shape inference only, no compute)."""
    ok = [s for s in range(lo, lo + span) if _accepts(model, layout, channels, s)]
    if not ok:
        raise VolinferError(f"the model accepts no cubic input size between {lo} and {lo + span - 1}")
    m = 0
    for s in ok:
        m = gcd(m, s)
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
    from volinfer.normalize import Normalizer
    from volinfer.reader import VolumeSource

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
            tiles.append(x[None] if layout == "NCDHW" else np.moveaxis(x, 0, -1)[None])
    return tiles


def quantize_int8(model: ov.Model, tiles: list[np.ndarray]) -> ov.Model:
    """Post-training INT8 quantisation with NNCF, calibrated on real tiles (optional extra ``int8``)."""
    from .sources import require

    nncf = require("nncf", "int8")
    return nncf.quantize(model, nncf.Dataset(tiles), subset_size=len(tiles))


def check_parity(source: Source, ir_path: Path, x: np.ndarray, tolerance: float, output: int | None) -> ParityReport:
    """Run the source and the saved IR (OpenVINO CPU, f32) on ``x``; relative error = max |diff| / max |ref|."""
    ref = source.run(x)
    compiled = ov.Core().compile_model(str(ir_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x)
    pairs = list(zip(ref, [np.asarray(got[o]) for o in compiled.outputs]))
    if output is not None:
        pairs = [pairs[output]]
    max_abs, max_rel = 0.0, 0.0
    for r, g in pairs:
        if r.shape != g.shape:
            raise VolinferError(f"IR output shape {g.shape} differs from the source's {r.shape}")
        d = float(np.abs(r.astype(np.float64) - g).max())
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / max(float(np.abs(r).max()), 1e-12))
    return ParityReport(max_abs, max_rel, tolerance, list(x.shape), source.reference_note, max_rel <= tolerance)


def convert(
    model: str,
    output: str | os.PathLike,
    *,
    weights: str | None = None,
    trust_pickle: bool = False,
    factory_kwargs: dict[str, Any] | None = None,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    select_output: str | int | None = None,
    tile: int | Sequence[int] | None = None,
    channels: int | None = None,
    layout: str | None = None,
    static: bool = False,
    activation: str | None = None,
    labels: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    normalization: dict[str, Any] | None = None,
    spacing: Sequence[float] | None = None,
    overlap: float | int | None = None,
    stitch: str | None = None,
    fp16: bool = True,
    int8: bool = False,
    calibration_tiles: int = 8,
    check: bool = True,
    tolerance: float | None = None,
    calibration_volume: str | None = None,
    measure_rf: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> ConversionResult:
    """Convert ``model`` (any supported framework; see :func:`converters.sources.kind_of`) to an OpenVINO IR at
    ``output``, verify it against the source, and store the run settings in it. Nothing is left at ``output`` when
    any step fails. Returns the saved path, the parity report and the stored settings."""
    out = Path(output)
    if out.suffix.lower() != ".xml":
        raise VolinferError(f"{out}: output must be an OpenVINO IR path ending in .xml")
    if out.exists() and not overwrite:
        raise VolinferError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise VolinferError(f"{out.parent}: output directory does not exist")
    src = load(model, weights=weights, trust_pickle=trust_pickle, factory_kwargs=factory_kwargs,
               inputs=inputs, outputs=outputs)
    notes: list[str] = []

    # shapes: channels and layout first, then a shape to convert at (torch needs an example)
    layout = (layout or src.layout or "NCDHW").upper()
    t3 = None if tile is None else ([int(tile)] * 3 if isinstance(tile, (int, np.integer)) else [int(v) for v in tile])
    probe_tile = t3 or [64, 64, 64]
    if channels is None and src.framework.startswith(("pytorch", "torch")):
        channels = _guess_torch_channels(src, [64, 32, 128, *probe_tile])
    conv_shape = None
    if channels is not None:
        conv_shape = _shape(layout, channels, probe_tile)
        if not static:
            conv_shape = [1, channels, -1, -1, -1] if layout == "NCDHW" else [1, -1, -1, -1, channels]
    ov_model = _convert_with_examples(src, conv_shape, layout, channels or 1, [64, *probe_tile, 128, 96, 32])
    if len(ov_model.inputs) != 1:
        raise VolinferError(f"model has {len(ov_model.inputs)} inputs; volinfer runs single-input models "
                            f"(cut the graph with --input)")
    ps = ov_model.input(0).get_partial_shape()
    if ps.rank.is_dynamic or ps.rank.get_length() != 5:
        raise VolinferError(f"model input is {ps}; expected 5-D (N, C, D, H, W) or (N, D, H, W, C)")
    cdim = ps[1 if layout == "NCDHW" else 4]
    if channels is None:
        if cdim.is_dynamic:
            raise VolinferError("cannot tell the input channel count: pass --channels")
        channels = cdim.get_length()
    spatial = [ps[i] for i in _spatial_axes(layout)]
    if all(d.is_static for d in spatial) and t3 is None:
        t3 = [d.get_length() for d in spatial]
    # the model's own batch/channel dims are fixed; spatial dims dynamic unless --static
    ov_model.reshape({0: ov.PartialShape(_shape(layout, channels, t3 or probe_tile) if static
                                         else (_shape(layout, channels, [-1, -1, -1])))})
    multiple = probe_size_multiple(ov_model, layout, channels) if not static else None
    if t3 is None:
        t3 = [max(64, multiple or 1)] * 3 if (multiple or 1) <= 64 else [multiple] * 3  # type: ignore[list-item]
    if multiple and any(v % multiple for v in t3):
        raise VolinferError(f"tile {'x'.join(map(str, t3))} rejected: this model needs sizes divisible by {multiple}")
    ov.layout_helpers.set_layout(ov_model.input(0), ov.Layout(layout))
    per_tile = sorted({op.get_type_name() for op in ov_model.get_ops()} & PER_TILE_STAT_OPS)
    if per_tile:
        notes.append(f"model normalises per input ({', '.join(per_tile)}): per-tile statistics differ from "
                     f"whole-volume ones, so crop stitching is not exact; gaussian stitching is the default for it")

    out_names = [sorted(o.get_names()) for o in ov_model.outputs]
    out_index = None
    if select_output is not None:
        if isinstance(select_output, int) or str(select_output).isdigit():
            out_index = int(select_output)
            if out_index >= len(ov_model.outputs):
                raise VolinferError(f"output {out_index} does not exist; the model has {len(ov_model.outputs)}")
        else:
            hits = [i for i, n in enumerate(out_names) if select_output in n]
            if not hits:
                raise VolinferError(f"no output named {select_output!r}; outputs: {out_names}")
            out_index = hits[0]
    elif len(ov_model.outputs) > 1:
        notes.append(f"model has {len(ov_model.outputs)} outputs; using output 0 (choose with --output-name)")

    settings = ModelSettings(
        layout=layout, in_channels=channels, channel_names=list(channel_names) if channel_names else None,
        tile=t3, size_multiple=multiple or None, overlap=overlap,
        stitch=stitch or ("gaussian" if per_tile else None), normalization=normalization, activation=activation,
        labels=list(labels) if labels else None, spacing=list(spacing) if spacing else None,
        output=str(out_index) if out_index is not None else None, instance_norm=bool(per_tile) or None,
        source_framework=src.framework, source_file=src.path.name if src.path else None,
        source_sha256=_sha256(src.path), volinfer_version=volinfer.__version__,
    )
    if src.framework == "openvino":  # re-describing an IR: keep what it already stores
        old = ModelSettings.from_model(ov_model)
        for k, v in old.as_dict().items():
            if getattr(settings, k, None) is None and k in settings.__dataclass_fields__:
                setattr(settings, k, v)
        settings.extra.update(old.extra)
    if measure_rf:
        rf = measure_receptive_field(TileModel(ov_model.clone(), tile=t3))
        settings.receptive_field = list(rf.radius)
        if not rf.bounded:
            settings.extra["receptive_field_bounded"] = False
            notes.append(f"receptive field {rf} at tile {t3}: crop stitching cannot be exact at this tile size")
    settings.to_model(ov_model)
    if int8:
        if not calibration_volume:
            raise VolinferError("--int8 needs --calibration-volume (real tiles to calibrate the quantisation on)")
        ov_model = quantize_int8(ov_model, _calibration_tiles(calibration_volume, layout, channels, t3,
                                                              normalization, count=calibration_tiles, seed=seed))
        settings.extra["quantization"] = f"int8 (NNCF, {calibration_tiles} calibration tiles)"
        settings.to_model(ov_model)
        notes.append("INT8 weights and activations: parity below is against the FP32 source; it is reported, and "
                     "fails the conversion only when --tolerance is given")

    tmp_xml = out.with_name(f".{out.stem}.partial.xml")
    tmp_bin = tmp_xml.with_suffix(".bin")
    parity = None
    try:
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=fp16)
        if check:
            tol = tolerance if tolerance is not None else (float("inf") if int8 else 1e-2 if fp16 else 1e-4)
            if calibration_volume:
                x = _calibration_tiles(calibration_volume, layout, channels, t3, normalization)[0]
            else:
                x = np.random.default_rng(seed).standard_normal(_shape(layout, channels, t3)).astype(np.float32)
            parity = check_parity(src, tmp_xml, x, tol, out_index)
            if not parity.passed:
                raise VolinferError(f"conversion rejected, {parity}; loosen with --tolerance or use --no-fp16")
        os.replace(tmp_bin, out.with_suffix(".bin"))
        os.replace(tmp_xml, out)
    finally:
        for p in (tmp_xml, tmp_bin):
            if p.exists():
                p.unlink()
    return ConversionResult(out, parity, settings, notes)


def _convert_with_examples(src: Source, shape: list[int] | None, layout: str, channels: int,
                           sizes: list[int]) -> ov.Model:
    """Convert, tracing at the first example size the model accepts (a rejected tile is explained later, once the
    size multiple is known)."""
    error: VolinferError | None = None
    for size in dict.fromkeys(sizes):
        try:
            return src.to_openvino(shape, _shape(layout, channels, [size] * 3))
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
