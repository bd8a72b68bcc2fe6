"""Run settings stored inside an OpenVINO IR (``rt_info["volinfer"]``), so a model file says how it wants to be run.

Each setting is one key under ``volinfer`` whose value is JSON text. Keys this version does not know are kept as they
are and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import openvino as ov

from volinfer import validate
from volinfer.errors import VolinferError
from volinfer.model.precision import MAX_PROB_ABS, MIN_LABEL_AGREEMENT

RT_KEY = "volinfer"


def _ints(value: Any, minimum: int, counts: tuple[int, ...] = (3,)) -> list[int]:
    vals = value if isinstance(value, list) else [value]
    if len(vals) not in counts:
        raise VolinferError(f"expected {' or '.join(map(str, counts))} whole numbers")
    return [validate.count("value", v, minimum) for v in vals]


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise VolinferError("expected a list of names")
    return value


def _choice(value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in {c.lower() for c in choices}:
        raise VolinferError(f"expected one of {', '.join(choices)}")
    return value


def _normalization(value: Any) -> dict[str, Any]:
    kinds = ("none", "zscore", "minmax", "percentile", "scale")
    if not isinstance(value, dict) or value.get("kind", "none") not in kinds:
        raise VolinferError(f"expected a map with kind one of {', '.join(kinds)}")
    validate.normalization(value)
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise VolinferError("expected true or false")
    return value


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise VolinferError("expected text")
    return str(value)


def _output(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and value < 0):
        raise VolinferError("expected an output name or index")
    return value


def _number(record: dict[str, Any], key: str, low: float, high: float = float("inf"),
            optional: bool = False) -> float | None:
    """``record[key]`` as a finite number within [low, high] (not a bool, not text)."""
    v = record.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= float(v) <= high:
        raise VolinferError(f"{key} must be a number from {low:g} to {high:g}; got {json.dumps(v)}")
    return float(v)


def _precision_check(value: Any) -> dict[str, Any]:
    """The stored reduced-precision verdict (:func:`volinfer.model.precision.compare`): typed, and coherent (a
    "faithful" verdict must meet the criteria with its own figures: it decides whether runs use bf16/f16)."""
    if not isinstance(value, dict):
        raise VolinferError("expected a map (precision, faithful, label_agreement, prob_max_abs)")
    _choice(value.get("precision"), ("bf16", "f16"))
    faithful = value.get("faithful")
    if not isinstance(faithful, bool):
        raise VolinferError(f"faithful must be true or false; got {json.dumps(faithful)}")
    agree = _number(value, "label_agreement", 0.0, 1.0)
    moved = _number(value, "prob_max_abs", 0.0)
    _number(value, "input_abs_max", 0.0, float("inf"), optional=True)
    if faithful and (agree < MIN_LABEL_AGREEMENT or moved > MAX_PROB_ABS):  # type: ignore[operator]
        raise VolinferError(f"it says faithful with labels {agree:.2%} equal and probabilities moved by {moved:g} "
                            f"(faithful needs >= {MIN_LABEL_AGREEMENT:.1%} and <= {MAX_PROB_ABS})")
    return value


#: How each stored setting is checked (value as decoded from its JSON text).
_CHECKS: dict[str, Any] = {
    "layout": lambda v: _choice(v, ("NCDHW", "NDHWC")),
    "in_channels": lambda v: _ints(v, 1, (1,))[0],
    "channel_names": _strings,
    "tile": lambda v: v if isinstance(v, int) and _ints(v, 1, (1,)) else _ints(v, 1, (3,)),
    "size_multiple": lambda v: _ints(v, 1, (1,))[0],
    "overlap": lambda v: (validate.overlap(v), v)[1],
    "stitch": lambda v: _choice(v, ("crop", "gaussian", "mean")),
    "receptive_field": lambda v: _ints(v, 0, (3,)),
    "normalization": _normalization,
    "activation": lambda v: _choice(v, ("softmax", "sigmoid", "none")),
    "labels": _strings,
    "spacing": lambda v: [validate.positive("value", x) for x in (v if isinstance(v, list) and len(v) in (1, 3)
                                                                   else [None])],
    "orientation": validate.orientation,
    "output": _output,
    "instance_norm": _flag,
}
#: Checks of stored keys kept in ``ModelSettings.extra`` that decide how a run computes (not only what it says).
_EXTRA_CHECKS: dict[str, Any] = {
    "precision_check": _precision_check,
    "receptive_field_bounded": _flag,
    "norm_stats": lambda v: _choice(v, ("volume", "tile")),
    "outputs": lambda v: _choice(v, ("logits", "probabilities", "log-probabilities")),
}


def _check_setting(key: str, value: Any) -> Any:
    """``value`` if it is a valid ``key`` setting, else a one-line error naming the key and what is expected."""
    check = _CHECKS.get(key) or _EXTRA_CHECKS.get(key, _text)
    try:
        return check(value)
    except VolinferError as e:
        raise VolinferError(f"the model's stored setting '{key}' (rt_info {RT_KEY}/{key}) is invalid: "
                            f"{json.dumps(value)[:80]} ({e}); re-convert the model with `volinfer convert`") from None


@dataclass
class ModelSettings:
    """What a model needs to be run correctly. ``None`` means "not stored; use the default or ask the user"."""

    layout: str | None = None  # "NCDHW" or "NDHWC"
    in_channels: int | None = None
    channel_names: list[str] | None = None
    tile: list[int] | None = None
    size_multiple: int | None = None
    overlap: float | int | None = None
    stitch: str | None = None  # "crop", "gaussian", "mean"
    receptive_field: list[int] | None = None  # radius in voxels per axis, measured
    normalization: dict[str, Any] | None = None
    activation: str | None = None  # "softmax", "sigmoid", "none"
    labels: list[str] | None = None
    spacing: list[float] | None = None  # voxel size in mm the model expects, (x, y, z) of its input
    orientation: str | None = None  # where the model's input axes point (e.g. "RAS")
    output: str | None = None  # output name to use when the model has several
    instance_norm: bool | None = None  # per-tile statistics: crop stitching is not exact
    source_framework: str | None = None
    source_file: str | None = None
    source_sha256: str | None = None
    volinfer_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: ov.Model) -> "ModelSettings":
        """Read the settings stored in ``model``; an IR without any gives all-``None`` settings. Every known key is
        checked (type and value): a corrupt one is a one-line error naming it, never a traceback later."""
        if not model.has_rt_info([RT_KEY]):
            return cls()
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        try:
            items = list(model.get_rt_info()[RT_KEY].items())
        except Exception:
            raise VolinferError(f"the model's rt_info '{RT_KEY}' is not a map of settings; re-create it with "
                                f"`volinfer convert`") from None
        for key, raw in items:
            try:
                text = raw.astype(str)
            except Exception:  # a nested map where a value belongs
                text = str(raw)
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            if (key in known or key in _EXTRA_CHECKS) and value is not None:
                value = _check_setting(key, value)
            (values if key in known else extra)[key] = value
        return cls(**values, extra=extra)

    def to_model(self, model: ov.Model) -> None:
        """Write every non-``None`` setting (and the unknown keys read earlier) into ``model``'s rt_info."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        for key, value in data.items():
            model.set_rt_info(json.dumps(value), [RT_KEY, key])

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        return data
