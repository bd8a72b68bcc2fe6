"""MHA / MHD / NRRD volumes in (optional extra ``itk``: SimpleITK), as CT from research pipelines comes.

SimpleITK reads the header (size, pixel type, spacing, origin, direction) without the voxels. ITK's physical space is
LPS; the affine handed on is NIfTI's RAS one, ``diag(-1, -1, 1) · [direction · diag(spacing) | origin]``, as ITK's own
NIfTI writer stores it, and the voxels come in ``(x, y, z)`` order (ITK's index order, x fastest), like every reader.

Lazy where the format is raw: an uncompressed ``.mha`` (``ElementDataFile = LOCAL``), ``.mhd`` + ``.raw`` and NRRD with
``encoding: raw`` (attached or detached) have NIfTI's memory layout, so they are read by the same positioned strip
reader as ``.nii`` files (:class:`volinfer.io.reader.StripChannel`) at the data offset their header gives. Compressed
ones (``CompressedData = True``: one zlib stream; NRRD ``encoding: gzip``, 3D Slicer's default) are decompressed as
they are read, a window of whole planes at a time, like a ``.nii.gz`` (:class:`volinfer.io.reader.StreamChannel`).
Other encodings SimpleITK decodes whole (NRRD text/hex: memory, the volume; bzip2 is refused: its expansion cannot be
bounded), after checking that the bytes can hold what the header declares. Declared sizes are checked against the
bytes present before anything of that size is allocated; vector (multi-component) images are refused (one file per
channel); DICOM series are out of scope (convert them with ``dcm2niix``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.gzipio import InflateReader
from volinfer.io.reader import (MAX_DEFLATE_RATIO, open_channels, ArrayChannel, StoredLayout, StreamChannel,
                                StripChannel, VolumeSource, check_declared_size, native)

#: Header bytes read to find the data offset (MetaImage / NRRD headers are a few hundred bytes).
HEADER_MAX = 1 << 16


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError:
        raise VolinferError("MHA/MHD/NRRD volumes need SimpleITK: pip install 'volinfer[itk]'") from None
    return sitk


@dataclass
class ItkHeader:
    """What SimpleITK's header read says about one file."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    affine: np.ndarray


@dataclass
class RawData:
    """Where a file's voxels lie: uncompressed (:func:`raw_data`), or in deflate streams (:func:`packed_data`;
    ``offset``: where the first starts in the file)."""

    path: Path
    offset: int
    big_endian: bool


def read_header(p: Path) -> ItkHeader:
    """Size, pixel type and RAS affine of ``p``, from its header only; one-line errors for anything unusable."""
    sitk = _sitk()
    if not p.is_file() or p.stat().st_size == 0:
        raise VolinferError(f"{p}: no such file" if not p.exists() else f"{p}: empty file or a directory")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except Exception as e:
        raise VolinferError(f"{p}: not a readable MHA/MHD/NRRD volume ({str(e).strip().splitlines()[-1][:200]})"
                            ) from None
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) != 3 or min(size) < 1:
        raise VolinferError(f"{p}: expected a 3-D image, got size {size}")
    if reader.GetNumberOfComponents() != 1:
        raise VolinferError(f"{p}: {reader.GetNumberOfComponents()} components per voxel (vector image): save one "
                            f"scalar volume per channel and give those files")
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype)
    direction = np.asarray(reader.GetDirection(), float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(reader.GetSpacing(), float)[None, :]
    lps[:3, 3] = reader.GetOrigin()
    return ItkHeader(size, dtype, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)  # type: ignore[arg-type]


def _fields(text: str, sep: str) -> dict[str, str]:
    """``key<sep> value`` lines, keys lower-case (comments and NRRD's ``key:=value`` pairs skipped)."""
    out = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found and not line.startswith("#") and not (sep == ":" and value.startswith("=")):
            out[key.strip().lower()] = value.strip()
    return out


def _true(value: str | None) -> bool:
    """A MetaImage boolean as MetaIO reads it: ``True``, ``T``, ``1`` (by its first character)."""
    return bool(value) and value.strip()[:1] in ("T", "t", "1")  # type: ignore[union-attr]


@dataclass
class _Layout:
    """What a MetaImage or NRRD header says about where its voxels lie."""

    nrrd: bool
    data: str | None  # a separate data file's name (None: the voxels follow the header)
    start: int  # where voxels following the header start (-1: the header has no end, e.g. a detached .nhdr)
    big: bool  # big-endian voxels
    encoding: str  # "raw", "deflate" (MetaImage CompressedData, NRRD gzip), or another NRRD encoding
    skip: str  # NRRD byte skip, MetaImage HeaderSize ("0" when absent)
    line_skip: str


def _header_end(head: bytes) -> int:
    """Where a NRRD header's first empty line ends (LF or CRLF lines), i.e. where attached data start; -1: none."""
    pos = 0
    while (nl := head.find(b"\n", pos)) >= 0:
        if head[pos:nl].rstrip(b"\r") == b"":
            return nl + 1
        pos = nl + 1
    return -1


def _layout(p: Path) -> _Layout | None:
    """The data layout a MetaImage or NRRD header declares; None for a MetaImage without ElementDataFile."""
    with open(p, "rb") as f:
        head = f.read(HEADER_MAX)
    if head.startswith(b"NRRD"):
        start = _header_end(head)
        fields = {k.replace(" ", ""): v for k, v in
                  _fields(head[: start if start >= 0 else len(head)].decode("latin-1"), ":").items()}
        encoding = fields.get("encoding", "raw").lower()
        return _Layout(True, fields.get("datafile"), start, fields.get("endian", "").lower() == "big",
                       "deflate" if encoding in ("gzip", "gz") else encoding, fields.get("byteskip", "0"),
                       fields.get("lineskip", "0"))
    cut = head.find(b"ElementDataFile")
    if cut < 0:
        return None
    line_end = head.find(b"\n", cut)
    fields = _fields(head[: line_end if line_end >= 0 else len(head)].decode("latin-1"), "=")
    data = fields.get("elementdatafile", "")
    return _Layout(False, None if data.upper() == "LOCAL" else data, line_end + 1 if line_end >= 0 else -1,
                   _true(fields.get("binarydatabyteordermsb") or fields.get("elementbyteordermsb")),
                   "deflate" if _true(fields.get("compresseddata")) else "raw", fields.get("headersize", "0"), "0")


def raw_data(p: Path, nbytes: int, lay: _Layout | None) -> RawData | None:
    """The data file, offset and byte order of an uncompressed MetaImage or NRRD, from its header's layout ``lay``
    (:func:`_layout`); None where the voxels are compressed or laid out in a way only SimpleITK reads (lists of
    files, line skips)."""
    if lay is None or lay.encoding != "raw" or lay.line_skip != "0" or not _whole(lay.skip):
        return None
    if lay.data is not None:
        return _detached(p, lay.data, int(lay.skip), nbytes, lay.big)
    if lay.nrrd and lay.skip != "0":
        return None
    return RawData(p, lay.start, lay.big) if lay.start >= 0 else None


def packed_data(p: Path, lay: _Layout | None) -> RawData | None:
    """Where a compressed MetaImage's stream (``CompressedData = True``) or a gzip NRRD's starts, and the voxels'
    byte order, from its header's layout ``lay``; None for other encodings and layouts (lists of files, byte or line
    skips, header sizes)."""
    if lay is None or lay.encoding != "deflate" or lay.line_skip != "0" or lay.skip != "0":
        return None
    if lay.data is None:
        return RawData(p, lay.start, lay.big) if lay.start >= 0 else None
    found = _detached(p, lay.data, 0, 0, lay.big)
    return RawData(found.path, 0, lay.big) if found is not None else None


def _whole(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _detached(p: Path, name: str, skip: int, nbytes: int, big: bool) -> RawData | None:
    """A header's separate data file (one file, no pattern or list), with ``skip`` bytes before the voxels (-1: the
    voxels are the file's last ``nbytes``)."""
    if " " in name.strip() or "%" in name or name.upper() == "LIST":
        return None
    data = (p.parent / name) if not Path(name).is_absolute() else Path(name)
    if not data.is_file():
        raise VolinferError(f"{p}: its data file {data} does not exist")
    offset = os.path.getsize(data) - nbytes if skip == -1 else skip
    return RawData(data, max(0, offset), big)


def data_files(p: Path) -> list[Path]:
    """The separate data file a ``.mhd``/``.nhdr`` header names (none for attached data, lists or patterns): an
    input too, so that no output may be written over it."""
    try:
        lay = _layout(p)
    except OSError:
        return []
    name = lay.data if lay is not None else None
    if not name or name.upper() == "LIST" or " " in name or "%" in name:
        return []
    return [p.parent / name]


def _open_one(p: Path, depth: int) -> tuple[Any, ItkHeader]:
    """One scalar volume: its channel reader (strips of the raw data, a window of planes decompressed as read, or
    the array SimpleITK decoded) and header."""
    hdr = read_header(p)
    nbytes = math.prod(hdr.shape) * hdr.dtype.itemsize
    lay = _layout(p)
    raw = raw_data(p, nbytes, lay)
    if raw is not None:
        stored = hdr.dtype.newbyteorder(">" if raw.big_endian else "<")
        check_declared_size(raw.path, raw.offset + nbytes, compressed=False)
        layout = StoredLayout(raw.path, hdr.shape, native(stored), raw.offset, 1.0, 0.0,
                              swap=native(stored) != stored)
        return StripChannel(layout), hdr
    packed = packed_data(p, lay)
    if packed is not None:
        stored = hdr.dtype.newbyteorder(">" if packed.big_endian else "<")
        _check_inflatable(p, nbytes, os.path.getsize(packed.path) - packed.offset)
        layout = StoredLayout(packed.path, hdr.shape, native(stored), 0, 1.0, 0.0, swap=native(stored) != stored)
        channel = StreamChannel(layout, depth, lambda: InflateReader(packed.path, packed.offset))
        channel.verify_end = True  # one volume a file: its stream's checksum is checked after the last plane
        return channel, hdr
    size = os.path.getsize(p)
    encoding = lay.encoding if lay is not None and lay.nrrd else None  # ("deflate": gzip with skips)
    if encoding is not None and encoding not in ("raw", "deflate", "text", "txt", "ascii", "hex"):
        raise VolinferError(f"{p}: NRRD encoding '{encoding}' is not read (its expansion cannot be bounded before "
                            f"decoding): save it raw or gzip-compressed")
    _check_inflatable(p, nbytes, size)
    sitk = _sitk()
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # (z, y, x)
    except Exception as e:
        raise VolinferError(f"{p}: voxels cannot be read ({str(e).strip().splitlines()[-1][:200]}); truncated or "
                            f"corrupt?") from None
    return ArrayChannel(array.transpose(2, 1, 0)), hdr


def _check_inflatable(p: Path, nbytes: int, size: int) -> None:
    """``size`` compressed bytes must be able to hold the ``nbytes`` of voxels the header declares (deflate expands
    at most :data:`volinfer.io.reader.MAX_DEFLATE_RATIO` times), before anything that large is allocated."""
    if nbytes > size * MAX_DEFLATE_RATIO:
        raise VolinferError(f"{p}: header describes {nbytes} bytes of voxels, more than {size} compressed bytes can "
                            f"hold: the header's size is wrong or the file is truncated")


def open_itk_source(paths: Sequence[str | os.PathLike], depth: int) -> VolumeSource:
    """A :class:`VolumeSource` over one MHA/MHD/NRRD file per channel (same grid), lazily where raw or zlib/gzip
    compressed (``depth``: the planes a compressed file's window holds: the tile's)."""
    readers, first = open_channels(paths, lambda p: _open_one(p, depth), lambda h, f: h.shape != f.shape
                                   or not np.allclose(h.affine, f.affine, atol=1e-4))
    return VolumeSource(readers, first.shape, affine=first.affine, paths=[Path(p) for p in paths])
