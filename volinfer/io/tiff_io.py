"""Multi-page TIFF / OME-TIFF z-stacks in and out (optional extra ``tiff``: tifffile).

A stack is one image per page: pages = z, rows = y, columns = x, handed on as every reader does, in ``(x, y, z)``
order (see :mod:`volinfer.io.reader`). Reading is lazy:

* an uncompressed stack stored contiguously (what tifffile, ImageJ and most acquisition software write) has NIfTI's
  memory layout, x fastest: it is read by the same positioned strip reader as ``.nii`` files
  (:class:`volinfer.io.reader.StripChannel`), not a memory map, so file pages never count towards the process's
  resident memory;
* any other stack (compressed, tiled, scattered strips) is decoded page by page into a window of ``depth`` pages.

Geometry: OME-TIFF ``PhysicalSizeX/Y/Z`` (with their units) give the voxel size, converted to millimetres (NIfTI's
unit) on the affine's diagonal; without them, 1 per voxel. Safety: a stack must be one series of single-channel grey
pages; RGB pages and several channels are refused (one stack per channel), and so are files whose pages tifffile
cannot all find or whose page data lie past the file's end (truncated), before anything of their size is allocated.

Outputs (``-o seg.tif``): an uncompressed contiguous stack ``(z, y, x)`` (``(c, z, y, x)`` with channels, pages in
that order), created by tifffile and filled with positioned writes through a temporary file, like NIfTI outputs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import unicodedata
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.reader import (Region, open_channels, StoredLayout, StripChannel, VolumeSource, check_declared_size,
                                check_voxel_type, native)
from volinfer.io.targets import aux_path
from volinfer.io.writer import NiftiWriter
from volinfer import portable

#: The most a TIFF codec expands its bytes (deflate ~1032:1, LZW with 12-bit codes ~2730:1): a compressed stack that
#: declares more pixels than its bytes can hold is refused before its page window is allocated.
MAX_CODEC_RATIO = 4096
#: OME length units → millimetres.
_TO_MM = {"pm": 1e-9, "Å": 1e-7, "nm": 1e-6, "µm": 1e-3, "μm": 1e-3, "um": 1e-3, "micron": 1e-3, "mm": 1.0,
          "cm": 10.0, "dm": 100.0, "m": 1e3, "in": 25.4, "ft": 304.8}


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError:
        raise VolinferError("TIFF volumes need the tifffile package: pip install 'volinfer[tiff]'") from None
    return tifffile


class _LogErrors(logging.Handler):
    """Collects the errors tifffile logs instead of raising (a broken page chain, a stack that failed to reshape)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class PageChannel:
    """Pages decoded one at a time into a window of ``depth`` whole planes (compressed or scattered stacks)."""

    HOLDS = "planes"  # (see volinfer.io.reader.read_buffer)

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype, depth: int) -> None:
        self.path, self.shape = path, shape
        self.dtype, self.slope, self.inter = native(dtype), 1.0, 0.0
        self._tf = _tifffile().TiffFile(str(path))
        x, y, _ = shape
        self._buf = np.empty((max(1, depth), y, x), dtype=self.dtype)
        self._w0 = self._w1 = 0  # the window holds planes [w0, w1)

    def _fill(self, z0: int, z1: int) -> None:
        """The window moved to planes [z0, z1): planes both windows share move within the buffer (never copied
        aside: the window is all it holds), the others are decoded."""
        old, w0 = self._buf, self._w0
        if z1 - z0 > old.shape[0]:
            self._buf = np.empty((z1 - z0, *old.shape[1:]), dtype=self.dtype)
        keep = range(max(z0, w0), min(z1, self._w1))
        self._w0 = self._w1 = 0  # (holding nothing until every plane is in)
        for z in keep if z0 >= w0 else reversed(keep):  # in the order that moves no plane before it is read
            self._buf[z - z0] = old[z - w0]
        for z in range(z0, z1):
            if z not in keep:
                self._buf[z - z0] = self._page(z)
        self._w0, self._w1 = z0, z1

    def _page(self, z: int) -> np.ndarray:
        try:
            page = self._tf.asarray(key=z, series=0)
        except Exception as e:  # corrupt compressed data, a page cut short
            raise VolinferError(f"{self.path}: page {z} cannot be decoded ({type(e).__name__}: {e})") from None
        if page.shape != self._buf.shape[1:]:
            raise VolinferError(f"{self.path}: page {z} is {page.shape}, not {self._buf.shape[1:]} like the first")
        return page

    def region(self, r: Region) -> np.ndarray:
        (x0, x1), (y0, y1), (z0, z1) = r
        if not (self._w0 <= z0 and z1 <= self._w1):
            self._fill(z0, z1)
        return self._buf[z0 - self._w0 : z1 - self._w0].transpose(2, 1, 0)[x0:x1, y0:y1]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.region(((0, self.shape[0]), (0, self.shape[1]), (z0, z1)))

    def close(self) -> None:
        self._tf.close()


def _stack_shape(series: Any, path: Path) -> tuple[int, int, int]:
    """``(x, y, z)`` of a series of grey pages; one-line refusals for colour, channels and other dimensions."""
    axes, shape = str(series.axes), tuple(int(s) for s in series.shape)
    if "S" in axes:
        raise VolinferError(f"{path}: RGB/multi-sample pages ({dict(zip(axes, shape))['S']} samples per pixel) are "
                            f"not supported: save one grey stack per channel and give those files")
    extra = {a: n for a, n in zip(axes[:-2], shape[:-2]) if n > 1}
    if any(a in "C" for a in extra):
        raise VolinferError(f"{path}: the TIFF holds {extra['C']} channels: save one single-channel stack per "
                            f"channel and give those files (one per model input channel)")
    if len(extra) > 1 or axes[-2:] != "YX" or any(a not in "ZQI" for a in extra):
        raise VolinferError(f"{path}: TIFF series with axes {axes} {shape}: expected one z-stack of grey pages "
                            f"(not a time series or several stacks)")
    return shape[-1], shape[-2], next(iter(extra.values()), 1)


def _flat_image(series: Any) -> bool:
    """Whether a series is a 2-D image: one page, and no z (or page-sequence) axis declared, not even of length 1
    (OME-TIFF and ImageJ files declare one; a shaped stack saved with axes ZYX too)."""
    declared = str(series.get_axes(False)) if hasattr(series, "get_axes") else str(series.axes)
    return len(series.shape) == 2 and not any(a in "ZQI" for a in declared)


def _check_pages(tf: Any, path: Path, z: int, size: int) -> None:
    """Every page the stack needs is there and its data lie inside the file (a truncated file fails here)."""
    if len(tf.pages) < z:
        raise VolinferError(f"{path}: {len(tf.pages)} page(s) found, the stack needs {z} (truncated?)")
    for n in range(z):
        page = tf.pages[n]
        ends = [int(o) + int(b) for o, b in zip(page.dataoffsets, page.databytecounts)]
        if not ends or max(ends) > size or 0 in page.databytecounts:
            raise VolinferError(f"{path}: page {n}'s data lie past the end of the file ({size} bytes; truncated?)")


def _voxel_mm(tf: Any) -> tuple[float, float, float] | None:
    """The voxel size in millimetres: OME ``PhysicalSizeX/Y/Z``, else ImageJ's (:func:`_imagej_mm`); None when the
    file records none, or not along every axis in a length unit volinfer knows (X and Y without Z, as some exports
    write): a size made up for one axis would resample it as if it were known."""
    if not getattr(tf, "is_ome", False):
        return _imagej_mm(tf)
    try:
        pixels = next(el for el in ET.fromstring(tf.ome_metadata).iter() if el.tag.endswith("Pixels"))
    except Exception:
        return None
    out = []
    for ax in "XYZ":
        try:
            size = float(pixels.get(f"PhysicalSize{ax}", "nan"))
        except ValueError:
            size = math.nan
        unit = unicodedata.normalize("NFKC", pixels.get(f"PhysicalSize{ax}Unit", "µm"))  # µ, μ; Å, Å: one each
        mm = size * _TO_MM.get(unit, math.nan)
        if not (math.isfinite(mm) and mm > 0):
            return None
        out.append(mm)
    return out[0], out[1], out[2]


def _imagej_mm(tf: Any) -> tuple[float, float, float] | None:
    """An ImageJ stack's voxel size in millimetres (what Fiji and ``tifffile.imwrite(imagej=True)`` write): x and y
    from the first page's ``XResolution``/``YResolution`` (pixels per unit), z from the metadata's ``spacing``, all in
    its ``unit``; None when the stack is no ImageJ file or says no length unit (ImageJ's default "pixel")."""
    meta = getattr(tf, "imagej_metadata", None) if getattr(tf, "is_imagej", False) else None
    unit = _TO_MM.get(str((meta or {}).get("unit", "")).replace("\\u00B5", "µ").replace("micron", "µm"))
    if unit is None:
        return None
    page = tf.pages[0]

    def size(tag: str) -> float:
        try:
            num, den = page.tags[tag].value
            return den / num * unit if num > 0 and den > 0 else unit
        except Exception:
            return unit

    try:
        z = float(meta.get("spacing", 1.0))  # type: ignore[union-attr]
    except (TypeError, ValueError):
        z = 1.0
    return size("XResolution"), size("YResolution"), (z if math.isfinite(z) and z > 0 else 1.0) * unit


def _open_one(p: Path, depth: int) -> tuple[Any, tuple[int, int, int], tuple[float, float, float] | None]:
    """One single-channel stack: its reader, ``(x, y, z)`` shape and voxel size in mm (None: not recorded), all
    checked before allocation."""
    tifffile = _tifffile()
    if not p.is_file() or p.stat().st_size == 0:
        raise VolinferError(f"{p}: no such file" if not p.exists() else f"{p}: not a TIFF file (empty or a directory)")
    errors = _LogErrors()
    logger = logging.getLogger("tifffile")
    logger.addHandler(errors)
    try:
        with tifffile.TiffFile(str(p)) as tf:
            series = tf.series[0]
            shape, flat = _stack_shape(series, p), _flat_image(series)
            stored = np.dtype(series.dtype).newbyteorder(tf.byteorder)
            check_voxel_type(stored, str(p))
            offset, voxel = series.dataoffset, _voxel_mm(tf)
            if offset is None:  # contiguous stacks (ImageJ's > 4 GB ones list one page) are checked by size below
                _check_pages(tf, p, shape[2], p.stat().st_size)
    except VolinferError:
        raise
    except Exception as e:
        raise VolinferError(f"{p}: not a readable TIFF stack ({type(e).__name__}: {e})") from None
    finally:
        logger.removeHandler(errors)
    if errors.messages:
        raise VolinferError(f"{p}: damaged TIFF ({errors.messages[0][:200]}); truncated or corrupt?")
    if flat:  # refused as 2-D NIfTI, MHA/NRRD and Zarr images are
        raise VolinferError(f"{p}: expected a 3-D image, got one 2-D page of {shape[0]}x{shape[1]} (a one-slice "
                            f"stack says so: OME-TIFF or ImageJ metadata with a z axis of 1)")
    if offset is None:
        declared, size = math.prod(shape) * stored.itemsize, p.stat().st_size
        if declared > size * MAX_CODEC_RATIO:
            raise VolinferError(f"{p}: pages declare {declared} bytes of pixels, more than {size} compressed bytes "
                                f"can hold: the file is corrupt or truncated")
        return PageChannel(p, shape, stored, depth), shape, voxel
    check_declared_size(p, int(offset) + math.prod(shape) * stored.itemsize, compressed=False)
    layout = StoredLayout(p, shape, native(stored), int(offset), 1.0, 0.0, swap=native(stored) != stored)
    return StripChannel(layout), shape, voxel


def _grid_of(opened: tuple[Any, tuple[int, int, int], Any]) -> tuple[Any, tuple[Any, Any]]:
    reader, shape, voxel = opened
    return reader, (shape, voxel)


def open_tiff_source(paths: Sequence[str | os.PathLike], depth: int) -> VolumeSource:
    """A :class:`VolumeSource` over one TIFF stack per channel (same shape and voxel size), lazily. A stack has no
    anatomical orientation, and without OME sizes no voxel size either: the source says so
    (``orientation_known``, ``spacing_known``), and its affine is the diagonal of the voxel size (or 1)."""
    readers, first = open_channels(paths, lambda p: _grid_of(_open_one(p, depth)), lambda g, f: g != f)
    source = VolumeSource(readers, first[0], affine=np.diag([*(first[1] or (1.0, 1.0, 1.0)), 1.0]),
                          paths=[Path(p) for p in paths])
    source.orientation_known, source.spacing_known = False, first[1] is not None
    return source


class TiffWriter(NiftiWriter):
    """A TIFF stack output: an uncompressed contiguous ``(z, y, x)`` / ``(c, z, y, x)`` stack whose pixel data have
    the NIfTI writer's layout, so blocks are written by the same positioned writes into a temporary file that is
    renamed onto the target at the end (see module docs). ``resume`` continues an interrupted temporary file."""

    def __init__(self, target: str | os.PathLike, shape: tuple[int, int, int], channels: int, dtype: np.dtype,
                 voxel_mm: Sequence[float] | None = None, resume: bool = False) -> None:
        self.target = Path(target)
        self.shape, self.channels, self.dtype = shape, channels, np.dtype(dtype)
        self.compress, self.compresslevel = False, 1
        self.tmp = aux_path(self.target, ".partial.tif")
        self._gz_tmp = aux_path(self.target, ".partial.tif.gz")  # never made: TIFF outputs are not compressed
        self._part_tmps, self._gz, self._fd, self._hi = [], None, -1, 0
        X, Y, Z = shape
        full = (Z, Y, X) if channels == 1 else (channels, Z, Y, X)
        if resume and not self.tmp.exists():
            raise VolinferError(f"{self.tmp}: no interrupted output to resume (run without --resume)")
        try:
            self.offset = self._existing(full) if resume else self._create(full, voxel_mm)
            self._fd = portable.open_fd(self.tmp, os.O_WRONLY)
        except OSError as e:
            self.abort()
            raise VolinferError(f"cannot create {self.target}: {e.strerror or e}") from None

    def _create(self, full: tuple[int, ...], voxel_mm: Sequence[float] | None) -> int:
        """Make the temporary stack (tifffile writes the header and page directories) and return its data offset.
        ``voxel_mm`` None: no physical size is claimed (the input recorded none)."""
        tifffile = _tifffile()
        self._check_space(math.prod(full) * self.dtype.itemsize + 65536, 0)  # the stack, uncompressed
        axes = "ZYX" if len(full) == 3 else "CZYX"
        meta: dict[str, Any] = {"axes": axes}
        if voxel_mm is not None:
            meta.update(PhysicalSizeX=voxel_mm[0] * 1e3, PhysicalSizeY=voxel_mm[1] * 1e3,
                        PhysicalSizeZ=voxel_mm[2] * 1e3)
        # the OME UUID from what the file holds, not a random one: a resumed run writes the same bytes
        digest = hashlib.blake2b(repr((full, self.dtype.str, meta)).encode(), digest_size=16).digest()
        meta["UUID"] = str(uuid.UUID(bytes=digest))
        mm = tifffile.memmap(str(self.tmp), shape=full, dtype=self.dtype, photometric="minisblack", ome=True,
                             metadata=meta)
        offset = int(mm.offset)
        del mm  # nothing written through the map: data go in by positioned writes
        return offset

    def _existing(self, full: tuple[int, ...]) -> int:
        """The data offset of an interrupted temporary stack of the same shape and type."""
        tifffile = _tifffile()
        with tifffile.TiffFile(str(self.tmp)) as tf:
            s = tf.series[0]
            if tuple(s.shape) != full or np.dtype(s.dtype) != self.dtype or s.dataoffset is None:
                raise VolinferError(f"{self.tmp}: interrupted output has another shape or type; run without --resume")
            return int(s.dataoffset)
