"""Zarr volumes in and out (optional extra ``zarr``), and NIfTI ↔ Zarr conversion.

Axes are data, not convention. Every reader hands volinfer a volume in one axis order, NIfTI's ``(x, y, z)`` (see
:mod:`volinfer.io.reader`), and a Zarr array's axes are found by name: the OME-Zarr ``multiscales`` ``axes``, else
the Zarr v3 ``dimension_names``, else xarray's ``_ARRAY_DIMENSIONS``; only an array that names none of them is read
in the documented order of a plain array, OME-Zarr's ``(z, y, x)`` (``(c, z, y, x)`` with channels). Axes named
``x``, ``y``, ``z`` are the space axes in any order; one channel axis (``c``/``channel`` or type ``channel``) gives
the channels; other axes (e.g. ``t``) must have length 1. So ``to-zarr`` then ``run`` feeds the model the same
array as running the NIfTI file, and every store volinfer writes is OME-Zarr (NGFF 0.5, see :mod:`volinfer.io.ome`)
in ``(z, y, x)`` / ``(c, z, y, x)`` order with the input's affine (and its NIfTI header, for ``to-nifti``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.io.reader import Region, VolumeSource
from volinfer.io.ome import (NGFF_MM, Geometry, check_levels, geometry_attrs, level_chunks, level_shapes,
                             multiscales, read_geometry)
from volinfer.io.journal import ResumableError
from volinfer.io.targets import STORE_ATTR, aux_path, check_output, is_volinfer_store, remove_store, store_mark

#: A chunk is decoded whole into memory: more than this per chunk is refused, whatever the store claims.
MAX_CHUNK_BYTES = 1 << 30
#: Arrays declaring more than this many bytes must have at least 1% of their chunks present on disk.
SPARSE_CHECK_BYTES = 1 << 31


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise VolinferError("Zarr volumes need the zarr package: pip install 'volinfer[zarr]'") from None
    return zarr


#: The space axes in the order every reader hands them on (NIfTI's voxel order).
SPACE_AXES = ("x", "y", "z")
#: A plain array's axes when nothing names them (OME-Zarr's order).
PLAIN_AXES = {3: ("z", "y", "x"), 4: ("c", "z", "y", "x")}


#: The largest chunk row (whole planes, a chunk deep, as stored) :meth:`ZarrChannel.planes` decodes once and keeps
#: while a pass reads it: 1024² int16 in 128-deep chunks (256 MiB); wider cross-sections decode per slab of planes.
ROW_CACHE_BYTES = 256 << 20


class ZarrChannel:
    """One channel of a Zarr array whose axes are ``names`` (see module docs): ``region`` takes the ``(x, y, z)``
    ranges every reader takes and returns an ``(x, y, z)`` array, whatever the array's own axis order; reads go
    straight to the chunks they touch."""

    HOLDS = "nothing"  # (see volinfer.io.reader.read_buffer)

    def __init__(self, array: Any, channel: int | None, names: Sequence[str] = ("z", "y", "x"),
                 path: str | Path = "the Zarr store") -> None:
        self.array, self.channel, self.names, self.path = array, channel, tuple(names), path
        self._row: tuple[int, np.ndarray] | None = None  # the chunk row planes() serves (first plane, voxels)
        self.dtype = np.dtype(array.dtype)
        self.slope, self.inter = 1.0, 0.0
        space = [n for n in self.names if n in SPACE_AXES]
        self._to_xyz = tuple(space.index(n) for n in SPACE_AXES)  # transpose of a read into (x, y, z)
        self.shape = tuple(int(array.shape[self.names.index(n)]) for n in SPACE_AXES)
        self.chunks = tuple(int(array.chunks[self.names.index(n)]) for n in SPACE_AXES)

    def region(self, r: Region) -> np.ndarray:
        key: list[Any] = []
        for n in self.names:
            if n in SPACE_AXES:
                a, b = r[SPACE_AXES.index(n)]
                key.append(slice(a, b))
            else:  # the channel axis, or an axis of length 1
                key.append(self.channel if n == "c" else 0)
        try:
            data = np.asarray(self.array[tuple(key)])
        except Exception as e:  # a chunk that does not decode: damaged input, not a bug of this run
            where = ", ".join(f"{n} {a}..{b}" for n, (a, b) in zip(SPACE_AXES, r))
            raise VolinferError(f"{self.path}: a chunk in {where} cannot be read ({type(e).__name__}: "
                                f"{str(e)[:200]}); the store is damaged") from None
        return data.transpose(self._to_xyz)

    def planes(self, z0: int, z1: int) -> np.ndarray:
        """Whole planes ``[z0, z1)``. Read in order a few planes at a time (a pass over the volume), each chunk row
        is decoded once and served from memory (:data:`ROW_CACHE_BYTES`; it was decoded again for every slab of
        planes: 8 times for 128-deep chunks, 92 s of a 1024³ run), dropped with its last planes."""
        x, y, _ = self.shape
        cz = self.chunks[2]
        r0, r1 = z0 // cz * cz, min(self.shape[2], z0 // cz * cz + cz)
        if z1 - z0 >= cz or z1 > r1 or x * y * cz * self.dtype.itemsize > ROW_CACHE_BYTES:
            return self.region(((0, x), (0, y), (z0, z1)))
        if self._row is None or self._row[0] != r0:
            self._row = (r0, self.region(((0, x), (0, y), (r0, r1))))
        out = self._row[1][:, :, z0 - r0: z1 - r0]
        if z1 == r1:
            self._row = None
        return out

    def close(self) -> None:
        self._row = None


def _axis_name(axis: Any) -> str:
    """One axis of OME-Zarr metadata (a dict, or a bare name in NGFF 0.3) or a dimension name, normalised: the
    channel axis is ``c``."""
    name = str(axis.get("name", "") if isinstance(axis, dict) else axis or "").lower()
    kind = axis.get("type") if isinstance(axis, dict) else None
    return "c" if kind == "channel" or name in ("c", "channel", "channels") else name


def array_axes(arr: Any, root_attrs: dict[str, Any] | None, path: Path) -> tuple[str, ...]:
    """The names of ``arr``'s axes (see module docs), checked: ``x``, ``y`` and ``z`` once each, at most one channel
    axis, every other axis of length 1."""
    ms = (root_attrs or {}).get("multiscales") or ((root_attrs or {}).get("ome") or {}).get("multiscales")
    attrs = dict(getattr(arr, "attrs", {}) or {})
    found = (ms[0].get("axes") if ms and isinstance(ms[0], dict) else None) \
        or getattr(getattr(arr, "metadata", None), "dimension_names", None) or attrs.get("_ARRAY_DIMENSIONS")
    if found is None or not any(found):
        if arr.ndim not in PLAIN_AXES:
            raise VolinferError(f"{path}: expected a 3-D (z, y, x) or channels-first 4-D (c, z, y, x) array, got "
                                f"shape {tuple(arr.shape)} with no axis names")
        return PLAIN_AXES[arr.ndim]
    names = tuple(_axis_name(a) for a in found)
    if len(names) != arr.ndim:
        raise VolinferError(f"{path}: metadata names {len(names)} axes {names} for a {arr.ndim}-D array")
    if sorted(n for n in names if n in SPACE_AXES) != sorted(SPACE_AXES) or names.count("c") > 1:
        raise VolinferError(f"{path}: axes {names}: expected x, y and z once each and at most one channel axis")
    extra = [(n, s) for n, s in zip(names, arr.shape) if n not in (*SPACE_AXES, "c") and s != 1]
    if extra:
        raise VolinferError(f"{path}: axis {extra[0][0]!r} has length {extra[0][1]}; volinfer runs one 3-D volume "
                            f"(select one time point or other index first)")
    return names


def open_zarr_array(path: str | Path, mode: str = "r") -> Any:
    """The array of a Zarr store: a bare array, or an OME-Zarr group's full-resolution level; checked when read."""
    return _open_array(path, mode)[0]


def _open_array(path: str | Path, mode: str = "r") -> tuple[Any, dict[str, Any]]:
    """The array (as :func:`open_zarr_array`) and the attributes of the store's root (its OME-Zarr metadata)."""
    zarr = _zarr()
    p = Path(path)
    if mode == "r" and not p.exists():
        raise VolinferError(f"{p}: no such Zarr store")
    try:
        node = zarr.open(str(p), mode=mode)
    except Exception as e:
        raise VolinferError(f"{p}: not a readable Zarr array ({type(e).__name__}: {e})") from None
    attrs = dict(node.attrs)
    if not hasattr(node, "shape"):  # an OME-Zarr group: its first multiscale level is the full-resolution array
        ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not ms:
            raise VolinferError(f"{p}: Zarr group without an array (expected an array or OME-Zarr multiscales)")
        try:
            node = node[ms[0]["datasets"][0]["path"]]
        except Exception as e:
            raise VolinferError(f"{p}: OME-Zarr multiscales name a missing array ({type(e).__name__}: {e})") from None
    if mode == "r":
        validate_array(node, p)
    return node, attrs


def validate_array(arr: Any, path: Path) -> None:
    """Check what the metadata declares against what is sane and present, before allocating anything for it:
    positive dimensions, chunks small enough to decode, and, for arrays declaring many GB, chunk files actually
    on disk (at least 1% of those declared). A hostile or truncated store then fails in milliseconds."""
    shape, chunks = tuple(int(s) for s in arr.shape), tuple(int(c) for c in arr.chunks)
    item = np.dtype(arr.dtype).itemsize
    if not shape or min(shape) < 1 or min(chunks) < 1:
        raise VolinferError(f"{path}: Zarr array has an empty shape {shape} or chunks {chunks}")
    if math.prod(chunks) * item > MAX_CHUNK_BYTES:
        raise VolinferError(f"{path}: Zarr chunks {chunks} are {math.prod(chunks) * item / 2**30:.1f} GiB each, more "
                            f"than the {MAX_CHUNK_BYTES >> 30} GiB volinfer decodes; rechunk the array")
    if math.prod(shape) * item <= SPARSE_CHECK_BYTES:
        return
    declared = math.prod(-(-s // c) for s, c in zip(shape, chunks))
    need = max(1, declared // 100)
    found = _count_files(_array_dir(arr, path), need)
    if found < need:
        raise VolinferError(f"{path}: Zarr metadata declares shape {shape} ({math.prod(shape) * item / 2**30:.0f} GiB, "
                            f"{declared} chunks) but only {found} chunk file(s) exist; refusing a truncated or bogus "
                            f"store")


def _array_dir(arr: Any, path: Path) -> Path:
    sub = str(getattr(arr, "path", "") or "")
    root = Path(path)
    return root / sub if sub and not root.name == sub and (root / sub).is_dir() else root


def _count_files(root: Path, stop: int) -> int:
    """Chunk files under ``root`` (metadata excluded), counting no further than ``stop``."""
    n = 0
    for _, _, files in os.walk(root):
        n += sum(1 for f in files if f not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"))
        if n >= stop:
            break
    return n


def open_zarr_source(path: str | Path) -> tuple[VolumeSource, Any]:
    """A :class:`VolumeSource` over a Zarr array, in ``(x, y, z)`` order whatever the array's own (see module docs),
    with the store's affine; plus the array."""
    arr, root_attrs = _open_array(path)
    names = array_axes(arr, root_attrs, Path(path))
    if "c" in names:
        readers = [ZarrChannel(arr, c, names, path) for c in range(arr.shape[names.index("c")])]
    else:
        readers = [ZarrChannel(arr, None, names, path)]
    geom = store_geometry(path)
    source = VolumeSource(readers, readers[0].shape, affine=geom.affine, paths=[Path(path)])
    source.orientation_known, source.spacing_known = geom.oriented, geom.sized
    source.mm_per_unit = 1.0 if geom.unit is None else NGFF_MM.get(geom.unit)
    source.geometry = geom  # what an output of this store keeps (unit, a NIfTI-born store's header)
    return source, arr


def check_zarr_output(path: str | Path, inputs: Sequence[str | Path], overwrite: bool, resume: bool) -> None:
    """The shared output check (:func:`volinfer.io.targets.check_output`). ``resume`` changes nothing here: an
    interrupted run's store lies hidden beside the output (:func:`partial_store`), so a store under the output's
    name is a finished one, replaced only with ``--overwrite`` as for NIfTI files (a caller that adopts an
    unfinished store of the old layout, :func:`unfinished_legacy`, passes ``overwrite`` for it)."""
    check_output(Path(path), [Path(i) for i in inputs], overwrite, "zarr")


def unfinished_legacy(output: str | Path, journal: Path, other: tuple[Path, str]) -> bool:
    """Whether ``output`` is a store volinfer left unfinished under the output's own name before it wrote stores
    hidden (:func:`partial_store`), for this route to continue: a store volinfer wrote (a directory, not a link), no
    partial store beside it, and this route's progress ``journal`` beside it (a finished run in this process
    removed it; blocks leave theirs, and say by their markers what is finished). The journal of the other route
    there instead (``other``: its path, and what wrote the store and how to continue it) is refused in one line:
    this route cannot continue it. Only ``--resume`` asks; the journal then says whether it is this run (:func:`adopt_legacy`)."""
    out = Path(output)
    if os.path.lexists(partial_store(out)) or not is_volinfer_store(out):
        return False
    if journal.exists():
        return True
    if other[0].exists():
        raise VolinferError(f"{out}: an earlier volinfer {other[1]}, or pass --overwrite without --resume to start "
                            f"over")
    return False


def adopt_legacy(output: str | Path) -> Path:
    """Move an unfinished store of the old layout (:func:`unfinished_legacy`) to the partial store's name, where
    ``--resume`` continues it and from where it is published once complete; durably (a crash after this leaves the
    ordinary interrupted layout). Call once its journal says it is this run's."""
    store = partial_store(output)
    os.replace(output, store)
    portable.fsync_dir(store.parent if str(store.parent) else Path("."))
    return store


def partial_store(output: str | Path) -> Path:
    """Where a run writes a Zarr output until it is complete: ``.<name>.zarr.partial.zarr`` beside it (hidden, as
    NIfTI and TIFF outputs' ``.partial`` files), so that nothing under the output's name looks finished before it
    is; :func:`publish_store` moves it there. An interrupted run keeps it for ``--resume``."""
    return aux_path(Path(output), ".partial.zarr")


def publish_store(partial: Path, output: Path, overwrite: bool, resumable: bool = True) -> Path:
    """Move the complete store ``partial`` onto ``output`` by renaming it; a store already there (allowed by
    ``overwrite``, checked before the run: one volinfer wrote) is moved aside first and removed only once the new
    one is in place. A rename that fails is a :class:`volinfer.io.journal.ResumableError` that keeps the finished
    store hidden (``--resume`` only redoes this step), or a plain one-line error where nothing resumes
    (``resumable`` False)."""
    output = Path(output)
    old, there = aux_path(output, ".old.zarr"), os.path.lexists(output)
    if there and not overwrite:
        raise VolinferError(f"{output}: already exists (pass --overwrite to replace it)")
    try:
        if there:
            if os.path.lexists(old):
                remove_store(old)
            os.replace(output, old)
        try:
            os.replace(partial, output)
        except OSError:
            if there:
                os.replace(old, output)
            raise
    except OSError as e:
        what = f"cannot move the finished store {partial} onto {output}: {e.strerror or e}"
        if not resumable:
            raise VolinferError(what) from None
        raise ResumableError(f"{what}; fix that and run the same command with --resume to finish") from None
    portable.fsync_dir(output.parent if str(output.parent) else Path("."))
    discard_partial(old)  # the store replaced, or the one a crash between the two renames left aside
    return output


def discard_partial(partial: Path) -> None:
    """Remove a hidden partial store this run wrote (a failure no ``--resume`` can continue); never raises."""
    try:
        if os.path.lexists(partial):
            remove_store(partial)
    except (OSError, VolinferError):
        pass


@dataclass(frozen=True)
class StoreSpec:
    """How an output store is laid out and described: level 0's ``chunks`` ``(z, y, x)``; ``levels`` downsampled
    levels made by ``method`` (their chunks aligned with the ``block`` extent that writes them, see
    :func:`volinfer.io.ome.level_chunks`); the compressor (None: uncompressed); the volume's ``geometry``; and
    ``attrs`` recorded beside volinfer's mark."""

    chunks: tuple[int, int, int]
    levels: int = 0
    method: str = "nearest"
    block: Sequence[int] | None = None
    compressor: str | None = "zstd"
    geometry: Geometry | None = None
    attrs: dict[str, Any] | None = None


def create_output(path: str | Path, shape: Sequence[int], channels: int, dtype: np.dtype, spec: StoreSpec, *,
                  overwrite: bool = False, resume: bool = False) -> list[Any]:
    """The output: an OME-Zarr group (see :mod:`volinfer.io.ome`) holding level ``0`` of shape ``(z, y, x)`` or
    ``(c, z, y, x)`` laid out as ``spec`` says; returns the level arrays. Existing stores are reused on resume
    (same shape, type and levels). Call :func:`check_zarr_output` first (and hold the output's lock): only a store
    volinfer wrote is replaced."""
    levels = spec.levels
    zarr = _zarr()
    p = Path(path)
    check_levels(shape, levels)
    shapes = level_shapes(shape, levels)
    lead = () if channels == 1 else (channels,)
    if os.path.lexists(p):
        if resume:
            return _reopen_output(p, [(*lead, *s) for s in shapes], dtype)
        if not overwrite:
            raise VolinferError(f"{p}: already exists (pass --overwrite to replace it)")
        remove_store(p)  # refuses anything volinfer did not write
    kwargs: dict[str, Any] = {}
    if spec.compressor is None:
        kwargs["compressors"] = None
    group = zarr.open_group(str(p), mode="w-", attributes={STORE_ATTR: store_mark()})
    names = (["c"] if channels > 1 else []) + ["z", "y", "x"]
    arrays = []
    for lev, (s, c) in enumerate(zip(shapes, level_chunks(spec.chunks, spec.block, levels))):
        c = tuple(min(a, b) for a, b in zip(c, s)) if lev else tuple(c)
        arrays.append(group.create_array(str(lev), shape=(*lead, *s), chunks=(*lead, *c), dtype=dtype,
                                         fill_value=0, dimension_names=names, **kwargs))
    geom = spec.geometry or Geometry(np.eye(4))
    group.attrs.update({"ome": multiscales(geom, channels, levels, spec.method),
                        STORE_ATTR: {**store_mark(), **geometry_attrs(geom), **(spec.attrs or {})}})
    return arrays


def _reopen_output(p: Path, shapes: list[tuple[int, ...]], dtype: np.dtype) -> list[Any]:
    zarr = _zarr()
    if not is_volinfer_store(p):
        raise VolinferError(f"{p}: not a store volinfer wrote; cannot resume into it")
    try:
        group = zarr.open_group(str(p), mode="r+")
        arrays = [group[str(lev)] for lev in range(len(shapes))]
    except Exception:
        raise VolinferError(f"{p}: existing output has other levels; cannot resume into it") from None
    if len(list(group.array_keys())) != len(shapes) or any(
            tuple(a.shape) != s or np.dtype(a.dtype) != np.dtype(dtype) for a, s in zip(arrays, shapes)):
        raise VolinferError(f"{p}: existing output has another shape, type or pyramid; cannot resume into it")
    return arrays


def store_geometry(path: str | Path) -> Geometry:
    """The geometry recorded in a Zarr store (see :func:`volinfer.io.ome.read_geometry`), group or bare array."""
    zarr = _zarr()
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:
        raise VolinferError(f"{path}: not a readable Zarr store ({type(e).__name__}: {e})") from None
    root_attrs = dict(root.attrs)
    array_attrs: dict[str, Any] = {}
    if not hasattr(root, "shape"):
        ms = root_attrs.get("multiscales") or root_attrs.get("ome", {}).get("multiscales")
        try:
            array_attrs = dict(root[ms[0]["datasets"][0]["path"]].attrs) if ms else {}
        except Exception:
            array_attrs = {}
    geom = read_geometry(root_attrs, array_attrs)
    linear = np.asarray(geom.affine, float)[:3, :3]
    if not np.all(np.isfinite(geom.affine)) or abs(np.linalg.det(linear)) < 1e-12:
        sizes = "x".join(f"{v:g}" for v in np.linalg.norm(linear, axis=0))
        raise VolinferError(f"{path}: its recorded voxel size {sizes} is not usable (every scale must be finite and "
                            f"non-zero)")
    return geom


def sync_region(arr: Any, box: Sequence[tuple[int, int]]) -> None:
    """fsync the chunk files of ``arr`` that hold the spatial ``box`` (last three axes; local stores only; a no-op
    where the key encoding or the store's directory is unknown). Data first, then whatever claims it is done."""
    from itertools import product

    try:
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        root = Path(str(arr.store.root)) / str(arr.path or "")
    except AttributeError:
        return
    chunks = arr.chunks[-3:]
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, chunks)]
    lead = (0,) * (arr.ndim - 3)
    for idx in product(*ranges):
        portable.fsync_path(root / encode((*lead, *idx)))  # False: a chunk equal to the fill value is not stored


def done_marker_dir(path: str | Path) -> Path:
    """Per-block completion markers: a block is complete when its chunks were written *and* its marker exists.
    Beside the store, not in it (``.<name>.zarr.done``): a Zarr reader warns about any object in a store that is not
    part of its hierarchy."""
    return aux_path(Path(path), ".done")


def store_write_error(target: Path, e: OSError) -> ResumableError:
    """A failed write into an output store (a full disk, a quota, a vanished mount): one line, and resumable."""
    return ResumableError(f"cannot write {target}: {e.strerror or e}; the store written so far is kept: free space "
                          f"and run the same command with --resume to continue")
