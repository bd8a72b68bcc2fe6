"""Every option's parser and choice list, in one place below everything that uses them: the command line, the
Python API (:class:`~volinfer.run.settings.RunSettings`), ``volinfer convert`` and the stored model settings parse
and check values through these functions (numeric ranges through :mod:`volinfer.validate`), so a value means
the same and is refused with the same one line everywhere."""

from __future__ import annotations

from typing import Any, Sequence

from volinfer.errors import VolinferError
from volinfer.validate import Checked, finite, normalization, overlap, percentiles, positive

#: How tile outputs are combined: crop (no accumulator; exact with margins) or blended.
STITCH_MODES = ("crop", "gaussian", "mean")
#: The blending stitchers' weights.
BLEND_MODES = ("gaussian", "mean")
#: Where InstanceNorm/GroupNorm statistics come from: the whole volume (exact) or each tile.
NORM_STATS = ("volume", "tile")
#: What a run writes.
OUTPUT_KINDS = ("labels", "probabilities", "raw")
#: How a tile beyond the volume's edge is filled.
PAD_MODES = ("constant", "edge", "reflect")
#: Which engine runs the model: chosen by the planner, tile by tile, or layer streaming.
ENGINES = ("auto", "tiles", "stream")
#: Intensity normalisations (``--normalize``).
NORMALIZATIONS = ("none", "zscore", "minmax", "percentile", "scale")


def parse_normalization(text: str | None) -> dict[str, Any] | None:
    """CLI form: ``zscore``, ``minmax``, ``percentile:0.5:99.5``, ``scale:0.001:0``, ``none``; validated (finite
    numbers, the right count of them, percentiles 0 <= LO < HI <= 100)."""
    if not text:
        return None
    parts = text.split(":")
    kind = parts[0]
    if kind not in NORMALIZATIONS:
        raise VolinferError(f"--normalize must be one of {', '.join(NORMALIZATIONS)} (percentile:LO:HI, scale:A:B); got {text!r}")
    nums = [finite(f"--normalize {text!r}: parameter", p) for p in parts[1:]]
    if kind == "percentile":
        if len(nums) not in (0, 2):
            raise VolinferError(f"--normalize percentile takes two numbers, percentile:LO:HI (e.g. "
                                f"percentile:0.5:99.5); got {text!r}")
        lo, hi = percentiles(*nums) if nums else (0.5, 99.5)
        return {"kind": kind, "lower": lo, "upper": hi}
    if kind == "scale":
        if len(nums) != 2:
            raise VolinferError("--normalize scale needs two numbers: scale:A:B means x * A + B")
        spec = {"kind": kind, "scale": nums[0], "shift": nums[1]}
        normalization(spec)
        return spec
    if nums:
        raise VolinferError(f"--normalize {kind} takes no parameters; got {text!r}")
    return {"kind": kind}


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


def parse_tile(value: str | None) -> Any:
    """``--tile``: ``auto``/empty → None (planned), ``128`` → 128, ``128,128,64`` / ``128x128x64`` → three sizes."""
    if not value or value.strip().lower() == "auto":
        return None
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        raise VolinferError(f"--tile expects a size (128) or three sizes (128,128,64); got {value!r}") from None
    return parts[0] if len(parts) == 1 else parts


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """``"1,2"`` → ``(1, 2)``; empty → ``None`` (all channels)."""
    if not text:
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise VolinferError(f"--channels expects comma-separated integers, got {text!r}") from None


def parse_mirror(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"xyz"`` / ``"xz"`` / ``[0, 2]`` → sorted volume axes to mirror over; empty for none."""
    if value is None or value == "" or value == "none":
        return ()
    if isinstance(value, str):
        bad = set(value.lower()) - set("xyz")
        if bad or len(set(value.lower())) != len(value):
            raise VolinferError(f"--mirror takes a subset of the axes x, y, z (e.g. xyz or xz); got {value!r}")
        return tuple(sorted("xyz".index(c) for c in value.lower()))
    axes = tuple(sorted(set(int(a) for a in value)))
    if any(a not in (0, 1, 2) for a in axes):
        raise VolinferError(f"mirror axes must be 0, 1, 2 (x, y, z); got {value!r}")
    return axes


def parse_overlap(value: Any) -> list[float] | None:
    """``0.25`` / ``"0.25"`` (fraction of the tile), ``32`` (voxels), ``"32,32,16"`` (per axis) → 3 numbers."""
    return overlap(value)  # values < 1 are fractions, whole numbers >= 1 voxels, the rest refused


def _normalize(name: str, value: Any) -> Any:
    return parse_normalization(value)


def _memory(name: str, value: Any) -> float:
    return positive(name, parse_size_mb(str(value)))


NORMALIZE = Checked("normalize", _normalize, keep_text=True)
MEMORY = Checked("size", _memory, keep_text=True)
