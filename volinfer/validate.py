"""Validating numeric option values, once, for every way in: the command line (at parse time, through the click
types at the end of this module) and the Python API / stored model settings (the same functions, called by
:class:`~volinfer.run.postprocess.OutputSpec`, :class:`~volinfer.run.normalize.Normalizer`, the blend weights and
:func:`~volinfer.run.setup.parse_overlap`).

Every check raises :class:`~volinfer.errors.VolinferError` with one line naming the option, the valid range and the
value given. NaN and infinities are refused everywhere: a NaN that slips through a comparison (``nan <= 0`` is false)
is how a run ends with an all-NaN output and exit 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import click

from volinfer.errors import VolinferError

#: How the overlap rule reads (in --help and in errors).
OVERLAP_RULE = ("a fraction of the tile in [0, 1) (0.25), or a whole number of voxels >= 1 (32), optionally per "
                "axis (32,32,16)")


def _num(name: str, value: Any) -> float:
    """``value`` as a finite float, or a one-line error."""
    if isinstance(value, bool):
        raise VolinferError(f"{name} must be a number; got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VolinferError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(v):
        raise VolinferError(f"{name} must be a finite number; got {value!r}")
    return v


def finite(name: str, value: Any) -> float:
    """Any finite number (e.g. ``--nan-value``, the shift of ``--normalize scale``)."""
    return _num(name, value)


def float32_value(name: str, value: Any) -> float:
    """A finite number that float32, the type volinfer computes in, can hold (e.g. ``--nan-value``)."""
    v = _num(name, value)
    limit = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
    if abs(v) > limit:
        raise VolinferError(f"{name} must be within float32's range (±{limit:.4g}); got {value!r}")
    return v


def positive(name: str, value: Any) -> float:
    """A finite number > 0 (e.g. ``--sigma``, ``--tolerance``)."""
    v = _num(name, value)
    if not v > 0:
        raise VolinferError(f"{name} must be > 0; got {value!r}")
    return v


def count(name: str, value: Any, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (``--requests``, ``--threads``, ``--block``, ...). ``2.0`` is accepted, ``2.5``
    is not."""
    v = _num(name, value)
    if v != int(v) or v < minimum:
        raise VolinferError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    return int(v)


def threshold(value: Any, activation: str | None) -> float:
    """A labels threshold: a probability in (0, 1) when an activation turns outputs into probabilities; any finite
    number when outputs are thresholded raw (``activation="none"``)."""
    if activation == "none":
        return _num("threshold", value)
    v = _num("threshold", value)
    if not 0 < v < 1:
        raise VolinferError(f"threshold must be strictly between 0 and 1 (it applies to probabilities); got "
                            f"{value!r} (with --activation none it is compared with raw outputs and may be any number)")
    return v


def _split(name: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.replace("x", ",").split(",")]
    elif isinstance(value, (numbers.Number, bool)):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise VolinferError(f"{name}: expected one or three values; got {value!r}") from None
    if len(items) not in (1, 3) or any(v == "" for v in items):
        raise VolinferError(f"{name}: expected one or three values; got {value!r}")
    return items


def overlap(value: Any) -> list[float] | None:
    """``--overlap`` → three numbers (None when not given). Values < 1 are fractions of the tile, whole numbers >= 1
    are voxels; anything else (negative, NaN/Inf, 1.5) is refused rather than guessed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    out = []
    for item in _split("overlap", value):
        try:
            v = _num("overlap", item)
        except VolinferError:
            raise VolinferError(f"overlap must be {OVERLAP_RULE}; got {value!r}") from None
        if v < 0 or (v >= 1 and v != int(v)):
            why = "negative" if v < 0 else "ambiguous (not a fraction < 1, not a whole number of voxels)"
            raise VolinferError(f"overlap {item} is {why}: give {OVERLAP_RULE}")
        out.append(v)
    return out * 3 if len(out) == 1 else out


def tile(value: Any) -> list[int] | None:
    """``--tile``: one or three whole numbers >= 1 (``auto``, or nothing: let volinfer choose)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        return [count("tile", v) for v in _split("tile", value)]
    except VolinferError:
        raise VolinferError(f"tile must be auto, or one or three whole numbers >= 1 (128 or 128x128x64); got {value!r}"
                            ) from None


def percentiles(lo: Any, hi: Any) -> tuple[float, float]:
    """Percentile clipping bounds: 0 <= lo < hi <= 100."""
    a, b = _num("percentile lower bound", lo), _num("percentile upper bound", hi)
    if not 0 <= a < b <= 100:
        raise VolinferError(f"percentile bounds must satisfy 0 <= LO < HI <= 100; got {lo}, {hi}")
    return a, b


def normalization(spec: dict[str, Any]) -> None:
    """The numbers of a normalisation spec (CLI, API or stored in a model) are finite and make sense."""
    kind = spec.get("kind", "none")
    where = f"normalization {kind}"

    def each(key: str, check: Callable[[str, Any], float]) -> list[float]:
        raw = spec[key]
        vals = raw if isinstance(raw, (list, tuple)) else [raw]
        if not vals:
            raise VolinferError(f"{where}: {key} is empty")
        return [check(f"{where} {key}", v) for v in vals]

    if kind == "scale":
        for key in ("scale", "shift"):
            if key not in spec:
                raise VolinferError(f"{where} needs 'scale' and 'shift' (x * scale + shift)")
        if any(v == 0 for v in each("scale", finite)):
            raise VolinferError(f"{where}: scale must not be 0 (it would erase the image)")
        each("shift", finite)
    elif kind == "zscore" and "mean" in spec and "std" in spec:
        each("mean", finite)
        each("std", positive)
    elif kind == "minmax" and "min" in spec and "max" in spec:
        lo, hi = each("min", finite), each("max", finite)
        if len(lo) == len(hi) and any(a >= b for a, b in zip(lo, hi)):
            raise VolinferError(f"{where}: min must be below max; got {spec['min']}, {spec['max']}")
    elif kind == "percentile":
        percentiles(spec.get("lower", 0.5), spec.get("upper", 99.5))


# ---- click adapters: the same checks at parse time, failing as one line (exit 2) ----


class OptionError(click.UsageError):
    """A bad option value, printed as one ``error: ...`` line (click's usage block would add three)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _named(text: str, opt: str) -> str:
    """The message, starting with the option as typed (``--sigma must be ...``)."""
    bare = opt.lstrip("-")
    if text.startswith(opt):
        return text
    if opt.startswith("-") and text.startswith(bare):
        return opt[: len(opt) - len(bare)] + text
    return f"{opt}: {text}"


def _option_name(param: click.Parameter | None, default: str) -> str:
    if param is None or not getattr(param, "opts", None):
        return default
    return max(param.opts, key=len)


class Checked(click.ParamType):
    """A click type running one of the checks above; ``keep_text`` hands the command the text as typed (for
    options whose command body parses it), after it passed the check."""

    def __init__(self, name: str, check: Callable[[str, Any], Any], keep_text: bool = False) -> None:
        self.name, self.check, self.keep_text = name, check, keep_text

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        opt = _option_name(param, self.name)
        try:
            checked = self.check(opt, value)
        except VolinferError as e:
            raise OptionError(_named(str(e), opt), ctx=ctx) from None
        return value if self.keep_text else checked


def _overlap(name: str, value: Any) -> Any:
    return overlap(value)


def _single_overlap(name: str, value: Any) -> float:
    items = overlap(value)
    if items is None or len(set(items)) != 1 or (isinstance(value, str) and "," in value):
        raise VolinferError(f"{name} takes one value here ({OVERLAP_RULE.split(', optionally')[0]}); got {value!r}")
    return items[0]


def _tile(name: str, value: Any) -> Any:
    return tile(value)


def _tiles(name: str, value: Any) -> Any:
    return [count(name, v) for v in str(value).split(",")]


def _positive_list(name: str, value: Any) -> list[float]:
    return [positive(name, v) for v in _split(name, value)]


def orientation(value: Any) -> str:
    """An orientation code: three letters naming where each voxel axis points, one of R/L, one of A/P, one of S/I
    (NIfTI's convention, e.g. RAS, LPS); returned upper-case."""
    text = str(value).strip().upper() if isinstance(value, str) else ""
    pairs = [{"R", "L"}, {"A", "P"}, {"S", "I"}]
    if len(text) != 3 or sorted(next((i for i, p in enumerate(pairs) if c in p), 9) for c in text) != [0, 1, 2]:
        raise VolinferError(f"orientation must be three letters with one of R/L, A/P, S/I each (e.g. RAS, LPS); "
                            f"got {value!r}")
    return text


def _orientation(name: str, value: Any) -> str:
    return orientation(value)


FLOAT = Checked("number", finite)
POSITIVE = Checked("number", positive)
COUNT = Checked("integer", lambda n, v: count(n, v))
OVERLAP = Checked("overlap", _overlap, keep_text=True)
SINGLE_OVERLAP = Checked("overlap", _single_overlap)
TILE = Checked("tile", _tile, keep_text=True)
TILES = Checked("tiles", _tiles, keep_text=True)
SPACING = Checked("spacing", _positive_list, keep_text=True)
ORIENTATION = Checked("orientation", _orientation)


def threshold_callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``--threshold``: in (0, 1) unless ``--activation none`` (declare ``--activation`` eager so it is known)."""
    if value is None:
        return value
    try:
        return threshold(value, ctx.params.get("activation"))
    except VolinferError as e:
        raise OptionError(_named(str(e), "--threshold"), ctx=ctx) from None
