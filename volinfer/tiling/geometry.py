"""Tile geometry: which tile covers which part of the volume. Pure numpy-free arithmetic, no I/O, no OpenVINO.

Conventions
-----------
* Volume axes are NIfTI's (x, y, z); x varies fastest on disk, so slabs along z are contiguous.
* The model sees the volume padded on the high side of each axis to ``padded = max(tile, ceil(n / multiple) * multiple)``.
  Every tile starts on a multiple of ``multiple`` (the model's total down-sampling factor), so a translation-equivariant
  network sees each tile on the same sampling grid as it would see the whole padded volume. That is what lets crop
  stitching be *exact*: with margins covering the receptive field, its output is whole-volume inference on the padded
  volume, cropped back to ``n``, up to the small deviation :mod:`volinfer.model.tiling_check` measures.
* Tiles are visited z-row by z-row, then y-row, then x (x innermost), matching the on-disk order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence


class GeometryError(ValueError):
    """A tile/overlap/margin combination that cannot cover the volume."""


@dataclass(frozen=True)
class AxisPlan:
    """Tiling along one axis.

    ``starts[i]`` is where tile ``i`` begins (padded coordinates, which equal volume coordinates below ``size``);
    ``cores[i]`` is the half-open range of *volume* voxels tile ``i`` is responsible for in crop mode (a partition of
    ``[0, size)``); in blend mode every tile contributes its whole in-volume extent ``[start, min(start+tile, size))``.
    """

    size: int
    tile: int
    padded: int
    starts: tuple[int, ...]
    cores: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.starts)

    def extent(self, i: int) -> tuple[int, int]:
        """In-volume range covered by tile ``i``."""
        s = self.starts[i]
        return s, min(s + self.tile, self.size)


def padded_size(size: int, tile: int, multiple: int) -> int:
    """Extent the volume is padded to along one axis before tiling."""
    return max(tile, -(-size // multiple) * multiple)


def _starts(size: int, tile: int, multiple: int, stride: int) -> list[int]:
    padded = padded_size(size, tile, multiple)
    last = padded - tile
    starts = list(range(0, last, stride)) + [last]
    return sorted(set(starts))


def plan_axis_crop(size: int, tile: int, multiple: int, margin: int) -> AxisPlan:
    """Tiles whose centres (tile minus ``margin`` on each inner side) partition the axis exactly."""
    _check_tile(size, tile, multiple)
    if margin < 0:
        raise GeometryError(f"margin must be >= 0, got {margin}")
    if _single(size, tile, multiple):
        return AxisPlan(size=size, tile=tile, padded=padded_size(size, tile, multiple), starts=(0,), cores=((0, size),))
    stride = (tile - 2 * margin) // multiple * multiple
    if stride <= 0:
        raise GeometryError(
            f"margin {margin} leaves no room in a tile of {tile}: need tile - 2*margin >= {multiple} "
            f"(the model's size multiple); use a larger tile or a smaller overlap"
        )
    starts = _starts(size, tile, multiple, stride)
    # split each pair of neighbours half-way through their overlap: both sides keep >= margin of context
    bounds = [0] + [min(size, (a + b + tile) // 2) for a, b in zip(starts[:-1], starts[1:])] + [size]
    keep = [i for i in range(len(starts)) if bounds[i + 1] > bounds[i]]
    return AxisPlan(
        size=size,
        tile=tile,
        padded=padded_size(size, tile, multiple),
        starts=tuple(starts[i] for i in keep),
        cores=tuple((bounds[i], bounds[i + 1]) for i in keep),
    )


def plan_axis_blend(size: int, tile: int, multiple: int, overlap: int) -> AxisPlan:
    """Tiles that overlap by at least ``overlap`` voxels; every tile contributes everywhere it lies in the volume."""
    _check_tile(size, tile, multiple)
    if overlap >= 0 and _single(size, tile, multiple):
        return AxisPlan(size=size, tile=tile, padded=padded_size(size, tile, multiple), starts=(0,), cores=((0, size),))
    if not 0 <= overlap < tile:
        raise GeometryError(f"overlap must be in [0, tile={tile}), got {overlap}")
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    starts = [s for s in _starts(size, tile, multiple, stride) if s < size]
    return AxisPlan(
        size=size,
        tile=tile,
        padded=padded_size(size, tile, multiple),
        starts=tuple(starts),
        cores=tuple((s, min(s + tile, size)) for s in starts),
    )


def _single(size: int, tile: int, multiple: int) -> bool:
    """One tile covers the whole (padded) axis: no neighbour, so no margin or overlap is needed, whatever was asked
    (a tile clamped to a thin slab's extent must not fail for margins it does not have)."""
    return tile >= -(-size // multiple) * multiple


def _check_tile(size: int, tile: int, multiple: int) -> None:
    if size < 1:
        raise GeometryError(f"axis of size {size} cannot be tiled")
    if tile < 1 or multiple < 1:
        raise GeometryError(f"tile ({tile}) and multiple ({multiple}) must be positive")
    if tile % multiple:
        raise GeometryError(f"tile size {tile} is not a multiple of {multiple}")


@dataclass(frozen=True)
class Tile:
    """One tile: its grid index, where it starts, and the volume region it is responsible for."""

    index: tuple[int, int, int]
    start: tuple[int, int, int]
    core: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @property
    def row(self) -> tuple[int, int]:
        """(z-row, y-row): tiles sharing it lie side by side along x."""
        return self.index[2], self.index[1]


@dataclass(frozen=True)
class TileGrid:
    """The three axis plans of a volume, and the tiles in on-disk order."""

    axes: tuple[AxisPlan, AxisPlan, AxisPlan]
    mode: str  # "crop" or "blend"

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        tile: Sequence[int],
        multiple: Sequence[int],
        overlap: Sequence[int],
        mode: str,
    ) -> "TileGrid":
        """Plan a grid; in crop mode ``overlap`` is split into a margin of ``overlap // 2`` on each side."""
        if mode not in ("crop", "blend"):
            raise GeometryError(f"unknown grid mode {mode!r}")
        if mode == "crop":
            axes = tuple(plan_axis_crop(n, t, m, o // 2) for n, t, m, o in zip(shape, tile, multiple, overlap))
        else:
            axes = tuple(plan_axis_blend(n, t, m, o) for n, t, m, o in zip(shape, tile, multiple, overlap))
        return cls(axes=axes, mode=mode)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size for a in self.axes)  # type: ignore[return-value]

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        return tuple(a.tile for a in self.axes)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.axes[0].count * self.axes[1].count * self.axes[2].count

    def __iter__(self) -> Iterator[Tile]:
        ax, ay, az = self.axes
        for iz in range(az.count):
            for iy in range(ay.count):
                for ix in range(ax.count):
                    yield Tile(
                        index=(ix, iy, iz),
                        start=(ax.starts[ix], ay.starts[iy], az.starts[iz]),
                        core=(ax.cores[ix], ay.cores[iy], az.cores[iz]),
                    )
