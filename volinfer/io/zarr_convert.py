"""NIfTI <-> Zarr conversion (``volinfer to-zarr`` / ``volinfer to-nifti``): streamed slab by slab, the geometry
kept across the round trip (see :mod:`volinfer.io.ome` for the axis mapping)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.ome import Geometry, geometry_from_nifti
from volinfer.io.reader import VolumeSource, exceeds_float32, scan_slabs
from volinfer.io.targets import OutputLock
from volinfer.io.writer import SameImageWriter, check_target
from volinfer.io.zarr_io import (check_zarr_output, create_output, discard_partial, open_zarr_source, partial_store,
                                 publish_store, store_geometry)
from volinfer.io.zarr_writer import store_spec
from volinfer.progress import progress_bar


def nifti_to_zarr(nifti: str | Path, out: str | Path, chunks: int | Sequence[int] = 64, overwrite: bool = False,
                  progress: bool = False, compression: bool = True) -> Path:
    """Stream a NIfTI volume into an OME-Zarr store ``(z, y, x)`` (or ``(c, z, y, x)``), slab by slab, keeping its
    affine (see :mod:`volinfer.io.ome` for the axis mapping). ``chunks``: an edge, or ``(z, y, x)`` edges. Written
    hidden beside ``out`` (:func:`volinfer.io.zarr_io.partial_store`) and renamed onto it once complete: an
    interrupted or failed conversion leaves nothing under the output's name."""
    depth = store_spec("raw", Geometry(np.eye(4)), chunks).chunks[0]
    check_zarr_output(out, [nifti], overwrite, resume=False)
    store = partial_store(out)
    with OutputLock(Path(out)), VolumeSource.open([nifti], depth=depth) as src:
        try:
            _copy_into_store(src, store, chunks, depth, progress, compression)
            return publish_store(store, Path(out), overwrite, resumable=False)
        except BaseException:
            discard_partial(store)
            raise


def _copy_into_store(src: VolumeSource, store: Path, chunks: int | Sequence[int], depth: int, progress: bool,
                     compression: bool) -> None:
    """:func:`nifti_to_zarr`'s copy: the store created at ``store`` and filled slab by slab."""
    X, Y, Z = src.shape
    geom = geometry_from_nifti(src.header, src.affine)
    # NIfTI intensity scaling (scl_slope / scl_inter) is applied here: Zarr has no such header, and a store of
    # raw stored values would silently change every result computed from it
    scaled = any((r.slope, r.inter) != (1.0, 0.0) for r in src.readers)
    dtype = np.dtype(np.float32) if scaled else src.readers[0].dtype
    if scaled and any(exceeds_float32(r.dtype, r.slope, r.inter) for r in src.readers):
        dtype = np.dtype(np.float64)
    arr = create_output(store, (Z, Y, X), src.channels, dtype, store_spec("raw", geom, chunks, 0, compression),
                        overwrite=True)[0]  # a stale partial store: started over
    bar = progress_bar(Z * src.channels, "to-zarr", "plane", disable=not progress)
    for c, reader in enumerate(src.readers):
        z0 = 0
        for slab in scan_slabs(reader, src.shape, depth, voxels=X * Y * depth):
            zyx = np.ascontiguousarray(slab.transpose(2, 1, 0))
            if scaled:
                zyx = (zyx.astype(np.float64) * reader.slope + reader.inter).astype(dtype)
            if src.channels == 1:
                arr[z0 : z0 + zyx.shape[0]] = zyx
            else:
                arr[c, z0 : z0 + zyx.shape[0]] = zyx
            z0 += zyx.shape[0]
            bar.update(zyx.shape[0])
    bar.close()


def nifti_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """The NIfTI type that holds ``dtype`` exactly: itself, or float32 for float16 and uint8 for bool (NIfTI-1 has
    neither); a one-line error for types NIfTI cannot hold at all."""
    dtype = np.dtype(dtype)
    widened = {np.dtype(np.float16): np.dtype(np.float32), np.dtype(bool): np.dtype(np.uint8)}.get(dtype, dtype)
    try:
        nib.Nifti1Header().set_data_dtype(widened)
    except Exception:
        raise VolinferError(f"{where}: voxel type {dtype} has no NIfTI equivalent") from None
    return widened


def zarr_to_nifti(zarr_path: str | Path, out: str | Path, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a Zarr array (any axis order its metadata names, see module docs; OME-Zarr: level 0) as a NIfTI
    ``(x, y, z)`` (``(x, y, z, c)``) volume with the geometry the store records: its affine, and the NIfTI header a
    NIfTI-born store keeps (sform/qform codes, units, description), streaming z-slabs; atomic, like runs. float16
    is written as float32 (NIfTI has no float16)."""
    source, _ = open_zarr_source(zarr_path)
    geom = store_geometry(zarr_path)
    check_target(Path(out), overwrite, [Path(zarr_path)])
    with OutputLock(Path(out)), source:
        return _zarr_to_nifti(source, Path(out), geom, progress)


def _zarr_to_nifti(source: VolumeSource, out: Path, geom: Geometry, progress: bool = False) -> Path:
    X, Y, Z = source.shape
    dtype = nifti_dtype(source.readers[0].dtype, str(source.paths[0]))
    w = SameImageWriter(out, (X, Y, Z), source.channels, dtype, reference=geom.nifti_header(), affine=geom.affine)
    bar = progress_bar(Z, "to-nifti", "plane", disable=not progress)
    try:
        step = source.stored_depth
        for z0 in range(0, Z, step):
            z1 = min(Z, z0 + step)
            block = np.stack([r.planes(z0, z1).transpose(2, 1, 0) for r in source.readers]).astype(dtype, copy=False)
            w.write(block, z0, 0)  # (c, z, y, x): the writer's blocks
            w.release_written()
            bar.update(z1 - z0)
        return w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        bar.close()
