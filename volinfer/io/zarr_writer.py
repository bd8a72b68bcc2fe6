"""A Zarr (OME-Zarr) output for the streaming engine: NIfTI in, ``-o out.zarr``.

The engine hands finished blocks ``(channels, nz, ny, X)`` in row order (see :class:`volinfer.tiling.stitch.BlockWriter`).
For a NIfTI grid ``(x, y, z)`` that is exactly the OME-Zarr ``(c, z, y, x)`` layout, so blocks are copied as they
are into *slabs* of one chunk's depth spanning the whole ``(y, x)`` cross-section; a slab is written once all its
planes are final (whole chunks, each written once) and freed. Memory: one or two slabs of the output dtype, the same
order as what the stitchers already hold. With a pyramid, each written slab is downsampled into the next level's
slab buffer, and so on: every level is written as the run goes, with no second pass over the output.

The store is written hidden beside the output (:func:`volinfer.io.zarr_io.partial_store`, ``.seg.zarr.partial.zarr``)
and renamed onto it once complete, as NIfTI and TIFF outputs are: an interrupted or failed run leaves nothing under
the output's name that a pipeline could take for a finished result.

Resume: the journal records the last row of tiles whose planes are all in the store (:meth:`ZarrWriter.durable_row`);
a resumed run starts a little earlier, at a plane where every level's slab boundary falls, re-reads the level-0
planes it needs from the partial store and rewrites the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.ome import Geometry, check_pyramid, downsample, downsample_method
from volinfer.io.zarr_io import (StoreSpec, create_output, discard_partial, partial_store, publish_store,
                                 store_write_error, sync_region)


def store_spec(kind: str, geometry: Geometry, chunks: int | Sequence[int] = 64, pyramid: int = 0,
               compression: bool = True) -> StoreSpec:
    """The layout of a run's output store: cubic (or per-axis) chunks, ``pyramid`` levels downsampled as suits the
    output ``kind`` (labels: nearest), zstd unless ``compression`` is off."""
    chunk3 = (int(chunks),) * 3 if isinstance(chunks, (int, np.integer)) else tuple(int(c) for c in chunks)
    return StoreSpec(chunk3, pyramid, downsample_method(kind), None, "zstd" if compression else None,  # type: ignore[arg-type]
                     geometry)


class _Level:
    """One pyramid level: slabs of ``chunk_z`` planes waiting for their last plane, written in order."""

    def __init__(self, arr: Any, shape_zyx: Sequence[int], channels: int, dtype: np.dtype, base: int) -> None:
        self.arr, self.shape, self.channels, self.dtype = arr, tuple(shape_zyx), channels, np.dtype(dtype)
        self.cz = int(arr.chunks[-3])
        self.flushed = base  # planes below are in the store
        self.pending: dict[int, np.ndarray] = {}

    def put(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Copy ``block`` (C, nz, ny, nx) to planes ``z0..``, rows ``y0..`` (x from 0)."""
        nz, ny, nx = block.shape[1:]
        Z, Y, X = self.shape
        z = z0
        while z < z0 + nz:
            s = z // self.cz
            lo, hi = s * self.cz, min((s + 1) * self.cz, Z)
            buf = self.pending.get(s)
            if buf is None:
                buf = self.pending[s] = np.zeros((self.channels, hi - lo, Y, X), dtype=self.dtype)
            end = min(hi, z0 + nz)
            buf[:, z - lo : end - lo, y0 : y0 + ny, :nx] = block[:, z - z0 : end - z0]
            z = end

    def complete_below(self, z: int) -> list[tuple[int, np.ndarray]]:
        """Write every slab whose planes all lie below ``z``; returns them (start plane, data), in order."""
        out = []
        Z = self.shape[0]
        while self.flushed < Z and min(self.flushed + self.cz, Z) <= z:
            s = self.flushed // self.cz
            buf = self.pending.pop(s, None)
            if buf is None:
                raise RuntimeError(f"slab {s} of {self.arr.path or 'level'} completed without data")
            lo = self.flushed
            region = (slice(lo, lo + buf.shape[1]),)
            if self.arr.ndim == 3:
                self.arr[region] = buf[0]
            else:
                self.arr[(slice(None), *region)] = buf
            sync_region(self.arr, ((lo, lo + buf.shape[1]), (0, self.shape[1]), (0, self.shape[2])))
            self.flushed = lo + buf.shape[1]
            out.append((lo, buf))
        return out


class ZarrWriter:
    """Streams the engine's blocks into an OME-Zarr store with ``levels`` downsampled levels (see module docs)."""

    def __init__(self, target: str | Path, shape: Sequence[int], channels: int, dtype: np.dtype, spec: StoreSpec,
                 *, row_planes: Sequence[int], overwrite: bool = False, resume_row: int | None = None) -> None:
        """``shape``: the engine's grid ``(x, y, z)``; ``spec``: the store's layout (:func:`store_spec`);
        ``row_planes[r]``: the first plane rows ``>= r`` write (``row_planes[-1]`` = the last plane + 1);
        ``resume_row``: the row a resumed engine starts at (None: a new store); ``overwrite``: a store at ``target``
        may be replaced at :meth:`commit` (checked before the run). The store is written at
        :func:`volinfer.io.zarr_io.partial_store` until then."""
        self.target, self.overwrite = Path(target), overwrite
        self.store = partial_store(self.target)
        X, Y, Z = (int(s) for s in shape)
        check_pyramid(spec.levels, None, spec.chunks)
        self.row_planes = list(row_planes)
        self.method = spec.method
        resume, start_row = resume_row is not None, resume_row or 0
        if resume and not self.store.is_dir():
            raise VolinferError(f"{self.store}: no interrupted output to resume (run without --resume)")
        arrays = create_output(self.store, (Z, Y, X), channels, np.dtype(dtype), spec, overwrite=True,
                               resume=resume)  # a stale partial store of an earlier run: started over
        unit = math.lcm(*(int(a.chunks[-3]) << lev for lev, a in enumerate(arrays)))
        first = self.row_planes[start_row] if resume else 0
        base = first // unit * unit
        self.levels = [_Level(a, a.shape[-3:], channels, dtype, base >> lev) for lev, a in enumerate(arrays)]
        if resume:
            self._replay(base, first)

    def _replay(self, base: int, upto: int) -> None:
        """Resume: feed level-0 planes ``[base, upto)`` back from the store, rebuilding every level's open slab."""
        top = self.levels[0]
        for z in range(base, upto, top.cz):
            end = min(z + top.cz, upto)
            data = np.asarray(top.arr[..., z:end, :, :])
            self.write(data if top.arr.ndim == 4 else data[None], z, 0)
            self._complete(end)

    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Store ``block`` (channels, nz, ny, X) at planes ``z0..`` and rows ``y0..`` (Zarr ``[c, z, y, x]``)."""
        self.levels[0].put(block, z0, y0)

    def _complete(self, z: int) -> None:
        """Planes below ``z`` are final: write the finished slabs, cascading them down the pyramid. A failed write
        (a full disk) is a :class:`volinfer.io.journal.ResumableError`: the store stays, the journal keeps the rows
        it held before."""
        try:
            self._complete_levels(z)
        except OSError as e:
            raise store_write_error(self.target, e) from None

    def _complete_levels(self, z: int) -> None:
        done = self.levels[0].complete_below(z)
        for lev in range(1, len(self.levels)):
            nxt = self.levels[lev]
            for lo, buf in done:
                nxt.put(downsample(buf, self.method), lo // 2, 0)
            if done:
                last_lo, last = done[-1]
                done = nxt.complete_below(-(-(last_lo + last.shape[1]) // 2))
            else:
                done = []

    def planes_final(self, z: int) -> None:
        """Every plane below ``z`` is final (whole planes written in order, e.g. by a grid step): store the slabs
        they complete, so that no more than a slab per level waits in memory."""
        self._complete(z)

    def durable_row(self, row: int) -> int:
        """Rows ``< row`` are written: flush the slabs they finished and return the largest ``r <= row`` whose
        planes are all in the store (what the journal may claim)."""
        self._complete(self.row_planes[row])
        flushed = self.levels[0].flushed
        return max(r for r in range(row + 1) if self.row_planes[r] <= flushed)

    def sync(self) -> None:
        """Slabs are fsync'ed as they are written; nothing else is pending on disk."""

    def commit(self) -> Path:
        """Write the last slabs, then move the complete store onto the target (replacing one there only with
        ``overwrite``). A failed rename keeps the store hidden and resumable."""
        self._complete(self.row_planes[-1])
        if any(lev.pending for lev in self.levels):
            raise RuntimeError(f"{self.target}: planes never written")
        return publish_store(self.store, self.target, self.overwrite)

    def close_for_resume(self) -> None:
        """Keep the partial store: the journal says how far it is final."""

    def abort(self) -> None:
        """Remove the partial store (a failure no ``--resume`` can continue: its journal goes too); the target, if
        any, is untouched."""
        discard_partial(self.store)


def row_planes(grid: Any) -> list[int]:
    """For each row of tiles ``r``, the first plane rows ``>= r`` write (as the engine's resume computes it), and
    the volume's depth last."""
    az = grid.axes[2]
    firsts = [az.starts[r] if grid.mode == "blend" else az.cores[r][0] for r in range(az.count)]
    return firsts + [grid.shape[2]]
