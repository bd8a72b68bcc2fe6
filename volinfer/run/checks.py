"""Input checks that need to look at the voxels: NaN/Inf policy and whether (normalised) values fit the type the
model computes in. Both read what the run's one pre-pass recorded (:class:`volinfer.run.prepass.ValueScan`): no check
makes a pass of its own, and the pre-pass scans a channel's values only when a check can find something there.
"""

from __future__ import annotations

import numpy as np

from volinfer import validate
from volinfer.errors import VolinferError
from volinfer.run.normalize import Normalizer
from volinfer.run.prepass import ValueScan
from volinfer.io.reader import ChannelReader, exceeds_float32


def needs_value_scan(readers: list[ChannelReader], dtype: np.dtype) -> bool:
    """Whether any check can find something: float channels (NaN/Inf), or values that could leave the model's
    input type (integer or 16-bit float inputs; channels stored wider than float32)."""
    return any(r.dtype.kind == "f" or _range_matters(r, dtype) for r in readers)


def _range_matters(reader: ChannelReader, dtype: np.dtype) -> bool:
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize > 4:
        return False
    narrow = not (dtype.kind == "f" and dtype.itemsize == 4)
    return narrow or exceeds_float32(reader.dtype, reader.slope, reader.inter)


def check_nonfinite(scan: ValueScan, replace: float | None) -> int:
    """Refuse volumes with NaN/Inf (the default), or accept them when ``replace`` is given. Returns the count."""
    if replace is not None:
        validate.float32_value("nan_value", replace)
    counts = scan.nonfinite
    total = sum(counts)
    if total and replace is None:
        where = ", ".join(f"channel {c}: {n}" for c, n in enumerate(counts) if n) if len(counts) > 1 else ""
        raise VolinferError(
            f"the volume holds {total} NaN/Inf voxel(s){' (' + where + ')' if where else ''}; "
            f"pass --nan-value V to replace them with V")
    return total


def check_input_range(scan: ValueScan, readers: list[ChannelReader], normalizer: Normalizer,
                      dtype: np.dtype) -> None:
    """Refuse volumes whose (normalised) values do not fit the model's input type, instead of letting them wrap or
    turn into Inf (and the output into NaN): every channel for integer or 16-bit float inputs; for float32 inputs,
    channels stored wider (float64 voxels, a huge slope)."""
    dtype = np.dtype(dtype)
    narrow = not (dtype.kind == "f" and dtype.itemsize == 4)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    for c, reader in enumerate(readers):
        if not _range_matters(reader, dtype):
            continue
        lo, hi = scan.lo[c], scan.hi[c]
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
