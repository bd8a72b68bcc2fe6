"""Reading tiles of a volume without loading it whole.

Axis order: every reader in :mod:`volinfer.io` (NIfTI here; TIFF stacks, MHA/MHD/NRRD and Zarr in their modules,
picked by :func:`volinfer.io.sources.open_paths`) hands on ``(x, y, z)`` arrays — NIfTI's voxel order, x varying
fastest on disk — with the affine that maps voxel ``(i, j, k)`` to world (RAS, mm), so the model sees the same array
for the same voxels whatever the file format.

A :class:`VolumeSource` gives the voxels of one region of one channel, as stored (scaling applied later, per tile).
Requests arrive in on-disk order (z-rows, then y-rows, then x), and each source keeps only what those requests need:

* uncompressed ``.nii``: one strip (all of x, the tile's y and z range) read with positioned reads in bounded
  chunks (:func:`volinfer.portable.pread_into`) straight into the strip's buffer; tiles side by side along x are cut
  from it. No memory map, so file pages never count towards the process's resident memory.
* ``.nii.gz``: a forward-only window of whole z-planes, decompressed as a stream in on-disk order. Its size is
  ``X * Y * tile_z`` voxels of the stored dtype: the one part of reading that grows with the volume's cross-section.
* numpy arrays (Python API): views.

Every source passes through :class:`VolumeSource`, which is where the numeric domain is settled once for all
commands: voxels reach the rest of volinfer in native byte order (big-endian files are swapped in place in the
reader's own buffers, as they are read), and types no model input can represent faithfully (complex, RGB and other
structured types) are refused with a line saying what to do. Declared sizes are checked against the bytes present
before any buffer is allocated (for ``.nii.gz``, against what the compressed bytes can possibly expand to).
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import nibabel as nib
import numpy as np

from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.io.gzipio import open_read as open_gzip

Region = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Deflate's largest possible expansion (zlib's documented limit is 1032:1); with gzip's per-member overhead, no
#: stream of n compressed bytes inflates to more than this many times n.
MAX_DEFLATE_RATIO = 1032


def native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in this machine's byte order."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative or dtype.byteorder == "|" else dtype.newbyteorder("=")


def check_voxel_type(dtype: np.dtype, where: str = "the volume") -> None:
    """Refuse voxel types a model input cannot represent without losing information, with what to do instead."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise VolinferError(
            f"{where}: complex voxels ({dtype.name}) are not supported: converting would drop the imaginary part; "
            f"save the magnitude (abs) or the real and imaginary parts as separate channel files and give those")
    if dtype.kind == "V" or dtype.fields is not None:
        names = ",".join(dtype.names or ()) or "structured"
        raise VolinferError(
            f"{where}: {names} voxels (e.g. RGB24) are not supported: save each colour as its own 3-D file (or a "
            f"4-D file with one channel per colour) and give those, or convert the image to grey levels")
    if dtype.kind not in "biuf":
        raise VolinferError(f"{where}: voxel type {dtype} is not a number type; expected integers or floats")


class ChannelReader(Protocol):
    """Stored voxels of one channel: ``region(((x0, x1), (y0, y1), (z0, z1)))`` returns an (x, y, z) array."""

    dtype: np.dtype
    slope: float
    inter: float

    def region(self, r: Region) -> np.ndarray: ...

    def planes(self, z0: int, z1: int) -> np.ndarray: ...

    def close(self) -> None: ...


class ArrayChannel:
    """One channel of an in-memory array."""

    HOLDS = "nothing"  # reads are views of the array (see :func:`read_buffer`)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.dtype = array.dtype
        self.slope, self.inter = 1.0, 0.0

    def region(self, r: Region) -> np.ndarray:
        (x0, x1), (y0, y1), (z0, z1) = r
        return self.array[x0:x1, y0:y1, z0:z1]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.array[:, :, z0:z1]

    def close(self) -> None:
        pass


class NativeChannel:
    """Wraps a channel whose voxels come in the other byte order (a big-endian array or Zarr store): each read is
    converted to native order (a copy; NIfTI readers swap in their own buffers instead)."""

    def __init__(self, inner: ChannelReader) -> None:
        self.inner = inner
        self.dtype = native(inner.dtype)
        self.slope, self.inter = inner.slope, inner.inter

    def region(self, r: Region) -> np.ndarray:
        return self.inner.region(r).astype(self.dtype)

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.inner.planes(z0, z1).astype(self.dtype)

    def close(self) -> None:
        self.inner.close()


@dataclass
class StoredLayout:
    """Where and how one channel's voxels lie in a file, x fastest, then y, then z (NIfTI, and the raw layouts of
    TIFF, MHA/MHD and NRRD files), so that one strip reader serves them all."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype  # native byte order: what the reader hands out
    offset: int  # byte offset of this channel's first voxel
    slope: float
    inter: float
    swap: bool = False  # the file stores the other byte order: swap every read in place


class StripChannel:
    """Random-access reader for uncompressed files: one full-x strip at a time, read with one positioned read per
    z-plane straight into a buffer that is reused for every strip (no per-tile allocation, no memory map)."""

    HOLDS = "strip"

    def __init__(self, stored: StoredLayout) -> None:
        self.s = stored
        self.dtype, self.slope, self.inter = stored.dtype, stored.slope, stored.inter
        self._fd = portable.open_fd(stored.path, os.O_RDONLY)
        self._key: tuple[int, int, int, int] | None = None
        self._buf = np.empty((0, 0, stored.shape[0]), dtype=stored.dtype)  # (z, y, X)
        self.read_once: int | None = None  # see VolumeSource.read_once

    def _load(self, y0: int, y1: int, z0: int, z1: int) -> np.ndarray:
        X, Y, _ = self.s.shape
        ny, nz = y1 - y0, z1 - z0
        if self._buf.shape[0] < nz or self._buf.shape[1] < ny:
            self._buf = np.empty((max(nz, self._buf.shape[0]), max(ny, self._buf.shape[1]), X), self.s.dtype)
        strip = self._buf[:nz, :ny]
        item = self.s.dtype.itemsize
        for k in range(nz):  # rows y0..y1 of one plane are contiguous on disk, and so is strip[k] in memory
            at = self.s.offset + ((z0 + k) * Y + y0) * X * item
            self._read_exact(strip[k], at)
            if self.read_once is not None:  # (not needed again: its pages leave the cache first)
                portable.forget(self._fd, at, max(0, ny - self.read_once) * X * item)
        if self.s.swap:
            strip.byteswap(inplace=True)
        return strip

    def region(self, r: Region) -> np.ndarray:
        (x0, x1), (y0, y1), (z0, z1) = r
        k = self._key
        if k is None or not (k[0] <= y0 and y1 <= k[1] and k[2] <= z0 and z1 <= k[3]):
            self._load(y0, y1, z0, z1)
            self._key = k = (y0, y1, z0, z1)
        strip = self._buf[: k[3] - k[2], : k[1] - k[0]]
        return strip.transpose(2, 1, 0)[x0:x1, y0 - k[0] : y1 - k[0], z0 - k[2] : z1 - k[2]]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        """Whole planes [z0, z1) as (x, y, z), read into a fresh array (for scans; the strip cache is untouched)."""
        X, Y, _ = self.s.shape
        out = np.empty((z1 - z0, Y, X), dtype=self.s.dtype)
        item = self.s.dtype.itemsize
        self._read_exact(out, self.s.offset + z0 * Y * X * item)
        if self.s.swap:
            out.byteswap(inplace=True)
        return out.transpose(2, 1, 0)

    def _read_exact(self, buf: np.ndarray, offset: int) -> None:
        """Fill ``buf`` from ``offset`` (in bounded chunks, short reads continued: any size works)."""
        if portable.pread_into(self._fd, buf, offset) != buf.nbytes:
            raise VolinferError(f"{self.s.path}: file is shorter than its header says (truncated?)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamChannel:
    """Forward-only reader for compressed files: keeps a window of whole z-planes, decompressing in on-disk order
    (a ``.nii.gz``; with ``opener``, any stream of x-fastest voxels, e.g. a compressed MHA or NRRD's after its
    header: :class:`volinfer.io.gzipio.InflateReader`)."""

    HOLDS = "planes"

    verify_end = False  # the file's last channel: check the gzip trailer once the last plane is read

    def __init__(self, stored: StoredLayout, depth: int, opener: Callable[[], Any] | None = None) -> None:
        self.s = stored
        self._opener = opener or (lambda: open_gzip(self.s.path))  # ISA-L where installed
        self.dtype, self.slope, self.inter = stored.dtype, stored.slope, stored.inter
        x, y, _ = stored.shape
        self._plane_bytes = x * y * stored.dtype.itemsize
        self._buf = np.empty((max(1, depth), y, x), dtype=stored.dtype)
        self._w0 = self._w1 = 0  # window holds planes [w0, w1) in buf[0 : w1 - w0]
        self._f: gzip.GzipFile | None = None

    def _open(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = self._opener()
        _read_exact(self._f, self.s.offset, self.s.path)

    def _advance(self, z0: int, z1: int) -> None:
        """Make the window hold planes [z0, z1); the stream position always equals the window's end."""
        if z1 - z0 > self._buf.shape[0]:
            raise ValueError(f"request of {z1 - z0} planes exceeds window depth {self._buf.shape[0]}")
        if self._f is None or z0 < self._w0:  # first use, or a backward request (gzip streams only go forward)
            self._open()
            self._w0 = self._w1 = 0
        assert self._f is not None
        if z0 >= self._w1:
            _read_exact(self._f, (z0 - self._w1) * self._plane_bytes, self.s.path)
            self._w0 = self._w1 = z0
        elif z0 > self._w0:
            self._buf[: self._w1 - z0] = self._buf[z0 - self._w0 : self._w1 - self._w0]
            self._w0 = z0
        while self._w1 < z1:
            plane = self._buf[self._w1 - self._w0]
            _read_into(self._f, memoryview(plane).cast("B"), self.s.path)
            if self.s.swap:
                plane.byteswap(inplace=True)
            self._w1 += 1
        if self._w1 == self.s.shape[2] and self.verify_end:
            self._check_end()

    def _check_end(self) -> None:
        """After the last plane of the file's last channel, the stream must end here: reading on makes the gzip
        layer check its CRC and length, so a corrupt file fails instead of giving wrong voxels."""
        assert self._f is not None
        try:
            extra = self._f.read(1)
        except Exception as e:  # zlib/ISA-L/gzip errors: a bad checksum or stream
            raise VolinferError(f"{self.s.path}: corrupt compressed data (checksum or length check failed: {e})"
                                ) from None
        if extra:
            raise VolinferError(f"{self.s.path}: more data after the voxels the header describes (corrupt file, or "
                                f"wrong header dimensions)")
        self.verify_end = False  # checked once per stream

    def region(self, r: Region) -> np.ndarray:
        (x0, x1), (y0, y1), (z0, z1) = r
        if not (self._w0 <= z0 and z1 <= self._w1) or self._f is None:
            self._advance(z0, z1)
        planes = self._buf[z0 - self._w0 : z1 - self._w0]  # (z, Y, X)
        return planes.transpose(2, 1, 0)[x0:x1, y0:y1]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.region(((0, self.s.shape[0]), (0, self.s.shape[1]), (z0, z1)))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _read_exact(f, nbytes: int, path: Path) -> None:
    """Consume ``nbytes`` of a stream (to skip over a header or planes)."""
    remaining = nbytes
    try:
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 22))
            if not chunk:
                raise VolinferError(f"{path}: file ends before its header says it should (truncated?)")
            remaining -= len(chunk)
    except (EOFError, gzip.BadGzipFile, OSError) as e:  # the same translation as _read_into
        raise VolinferError(f"{path}: corrupt compressed data ({e})") from None


def _read_into(f, view: memoryview, path: Path) -> None:
    got = 0
    try:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise VolinferError(f"{path}: file ends before its header says it should (truncated?)")
            got += n
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, VolinferError):
            raise
        raise VolinferError(f"{path}: corrupt compressed data ({e})") from None


def read_buffer(readers: Sequence[Any]) -> str:
    """What a volume's readers hold between reads, which the tiles engine's memory grows with (the largest of its
    channels'): "planes" (whole x-y planes over a tile's z range: a gzip window, decoded TIFF pages), "strip" (all of
    x over a tile's y and z range: uncompressed files), or "nothing" (in-memory arrays and Zarr chunks, read straight
    into the tile). A reader wrapping another (:class:`NativeChannel`) holds what the inner one does."""
    kinds = {getattr(getattr(r, "inner", r), "HOLDS", "strip") for r in readers}
    return next((k for k in ("planes", "strip") if k in kinds), "nothing")


def stored_as(readers: Sequence[Any]) -> tuple[int, str]:
    """How a volume is stored, as the tiles engine's buffers are sized: bytes a voxel (its widest channel's) and
    what its readers hold (:func:`read_buffer`)."""
    return max(r.dtype.itemsize for r in readers), read_buffer(readers)


#: NIfTI space units (nibabel's names) in millimetres; "unknown" is read as millimetres, NIfTI's usual unit.
NIFTI_MM = {"unknown": 1.0, "mm": 1.0, "micron": 1e-3, "meter": 1e3}


class VolumeSource:
    """A volume of one or more channels: one 4-D file, several 3-D files (one per channel), or a numpy array.

    ``shape`` is the spatial (x, y, z) shape; ``channels`` the channel count; ``header`` / ``affine`` come from the
    first file and are what the output copies.
    """

    def __init__(
        self,
        channels: Sequence[ChannelReader],
        shape: tuple[int, int, int],
        header: nib.Nifti1Header | None = None,
        affine: np.ndarray | None = None,
        paths: Sequence[Path] = (),
    ) -> None:
        readers = list(channels)
        for r in readers:  # the one gate every source (NIfTI, Zarr, array) passes
            check_voxel_type(r.dtype, str(paths[0]) if len(paths) == 1 else "the volume")
        self.readers = [r if native(r.dtype) == r.dtype else NativeChannel(r) for r in readers]
        self.shape = shape
        if header is not None and header.endianness != nib.volumeutils.native_code:
            header = header.as_byteswapped(nib.volumeutils.native_code)  # outputs copy it: say native order
        self.header = header
        self.affine = affine
        self.paths = list(paths)
        # whether the affine says where the axes point / how large the voxels are (a TIFF stack without OME sizes
        # knows neither; the model's grid step (volinfer.run.model_grid) then leaves that part alone)
        self.orientation_known = self.spacing_known = affine is not None
        # millimetres per unit of the affine (a NIfTI header's xyzt_units; None: a unit that is no known length)
        self.mm_per_unit: float | None = NIFTI_MM.get(header.get_xyzt_units()[0]) if header is not None else 1.0
        self.geometry: Any = None  # a Zarr store's own (volinfer.io.ome.Geometry): what its outputs keep

    @property
    def channels(self) -> int:
        return len(self.readers)

    def read_once(self, kept: int | None) -> None:
        """From now on each region read from an uncompressed file is read only once, but for its last ``kept`` rows
        along y (None: reads as before). Skewed bands read their own input rows band after band, the next band
        again only the few rows its first layer's halo needs: the rest leave the page cache as soon as they are read,
        instead of crowding out what the run reads back soon (the strips and spilled planes a band writes; at 2048³
        the input alone is 16 GiB)."""
        for r in self.readers:
            r = getattr(r, "inner", r)
            if isinstance(r, StripChannel):
                r.read_once = kept

    @property
    def stored_depth(self) -> int:
        """Planes along z the storage keeps together (a chunked store's chunk depth; 1 for files read plane by
        plane): what a forward pass over z should read at a time to decompress each chunk once."""
        return max([1] + [int(r.chunks[2]) for r in self.readers if getattr(r, "chunks", None)])

    @classmethod
    def from_array(cls, array: np.ndarray, channel_axis: int | None = None) -> "VolumeSource":
        """Wrap an array shaped (x, y, z) or, with ``channel_axis``, (x, y, z, c) / (c, x, y, z)."""
        a = np.asarray(array)
        if channel_axis is None:
            if a.ndim != 3:
                raise VolinferError(f"expected a 3-D array (x, y, z), got shape {a.shape}; pass channel_axis for 4-D")
            chans = [a]
        else:
            if a.ndim != 4:
                raise VolinferError(f"expected a 4-D array with channel_axis={channel_axis}, got shape {a.shape}")
            chans = [np.take(a, c, axis=channel_axis) for c in range(a.shape[channel_axis])]
        return cls([ArrayChannel(c) for c in chans], tuple(chans[0].shape))  # type: ignore[arg-type]

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike], depth: int) -> "VolumeSource":
        """Open NIfTI files lazily; ``depth`` is the deepest z-range one tile request spans (the tile's z size)."""
        readers: list[ChannelReader] = []
        try:  # a file that fails closes the readers already opened for the earlier ones
            first = None
            for p in map(Path, paths):
                first = _open_file(p, paths, first, depth, readers)
        except BaseException:
            for r in readers:
                r.close()
            raise
        assert first is not None
        return cls(readers, tuple(first.shape[:3]), header=first.header, affine=first.affine,  # type: ignore[arg-type]
                   paths=[Path(p) for p in paths])

    def read(self, channel: int, r: Region) -> np.ndarray:
        """Stored voxels of ``channel`` in region ``r``, as an (x, y, z) array (scaling not yet applied)."""
        return self.readers[channel].region(r)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "VolumeSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_file(p: Path, paths: Sequence[str | os.PathLike], first: nib.Nifti1Image | None, depth: int,
               readers: list[ChannelReader]) -> nib.Nifti1Image:
    """Check one NIfTI file against the first (shape, affine) and append a reader per channel to ``readers``;
    returns the first file's image."""
    img = _load_header(p)
    shape = img.shape
    if len(shape) == 5 and shape[3] == 1:  # NIfTI stores vector data as (x, y, z, 1, c)
        shape = shape[:3] + shape[4:]
    if len(shape) not in (3, 4):
        raise VolinferError(f"{p}: expected a 3-D or 4-D image, got {len(img.shape)}-D shape {img.shape}")
    if first is None:
        first = img
    elif tuple(shape[:3]) != tuple(first.shape[:3]):
        raise VolinferError(f"{p}: shape {tuple(shape[:3])} differs from {paths[0]}'s {tuple(first.shape[:3])}")
    elif not np.allclose(img.affine, first.affine, atol=1e-4):
        raise VolinferError(f"{p}: affine differs from {paths[0]}'s (the channels are not on one grid)")
    proxy = img.dataobj
    stored_dtype = np.dtype(proxy.dtype)
    check_voxel_type(stored_dtype, str(p))
    dtype = native(stored_dtype)
    n_ch = shape[3] if len(shape) == 4 else 1
    vox = math.prod(int(v) for v in shape[:3])  # Python ints: NIfTI-2 dims can overflow int64 products
    if vox == 0 or n_ch == 0:
        raise VolinferError(f"{p}: the header describes an empty image (shape {tuple(shape)})")
    compressed = _is_gzip(p)
    check_declared_size(p, int(proxy.offset) + vox * n_ch * dtype.itemsize, compressed)
    for c in range(n_ch):
        stored = StoredLayout(
            path=p,
            shape=tuple(shape[:3]),  # type: ignore[arg-type]
            dtype=dtype,
            offset=int(proxy.offset) + c * vox * dtype.itemsize,
            slope=float(proxy.slope),
            inter=float(proxy.inter),
            swap=dtype != stored_dtype,
        )
        readers.append(StreamChannel(stored, depth) if compressed else StripChannel(stored))
        if compressed and c == n_ch - 1:
            readers[-1].verify_end = True  # type: ignore[attr-defined]
    return first


def scan_slabs(reader: ChannelReader, shape: tuple[int, int, int], depth: int,
               voxels: int = 1 << 22) -> "Iterator[np.ndarray]":
    """Whole z-slabs of one channel, in on-disk order, each at most ``voxels`` voxels (and ``depth`` planes, the
    most a gzip stream window holds): for passes over the whole volume that must not hold it."""
    step = slab_planes(shape, depth, voxels)
    for z0 in range(0, shape[2], step):
        yield reader.planes(z0, min(shape[2], z0 + step))


def slab_planes(shape: tuple[int, int, int], depth: int, voxels: int = 1 << 22) -> int:
    """Planes in each of :func:`scan_slabs`' slabs."""
    return max(1, min(depth, voxels // max(1, shape[0] * shape[1])))


def _is_gzip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def check_declared_size(p: Path, expected: int, compressed: bool) -> None:
    """The bytes the header declares must be present, checked before anything of that size is allocated: the file
    size for ``.nii``; for ``.nii.gz``, the most the compressed bytes can inflate to (deflate cannot exceed
    :data:`MAX_DEFLATE_RATIO`, whatever the trailer says: its size field is only modulo 2**32) and the trailer."""
    size = os.path.getsize(p)
    if not compressed:
        if size < expected:
            raise VolinferError(f"{p}: file holds {size} bytes but its header describes {expected} (truncated, or "
                                f"the header's dimensions are wrong)")
        return
    if expected > size * MAX_DEFLATE_RATIO:
        raise VolinferError(
            f"{p}: header describes {expected} bytes of voxels, more than {size} compressed bytes can hold (at most "
            f"{size * MAX_DEFLATE_RATIO}): the header's dimensions are wrong or the file is truncated")
    _check_gzip_size(p, expected)


def _check_gzip_size(p: Path, expected: int) -> None:
    """Compare the size the header implies with the gzip trailer's record of the uncompressed size (mod 2**32):
    catches truncated or corrupt files and wrong header dimensions before any work, without decompressing. The
    trailer is the LAST member's: a valid file of several gzip members (concatenated, or written in parts by
    ``bgzip``/``pigz``-like tools) records only its own part there, so on a mismatch the whole stream is inflated
    once, counting bytes in bounded memory, before the file is refused."""
    with open(p, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize == expected % 2**32:
        return
    inside = _inflated_size(p)
    if inside != expected:
        raise VolinferError(
            f"{p}: compressed data does not match the header ({inside} bytes inside, header implies "
            f"{expected}): the file is truncated or corrupt, or its header's dimensions are wrong")


def _inflated_size(p: Path, chunk: int = 1 << 22) -> int:
    """Bytes the whole gzip stream of ``p`` (every member) inflates to; a corrupt stream is a one-line error."""
    total = 0
    buf = bytearray(chunk)
    try:
        with open_gzip(p) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    return total
                total += n
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise VolinferError(f"{p}: the file is truncated or corrupt ({e})") from None


def _load_header(p: Path) -> nib.Nifti1Image:
    """Open ``p`` as a NIfTI image without reading its voxels; every failure becomes a one-line error."""
    if not p.exists():
        raise VolinferError(f"{p}: no such file")
    if p.is_dir():
        raise VolinferError(f"{p}: is a directory, expected a NIfTI file")
    if p.stat().st_size == 0:
        raise VolinferError(f"{p}: file is empty")
    try:
        img = nib.load(str(p))
    except Exception as e:  # nibabel raises many types for unreadable files
        raise VolinferError(f"{p}: not a readable NIfTI volume ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolinferError(f"{p}: {type(img).__name__} is not supported; expected NIfTI (.nii or .nii.gz)")
    return img


#: The largest float32 value: stored values beyond it need float64 arithmetic.
F32_MAX = float(np.finfo(np.float32).max)


def exceeds_float32(dtype: np.dtype, slope: float = 1.0, inter: float = 0.0) -> bool:
    """Whether stored values of ``dtype``, scaled by the file's slope/intercept, can leave float32's range (float64
    voxels, 64-bit integers with a large slope, ...): such channels are normalised in float64 and range-checked."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        return False
    top = float(np.finfo(dtype).max if dtype.kind == "f" else max(-int(np.iinfo(dtype).min), np.iinfo(dtype).max))
    return top * abs(slope) + abs(inter) > F32_MAX


def open_channels(paths: Sequence[str | os.PathLike], open_one: Callable[[Path], tuple[Any, Any]],
                  differs: Callable[[Any, Any], bool]) -> tuple[list[Any], Any]:
    """One reader per channel file, each opened by ``open_one(path) -> (reader, grid)``, and the first file's grid;
    a channel whose grid ``differs`` from the first's is refused in one line. Readers opened so far are closed
    when any file fails."""
    readers: list[Any] = []
    first: Any = None
    try:
        for p in map(Path, paths):
            reader, grid = open_one(p)
            readers.append(reader)
            if first is None:
                first = grid
            elif differs(grid, first):
                raise VolinferError(f"{p}: its grid (shape, voxel size or orientation) differs from {paths[0]}'s: "
                                    f"the channels are not on one grid")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers, first
