"""Volumes moved between grids in bounded memory: reorientation (axis permutations and flips, exact) and
resampling to a voxel size (separable linear or nearest interpolation, streamed plane by plane).

Both work on :class:`volinfer.io.reader.VolumeSource` inputs (``(x, y, z)`` with an affine) and write into the
writers of :mod:`volinfer.io.writer` or an uncompressed NIfTI file, so the grid steps of a run
(:mod:`volinfer.run.model_grid`) are made of the same readers and writers as the run itself.

* **Reorientation** (:class:`AxisMap`): target axis ``m`` is source axis ``perm[m]``, reversed where ``flip[m]``:
  only copies of voxels, no interpolation, so it is exact and its inverse restores every voxel. Target planes are
  produced in order, in blocks: when target z is source z, a block is a few source planes (flipped z reads them
  backwards: a ``.nii.gz`` stream restarts per block); when it is source x or y, a block of at most
  :data:`GRID_SLAB_BYTES` is gathered in one pass over the source's z-slabs (more passes for larger volumes), so
  memory stays one block plus one source slab whatever the volume's size.
* **Resampling** (:func:`resample_into`): target index ``j`` along an axis samples the source at
  ``(j + 0.5) * ratio - 0.5`` (voxel centres aligned, the extent kept: ``n_out = round(n * ratio⁻¹)``), clamped to
  the volume (edge voxels repeat). Linear: the two neighbouring voxels weighted, along z first (two source planes
  per target plane), then y, then x; nearest: the closest voxel (half-way rounds up). Memory: the source planes a
  batch of target planes needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np

from volinfer.errors import VolinferError
from volinfer.io.reader import VolumeSource, scan_slabs

#: Voxels of source planes a grid step reads at once (bounds its memory: ~16 MB of float32 per copy).
SLAB_VOXELS = 1 << 22
#: Bytes of one block of reoriented planes: a permutation that moves z gathers each block in one pass over the
#: source's z-slabs, so a volume larger than this costs ``ceil(size / GRID_SLAB_BYTES)`` passes.
GRID_SLAB_BYTES = 1 << 25
#: Relative difference under which a voxel size counts as equal to the model's (no resampling on that axis).
SPACING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class AxisMap:
    """Target axis ``m`` holds source axis ``perm[m]``, reversed where ``flip[m]``."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def between(cls, affine: np.ndarray, target: str) -> "AxisMap | None":
        """The map that brings a volume with ``affine`` to orientation ``target`` (e.g. ``RAS``); None when it is
        there already. An oblique affine goes to its closest axis-aligned orientation (nibabel's
        ``io_orientation``), as TotalSegmentator and nibabel's ``as_closest_canonical`` do."""
        src = nib.orientations.io_orientation(np.asarray(affine, float))
        dst = nib.orientations.axcodes2ornt(tuple(target))
        perm, flip = [], []
        for world, sign in dst:
            s = int(np.flatnonzero(src[:, 0] == world)[0])
            perm.append(s)
            flip.append(bool(src[s, 1] != sign))
        amap = cls(tuple(perm), tuple(flip))  # type: ignore[arg-type]
        return None if amap.perm == (0, 1, 2) and not any(amap.flip) else amap

    def inverse(self) -> "AxisMap":
        perm = tuple(self.perm.index(s) for s in range(3))
        return AxisMap(perm, tuple(self.flip[m] for m in perm))  # type: ignore[arg-type]

    def shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(shape[s]) for s in self.perm)  # type: ignore[return-value]

    def affine(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The target's affine: the same world position for every voxel (exact)."""
        to_source = np.zeros((4, 4))
        to_source[3, 3] = 1.0
        for m, s in enumerate(self.perm):
            to_source[s, m] = -1.0 if self.flip[m] else 1.0
            to_source[s, 3] = shape[s] - 1.0 if self.flip[m] else 0.0
        return np.asarray(affine, float) @ to_source

    def apply(self, block: np.ndarray) -> np.ndarray:
        """An ``(x, y, z)`` source array in target order (a view)."""
        out = block.transpose(self.perm)
        return out[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]

    def describe(self, affine: np.ndarray, target: str) -> str:
        """The summary's words, e.g. ``reoriented PSL -> RAS: input axes zxy become xyz; flipped xy``."""
        src = "".join(nib.orientations.aff2axcodes(np.asarray(affine, float)))
        moves = "" if self.perm == (0, 1, 2) else f"input axes {''.join('xyz'[s] for s in self.perm)} become xyz"
        flips = "".join("xyz"[m] for m in range(3) if self.flip[m])
        return f"reoriented {src} -> {target}: " + "; ".join(x for x in (moves, flips and f"flipped {flips}") if x)


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Length of each voxel axis in world units (mm)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))  # type: ignore


@dataclass(frozen=True)
class Resampling:
    """From a grid of ``shape`` with voxel sizes ``have`` to voxel sizes ``want`` over the same extent."""

    shape: tuple[int, int, int]
    have: tuple[float, float, float]
    want: tuple[float, float, float]

    @classmethod
    def between(cls, shape: Sequence[int], affine: np.ndarray, want: Sequence[float]) -> "Resampling | None":
        # to float32's 7 digits (a NIfTI header's precision): a voxel of 0.8 mm said in mm (0.800000011920929 in the
        # header) and in micrometres (800 x 0.001) samples the same points
        have = tuple(float(f"{h:.7g}") for h in voxel_sizes(affine))
        want3 = tuple(float(w) for w in (list(want) * 3 if len(want) == 1 else want))
        if all(abs(h - w) <= SPACING_TOLERANCE * w for h, w in zip(have, want3)):
            return None
        return cls(tuple(int(s) for s in shape), have, want3)  # type: ignore[arg-type]

    @property
    def ratio(self) -> tuple[float, ...]:
        """Target voxel size over source voxel size, per axis (1 where equal within the tolerance)."""
        return tuple(1.0 if abs(h - w) <= SPACING_TOLERANCE * w else w / h for h, w in zip(self.have, self.want))

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(max(1, int(round(n / r))) for n, r in zip(self.shape, self.ratio))  # type: ignore

    def affine(self, affine: np.ndarray) -> np.ndarray:
        """The resampled grid's affine (voxel centres as :func:`axis_samples` places them)."""
        r = np.asarray(self.ratio)
        step = np.eye(4)
        step[:3, :3] = np.diag(r)
        step[:3, 3] = 0.5 * r - 0.5
        return np.asarray(affine, float) @ step

    def describe(self) -> str:
        mm = lambda v: "x".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"resampled {mm(self.have)} mm -> {mm(self.want)} mm (linear): {'x'.join(map(str, self.shape))} -> "
                f"{'x'.join(map(str, self.out_shape))} voxels")


def axis_samples(n_out: int, n_in: int, ratio: float, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every target index along one axis: the two source indices and the weight of the second (linear), or the
    nearest index twice with weight 0 (nearest). Source coordinate ``(j + 0.5) * ratio - 0.5``, clamped."""
    c = np.clip((np.arange(n_out) + 0.5) * ratio - 0.5, 0.0, n_in - 1.0)
    if mode == "nearest":
        i = np.minimum(np.floor(c + 0.5), n_in - 1).astype(np.intp)
        return i, i, np.zeros(n_out, np.float32)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (c - i0).astype(np.float32)


def _along(a: np.ndarray, axis: int, samples: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    i0, i1, w = samples
    lo = np.take(a, i0, axis=axis)
    if not w.any():
        return lo
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    hi = np.take(a, i1, axis=axis)
    hi -= lo  # lo + (hi - lo) * w, in place: two arrays of the result's size at any time
    hi *= w
    lo += hi
    return lo


def resample_into(source: VolumeSource, out_shape: Sequence[int], ratio: Sequence[float], mode: str, writer: Any,
                  dtype: np.dtype) -> None:
    """Stream ``source`` (every channel, intensity scaling applied) onto a grid of ``out_shape`` (see module docs)
    into ``writer`` as ``(C, nz, Y, X)`` blocks of ``dtype``, z-batch by z-batch."""
    samples = [axis_samples(o, n, r, mode) for o, n, r in zip(out_shape, source.shape, ratio)]
    depth = slab_depth(source.shape)  # source planes read at once: (batch - 1) * ratio + 2 of them at most
    batch = max(1, min(int((depth - 2) / max(ratio[2], 1e-9)) + 1,  # every channel's block is held, then stacked
                       SLAB_VOXELS // max(1, out_shape[0] * out_shape[1] * len(source.readers))))
    for k0 in range(0, out_shape[2], batch):
        k1 = min(out_shape[2], k0 + batch)
        i0, i1, w = (s[k0:k1] for s in samples[2])
        lo, hi = int(i0.min()), int(i1.max()) + 1
        block = []
        for reader in source.readers:
            planes = _scaled(reader.planes(lo, hi), reader, mode)
            a = _along(planes, 2, (i0 - lo, i1 - lo, w))
            a = _along(_along(a, 1, samples[1]), 0, samples[0])
            block.append(_cast(a, dtype).transpose(2, 1, 0))
        writer.write(np.ascontiguousarray(np.stack(block)), k0, 0)
        planes_final(writer, k1)


def _scaled(planes: np.ndarray, reader: Any, mode: str) -> np.ndarray:
    """Stored voxels with the reader's intensity scaling; float32 (float64 for float64) for linear interpolation."""
    slope, inter = getattr(reader, "slope", 1.0), getattr(reader, "inter", 0.0)
    if mode == "nearest" and (slope, inter) == (1.0, 0.0):
        return planes
    work = planes.astype(np.float64 if planes.dtype == np.float64 else np.float32)
    return work * slope + inter if (slope, inter) != (1.0, 0.0) else work


def _cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and a.dtype.kind == "f":
        info = np.iinfo(dtype)
        return np.clip(np.rint(a), info.min, info.max).astype(dtype)
    return a.astype(dtype, copy=False)


def source_dtype(source: VolumeSource) -> np.dtype:
    """The type that holds ``source``'s voxels with their intensity scaling: stored type, else float32."""
    if any((getattr(r, "slope", 1.0), getattr(r, "inter", 0.0)) != (1.0, 0.0) for r in source.readers):
        return np.dtype(np.float32)
    return np.dtype(source.readers[0].dtype)


def reoriented_blocks(source: VolumeSource, amap: AxisMap, dtype: np.dtype) -> Iterator[tuple[int, np.ndarray]]:
    """``source`` (every channel, scaling applied) in ``amap``'s orientation, as ``(k0, block)`` pairs of
    ``(C, nk, Y', X')`` blocks of ``dtype`` in target plane order (see module docs for the memory this takes)."""
    tshape = amap.shape(source.shape)
    s2, flip = amap.perm[2], amap.flip[2]
    n2 = source.shape[s2]
    plane = tshape[0] * tshape[1] * source.channels * np.dtype(dtype).itemsize
    step = max(1, GRID_SLAB_BYTES // plane)
    if s2 == 2:
        step = min(step, slab_depth(source.shape))  # whole source planes: at most what a stream window holds
    for k0 in range(0, tshape[2], step):
        k1 = min(tshape[2], k0 + step)
        lo, hi = (n2 - k1, n2 - k0) if flip else (k0, k1)
        block = np.empty((source.channels, k1 - k0, tshape[1], tshape[0]), dtype=dtype)
        for c, reader in enumerate(source.readers):  # one channel's source range at a time, copied once
            block[c] = amap.apply(_source_range(reader, source.shape, s2, lo, hi, dtype)).transpose(2, 1, 0)
        yield k0, block


def _source_range(reader: Any, shape: Sequence[int], axis: int, lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
    """Source voxels ``[lo, hi)`` along ``axis`` (whole along the others) as an ``(x, y, z)`` array: whole planes
    for z; for x or y, one pass over the source's z-slabs, keeping that range of each."""
    if axis == 2:
        return _cast(_scaled(reader.planes(lo, hi), reader, "nearest"), dtype)
    out_shape = list(shape)
    out_shape[axis] = hi - lo
    out = np.empty(out_shape, dtype=dtype)
    z0 = 0
    for slab in _slabs(reader, shape):
        part = slab[lo:hi] if axis == 0 else slab[:, lo:hi]
        out[..., z0 : z0 + slab.shape[2]] = _cast(_scaled(part, reader, "nearest"), dtype)
        z0 += slab.shape[2]
    return out


def reorient_into(source: VolumeSource, amap: AxisMap, writer: Any, dtype: np.dtype | None = None) -> None:
    """Write ``source`` in ``amap``'s orientation into ``writer`` (``(C, nk, Y, X)`` blocks in plane order)."""
    dtype = np.dtype(dtype or source_dtype(source))
    for k0, block in reoriented_blocks(source, amap, dtype):
        writer.write(block, k0, 0)
        planes_final(writer, k0 + block.shape[1])


def slab_depth(shape: Sequence[int]) -> int:
    """The most z-planes a grid step reads at once (a few million voxels, and at least the 4 a linear batch
    needs): open sources for grid steps with this depth."""
    return max(4, SLAB_VOXELS // max(1, int(shape[0]) * int(shape[1])))


def _slabs(reader: Any, shape: Sequence[int]) -> Iterator[np.ndarray]:
    """Whole z-slabs of one channel in on-disk order, a few million voxels each."""
    return scan_slabs(reader, tuple(shape), depth=slab_depth(shape), voxels=SLAB_VOXELS)


def planes_final(writer: Any, z: int) -> None:
    """Tell a file writer that every plane below ``z`` is final (it may compress or store them now)."""
    hook = getattr(writer, "planes_final", None)
    if hook is not None:
        hook(z)


def check_regrid_size(shape: Sequence[int], channels: int, dtype: np.dtype, where: str) -> None:
    """Refuse a model grid whose voxel count overflows what a file can hold (a stored spacing far too fine)."""
    if math.prod(shape) * channels * np.dtype(dtype).itemsize > 1 << 46:
        raise VolinferError(f"{where}: resampling to the model's spacing gives {'x'.join(map(str, shape))} voxels; "
                            f"check the model's stored spacing or pass --no-resample")
