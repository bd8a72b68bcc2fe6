"""Input checks that need to look at the voxels, each one streaming pass over z-slabs (never the whole volume), run
only when it can find something: NaN/Inf only in float-stored channels, value range only for models whose input type
is narrower than float32 or for channels stored wider than float32 (float64 voxels). The NaN/Inf pass also records
each float channel's finite range, so the range check never needs a second pass over a float channel.
"""

from __future__ import annotations

import weakref

import numpy as np

from . import validate
from .errors import VolinferError
from .normalize import Normalizer, exceeds_float32
from .reader import ChannelReader, VolumeSource, scan_slabs


#: Finite (lo, hi) of float channels, recorded by the NaN/Inf pass for the range check.
_RANGES: "weakref.WeakKeyDictionary[object, tuple[float, float]]" = weakref.WeakKeyDictionary()


def count_nonfinite(source: VolumeSource, slab: int) -> list[int]:
    """Number of NaN/Inf voxels per channel."""
    counts = []
    for reader in source.readers:
        if reader.dtype.kind != "f":
            counts.append(0)
            continue
        n = 0
        lo, hi = np.inf, -np.inf
        for block in scan_slabs(reader, source.shape, slab):
            ok = np.isfinite(block)
            good = int(np.count_nonzero(ok))
            n += int(block.size - good)
            if good:
                finite = block if good == block.size else block[ok]
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        _RANGES[reader] = (lo, hi)
        counts.append(n)
    return counts


def check_nonfinite(source: VolumeSource, slab: int, replace: float | None) -> int:
    """Refuse volumes with NaN/Inf (the default), or accept them when ``replace`` is given. Returns the count."""
    if replace is not None:
        validate.finite("nan_value", replace)
    counts = count_nonfinite(source, slab)
    total = sum(counts)
    if total and replace is None:
        where = ", ".join(f"channel {c}: {n}" for c, n in enumerate(counts) if n) if len(counts) > 1 else ""
        raise VolinferError(
            f"the volume holds {total} NaN/Inf voxel(s){' (' + where + ')' if where else ''}; "
            f"pass --nan-value V to replace them with V")
    return total


def _stored_range(reader: ChannelReader, shape: tuple[int, int, int], slab: int) -> tuple[float, float]:
    """Smallest and largest finite stored value of one channel (lo > hi when there is none)."""
    if reader in _RANGES:  # recorded by the NaN/Inf pass just before (used once: data may change between runs)
        return _RANGES.pop(reader)
    lo, hi = np.inf, -np.inf
    for block in scan_slabs(reader, shape, slab):
        finite = block[np.isfinite(block)] if block.dtype.kind == "f" else block
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return lo, hi


def check_input_range(source: VolumeSource, slab: int, normalizer: Normalizer, dtype: np.dtype) -> None:
    """Refuse volumes whose (normalised) values do not fit the model's input type, instead of letting them wrap or
    turn into Inf (and the output into NaN). Only channels that can leave the range need the pass: every channel for
    integer or 16-bit float inputs; for float32 inputs, channels stored wider (float64 voxels, a huge slope)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize > 4:
        return
    narrow = not (dtype.kind == "f" and dtype.itemsize == 4)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    for c, reader in enumerate(source.readers):
        if not narrow and not exceeds_float32(reader.dtype, reader.slope, reader.inter):
            continue
        lo, hi = _stored_range(reader, source.shape, slab)
        if lo > hi:
            continue
        ends = [normalizer.normalized(v * reader.slope + reader.inter, c) for v in (lo, hi)]
        nlo, nhi = min(ends), max(ends)
        if not (float(info.min) <= nlo and nhi <= float(info.max)):  # also refuses NaN/Inf ends
            if narrow:
                raise VolinferError(
                    f"channel {c}: values span [{nlo:g}, {nhi:g}] after normalisation, but the model's input type "
                    f"{dtype} holds [{info.min:g}, {info.max:g}]; choose a --normalize that maps them into range")
            raise VolinferError(
                f"channel {c}: values span [{nlo:g}, {nhi:g}] after normalisation, beyond float32's range "
                f"(±{info.max:.3g}) that the model computes in; pass --normalize zscore, minmax or scale:A:B "
                f"(e.g. scale:1e-300:0) to bring them into range, or rescale the volume")
