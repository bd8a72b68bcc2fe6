"""A model's receptive-field radius: read from the graph where it can be, measured by perturbation where not.

Crop stitching is exact (volinfer's word, see :mod:`volinfer.run.fidelity`) when each tile's discarded margin is at
least this radius. :mod:`volinfer.model.graph_reach` computes it by arithmetic on every operation's kernel, stride,
dilation and padding (spatial normalisation layers treated as frozen, as volinfer runs them): no inference, no
memory, and a bound that holds for any input. Only a graph with an operation that arithmetic does not know is
probed: change one input voxel and see how far the output moves (by more than 1e-5 of the output range). A few
probe positions cover the phases of strided layers; the widest reach wins. When the reach touches the probe's
edge, the probe grows, within a memory budget (each size is priced before it is compiled): a probe that cannot
bound the field within the budget reports a lower bound and says so. The influences beyond the radius add up over
a whole tile border, so tiled outputs still deviate a little from whole-volume inference;
:mod:`volinfer.model.tiling_check` measures by how much.

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
from volinfer.model.memory import RUNTIME_FLOOR_MB, activation_bytes_per_voxel, default_budget_mb, weights_mb
from volinfer.model.graph_reach import NotAnalysable, Whole, graph_radius
from volinfer.model.layout import Layout
from volinfer.model.tile_model import TileModel
from volinfer.model.spatial_norm import (Moments, find_norm_layers, fixed_shape_global_ops, freeze, group_view,
                                         stat_tensor)

#: Largest probe edge: a probe at this size compiles the model once at (max_tile)^3.
MAX_PROBE_TILE = 320
#: How a receptive field was obtained (stored with it by `volinfer convert`).
GRAPH = "graph"
PROBE = "probe"


@dataclass(frozen=True)
class ReceptiveField:
    """Radius (voxels) per axis; ``bounded`` is False when the influence reached the probe's edge or an operation
    reads the whole volume (a lower bound); ``measured`` is False when it could not be measured at all (``reason``
    says why). ``method``: :data:`GRAPH` (kernel arithmetic) or :data:`PROBE` (perturbation)."""

    radius: tuple[int, int, int]
    bounded: bool
    measured: bool = True
    reason: str = ""
    method: str = PROBE

    def __str__(self) -> str:
        if not self.measured:
            return f"unknown ({self.reason})"
        text = "x".join(map(str, self.radius))
        if self.bounded:
            return text
        return f">= {text} ({self.reason or 'reaches the edge of the largest probe'})"

    def how(self) -> str:
        """How the field was obtained, in words (stored beside it)."""
        if self.method == GRAPH:
            what = "from the graph (kernel/stride/dilation/padding arithmetic, normalisation layers frozen)"
        else:
            what = "by perturbation (probe)"
        return what if self.bounded else f"{what}; unbounded: {self.reason or 'reaches the edge of the probe'}"


def frozen_at(model: TileModel, tile: Sequence[int], x: np.ndarray, core: ov.Core) -> ov.Model:
    """The model at ``tile`` with every spatial normalisation frozen to the statistics it computes on ``x``."""
    m = model.model.clone()
    m.reshape({m.input(0): ov.PartialShape(model.input_shape_for(tile))})
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
    shape = model.input_shape_for(tile)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    compiled = core.compile_model(frozen_at(model, tile, x, core), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    view = Layout.of(model.layout).to_cxyz(x[0])
    req.set_input_tensor(ov.Tensor(x, shared_memory=True))

    def run() -> np.ndarray:
        req.infer(share_outputs=True)
        out = req.get_output_tensor(model.output_index).data[0]
        return np.array(Layout.of(model.layout).to_cxyz(out), dtype=np.float64)

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


def from_graph(model: TileModel) -> ReceptiveField | None:
    """The receptive field by :mod:`volinfer.model.graph_reach` at the model's tile, or None when the graph holds
    an operation that arithmetic does not cover."""
    try:
        found = graph_radius(model.model, model.layout, model.in_channels, model.tile, model.output_index)
    except NotAnalysable:
        return None
    if isinstance(found, Whole):
        return ReceptiveField(tuple(t // 2 for t in model.tile), False, reason=found.why,  # type: ignore[arg-type]
                              method=GRAPH)
    return ReceptiveField(found, True, method=GRAPH)


def probe_mb(model: TileModel, tile: Sequence[int]) -> float:
    """Peak RAM (MB) of one probe at ``tile``: the runtime, the weights, the compiled model's live tensors, the
    normalisation statistics computed at once, and the probe's own float64 copies of the output."""
    voxels = float(np.prod(tile))
    per_voxel = activation_bytes_per_voxel(model.model, model.layout, model.in_channels, tile)
    layers, _ = find_norm_layers(model.model, model.layout, model.in_channels, tile)
    stats = sum(int(np.prod(shape)) for shape in _norm_input_shapes(model, tile, [n.name for n in layers])) * 4
    arrays = voxels * (4 * model.in_channels + 3 * 8 * max(1, model.out_channels))
    return RUNTIME_FLOOR_MB + weights_mb(model.model) + (per_voxel * voxels + stats + arrays) / 2**20


def _norm_input_shapes(model: TileModel, tile: Sequence[int], names: list[str]) -> list[list[int]]:
    if not names:
        return []
    m = model.model.clone()
    m.reshape({m.input(0): ov.PartialShape(model.input_shape_for(tile))})
    wanted = set(names)
    return [[d.get_length() for d in op.input_value(0).get_partial_shape()] for op in m.get_ordered_ops()
            if op.get_friendly_name() in wanted]


def largest_probe(model: TileModel, start: Sequence[int], cap: int, budget_mb: float) -> tuple[int, ...]:
    """The largest probe, growing ``start`` by doubling (in size multiples) up to ``cap`` per axis, that fits
    ``budget_mb``; ``start`` itself when nothing larger fits."""
    m = max(1, model.multiple)
    tile = tuple(int(t) for t in start)
    while True:
        grown = tuple(max(t, min(cap, -(-2 * t // m) * m)) for t in tile)
        if grown == tile or probe_mb(model, grown) > budget_mb:
            return tile
        tile = grown


def _global_ops(model: TileModel) -> list[str]:
    """The model's ops that combine values across the whole tile and cannot be frozen (see
    :func:`volinfer.model.spatial_norm.find_norm_layers`)."""
    try:
        return find_norm_layers(model.model, model.layout, model.in_channels, model.tile)[1]
    except Exception:  # noqa: BLE001 - a fixed input shape: read the ops at that shape
        return fixed_shape_global_ops(model.model, model.layout)


def measure_receptive_field(model: TileModel, tol: float = 1e-5, probes: int = 2, seed: int = 0,
                            max_tile: int | None = None, max_memory_mb: float | None = None,
                            graph: bool = True, fits: Callable[[Sequence[int]], bool] | None = None
                            ) -> ReceptiveField:
    """The receptive field: from the graph when it is analysable (``graph``), else by perturbation — voxels near
    the probe's centre perturbed, the farthest output voxel that changed by more than ``tol`` (relative to the
    output's range) reported, the probe grown from the model's tile until the reach is bounded, up to ``max_tile``
    per axis and within ``max_memory_mb`` (default: the run's default budget). Runs in f32 on the CPU. Never
    raises: a model that cannot be probed gives ``measured=False`` with the reason. ``fits``: the run's own check
    that a probe tile fits its budget (the planner counts what it predicts); no probe beyond it is made."""
    found = from_graph(model) if graph else None
    if found is not None:
        return found
    budget = max_memory_mb or default_budget_mb()
    cap = max(max_tile or MAX_PROBE_TILE, 1)
    tile = tuple(int(t) for t in model.tile)
    try:
        first_mb = probe_mb(model, tile)
    except Exception as e:  # noqa: BLE001 - the model refused the size: said in the result
        return ReceptiveField((0, 0, 0), False, measured=False, reason=f"probe at {tile} failed: "
                              f"{framework_message(e)[:200]}")
    if first_mb > budget or (fits is not None and not fits(tile)):
        return ReceptiveField((0, 0, 0), False, measured=False, reason=f"a probe at the tile "
                              f"{'x'.join(map(str, tile))} needs ~{first_mb:.0f} MB, over the {budget:.0f} MB budget")
    return _probe_growing(model, tile, tol, probes, seed, cap, budget, fits)


def _probe_growing(model: TileModel, tile: tuple[int, ...], tol: float, probes: int, seed: int, cap: int,
                   budget: float, fits: Callable[[Sequence[int]], bool] | None) -> ReceptiveField:
    core = ov.Core()
    fixed = model.declared_input.is_static
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
        m = max(1, model.multiple)
        grown = largest_probe(model, tile, max(cap // m * m, m), budget)
        grown = tuple(min(g, max(t, -(-2 * t // m) * m)) for g, t in zip(grown, tile))  # one doubling at a time
        if fits is not None and not fits(grown):
            grown = tile
        if grown == tile:
            edge = "the largest probe" if max(tile) >= cap else f"the largest probe within {budget:.0f} MB"
            return ReceptiveField(rf.radius, False, reason=f"a lower bound: it reaches the edge of {edge} "
                                  f"({'x'.join(map(str, tile))})")
        tile = grown
