"""The one streaming pass over the input before inference, shared by everything that needs the whole volume.

NaN/Inf counts, value ranges, normalisation statistics and the content fingerprint that keys ``--resume`` all read
every voxel once. Each is a *consumer* of the same z-slabs, read in on-disk order (a ``.nii.gz`` is decompressed once,
not once per check); the pass runs only when a consumer asks for it, and the run's summary reports how many passes
it made. Consumers see stored values (scaling and normalisation are theirs to apply).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol

import numpy as np

from volinfer.io.reader import VolumeSource, read_buffer, scan_slabs, slab_planes
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
            z0, slabs = 0, scan_slabs(reader, self.source.shape, self.slab)
            if self.source.shape[2] > slab_planes(self.source.shape, self.slab):  # one slab read while one is summed
                # a reader that keeps a window of planes (gzip, TIFF pages) reuses it: the slab read ahead is a copy
                slabs = read_ahead(slabs, copy=read_buffer([reader]) == "planes")
            try:
                for stored in slabs:
                    for consumer in self.consumers:
                        consumer.update(c, stored, z0)
                    z0 += stored.shape[2]
            finally:
                slabs.close()  # the reading thread stops now, not when an error's traceback lets go of it
        for consumer in self.consumers:
            consumer.finish()
        return 1


def read_ahead(slabs: Iterator[np.ndarray], copy: bool = False) -> Iterator[np.ndarray]:
    """``slabs``, each read (or decompressed) in a thread while the one before it is being summed: reading and
    inflating release the GIL, so on a 2048^3 volume the pass takes about the longer of the two instead of their
    sum. One slab waits at most (``copy``: each a copy, for readers that reuse their buffer); the thread is joined
    before this returns or raises (a reader is not shared)."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: tuple[np.ndarray | None, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for slab in slabs:
                if not offer((np.array(slab, order="K") if copy else slab, None)):
                    return
            offer((None, None))
        except BaseException as e:  # handed to the consumer, raised there
            offer((None, e))

    worker = threading.Thread(target=produce, name="volinfer-read-ahead", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # no thread to be had (an address-space limit): read in turn
        yield from slabs
        return
    try:
        while True:
            slab, error = ready.get()
            if error is not None:
                raise error
            if slab is None:
                return
            yield slab
    finally:
        stop.set()
        worker.join()


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
