"""Zarr volumes in and out (optional extra ``zarr``), and NIfTI ↔ Zarr conversion.

Axis convention: a Zarr array's axes are fed to the model in order (axis 0 → D), with channels first for 4-D arrays
(OME-Zarr's ``c, z, y, x``). NIfTI files are fed as nibabel gives them, ``x, y, z`` → D, H, W. The conversion helpers
write OME-Zarr order (``z, y, x``), which is the *same bytes* as NIfTI's x-fastest layout but the transposed axis
order: a model trained on NIfTI arrays sees a converted Zarr volume transposed. Convert back before running such a
model, or train on the layout you run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import VolinferError
from .reader import Region, VolumeSource


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise VolinferError("Zarr volumes need the zarr package: pip install 'volinfer[zarr]'") from None
    return zarr


def is_zarr(path: str | Path) -> bool:
    p = str(path).rstrip("/")
    return p.endswith(".zarr") or (Path(p).is_dir() and ((Path(p) / "zarr.json").exists()
                                                         or (Path(p) / ".zarray").exists()))


class ZarrChannel:
    """One channel of a 3-D or channels-first 4-D Zarr array; reads go straight to the chunks they touch."""

    def __init__(self, array: Any, channel: int | None) -> None:
        self.array, self.channel = array, channel
        self.dtype = np.dtype(array.dtype)
        self.slope, self.inter = 1.0, 0.0

    def region(self, r: Region) -> np.ndarray:
        sl = tuple(slice(a, b) for a, b in r)
        return np.asarray(self.array[sl] if self.channel is None else self.array[(self.channel, *sl)])

    def planes(self, z0: int, z1: int) -> np.ndarray:
        shape = self.array.shape[-3:]
        return self.region(((0, shape[0]), (0, shape[1]), (z0, z1)))

    def close(self) -> None:
        pass


def open_zarr_array(path: str | Path, mode: str = "r") -> Any:
    zarr = _zarr()
    p = Path(path)
    if mode == "r" and not p.exists():
        raise VolinferError(f"{p}: no such Zarr store")
    try:
        node = zarr.open(str(p), mode=mode)
    except Exception as e:
        raise VolinferError(f"{p}: not a readable Zarr array ({type(e).__name__}: {e})") from None
    if hasattr(node, "shape"):
        return node
    # an OME-Zarr group: its first multiscale level is the full-resolution array
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if ms:
        return node[ms[0]["datasets"][0]["path"]]
    raise VolinferError(f"{p}: Zarr group without an array (expected an array or OME-Zarr multiscales)")


def open_zarr_source(path: str | Path) -> tuple[VolumeSource, Any]:
    """A :class:`VolumeSource` over a 3-D array (one channel) or a 4-D channels-first array; plus the array."""
    arr = open_zarr_array(path)
    if arr.ndim == 3:
        readers = [ZarrChannel(arr, None)]
    elif arr.ndim == 4:
        readers = [ZarrChannel(arr, c) for c in range(arr.shape[0])]
    else:
        raise VolinferError(f"{path}: expected a 3-D or channels-first 4-D array, got shape {arr.shape}")
    return VolumeSource(readers, tuple(arr.shape[-3:])), arr  # type: ignore[arg-type]


def ome_attrs(source_array: Any) -> dict[str, Any]:
    """The multiscale/OME attributes worth copying to the output (voxel size, axes), when the input had them."""
    try:
        attrs = dict(source_array.attrs)
    except Exception:
        return {}
    keep = {k: v for k, v in attrs.items() if k in ("multiscales", "ome", "volinfer_axes", "voxel_size")}
    return json.loads(json.dumps(keep, default=str))


def create_output(path: str | Path, shape: Sequence[int], channels: int, dtype: np.dtype, chunks: Sequence[int],
                  attrs: dict[str, Any] | None = None, compressor: str | None = "zstd", overwrite: bool = False,
                  resume: bool = False) -> Any:
    """The output array: ``(z, y, x)`` or ``(c, z, y, x)`` chunked as asked; existing arrays are reused on resume."""
    zarr = _zarr()
    p = Path(path)
    full = tuple(shape) if channels == 1 else (channels, *shape)
    full_chunks = tuple(chunks) if channels == 1 else (channels, *chunks)
    if p.exists():
        if resume:
            arr = zarr.open_array(str(p), mode="r+")
            if tuple(arr.shape) != full or np.dtype(arr.dtype) != np.dtype(dtype):
                raise VolinferError(f"{p}: existing output has another shape or type; cannot resume into it")
            return arr
        if not overwrite:
            raise VolinferError(f"{p}: already exists (pass --overwrite to replace it, or --resume to continue)")
    kwargs: dict[str, Any] = {}
    if compressor is None:
        kwargs["compressors"] = None
    arr = zarr.create_array(store=str(p), shape=full, chunks=full_chunks, dtype=dtype, fill_value=0,
                            overwrite=True, **kwargs)
    if attrs:
        arr.attrs.update(attrs)
    return arr


def done_marker_dir(path: str | Path) -> Path:
    """Per-block completion markers: a block is complete when its chunks were written *and* its marker exists."""
    return Path(path) / ".volinfer_done"


def nifti_to_zarr(nifti: str | Path, out: str | Path, chunks: int = 64, overwrite: bool = False) -> Path:
    """Stream a NIfTI volume into an OME-style Zarr array ``(z, y, x)`` (or ``(c, z, y, x)``), slab by slab."""
    from .reader import VolumeSource, scan_slabs

    with VolumeSource.open([nifti], depth=chunks) as src:
        X, Y, Z = src.shape
        zooms = [float(v) for v in src.header.get_zooms()[:3]] if src.header is not None else [1.0, 1.0, 1.0]
        attrs = {"volinfer_axes": ["z", "y", "x"] if src.channels == 1 else ["c", "z", "y", "x"],
                 "voxel_size": zooms[::-1],
                 "affine": np.asarray(src.affine).tolist() if src.affine is not None else None}
        arr = create_output(out, (Z, Y, X), src.channels, src.readers[0].dtype, (chunks,) * 3, attrs,
                            overwrite=overwrite)
        for c, reader in enumerate(src.readers):
            z0 = 0
            for slab in scan_slabs(reader, src.shape, chunks, voxels=X * Y * chunks):
                zyx = np.ascontiguousarray(slab.transpose(2, 1, 0))
                if src.channels == 1:
                    arr[z0 : z0 + zyx.shape[0]] = zyx
                else:
                    arr[c, z0 : z0 + zyx.shape[0]] = zyx
                z0 += zyx.shape[0]
    return Path(out)


def zarr_to_nifti(zarr_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a ``(z, y, x)`` Zarr array as a NIfTI ``(x, y, z)`` volume, streaming z-slabs (atomic, like runs)."""
    from .writer import NiftiWriter, check_target

    arr = open_zarr_array(zarr_path)
    if arr.ndim != 3:
        raise VolinferError(f"{zarr_path}: zarr_to_nifti handles 3-D arrays, got shape {arr.shape}")
    check_target(Path(out), overwrite)
    Z, Y, X = arr.shape
    attrs = dict(arr.attrs)
    affine = np.asarray(attrs["affine"]) if attrs.get("affine") else np.diag([*attrs.get("voxel_size", [1, 1, 1])[::-1], 1])
    w = NiftiWriter(out, (X, Y, Z), 1, np.dtype(arr.dtype), affine=affine)
    try:
        step = max(1, arr.chunks[0])
        for z0 in range(0, Z, step):
            block = np.asarray(arr[z0 : z0 + step])  # (z, y, x): what the writer's (c, z, y, X) blocks are
            w.write(block[None], z0, 0)
        return w.commit()
    except BaseException:
        w.abort()
        raise
