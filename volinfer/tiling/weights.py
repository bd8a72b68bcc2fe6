"""Blending weights for overlapping tiles.

Weights are separable: ``w(x, y, z) = wx(x) * wy(y) * wz(z)``. Tiles form a Cartesian grid, so the sum of weights
that every voxel receives is separable too, ``W = Wx * Wy * Wz``: the normaliser is three 1-D arrays instead of a
full-volume count map. That is one of the reasons blending needs no full-volume accumulator.
"""

from __future__ import annotations

import numpy as np

from volinfer import validate
from volinfer.tiling.geometry import AxisPlan
from volinfer.options import BLEND_MODES


#: Smallest 1-D weight; keeps tile borders from dividing by ~0 where only one tile covers a voxel.
MIN_WEIGHT = 1e-3


def tile_weights_1d(mode: str, tile: int, sigma: float = 0.125) -> np.ndarray:
    """Weight profile of one tile along one axis: constant (``mean``) or a Gaussian with ``sigma * tile`` spread."""
    if mode == "mean":
        return np.ones(tile, dtype=np.float32)
    if mode == "gaussian":
        sigma = validate.positive("sigma", sigma)
        x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
        w = np.exp(-0.5 * (x / (sigma * tile)) ** 2)
        w /= w.max()
        return np.maximum(w, MIN_WEIGHT).astype(np.float32)
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {BLEND_MODES}")


def weight_sum_1d(plan: AxisPlan, weights: np.ndarray) -> np.ndarray:
    """Total weight each voxel of the axis receives from all tiles of ``plan``."""
    total = np.zeros(plan.size, dtype=np.float64)
    for start in plan.starts:
        stop = min(start + plan.tile, plan.size)
        total[start:stop] += weights[: stop - start]
    return total.astype(np.float32)
