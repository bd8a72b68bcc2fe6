"""The one streaming pass over the input before inference, shared by everything that needs the whole volume.

NaN/Inf counts, value ranges, normalisation statistics and the content fingerprint that keys ``--resume`` all read
every voxel once. Each is a *consumer* of the same z-slabs, read in on-disk order (a ``.nii.gz`` is decompressed once,
not once per check); the pass runs only when a consumer asks for it, and the run's summary reports how many passes
it made. Consumers see stored values (scaling and normalisation are theirs to apply).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from volinfer.io.reader import VolumeSource, scan_slabs
from volinfer.io.journal import hasher


class SlabConsumer(Protocol):
    """Something that needs every voxel: ``update`` sees each z-slab of channel ``c`` (stored values, (x, y, z),
    starting at plane ``z0``) in order; ``finish`` runs once the pass is over."""

    def update(self, c: int, stored: np.ndarray, z0: int) -> None: ...

    def finish(self) -> None: ...


class PrePass:
    """Runs the registered consumers over ``source`` in one pass of slabs ``slab`` planes deep."""

    def __init__(self, source: VolumeSource, slab: int) -> None:
        self.source, self.slab = source, slab
        self.consumers: list[SlabConsumer] = []

    def add(self, consumer: SlabConsumer | None) -> None:
        if consumer is not None:
            self.consumers.append(consumer)

    def run(self) -> int:
        """Stream the volume once through every consumer; returns the number of passes made (0 or 1)."""
        if not self.consumers:
            return 0
        for c, reader in enumerate(self.source.readers):
            z0 = 0
            for stored in scan_slabs(reader, self.source.shape, self.slab):
                for consumer in self.consumers:
                    consumer.update(c, stored, z0)
                z0 += stored.shape[2]
        for consumer in self.consumers:
            consumer.finish()
        return 1


class ValueScan:
    """NaN/Inf count (float channels) and finite (lo, hi) of stored values per channel."""

    def __init__(self, channels: int) -> None:
        self.nonfinite = [0] * channels
        self.lo = [np.inf] * channels
        self.hi = [-np.inf] * channels

    def update(self, c: int, stored: np.ndarray, z0: int) -> None:
        if stored.dtype.kind == "f":
            ok = np.isfinite(stored)
            good = int(np.count_nonzero(ok))
            self.nonfinite[c] += int(stored.size - good)
            if not good:
                return
            finite = stored if good == stored.size else stored[ok]
        else:
            finite = stored
        if finite.size:
            self.lo[c] = min(self.lo[c], float(finite.min()))
            self.hi[c] = max(self.hi[c], float(finite.max()))

    def finish(self) -> None:
        pass


class ContentDigest:
    """A content fingerprint of each channel's voxels (xxh3-128, or BLAKE2b without xxhash), in the stored byte
    order, fed from the same slabs: what ``--resume`` compares, whatever the file's name, place or compression."""

    def __init__(self, channels: int) -> None:
        self._h = [hasher() for _ in range(channels)]
        self.digests: list[str] = []

    def update(self, c: int, stored: np.ndarray, z0: int) -> None:
        planes = stored.transpose(2, 1, 0)  # back to the (z, y, x) order of the file's bytes
        self._h[c].update(np.ascontiguousarray(planes).data)

    def finish(self) -> None:
        self.digests = [h.hexdigest() for h in self._h]
