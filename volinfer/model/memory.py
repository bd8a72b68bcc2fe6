"""What a model costs in memory, and which tile sizes it takes: the figures every planner (tiles, stream, convert's
probes) sizes its work with. Measured constants carry how they were measured."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import openvino as ov

from volinfer import portable
from volinfer.model.layout import Layout

#: Resident memory of a process that has imported volinfer and OpenVINO and compiled a small model (MB, measured).
RUNTIME_FLOOR_MB = 150.0
#: Default share of the machine's memory (physical RAM, capped by a cgroup limit) a run may plan for (``--max-memory``
#: overrides it). Of the machine, not of what happens to be free: the same command plans the same on the same machine.
DEFAULT_MEMORY_FRACTION = 0.25
#: A run's default budget is at most the runtime, the model's weights and this much working memory (MB): what the
#: reference U-Net streams 512³ in (~0.7 GB) with room, and 1024³-2048³ in bands of the same peak. Without this cap a
#: quarter of a big machine would let the fastest plan grow with the volume (2048³: ~6 GB here), the opposite of
#: what volinfer is for; ``--max-memory`` trades memory for speed explicitly.
DEFAULT_WORKING_MB = 1024.0
#: What OpenVINO's CPU plugin holds beyond the peak of live tensors in topological order (its own layouts, scratch
#: buffers, fused-op workspaces), with two infer requests in flight (each holding its own input and output): the
#: measured steady RSS of a fresh process that compiled the model and ran both requests, over the estimate
#: (2026-12-07, `volinfer.run.plan.measure_model`): reference U-Net bf16 1.53 / 1.77 / 1.71 and f32 1.64 / 1.81 / 1.72,
#: MONAI InstanceNorm UNet f32 1.60 / 1.88 / 1.84 at 128³ / 192³ / 256³ tiles. 1.7 (the reference U-Net at 240³)
#: let a 19-tile run of the InstanceNorm UNet under --max-memory 700M peak at 725 MiB; 1.85 covers every tile from
#: 192³ up (at 128³ it is 13-21% high).
PLUGIN_FACTOR = 1.85


def activation_bytes_per_voxel(model: ov.Model, layout: str, channels: int, tile: Sequence[int],
                               itemsize: int = 4) -> float:
    """Peak bytes of live intermediate tensors per input voxel, from shape inference at ``tile`` and the tensors'
    lifetimes in topological order (a model of what OpenVINO's memory planner must hold at once)."""
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(Layout.of(layout).tensor_shape(channels, tile))})
    ops = [op for op in m.get_ordered_ops()]
    index = {op.get_friendly_name(): i for i, op in enumerate(ops)}
    last_use: dict[tuple[str, int], int] = {}
    for i, op in enumerate(ops):
        for inp in op.inputs():
            src = inp.get_source_output()
            last_use[(src.get_node().get_friendly_name(), src.get_index())] = i
    live, peak = 0, 0
    sizes: dict[tuple[str, int], int] = {}
    for i, op in enumerate(ops):
        if op.get_type_name() in ("Constant", "Result"):
            continue
        for o in op.outputs():
            ps = o.get_partial_shape()
            n = int(np.prod([d.get_length() for d in ps])) if ps.is_static else 0
            key = (op.get_friendly_name(), o.get_index())
            sizes[key] = n * itemsize
            live += sizes[key]
        peak = max(peak, live)
        for key, last in list(last_use.items()):
            if last == i and key in sizes and index.get(key[0], -1) < i:
                live -= sizes.pop(key)
    return PLUGIN_FACTOR * peak / float(np.prod(tile))


def accepts(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> bool:
    """Shape inference only: does the model take this tile and return an output of the same spatial size (every
    spatial dimension shape inference fixes)? Volumetric outputs of other sizes may stand beside it (deep
    supervision's down-sampled heads); a model without volumetric outputs is taken at its word. The one acceptance
    check of runs and conversion."""
    m = model.clone()
    lay = Layout.of(layout)
    try:
        m.reshape({m.input(0): ov.PartialShape(lay.tensor_shape(channels, tile))})
    except Exception:
        return False
    volumetric = [[ps[i] for i in lay.spatial_axes] for ps in (out.get_partial_shape() for out in m.outputs)
                  if ps.rank.is_static and ps.rank.get_length() == 5]
    return not volumetric or any(all(not d.is_static or d.get_length() == t for d, t in zip(dims, tile))
                                 for dims in volumetric)


def probe_multiple(model: ov.Model, layout: str, channels: int, lo: int = 64, span: int = 64) -> int | None:
    """The model's size multiple when it stores none: the greatest common divisor of the cubic sizes in
    ``[lo, lo + span)`` it accepts (shape inference only, no compute); None when it accepts none of them. The one
    probe of runs (a plain IR, an ONNX file) and conversion."""
    g = 0
    for size in range(lo, lo + span):
        if (not g or size % g) and accepts(model, layout, channels, [size] * 3):
            g = math.gcd(g, size)
    return g or None


def weights_mb(model: ov.Model) -> float:
    """Size of the model's constants (weights), MB, as stored."""
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            o = op.output(0)
            total += int(np.prod(list(o.get_shape()) or [1])) * o.get_element_type().size
    return total / 2**20


def default_budget_mb(model_weights_mb: float | None = None) -> float:
    """The memory budget without ``--max-memory`` (MB): :data:`DEFAULT_MEMORY_FRACTION` of the machine's memory
    (:func:`volinfer.portable.machine_mb`), never of its momentary free memory (a resumed run must plan the tiling
    its journal recorded); for a run of a model with ``model_weights_mb`` of weights, at most the runtime, the
    weights and :data:`DEFAULT_WORKING_MB` (flat peaks as volumes grow)."""
    machine = DEFAULT_MEMORY_FRACTION * portable.machine_mb()
    if model_weights_mb is None:
        return machine
    return min(machine, RUNTIME_FLOOR_MB + model_weights_mb + DEFAULT_WORKING_MB)
