"""Writing the output progressively: a NIfTI file on disk (atomically) or an array in memory.

:class:`NiftiWriter` writes finished blocks with positioned writes (``os.pwrite``) into a temporary uncompressed
``.nii`` beside the target: plain file I/O, so written pages live in the OS page cache and not in the process's
resident memory (a writable memory map would count them). For a ``.nii.gz`` target the finished temporary file is
compressed as a stream in on-disk order. Only then is the result renamed onto the target, so an interrupted run never
leaves a truncated file under the output name.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import VolinferError


def check_target(target: Path, overwrite: bool, inputs: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Refuse outputs that would clobber data or cannot be written, before any work starts."""
    name = target.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise VolinferError(f"{target}: output must end in .nii or .nii.gz")
    for p in inputs:
        if target.resolve() == Path(p).resolve():
            raise VolinferError(f"{target}: output path is also an input; choose another output name")
    if target.is_dir():
        raise VolinferError(f"{target}: is a directory")
    if target.exists() and not overwrite:
        raise VolinferError(f"{target}: already exists (pass --overwrite to replace it)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise VolinferError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise VolinferError(f"{parent}: output directory is not writable")


def output_header(
    reference: nib.Nifti1Header | None, affine: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype
) -> nib.Nifti1Header:
    """A NIfTI-1 header for the output: geometry (affine, qform/sform codes, zooms, units) copied from the input."""
    hdr = nib.Nifti1Header.from_header(reference) if reference is not None else nib.Nifti1Header()
    if reference is None and affine is not None:
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
    zooms = hdr.get_zooms()[:3] if reference is not None else None
    hdr.set_data_shape(shape)
    if zooms is not None and len(shape) == 4:
        hdr.set_zooms(tuple(zooms) + (1.0,))
    hdr.set_data_dtype(dtype)
    hdr["scl_slope"], hdr["scl_inter"] = np.nan, np.nan
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    if len(shape) == 4:
        hdr["intent_code"] = 0
    hdr["vox_offset"] = 0  # recomputed on write from the extensions' size
    return hdr


class NiftiWriter:
    """Streams blocks into ``target`` (``.nii`` or ``.nii.gz``) through a temporary file; see module docs."""

    def __init__(
        self,
        target: str | os.PathLike,
        shape: tuple[int, int, int],
        channels: int,
        dtype: np.dtype,
        reference: nib.Nifti1Header | None = None,
        affine: np.ndarray | None = None,
        compresslevel: int = 1,
        resume: bool = False,
    ) -> None:
        self.target = Path(target)
        self.shape, self.channels, self.dtype = shape, channels, np.dtype(dtype)
        self.compress = self.target.name.lower().endswith(".gz")
        self.compresslevel = compresslevel
        self.tmp = self.target.with_name(f".{self.target.name}.partial.nii")
        self._gz_tmp = self.target.with_name(f".{self.target.name}.partial.nii.gz")
        full = shape if channels == 1 else (*shape, channels)
        hdr = output_header(reference, affine, full, self.dtype)
        self._fd = -1
        size = 0
        if resume:  # continue an interrupted run: the temporary file already has header and finished rows
            if not self.tmp.exists():
                raise VolinferError(f"{self.tmp}: no interrupted output to resume (run without --resume)")
            with open(self.tmp, "rb") as f:
                old = nib.Nifti1Header.from_fileobj(f)
            self.offset = int(old["vox_offset"])
            if old.get_data_shape() != full or old.get_data_dtype() != self.dtype:
                raise VolinferError(f"{self.tmp}: interrupted output has another shape or type; run without --resume")
            self._fd = os.open(self.tmp, os.O_WRONLY)
            return
        try:
            with open(self.tmp, "wb") as f:
                hdr.write_to(f)
                self.offset = int(hdr["vox_offset"])
                size = self.offset + int(np.prod(full)) * self.dtype.itemsize
                f.flush()
                try:  # reserve the disk space now: a full disk or a file-size limit fails here, not hours later
                    os.posix_fallocate(f.fileno(), 0, size)
                except AttributeError:
                    f.truncate(size)
            self._fd = os.open(self.tmp, os.O_WRONLY)
        except OSError as e:
            self.abort()
            raise VolinferError(f"cannot create {self.target}: {e.strerror or e} "
                                f"(needs {size / 2**20:.0f} MB in {self.tmp.parent})") from None

    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Write ``block`` (channels, nz, ny, X): one positioned write per (channel, plane)."""
        X, Y, Z = self.shape
        c_n, nz, ny, nx = block.shape
        assert nx == X and block.dtype == self.dtype
        item = self.dtype.itemsize
        for c in range(c_n):
            for k in range(nz):
                pos = self.offset + (((c * Z + z0 + k) * Y + y0) * X) * item
                data = np.ascontiguousarray(block[c, k])
                try:
                    written = os.pwrite(self._fd, data, pos)
                except OSError as e:
                    raise VolinferError(f"cannot write {self.target}: {e.strerror or e}") from None
                if written != data.nbytes:
                    raise VolinferError(f"cannot write {self.target}: short write (disk full?)")

    def commit(self) -> Path:
        """Finish: compress if asked, then rename onto the target. Returns the target path."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        try:
            if self.compress:
                with open(self.tmp, "rb") as src, gzip.open(self._gz_tmp, "wb", compresslevel=self.compresslevel) as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.replace(self._gz_tmp, self.target)
                self.tmp.unlink()
            else:
                os.replace(self.tmp, self.target)
        except OSError as e:
            self.abort()
            raise VolinferError(f"cannot write {self.target}: {e.strerror or e}") from None
        return self.target

    def close_for_resume(self) -> None:
        """Stop writing but keep the temporary file, so that ``--resume`` can continue it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Remove every temporary file; the target (if any) is untouched."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for p in (self.tmp, self._gz_tmp):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


class ArrayWriter:
    """Collects the output in memory: (x, y, z) for one channel, (x, y, z, c) for several. For the Python API."""

    def __init__(self, shape: tuple[int, int, int], channels: int, dtype: np.dtype) -> None:
        self.array = np.zeros((*shape, channels), dtype=dtype)

    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        c, nz, ny, _ = block.shape
        self.array[:, y0 : y0 + ny, z0 : z0 + nz, :] = block.transpose(3, 2, 1, 0)

    def result(self) -> np.ndarray:
        return self.array[..., 0] if self.array.shape[-1] == 1 else self.array
