"""A conversion's settings as values (the counterpart of :mod:`volinfer.run.settings` for ``volinfer convert``).

Built once — from the command line or from :func:`converters.convert`'s keywords (:meth:`ConvertSettings.
from_kwargs`) — validated in the constructors, and passed down whole. Four parts: how to load the source, the input
the IR takes, the run settings stored in it, and how it is checked and saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from volinfer import validate
from volinfer.errors import VolinferError
from volinfer.run.settings import replace_flat


@dataclass(frozen=True)
class SourceSettings:
    """How the source model is loaded (:func:`converters.sources.load`) and which of its outputs is used."""

    weights: str | None = None
    trust_pickle: bool = False
    random_weights: bool = False
    factory_kwargs: dict[str, Any] | None = None
    inputs: list[str] | None = None  # the image input's name first (--input)
    outputs: list[str] | None = None
    fixed: dict[str, Any] | None = None  # other inputs frozen to constants (--set)
    select_output: str | int | None = None

    def __post_init__(self) -> None:
        for name, value in (self.fixed or {}).items():
            try:
                finite = bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
            except (TypeError, ValueError):
                continue  # not numeric: the input's own type check says what is wrong
            if not finite:  # a frozen NaN makes every output NaN, and parity on NaN == NaN "passes"
                raise VolinferError(f"--set {name}: value {value!r} is not finite (NaN and infinities are refused)")
        if self.random_weights and self.weights:
            raise VolinferError("--random-weights contradicts --weights: pass one (the IR would hold the trained "
                                "weights)")

    def load_kwargs(self) -> dict[str, Any]:
        return dict(weights=self.weights, trust_pickle=self.trust_pickle, random_weights=self.random_weights,
                    factory_kwargs=self.factory_kwargs, inputs=self.inputs, outputs=self.outputs, fixed=self.fixed)


@dataclass(frozen=True)
class ShapeSettings:
    """The IR's input: tile, channel count, layout, static or dynamic spatial dimensions."""

    tile: int | Sequence[int] | None = None
    channels: int | None = None
    layout: str | None = None
    static: bool = False

    def __post_init__(self) -> None:
        t = self.tile
        if t is not None and any(int(v) <= 0 for v in ([t] if isinstance(t, (int, np.integer)) else t)):
            raise VolinferError(f"--tile must be positive; got {t}")
        if self.channels is not None:
            validate.count("channels", self.channels)
        if self.layout is not None:
            object.__setattr__(self, "layout", self.layout.upper())


@dataclass(frozen=True)
class StoredSettings:
    """The run settings stored in the IR for ``volinfer run`` (None: not stored, or kept from a re-described IR)."""

    activation: str | None = None
    labels: Sequence[str] | None = None
    channel_names: Sequence[str] | None = None
    normalization: dict[str, Any] | None = None
    spacing: Sequence[float] | None = None
    orientation: str | None = None
    overlap: float | int | Sequence[float | int] | None = None
    stitch: str | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None:
            object.__setattr__(self, "orientation", validate.orientation(self.orientation))
        if isinstance(self.normalization, dict):
            validate.normalization(self.normalization)
        if self.spacing is not None:
            for v in self.spacing:
                validate.positive("spacing", v)


@dataclass(frozen=True)
class CheckSettings:
    """How the IR is saved and verified: FP16 weights, INT8 quantisation, parity against the source, calibration,
    receptive field."""

    fp16: bool | None = None  # None: FP16 weights when they pass parity, else FP32; True: FP16 or refuse; False: FP32
    int8: bool = False
    calibration_tiles: int = 8
    check: bool = True
    tolerance: float | None = None
    calibration_volume: str | None = None
    measure_rf: bool = True
    seed: int = 0
    device: str = "CPU"  # whose native reduced precision is verified for `--precision auto`
    precision: str = "auto"  # which reduced precision to verify: auto (the device's native one), f32 (none)
    threads: int | None = None
    speed_profile: bool = True  # time the model at a few tile shapes for the planner (--no-speed-profile: skip)
    max_memory_mb: float | None = None  # RAM budget of every stage (--max-memory; None: as for `run`)

    def __post_init__(self) -> None:
        validate.count("calibration-tiles", self.calibration_tiles)
        if self.max_memory_mb is not None:
            validate.positive("max-memory", self.max_memory_mb)
        if self.threads is not None:
            validate.count("threads", self.threads)
        if self.tolerance is not None:
            validate.positive("tolerance", self.tolerance)


@dataclass(frozen=True)
class ConvertSettings:
    """Everything a conversion is asked to do."""

    source: SourceSettings = field(default_factory=SourceSettings)
    shape: ShapeSettings = field(default_factory=ShapeSettings)
    stored: StoredSettings = field(default_factory=StoredSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    overwrite: bool = False

    @classmethod
    def from_kwargs(cls, base: "ConvertSettings | None" = None, **kw: Any) -> "ConvertSettings":
        """Settings from :func:`converters.convert`'s flat keywords, on top of ``base``; unknown keywords are
        refused."""
        return replace_flat(base or cls(), kw, ("overwrite",), "conversion")
