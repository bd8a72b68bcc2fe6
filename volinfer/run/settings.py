"""A run's settings as values: what to read, how to tile and stitch, what to write, how to run the model.

Built once — from the command line (:func:`RunSettings.from_cli`), from the Python API's keywords
(:meth:`RunSettings.from_kwargs`), or left at their defaults so that the model's stored settings apply (every
``None`` here means "stored in the model, else volinfer's default") — validated once, in the constructors (through
:mod:`volinfer.validate`), and passed down whole to :func:`volinfer.api.predict`, :func:`volinfer.run.distributed.run_zarr`
and :func:`volinfer.run.plan.plan_run`. They are frozen: a layer that needs another value makes a new one with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer import validate
from volinfer.errors import VolinferError
from volinfer.io.formats import is_tiff_output, is_zarr_output
from volinfer.options import (ENGINES, NORM_STATS, OUTPUT_KINDS, PAD_MODES, STITCH_MODES, check_budget_mb,
                              parse_channels, parse_mirror, parse_normalization, parse_size_mb, parse_tile)
from volinfer.model.tile_model import CompileOptions



def _choice(name: str, value: str | None, allowed: Sequence[str]) -> None:
    if value is not None and value not in allowed:
        raise VolinferError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

#: Gaussian stitching's sigma, a fraction of the tile, when ``--sigma`` is not given.
DEFAULT_SIGMA = 0.125
#: The probability above which one-mask-per-channel labels are set, when ``--threshold`` is not given.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class TilingSettings:
    """How the volume is cut into tiles and the tiles' outputs put back together."""

    tile: Any = None  # None/"auto": planned for fidelity; an int or three ints: used as is
    overlap: Any = None  # fraction(s) of the tile, whole voxels, or None (stored, else planned/default)
    stitch: str | None = None  # crop | gaussian | mean; None: stored, else crop
    sigma: float | None = None  # gaussian stitching only (refused with crop/mean); None: DEFAULT_SIGMA
    pad_mode: str = "constant"
    mirror: tuple[int, ...] = ()  # volume axes of test-time mirroring
    norm_stats: str | None = None  # volume | tile; None: stored, else volume
    max_memory_mb: float | None = None
    reuse_constant: bool = True
    engine: str = "auto"  # tiles | stream (layer by layer, see volinfer.run.stream) | auto: stream where it pays

    def __post_init__(self) -> None:
        _choice("engine", self.engine, ENGINES)
        if self.tile is not None:
            validate.tile(self.tile if isinstance(self.tile, str) else ",".join(str(t) for t in np.atleast_1d(self.tile)))
        if self.overlap not in (None, ""):
            validate.overlap(self.overlap)
        _choice("stitch", self.stitch, STITCH_MODES)
        _choice("norm-stats", self.norm_stats, NORM_STATS)
        _choice("pad mode", self.pad_mode, PAD_MODES)
        if self.sigma is not None:
            validate.positive("sigma", self.sigma)
        if self.max_memory_mb is not None:
            check_budget_mb("max-memory", self.max_memory_mb)
        object.__setattr__(self, "mirror", parse_mirror(self.mirror))  # type: ignore[arg-type]

    @property
    def gaussian_sigma(self) -> float:
        """The Gaussian stitcher's sigma (a fraction of the tile): the one given, else :data:`DEFAULT_SIGMA`."""
        return DEFAULT_SIGMA if self.sigma is None else self.sigma


@dataclass(frozen=True)
class OutputSettings:
    """What is written: labels, probabilities or raw outputs, which channels, in which type; Zarr store layout."""

    kind: str = "labels"
    activation: str | None = None  # softmax | sigmoid | none; None: from the graph / stored / default
    channels: tuple[int, ...] | None = None
    threshold: float | None = None  # one-mask-per-channel labels only (refused elsewhere); None: DEFAULT_THRESHOLD
    prob_dtype: str = "float32"
    chunks: Any = None  # Zarr outputs: chunk edge(s); None: 64 (NIfTI input) or the input's (Zarr input)
    compression: bool = True  # Zarr outputs
    pyramid: int = 0  # Zarr outputs: downsampled OME-Zarr levels

    def __post_init__(self) -> None:
        _choice("kind", self.kind, OUTPUT_KINDS)
        _choice("activation", self.activation, ("softmax", "sigmoid", "none"))
        if self.threshold is not None:  # the range depends on the resolved activation: OutputSpec
            validate.finite("threshold", self.threshold)
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        validate.count("pyramid", self.pyramid, minimum=0)

    @property
    def labels_threshold(self) -> float:
        """The threshold of one-mask-per-channel labels: the one given, else :data:`DEFAULT_THRESHOLD`."""
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def zarr_output(self, default_chunks: int = 64) -> dict[str, Any]:
        """The Zarr store settings a NIfTI-input run records and writes with."""
        return {"chunks": self.chunks if self.chunks is not None else default_chunks,
                "compression": self.compression, "pyramid": self.pyramid}


@dataclass(frozen=True)
class InputSettings:
    """How input voxels are read: intensity normalisation, the NaN/Inf replacement, an array's channel axis, and
    whether to resample to the model's stored spacing."""

    normalize: dict[str, Any] | None = None  # None: stored in the model, else none
    nan_value: float | None = None  # None: refuse volumes with NaN/Inf voxels
    channel_axis: int | None = None
    resample: bool = True  # resample to the model's stored spacing (volinfer.run.model_grid)

    def __post_init__(self) -> None:
        if isinstance(self.normalize, str):  # the CLI form ("zscore", "percentile:1:99"), e.g. from predict()

            object.__setattr__(self, "normalize", parse_normalization(self.normalize))
        if self.normalize is not None and not isinstance(self.normalize, dict):
            raise VolinferError(f"normalize must be a string such as 'zscore' or a dict such as {{'kind': 'zscore'}}; "
                                f"got {self.normalize!r}")
        if isinstance(self.normalize, dict):
            validate.normalization(self.normalize)
        if self.nan_value is not None:
            validate.float32_value("nan_value", self.nan_value)


@dataclass(frozen=True)
class RuntimeSettings:
    """How the model runs: device, precision, threads/streams, cache, requests in flight, layout, which output."""

    device: str = "CPU"
    precision: str = "auto"
    threads: int | None = None
    streams: int | None = None
    cache_dir: str | None = None
    requests: int = 2
    layout: str | None = None
    model_output: str | int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", validate.count("requests", self.requests))
        for name in ("threads", "streams"):  # 0 means "not set" (the device's default), as OpenVINO reads it
            if getattr(self, name) is not None:
                object.__setattr__(self, name, validate.count(name, getattr(self, name), minimum=0) or None)
        if self.layout is not None:
            object.__setattr__(self, "layout", self.layout.upper())
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", str(self.cache_dir))

    def compile_options(self) -> Any:
        """The :class:`volinfer.model.tile_model.CompileOptions` these settings compile with."""
        return CompileOptions(**self.compile_dict())

    def compile_dict(self) -> dict[str, Any]:
        """The compile options as a dict (picklable; what Zarr jobs send their workers)."""
        return dict(device=self.device, precision=self.precision, threads=self.threads, streams=self.streams,
                    cache_dir=self.cache_dir)




@dataclass(frozen=True)
class RunSettings:
    """Everything a run is asked to do, in four parts, plus how it treats an existing output."""

    tiling: TilingSettings = field(default_factory=TilingSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    input: InputSettings = field(default_factory=InputSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    resume: bool = False
    overwrite: bool = False
    progress: bool = False

    @classmethod
    def from_kwargs(cls, base: "RunSettings | None" = None, **kw: Any) -> "RunSettings":
        """Settings from the Python API's flat keywords (``tile=``, ``kind=``, ``device=``, ...), on top of ``base``.
        Also accepts ``options=`` (a dict of compile options), ``zarr_output=`` (a dict of ``chunks``,
        ``compression``, ``pyramid``). Unknown keywords are refused."""
        return replace_flat(base or cls(), _flatten(kw), _TOP, "run")

    def as_kwargs(self) -> dict[str, Any]:
        """The flat keywords these settings were built from (the inverse of :meth:`from_kwargs`)."""
        out: dict[str, Any] = {"resume": self.resume, "overwrite": self.overwrite, "progress": self.progress}
        for part in (self.tiling, self.output, self.input, self.runtime):
            out.update({f.name: getattr(part, f.name) for f in fields(part)})
        return out


_TOP = ("resume", "overwrite", "progress")


def replace_flat(base: Any, kw: dict[str, Any], top: Sequence[str], what: str) -> Any:
    """``base`` (a frozen dataclass of frozen parts) with flat keywords routed to the part that has a field of that
    name, and the names in ``top`` set on ``base`` itself; an unknown keyword is a TypeError naming ``what``.
    Shared by :class:`RunSettings` and :class:`converters.settings.ConvertSettings`."""
    parts = {f.name: getattr(base, f.name) for f in fields(base) if is_dataclass(getattr(base, f.name))}
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in parts}
    for key, value in kw.items():
        if key in top:
            own[key] = value
            continue
        name = next((n for n, part in parts.items() if key in {f.name for f in fields(part)}), None)
        if name is None:
            raise TypeError(f"unknown {what} setting {key!r}")
        nested[name][key] = value
    return replace(base, **own, **{n: replace(parts[n], **v) for n, v in nested.items() if v})


def _flatten(kw: dict[str, Any]) -> dict[str, Any]:
    """Unpack the grouped keywords some entry points take (``options``, ``zarr_output``)."""
    kw = dict(kw)
    options = kw.pop("options", None) or {}
    for k, v in options.items():
        if v is not None:
            kw.setdefault(k, v)
    zarr_output = kw.pop("zarr_output", None) or {}
    for k in ("chunks", "compression", "pyramid"):
        if k in zarr_output:
            kw[k] = zarr_output[k]
    return kw


def output_float_dtype(float16: bool, kind: str, output: str | Path) -> tuple[str, str | None]:
    """The probability dtype to write to ``output``, and a note, naming the output's format, when ``--float16``
    cannot apply: NIfTI-1 has no float16 type (nibabel refuses it), so NIfTI outputs get float32; the TIFF writer
    writes float32 too; Zarr stores float16."""
    if not float16:
        return "float32", None
    if kind != "probabilities":
        return "float32", f"--float16 applies to --kind probabilities; {kind} written as usual"
    if is_tiff_output(output):
        return "float32", "--float16 applies to .zarr outputs: this TIFF's probabilities are written as float32"
    if not is_zarr_output(output):
        return "float32", "NIfTI has no float16 type: probabilities written as float32 (a .zarr output stores float16)"
    return "float16", None


def from_cli(params: dict[str, Any]) -> RunSettings:
    """Settings from the ``run``/``plan`` commands' parsed options (click's parameter names)."""

    p = dict(params)
    kw: dict[str, Any] = {}
    simple = ("overlap", "stitch", "sigma", "pad_mode", "norm_stats", "mirror", "kind", "activation", "threshold",
              "device", "precision", "threads", "streams", "requests", "layout", "nan_value", "chunks", "pyramid",
              "resume", "overwrite", "prob_dtype", "engine")
    for key in simple:
        if key in p and p[key] is not None:
            kw[key] = p[key]
    kw["tile"] = parse_tile(p.get("tile"))
    if p.get("cache_dir"):
        kw["cache_dir"] = str(p["cache_dir"])
    if p.get("channels"):
        kw["channels"] = parse_channels(p["channels"])
    if p.get("normalize"):
        kw["normalize"] = parse_normalization(p["normalize"])
    if p.get("output_name") is not None:
        kw["model_output"] = p["output_name"]
    if p.get("max_memory"):
        kw["max_memory_mb"] = parse_size_mb(p["max_memory"])
    if "no_constant_reuse" in p:
        kw["reuse_constant"] = not p["no_constant_reuse"]
    if "no_compression" in p:
        kw["compression"] = not p["no_compression"]
    if "no_resample" in p:
        kw["resample"] = not p["no_resample"]
    kw["progress"] = not p.get("quiet") and not p.get("as_json")
    return RunSettings.from_kwargs(**kw)
