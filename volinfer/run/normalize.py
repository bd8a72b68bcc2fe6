"""Intensity normalisation applied to every tile, with statistics of the *whole* volume.

Per-tile statistics would make every tile see a different intensity scale (and break exact stitching), so statistics
that need the volume (z-score without stored mean/std, min-max, percentiles) are gathered first in one streaming pass
over z-slabs, never holding the volume.

Settings (``normalization`` in the model's stored settings, or ``--normalize``)::

    {"kind": "none"}
    {"kind": "zscore"}                              # mean/std of the volume (per channel)
    {"kind": "zscore", "mean": [..], "std": [..]}   # fixed, e.g. from the training set
    {"kind": "minmax"}  /  {"kind": "minmax", "min": [..], "max": [..]}   # to [0, 1]
    {"kind": "percentile", "lower": 0.5, "upper": 99.5}   # clip to the volume's percentiles, then z-score
    {"kind": "scale", "scale": a, "shift": b}       # x * a + b
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from volinfer import validate
from volinfer.tiling.blockwise import cast_copy
from volinfer.errors import VolinferError
from volinfer.io.reader import F32_MAX, VolumeSource, exceeds_float32
from volinfer.options import NORMALIZATIONS
from volinfer.run.prepass import PrePass





def percentile_step(shape: tuple[int, int, int]) -> int:
    """Percentiles are taken on every ``step``-th voxel along each axis: a sample of at most ~4M voxels (the whole
    volume up to ~13M voxels). Shared with the planner, which counts the sample's memory."""
    x, y, z = shape
    return max(1, round((x * y * z / 4e6) ** (1 / 3)))


def _lattice_sample(stored: np.ndarray, z0: int, step: int, slope: float, inter: float,
                    dtype: type) -> np.ndarray:
    """The finite real-world values of the slab starting at plane ``z0`` on the lattice of every ``step``-th voxel
    along x, y and z, continued across slabs. A lattice over all three axes represents every part of the volume; a
    stride in memory order would take the same few planes of each slab (thin structures along z unseen)."""
    picked = stored[::step, ::step, (-z0) % step :: step].astype(np.float64) * slope + inter
    picked = picked[np.isfinite(picked)] if not np.isfinite(picked).all() else picked.ravel()
    if dtype is np.float64 and (not picked.size or float(np.abs(picked).max()) <= F32_MAX):
        dtype = np.float32  # wide voxels whose values fit float32: the sample a float32 file of them gives
    return picked.astype(dtype)


def fits_float32(stored: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bool:
    """Whether these stored voxels, scaled by the file's slope/intercept, all lie within float32's range (NaN
    counts as not: the wide path handles it)."""
    if not stored.size:
        return True
    top = float(np.abs(stored).max())
    return top * abs(slope) + abs(inter) <= F32_MAX


class Normalizer:
    """Per-channel affine map ``x * a + b`` (plus optional clipping) fitted once for the whole volume."""

    def __init__(self, spec: dict[str, Any] | None, channels: int) -> None:
        self.spec = dict(spec or {"kind": "none"})
        self.kind = self.spec.get("kind", "none")
        if self.kind not in NORMALIZATIONS:
            raise VolinferError(f"unknown normalization {self.kind!r}; expected one of {', '.join(NORMALIZATIONS)}")
        validate.normalization(self.spec)
        self.channels = channels
        self.a = np.ones(channels, dtype=np.float64)
        self.b = np.zeros(channels, dtype=np.float64)
        self.clip: list[tuple[float, float] | None] = [None] * channels
        self.fitted = self.kind in ("none", "scale") or (
            self.kind == "zscore" and "mean" in self.spec and "std" in self.spec
        ) or (self.kind == "minmax" and "min" in self.spec and "max" in self.spec)
        if self.fitted:
            self._from_params()

    def _per_channel(self, key: str) -> np.ndarray:
        v = np.atleast_1d(np.asarray(self.spec[key], dtype=np.float64))
        if v.size == 1:
            v = np.repeat(v, self.channels)
        if v.size != self.channels:
            raise VolinferError(f"normalization {key} has {v.size} values for {self.channels} channels")
        return v

    def _from_params(self) -> None:
        if self.kind == "scale":
            self.a[:] = float(self.spec["scale"])
            self.b[:] = float(self.spec["shift"])
        elif self.kind == "zscore":
            self._set_zscore(self._per_channel("mean"), self._per_channel("std"))
        elif self.kind == "minmax":
            lo, hi = self._per_channel("min"), self._per_channel("max")
            span = np.where(hi > lo, hi - lo, 1.0)
            self.a, self.b = 1.0 / span, -lo / span

    def _set_zscore(self, mean: np.ndarray, std: np.ndarray) -> None:
        std = np.where(std > 0, std, 1.0)
        self.a, self.b = 1.0 / std, -mean / std

    def fit(self, source: VolumeSource, slab: int) -> None:
        """Gather the volume statistics this normalisation needs in a streaming pass of z-slabs of ``slab`` planes
        (on its own; a run feeds :meth:`statistics` from its one pre-pass instead, see :mod:`volinfer.run.prepass`)."""
        pre = PrePass(source, slab)
        pre.add(self.statistics(source))
        pre.run()

    def statistics(self, source: VolumeSource) -> "_Statistics | None":
        """A pre-pass consumer that fits this normalisation on ``source`` when the pass finishes; None when the
        normalisation needs no statistics (none, scale, fixed parameters)."""
        return None if self.fitted else _Statistics(self, source)

    def _set(self, c: int, n: int, s1: float, s2: float, lo: float, hi: float, samples: list[np.ndarray]) -> None:
        """The affine map of channel ``c`` from its streamed sums (and percentile sample)."""
        if not n:  # every voxel NaN/Inf: nothing to measure (replaced voxels get the fill value)
            return
        mean = s1 / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        if self.kind != "none" and not (math.isfinite(mean) and math.isfinite(std)):
            raise VolinferError(
                f"channel {c}: values up to {max(abs(lo), abs(hi)):g} are too large for {self.kind} statistics; "
                f"rescale the volume or pass --normalize scale:A:B with a small A")
        if self.kind == "zscore":
            self.a[c], self.b[c] = 1.0 / (std or 1.0), -mean / (std or 1.0)
        elif self.kind == "minmax":
            span = (hi - lo) or 1.0
            self.a[c], self.b[c] = 1.0 / span, -lo / span
        elif self.kind == "percentile":
            sample = np.concatenate(samples)
            plo, phi = np.percentile(sample, [self.spec.get("lower", 0.5), self.spec.get("upper", 99.5)])
            clipped = np.clip(sample, plo, phi)
            m, s = float(clipped.mean()), float(clipped.std()) or 1.0
            self.clip[c] = (float(plo), float(phi))
            self.a[c], self.b[c] = 1.0 / s, -m / s

    def describe(self) -> dict[str, Any]:
        """The fitted parameters, for the run report."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind != "none":
            out["scale"] = [round(float(v), 6) for v in self.a]
            out["shift"] = [round(float(v), 6) for v in self.b]
        if any(self.clip):
            out["clip"] = self.clip
        return out

    def normalized(self, value: float, channel: int) -> float:
        """Where a raw intensity ends up after normalisation (for filling replaced voxels)."""
        clip = self.clip[channel]
        v = min(max(value, clip[0]), clip[1]) if clip else value
        return float(v * self.a[channel] + self.b[channel])

    def to_float(self, stored: np.ndarray, channel: int, slope: float, inter: float, out: np.ndarray) -> None:
        """Write ``normalise(stored * slope + inter)`` into ``out`` (float32, same shape), in place."""
        if out.dtype != np.float32:  # narrow model input (f16, ints): scale in float32 first, then narrow
            wide = np.empty(out.shape, dtype=np.float32)
            self.to_float(stored, channel, slope, inter, wide)
            np.copyto(out, wide, casting="unsafe")
            return
        clip = self.clip[channel]
        a, b = float(self.a[channel]), float(self.b[channel])
        # float64 voxels beyond float32's range: scale before narrowing (range-checked). Voxels that fit take the
        # float32 path, so that a float64 file gives exactly what the same values stored as float32 give
        if exceeds_float32(stored.dtype, slope, inter) and not fits_float32(stored, slope, inter):
            wide = stored.astype(np.float64) * slope + inter
            if clip is not None:
                np.clip(wide, clip[0], clip[1], out=wide)
            cast_copy(wide * a + b, out)
            return
        cast_copy(stored, out)  # the one transposing pass; the rest runs on contiguous float32
        if clip is None:  # fold the file's scaling into one multiply-add
            a, b = slope * a, inter * a + b
        else:
            if slope != 1.0:
                out *= np.float32(slope)
            if inter:
                out += np.float32(inter)
            np.clip(out, clip[0], clip[1], out=out)
        if a != 1.0:
            out *= np.float32(a)
        if b:
            out += np.float32(b)


class _Statistics:
    """Streamed sums of one normalisation's channels (a :mod:`volinfer.run.prepass` consumer): count, sum, sum of
    squares, range, and for percentiles a lattice sample; fitted into the normaliser when the pass finishes."""

    def __init__(self, norm: Normalizer, source: VolumeSource) -> None:
        self.norm, self.readers = norm, source.readers
        self.step = percentile_step(source.shape)
        k = norm.channels
        self.n, self.s1, self.s2 = [0] * k, [0.0] * k, [0.0] * k
        self.lo, self.hi = [math.inf] * k, [-math.inf] * k
        self.samples: list[list[np.ndarray]] = [[] for _ in range(k)]

    def update(self, c: int, stored: np.ndarray, z0: int) -> None:
        reader = self.readers[c]
        if self.norm.kind == "percentile":
            wide = exceeds_float32(reader.dtype, reader.slope, reader.inter)
            self.samples[c].append(_lattice_sample(stored, z0, self.step, reader.slope, reader.inter,
                                                   np.float64 if wide else np.float32))
        if stored.dtype.kind in "iu" and stored.size:
            self._add_integers(c, stored, float(reader.slope), float(reader.inter))
            return
        block = stored.astype(np.float64) * reader.slope + reader.inter
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            block = block[np.isfinite(block)]  # NaN/Inf are replaced later; they do not count here
        if not block.size:
            return
        self.n[c] += block.size
        self.s1[c] += float(block.sum())
        self.s2[c] += float(np.square(block).sum())
        self.lo[c], self.hi[c] = min(self.lo[c], float(block.min())), max(self.hi[c], float(block.max()))

    def _add_integers(self, c: int, stored: np.ndarray, a: float, b: float) -> None:
        """Integer voxels (never NaN): sums of the stored values, scaled by the file's slope and intercept
        afterwards — the same sums as scaling every voxel first, in a fraction of the time."""
        n, s1, s2 = integer_sums(stored)
        self.n[c] += n
        self.s1[c] += a * s1 + b * n
        self.s2[c] += a * a * s2 + 2 * a * b * s1 + b * b * n
        ends = (a * float(stored.min()) + b, a * float(stored.max()) + b)
        self.lo[c], self.hi[c] = min(self.lo[c], *ends), max(self.hi[c], *ends)

    def finish(self) -> None:
        for c in range(self.norm.channels):
            self.norm._set(c, self.n[c], self.s1[c], self.s2[c], self.lo[c], self.hi[c], self.samples[c])
        self.norm.fitted = True


#: Voxels converted to float64 at a time by :func:`integer_sums`: a 2 MB buffer that stays in cache.
SUM_CHUNK = 1 << 18


def integer_sums(stored: np.ndarray) -> tuple[int, int, int]:
    """Count, sum and sum of squares of an integer array, exact (Python integers) for values of up to 16 bits.

    Chunk by chunk through one float64 buffer that stays in cache: converting the whole slab first wrote and read
    8 bytes a voxel through memory, twice the time (17 of the 27 s of a 2048^3 pre-pass). Each chunk's sums are
    exact in float64 (2^18 squares of at most 2^32 each stay below 2^53) and are added as integers."""
    flat = stored.ravel(order="K")  # memory order: a slab is a transposed view
    buf = np.empty(min(SUM_CHUNK, flat.size), np.float64)
    s1 = s2 = 0
    for i in range(0, flat.size, SUM_CHUNK):
        part = flat[i: i + SUM_CHUNK]
        f = buf[: part.size]
        f[...] = part
        # einsum, not np.dot: numpy's own loop, as fast here, and no BLAS thread pool (OpenBLAS's workers hung a
        # process beside torch's OpenMP threads on a loaded 2-core machine, spinning in exec_blas for 20 min)
        s1 += int(f.sum())
        s2 += int(np.einsum("i,i->", f, f))
    return flat.size, s1, s2
