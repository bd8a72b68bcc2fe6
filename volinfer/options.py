"""Every option's parser and choice list, in one place below everything that uses them: the command line, the
Python API (:class:`~volinfer.run.settings.RunSettings`), ``volinfer convert`` and the stored model settings parse
and check values through these functions (numeric ranges through :mod:`volinfer.validate`), so a value means
the same and is refused with the same one line everywhere."""

from __future__ import annotations

import re
from typing import Any, Sequence

from volinfer import portable
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
#: What ``--help`` says ``percentile:LO:HI`` does (:meth:`volinfer.run.normalize.Normalizer._set`): nnU-Net's CT
#: scheme, not MONAI's ScaleIntensityRangePercentiles; stored models depend on it, so it is said, not changed.
PERCENTILE_RULE = ("clip to the volume's LO and HI percentiles, then z-score the clipped values with their mean and "
                   "std, as nnU-Net does for CT; not a rescale to [0, 1]; 0 <= LO < HI <= 100, default 0.5:99.5")


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


#: ``--max-memory``'s units, in MB: binary throughout, as every memory figure volinfer prints (1G = 1024M), so K,
#: KB and KiB all mean 1024 bytes. A bare number is MB.
SIZE_UNITS_MB = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}
#: How ``--help`` states the units and range of a memory size.
SIZE_RULE = ("a bare number is MB; K, M, G, T, also written KB/KiB, MB/MiB, ..., are all binary (1G = 1024M); > 0 and "
             "at most the machine's RAM or cgroup limit")
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:E([+-]?\d+))?\s*(?:([KMGT])(I?B)?)?\s*", re.IGNORECASE)


def parse_size_mb(text: str) -> float:
    """``600M``, ``600MB``, ``600MiB``, ``1.5G``, ``800`` (a bare number: MB) → MB (binary units, see
    :data:`SIZE_UNITS_MB`). A lone ``B`` is refused rather than read as MB (``600B`` would otherwise mean 600 MB)."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise VolinferError(f"memory size must look like 600M or 1.5G (K, M, G, T, also as KB or KiB; a bare number "
                            f"is MB); got {text!r}")
    number, exponent, unit, _ = m.groups()
    value = float(f"{number}e{exponent or 0}")  # 1e400 is inf (refused as no size), not an OverflowError
    return value * SIZE_UNITS_MB[unit.upper()] if unit else value


def format_mb(mb: float) -> str:
    """A memory figure in MB for messages: whole MB, or KB below 1 MB (never "0 MB" for a budget of 1K)."""
    return f"{mb:.0f} MB" if mb >= 1 else f"{mb * 1024:.3g} KB"


def check_budget_mb(name: str, mb: float, given: Any = None) -> float:
    """A memory budget (MB) that is > 0 and at most the machine's memory (its RAM, capped by a cgroup limit:
    :func:`volinfer.portable.stated_machine_mb`), the figure the default budget is a share of: a larger one would plan for memory
    the run can never have (``--max-memory 1e9`` is about 1 PB, not 1 GB). ``given``: the value as typed."""
    positive(name, mb)
    machine = portable.stated_machine_mb()  # None: the machine says nothing, and there is nothing to hold it to
    if machine is not None and mb > machine:
        text = str(given if given is not None else mb).strip()
        bare = text[-1:].isdigit()
        raise VolinferError(f"{name} {text} ({format_mb(mb)}) is more than this machine's {format_mb(machine)} (its "
                            f"RAM, or its cgroup limit if lower)" + ("; a bare number is MB" if bare else ""))
    return mb


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
    return check_budget_mb(name, parse_size_mb(str(value)), value)


NORMALIZE = Checked("normalize", _normalize, keep_text=True)
MEMORY = Checked("size", _memory, keep_text=True)
