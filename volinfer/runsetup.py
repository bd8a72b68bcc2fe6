"""Resolving a run's settings against a model and a volume, once, for every way of running (file, array, Zarr,
plan): stitching, activation, output spec, overlap, grid, and the whole-volume passes (NaN/Inf, statistics, range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .checks import check_input_range, check_nonfinite
from .errors import VolinferError
from .geometry import GeometryError, TileGrid
from .model import TileModel
from .normalize import Normalizer
from .postprocess import OutputSpec
from .reader import VolumeSource

STITCH_MODES = ("crop", "gaussian", "mean")
DEFAULT_OVERLAP = 0.25


def parse_overlap(value: Any) -> list[float] | None:
    """``0.25`` / ``"0.25"`` (fraction of the tile), ``32`` (voxels), ``"32,32,16"`` (per axis) → 3 numbers."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            items = [float(v) for v in value.split(",")]
        except ValueError:
            raise VolinferError(f"overlap must be a fraction (0.25) or voxels (32), optionally per axis; got {value!r}"
                                ) from None
    elif isinstance(value, (int, float)):
        items = [float(value)]
    else:
        items = [float(v) for v in value]
    if len(items) == 1:
        items *= 3
    if len(items) != 3 or any(v < 0 for v in items):
        raise VolinferError(f"overlap needs one or three non-negative values; got {value!r}")
    return items


def overlap_voxels(items: list[float], tile: Sequence[int]) -> tuple[int, int, int]:
    """Fractions (< 1) are of the tile size; values >= 1 are voxels."""
    return tuple(int(round(v * t)) if v < 1 else int(v) for v, t in zip(items, tile))  # type: ignore[return-value]


def default_overlap(model: TileModel, stitch: str) -> list[float]:
    """Stored overlap, else (crop) twice the stored receptive-field radius when it fits, else a quarter tile."""
    s = model.settings
    if s.overlap is not None:
        return parse_overlap(s.overlap)  # type: ignore[return-value]
    if stitch == "crop" and s.receptive_field:
        rf = [int(v) for v in s.receptive_field]
        if all(2 * r + model.multiple <= t for r, t in zip(rf, model.tile)):
            return [float(2 * r) for r in rf]
    return [DEFAULT_OVERLAP] * 3


@dataclass
class RunSetup:
    stitch: str
    activation: str
    spec: OutputSpec
    overlap: tuple[int, int, int]
    grid: TileGrid
    normalizer: Normalizer
    nonfinite: int = 0
    nan_fill: list[float] | None = None


def resolve(tm: TileModel, shape: Sequence[int], channels: int, *, stitch: str | None = None, overlap: Any = None,
            kind: str = "labels", activation: str | None = None, keep: Sequence[int] | None = None,
            threshold: float = 0.5, prob_dtype: str = "float32",
            normalize: dict[str, Any] | None = None) -> RunSetup:
    """Everything that follows from the options, the model's stored settings and the volume's shape (no I/O)."""
    st = tm.settings
    stitch = stitch or st.stitch or "crop"
    if stitch not in STITCH_MODES:
        raise VolinferError(f"stitch must be one of {', '.join(STITCH_MODES)}; got {stitch!r}")
    if channels != tm.in_channels:
        raise VolinferError(f"the volume has {channels} channel(s) but the model expects {tm.in_channels} "
                            f"(give one 3-D file per channel, or one 4-D file)")
    activation = activation or st.activation or ("softmax" if tm.out_channels > 1 else "sigmoid")
    spec = OutputSpec(tm.out_channels, kind=kind, activation=activation,
                      keep=tuple(keep) if keep is not None else None, threshold=threshold, float_dtype=prob_dtype)
    ov_vox = overlap_voxels(parse_overlap(overlap) or default_overlap(tm, stitch), tm.tile)
    try:
        grid = TileGrid.build(shape, tm.tile, [tm.multiple] * 3, ov_vox, "crop" if stitch == "crop" else "blend")
    except GeometryError as e:
        raise VolinferError(str(e)) from None
    normalizer = Normalizer(normalize if normalize is not None else st.normalization, channels)
    return RunSetup(stitch, activation, spec, ov_vox, grid, normalizer)


def scan_volume(setup: RunSetup, tm: TileModel, source: VolumeSource, nan_value: float | None) -> None:
    """The whole-volume passes, streamed: NaN/Inf policy, normalisation statistics, input-type range."""
    depth = tm.tile[2]
    setup.nonfinite = check_nonfinite(source, depth, nan_value)
    setup.normalizer.fit(source, depth)
    check_input_range(source, depth, setup.normalizer, tm.input_dtype)
    if setup.nonfinite:
        setup.nan_fill = [setup.normalizer.normalized(nan_value, c) for c in range(source.channels)]  # type: ignore[arg-type]
