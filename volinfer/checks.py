"""Input checks that need to look at the voxels: non-finite values in floating-point volumes.

Runs one streaming pass (z-slabs, never the whole volume) only for channels stored as floats; integer volumes cannot
hold NaN or Inf and are not read.
"""

from __future__ import annotations

import numpy as np

from .errors import VolinferError
from .reader import VolumeSource, scan_slabs


def count_nonfinite(source: VolumeSource, slab: int) -> list[int]:
    """Number of NaN/Inf voxels per channel."""
    counts = []
    for reader in source.readers:
        if reader.dtype.kind != "f":
            counts.append(0)
            continue
        n = 0
        for block in scan_slabs(reader, source.shape, slab):
            n += int(block.size - np.count_nonzero(np.isfinite(block)))
        counts.append(n)
    return counts


def check_nonfinite(source: VolumeSource, slab: int, replace: float | None) -> int:
    """Refuse volumes with NaN/Inf (the default), or accept them when ``replace`` is given. Returns the count."""
    counts = count_nonfinite(source, slab)
    total = sum(counts)
    if total and replace is None:
        where = ", ".join(f"channel {c}: {n}" for c, n in enumerate(counts) if n) if len(counts) > 1 else ""
        raise VolinferError(
            f"the volume holds {total} NaN/Inf voxel(s){' (' + where + ')' if where else ''}; "
            f"pass --nan-value V to replace them with V")
    return total
