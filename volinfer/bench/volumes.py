"""Benchmark volumes generated straight to disk, a few z-planes at a time (never whole in RAM), reused across runs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def _planes(shape: tuple[int, int, int], z0: int, z1: int, seed: int) -> np.ndarray:
    """Smooth structure (a few low-frequency waves and spheres) plus noise, as int16 planes (x, y, z0:z1)."""
    x, y, _ = shape
    gx = np.linspace(0, 1, x, dtype=np.float32)[:, None, None]
    gy = np.linspace(0, 1, y, dtype=np.float32)[None, :, None]
    gz = (np.arange(z0, z1, dtype=np.float32) / max(1, shape[2] - 1))[None, None, :]
    v = 400 * np.sin(7 * gx + 3) * np.cos(5 * gy + 1) + 300 * np.sin(9 * gz + 2 * gx)
    rng = np.random.default_rng(seed + z0)
    v = v + rng.normal(0, 60, size=(x, y, z1 - z0)).astype(np.float32)
    return np.clip(v + 1000, -32768, 32767).astype(np.int16)


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0, slab: int = 8) -> Path:
    """Write an int16 ``.nii`` of ``shape`` (reused when it already exists with that shape)."""
    path = Path(path)
    if path.exists():
        try:
            if nib.load(str(path)).shape == tuple(shape):
                return path
        except Exception:
            pass
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)  # a stale one, or a link: removed, never written through
    with open(tmp, "wb") as f:
        hdr.write_to(f)
        f.seek(int(hdr["vox_offset"]))
        for z0 in range(0, shape[2], slab):
            block = _planes(shape, z0, min(shape[2], z0 + slab), seed)
            f.write(block.tobytes(order="F"))
    tmp.replace(path)
    return path
