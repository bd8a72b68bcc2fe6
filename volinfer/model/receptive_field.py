"""Measuring a model's receptive-field radius by perturbation, until it is bounded.

Crop stitching is exact (volinfer's word, see :mod:`volinfer.run.fidelity`) when each tile's discarded margin is at
least this radius: no single voxel beyond it moves an output by more than the tolerance (1e-5 of the output range).
The influences beyond it add up over a whole tile border, so tiled outputs still deviate a little from whole-volume
inference; :mod:`volinfer.model.tiling_check` measures by how much. Deriving the radius from
the graph is brittle (pooling, interpolation, attention); measuring is not: change one input voxel and see how far the
output moves. A few probe positions cover the phases of strided layers; the widest reach wins. When the reach touches
the probe tile's edge, the probe grows (up to ``max_tile``), so the radius is never silently capped at the tile.

Spatial normalisation layers (InstanceNorm, GroupNorm) would make every output voxel move: they are frozen, for the
measurement, to the statistics they computed on the probe's base input (the frozen network computes the same base
output), which is how volinfer runs them with whole-volume statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import openvino as ov

from volinfer.errors import framework_message
from volinfer.model.tile_model import TileModel
from volinfer.model.spatial_norm import (Moments, find_norm_layers, fixed_shape_global_ops, freeze, group_view,
                                         stat_tensor)

#: Largest probe edge: a probe at this size compiles the model once at (max_tile)^3.
MAX_PROBE_TILE = 320


@dataclass(frozen=True)
class ReceptiveField:
    """Radius (voxels) per axis; ``bounded`` is False when the influence reached the probe's edge (a lower bound);
    ``measured`` is False when it could not be measured at all (``reason`` says why)."""

    radius: tuple[int, int, int]
    bounded: bool
    measured: bool = True
    reason: str = ""

    def __str__(self) -> str:
        if not self.measured:
            return f"unknown ({self.reason})"
        text = "x".join(map(str, self.radius))
        return text if self.bounded else f">= {text} ({self.reason or 'reaches the edge of the largest probe'})"


def _shape(layout: str, channels: int, tile: Sequence[int]) -> list[int]:
    return [1, channels, *tile] if layout == "NCDHW" else [1, *tile, channels]


def _frozen_at(model: TileModel, tile: Sequence[int], x: np.ndarray, core: ov.Core) -> ov.Model:
    """The model at ``tile`` with every spatial normalisation frozen to the statistics it computes on ``x``."""
    m = model.model.clone()
    m.reshape({m.input(0): ov.PartialShape(_shape(model.layout, model.in_channels, tile))})
    layers, _ = find_norm_layers(m, model.layout, model.in_channels, tile)
    if not layers:
        return m
    probe = m.clone()
    outs = [stat_tensor(probe, layer) for layer in layers]
    stats_model = ov.Model(outs, probe.get_parameters(), "stats")
    compiled = core.compile_model(stats_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled(x)
    values = [np.asarray(res[o]) for o in compiled.outputs]
    for layer, v in zip(layers, values):
        block, axes = group_view(v, layer)
        mom = Moments()
        mom.add(block, axes)
        mean, var = mom.result()
        if layer.kind == "GroupNormalization":
            mean, var = mean.reshape(-1), var.reshape(-1)
        freeze(m, layer, mean, var)
    return m


def _measure_at(model: TileModel, tile: tuple[int, int, int], tol: float, probes: int, seed: int,
                core: ov.Core) -> ReceptiveField:
    shape = _shape(model.layout, model.in_channels, tile)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    compiled = core.compile_model(_frozen_at(model, tile, x, core), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    view = x[0] if model.layout == "NCDHW" else np.moveaxis(x[0], -1, 0)
    req.set_input_tensor(ov.Tensor(x, shared_memory=True))

    def run() -> np.ndarray:
        req.infer()
        out = req.get_output_tensor(model.output_index).data[0]
        return np.array(out if model.layout == "NCDHW" else np.moveaxis(out, -1, 0), dtype=np.float64)

    base = run()
    scale = max(float(np.abs(base).max()), 1e-12)
    centre = np.array(tile) // 2
    radius = np.zeros(3, dtype=int)
    bounded = True
    for k in range(max(1, probes)):
        p = tuple(int(v) for v in centre + k)
        saved = view[(slice(None), *p)].copy()
        view[(slice(None), *p)] += 10.0
        diff = np.abs(run() - base).max(axis=0)
        view[(slice(None), *p)] = saved
        hit = np.argwhere(diff > tol * scale)
        if hit.size == 0:
            continue
        radius = np.maximum(radius, np.abs(hit - np.array(p)).max(axis=0))
        if (hit.min(axis=0) == 0).any() or (hit.max(axis=0) == np.array(tile) - 1).any():
            bounded = False
    return ReceptiveField(tuple(int(r) for r in radius), bounded)  # type: ignore[arg-type]


def _global_ops(model: TileModel) -> list[str]:
    """The model's ops that combine values across the whole tile and cannot be frozen (see
    :func:`volinfer.model.spatial_norm.find_norm_layers`)."""
    try:
        return find_norm_layers(model.model, model.layout, model.in_channels, model.tile)[1]
    except Exception:  # noqa: BLE001 - a fixed input shape: read the ops at that shape
        return fixed_shape_global_ops(model.model, model.layout)


def measure_receptive_field(model: TileModel, tol: float = 1e-5, probes: int = 2, seed: int = 0,
                            max_tile: int | None = None,
                            fits: Callable[[Sequence[int]], bool] | None = None) -> ReceptiveField:
    """Perturb voxels near the probe's centre and report the farthest output voxel that changed by more than ``tol``
    (relative to the output's range), growing the probe from the model's tile until the reach is bounded. Runs in f32
    on the CPU, whatever precision the model was compiled for. Never raises: a model that cannot be probed (fixed
    input shape, rejected sizes) gives ``measured=False`` with the reason. ``fits``: whether a probe tile fits the
    run's memory budget; no probe beyond it is made (the first shrinks to fit; a bound not reached within it is a
    lower bound)."""
    core = ov.Core()
    max_tile = max_tile or MAX_PROBE_TILE
    m = max(1, model.multiple)
    tile = tuple(int(t) for t in model.tile)
    fixed = model.declared_input.is_static
    while fits is not None and not fits(tile) and not fixed and max(tile) > m:  # the largest axis first
        tile = tuple(max(m, t - m) if t == max(tile) else t for t in tile)
    if fits is not None and not fits(tile):
        return ReceptiveField((0, 0, 0), False, measured=False, reason=f"a probe at {tile} exceeds the memory budget")
    whole = _global_ops(model)
    while True:
        try:
            rf = _measure_at(model, tile, tol, probes, seed, core)  # type: ignore[arg-type]
        except Exception as e:  # the model refused the probe size, or ran out of memory
            first = framework_message(e)[:200]
            return ReceptiveField((0, 0, 0), False, measured=False, reason=f"probe at {tile} failed: {first}")
        if whole and rf.measured:  # a perturbation spreads thin over a whole-tile reduction: the graph says unbounded
            why = f"the whole input: {whole[0]} combines values across space or depends on positions in the tile"
            return ReceptiveField(rf.radius, False, reason=why)
        if rf.bounded:
            return rf
        if fixed:
            return ReceptiveField(rf.radius, False, measured=True,
                                  reason="the model's input shape is fixed, so the probe cannot grow")
        cap = max(max_tile // m * m, m)
        grown = tuple(max(t, min(cap, -(-2 * t // m) * m)) for t in tile)  # never shrinks below the probe so far
        if grown == tile or (fits is not None and not fits(grown)):
            return rf  # unbounded: the radius is a lower bound ("at least the probe")
        tile = grown  # type: ignore[assignment]
