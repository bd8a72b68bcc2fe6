"""Writing the output progressively: a NIfTI file on disk (atomically) or an array in memory.

:class:`NiftiWriter` writes finished blocks with positioned writes (:func:`volinfer.portable.pwrite_all`) into a temporary uncompressed
``.nii`` beside the target: plain file I/O, so written pages live in the OS page cache and not in the process's
resident memory (a writable memory map would count them). For a ``.nii.gz`` target a :class:`~volinfer.io.gzip_writer.GzipStreamer` compresses
the temporary file *while the run goes on*: each time the rows written so far are final (``sync``), background
threads read the newly final bytes back in on-disk order and compress them, so that after the last tile only the
tail is left to compress. Only then is the result renamed onto the target, so an interrupted run never leaves a
truncated file under the output name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from volinfer import portable
from volinfer.io.gzip_writer import GzipStreamer
from volinfer.options import format_mb
from volinfer.errors import VolinferError
from volinfer.io.journal import ResumableError
from volinfer.io.formats import is_zarr_output
from volinfer.io.targets import aux_path, check_output
from volinfer.io.zarr_io import check_zarr_output


def check_target(target: Path, overwrite: bool, inputs: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Refuse NIfTI outputs that would clobber data or cannot be written, before any work starts (see targets)."""
    check_output(Path(target), [Path(p) for p in inputs], overwrite, "nifti")


def check_any_output(output: Path, inputs: Sequence[Path], overwrite: bool, resume: bool) -> None:
    """The output check of :mod:`volinfer.io.targets` for every kind of output (Zarr, TIFF, NIfTI)."""
    if is_zarr_output(output):
        check_zarr_output(output, list(inputs), overwrite, resume)
    elif str(output).lower().endswith((".tif", ".tiff")):
        check_output(Path(output), [Path(p) for p in inputs], overwrite, "tiff")
    else:
        check_target(Path(output), overwrite, list(inputs))


def save_image(img: nib.Nifti1Image, target: Path, inputs: list[Path] = ()) -> Path:  # type: ignore[assignment]
    """Write a small in-memory image volinfer made (the demo's volume and ground truth) to ``target``, replacing a
    file there as ``--overwrite`` would: through the same checks as run outputs (:func:`check_target`), written to a
    temporary file beside it and renamed over it, so a symlink or hard link at ``target`` is replaced, never written
    through (its target stays as it was)."""
    target = Path(target)
    check_target(target, True, inputs)
    suffix = ".partial.nii.gz" if target.name.lower().endswith(".gz") else ".partial.nii"
    tmp = aux_path(target, suffix)
    tmp.unlink(missing_ok=True)  # a stale one, or a planted link: removed, never written through
    try:
        nib.save(img, str(tmp))
        portable.fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


#: NIfTI-1 stores dimensions as int16; larger volumes need a NIfTI-2 header.
NIFTI1_MAX_DIM = 32767


def output_header(
    reference: nib.Nifti1Header | None, affine: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype,
    same_image: bool = False,
) -> nib.Nifti1Header:
    """A NIfTI header for the output: geometry (affine, qform/sform codes, zooms, units) copied from the input; its
    scaling and display range cleared, and its intent and description too unless the output is the same image
    (``same_image``: a format conversion, e.g. ``to-nifti``; a model's output is not the input's z-score map). NIfTI-1 when every dimension fits its int16 fields, else NIfTI-2 (int64 dimensions)."""
    cls = nib.Nifti2Header if max(shape) > NIFTI1_MAX_DIM else nib.Nifti1Header
    hdr = cls.from_header(reference) if reference is not None else cls()
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
    if not same_image or len(shape) == 4:  # (an intent of a 3-D image does not hold for its channels)
        hdr["intent_code"], hdr["intent_name"] = 0, b""
        hdr["intent_p1"] = hdr["intent_p2"] = hdr["intent_p3"] = 0
    if not same_image:
        hdr["descrip"] = b"volinfer output"
    hdr["vox_offset"] = 0  # recomputed on write from the extensions' size
    return hdr


class NiftiWriter:
    """Streams blocks into ``target`` (``.nii`` or ``.nii.gz``) through a temporary file; see module docs.

    Contract with the caller: when :meth:`sync` is called, every block written so far is final (the engine drains
    a z-row of tiles before it says the row is done). That is what lets a ``.nii.gz`` be compressed as the run goes.
    """

    #: The output is the image ``reference`` describes (a format conversion: :class:`SameImageWriter`), not a model's
    #: output: its intent and description are kept (:func:`output_header`).
    same_image = False

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
        """``resume``: continue the temporary file an interrupted run left. Checks room for the temporary file and,
        for ``.nii.gz``, a conservative estimate of the compressed copy, before anything is written."""
        self.target = Path(target)
        self.shape, self.channels, self.dtype = shape, channels, np.dtype(dtype)
        self.compress = self.target.name.lower().endswith(".gz")
        self.compresslevel = compresslevel
        self.tmp = aux_path(self.target, ".partial.nii")
        self._gz_tmp = aux_path(self.target, ".partial.nii.gz")
        self._part_tmps = [aux_path(self.target, f".partial.c{c}.gz") for c in range(1, channels)]
        full = shape if channels == 1 else (*shape, channels)
        hdr = output_header(reference, affine, full, self.dtype, self.same_image)
        self._fd = -1
        self._gz: GzipStreamer | None = None
        self._hi = 0  # planes below the highest plane written so far are final at the next sync()
        size = 0
        if resume:  # continue an interrupted run: the temporary file already has header and finished rows
            if not self.tmp.exists():
                raise VolinferError(f"{self.tmp}: no interrupted output to resume (run without --resume)")
            old = _read_header(self.tmp)
            self.offset = int(old["vox_offset"])
            if old.get_data_shape() != full or old.get_data_dtype() != self.dtype:
                raise VolinferError(f"{self.tmp}: interrupted output has another shape or type; run without --resume")
            self._check_space(0, self.offset + int(np.prod(full)) * self.dtype.itemsize)
            self._fd = portable.open_fd(self.tmp, os.O_WRONLY)
            try:
                self._start_compression()  # the compressed stream restarts from plane 0 of the temporary file
            except BaseException:
                self.close_for_resume()  # no descriptor left open; the interrupted output stays resumable
                raise
            return
        estimate = self.offset_estimate(hdr) + int(np.prod(full)) * self.dtype.itemsize
        self._check_space(estimate, estimate)
        try:
            with open(self.tmp, "wb") as f:
                hdr.write_to(f)
                self.offset = int(hdr["vox_offset"])
                size = self.offset + int(np.prod(full)) * self.dtype.itemsize
                f.flush()
                portable.reserve(f.fileno(), size)  # a full disk or a file-size limit fails here, not hours later
            self._fd = portable.open_fd(self.tmp, os.O_WRONLY)
            self._start_compression()
        except OSError as e:
            self.abort()
            raise VolinferError(f"cannot create {self.target}: {e.strerror or e} "
                                f"(needs {size / 2**20:.0f} MB in {self.tmp.parent})") from None
        except BaseException:  # interrupted while creating: nothing left open or behind
            self.abort()
            raise

    @staticmethod
    def offset_estimate(hdr: nib.Nifti1Header) -> int:
        return int(hdr.single_vox_offset) + 4096  # header plus room for extensions

    @property
    def _plane_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def _start_compression(self) -> None:
        """For ``.nii.gz``: start compressing in the background; part 0 is the header and channel 0, part c
        channel c (channels lie one after the other, each plane by plane)."""
        if not self.compress:
            return
        per_channel = self._plane_bytes * self.shape[2]
        ranges = [(0 if c == 0 else self.offset + c * per_channel, self.offset + (c + 1) * per_channel)
                  for c in range(self.channels)]
        self._gz = GzipStreamer(self.tmp, self._gz_tmp, ranges, self._part_tmps, self.compresslevel)

    def _final_limits(self, planes: int) -> list[int]:
        """Per compressed part, the end of the bytes that are final when planes [0, ``planes``) are."""
        per_channel = self._plane_bytes * self.shape[2]
        return [self.offset + c * per_channel + planes * self._plane_bytes for c in range(self.channels)]

    def _check_space(self, tmp_bytes: int, data_bytes: int) -> None:
        """Refuse now, not after hours of work, when the disk cannot hold the temporary file and (for .nii.gz) a
        conservative estimate of the compressed copy: as large as the data for floats, a quarter for integers."""
        gz = (data_bytes if self.dtype.kind in "fc" else data_bytes // 4) if self.compress else 0
        free = portable.disk_free(self.tmp.parent)
        if free is None:
            return
        if tmp_bytes + gz > free:
            what = "the temporary file and its compressed copy" if gz else "the temporary file"
            raise VolinferError(f"{self.target}: not enough disk space in {self.tmp.parent}: needs about "
                                f"{format_mb((tmp_bytes + gz) / 2**20)} for {what}, {format_mb(free / 2**20)} free"
                                + ("; free space or write an uncompressed .nii" if gz else ""))

    def sync(self) -> None:
        """Make the rows written so far durable: called before the journal claims them, once every block written so
        far is final. For ``.nii.gz``, hands the newly final planes to the background compressor (and reports its
        failure, if it had one: the journal then keeps its last count, and ``--resume`` continues from there)."""
        if self._fd >= 0:
            try:
                portable.fsync(self._fd)
                self._release_written()
            except OSError as e:
                raise ResumableError(f"cannot write {self.target}: {e.strerror or e}; free space and run the same "
                                     f"command with --resume to continue") from None

    def release_written(self) -> None:
        """Every block written so far is final: let the background compressor have it (no fsync). For writers that
        write final planes in order without a journal (e.g. ``to-nifti``); ``sync`` does this too."""
        try:
            self._release_written()
        except OSError as e:
            raise VolinferError(f"cannot write {self.target}: {e.strerror or e}") from None

    def planes_final(self, z: int) -> None:
        """Every plane below ``z`` is final (blocks written in plane order, whole planes): compress them now."""
        self.release_written()

    def _release_written(self) -> None:
        if self._gz is not None:
            self._gz.advance(self._final_limits(self._hi))

    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        """Write ``block`` (channels, nz, ny, X): one positioned write per (channel, plane)."""
        X, Y, Z = self.shape
        c_n, nz, ny, nx = block.shape
        assert nx == X and block.dtype == self.dtype
        self._hi = max(self._hi, z0 + nz)
        item = self.dtype.itemsize
        for c in range(c_n):
            for k in range(nz):
                pos = self.offset + (((c * Z + z0 + k) * Y + y0) * X) * item
                try:  # bounded chunks, short writes continued (portable.pwrite_all)
                    portable.pwrite_all(self._fd, np.ascontiguousarray(block[c, k]), pos)
                except OSError as e:
                    raise ResumableError(f"cannot write {self.target}: {e.strerror or e}; fix that and run the "
                                         f"same command with --resume to continue") from None

    def commit(self) -> Path:
        """Finish: compress if asked, then rename onto the target. Returns the target path.

        A failure here (disk full while compressing, rename refused) keeps the finished temporary file: the
        journal already says every row is done, so ``--resume`` only redoes this step."""
        self.sync()
        os.close(self._fd)
        self._fd = -1
        try:
            if self.compress:
                self._compress()
                os.replace(self._gz_tmp, self.target)
                self.tmp.unlink()
            else:
                os.replace(self.tmp, self.target)
        except OSError as e:
            self._discard_compression()
            raise ResumableError(f"cannot write {self.target}: {e.strerror or e}; the finished result is kept in "
                                 f"{self.tmp}: fix that and run the same command with --resume to finish") from None
        return self.target

    def _compress(self) -> None:
        """Compress what the background compressor has not yet (the tail), and finish the gzip file. Reproducible:
        no file name and mtime 0 in the gzip header, slabs on a fixed grid, so a resumed run writes the same bytes
        as an uninterrupted one."""
        if self._gz is None:  # the compressor was stopped: start over from plane 0
            self._start_compression()
        assert self._gz is not None
        self._gz.finish()
        self._gz = None

    def _discard_compression(self) -> None:
        """Stop compressing and remove the compressed files: a resumed run restarts the stream from plane 0."""
        if self._gz is not None:
            self._gz.discard()
            self._gz = None
        for p in (self._gz_tmp, *self._part_tmps):
            p.unlink(missing_ok=True)

    def close_for_resume(self) -> None:
        """Stop writing but keep the temporary file, so that ``--resume`` can continue it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._discard_compression()

    def abort(self) -> None:
        """Remove every temporary file; the target (if any) is untouched."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._discard_compression()
        for p in (self.tmp, self._gz_tmp):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _read_header(path: Path) -> nib.Nifti1Header:
    """The header of an interrupted temporary file, NIfTI-1 or NIfTI-2 (told apart by ``sizeof_hdr``)."""
    with open(path, "rb") as f:
        first = f.read(4)
        f.seek(0)
        two = int.from_bytes(first, "little") == 540 or int.from_bytes(first, "big") == 540
        return (nib.Nifti2Header if two else nib.Nifti1Header).from_fileobj(f)


class ArrayWriter:
    """Collects the output in memory: (x, y, z) for one channel, (x, y, z, c) for several. For the Python API."""

    def __init__(self, shape: tuple[int, int, int], channels: int, dtype: np.dtype) -> None:
        self.array = np.zeros((*shape, channels), dtype=dtype)

    def write(self, block: np.ndarray, z0: int, y0: int) -> None:
        c, nz, ny, _ = block.shape
        self.array[:, y0 : y0 + ny, z0 : z0 + nz, :] = block.transpose(3, 2, 1, 0)

    def result(self) -> np.ndarray:
        return self.array[..., 0] if self.array.shape[-1] == 1 else self.array


class SameImageWriter(NiftiWriter):
    """A :class:`NiftiWriter` for a format conversion (``to-nifti``): the image its reference header describes, whose
    intent and description stay."""

    same_image = True
