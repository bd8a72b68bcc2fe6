"""The memory budget of a conversion: every stage that runs the model picks a size that fits it.

``volinfer convert --max-memory`` (default: a quarter of the machine's memory) bounds each stage: the
receptive-field probe (only where the graph cannot be read), the tiling check, the reduced-precision check, the
speed profile and the parity check. Their memory is priced before anything is compiled, with the planner's own
model of OpenVINO's live tensors (:func:`volinfer.model.memory.activation_bytes_per_voxel`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import openvino as ov

from volinfer.model.memory import RUNTIME_FLOOR_MB, activation_bytes_per_voxel, default_budget_mb, weights_mb


def budget_mb(max_memory_mb: float | None) -> float:
    """The conversion's budget: the one asked for, else the run's default."""
    return float(max_memory_mb) if max_memory_mb else default_budget_mb()


def stage_mb(model: ov.Model, layout: str, channels: int, tile: Sequence[int], copies: float) -> float:
    """Peak MB of a stage holding ``copies`` compiled models' live tensors at ``tile`` (a framework reference
    counts as one more copy), with the runtime and the weights."""
    per_voxel = activation_bytes_per_voxel(model, layout, channels, tile)
    return RUNTIME_FLOOR_MB + weights_mb(model) + copies * per_voxel * float(np.prod(tile)) / 2**20


def fitting_tile(model: ov.Model, layout: str, channels: int, tile: Sequence[int], multiple: int | None,
                 budget: float, copies: float = 1.0) -> list[int]:
    """``tile``, or the largest tile below it (its longest axis halved, in size multiples, at a time) whose stage
    fits ``budget``; a static input (``multiple`` None) keeps its tile. Never below one size multiple."""
    t = [int(v) for v in tile]
    if not multiple:
        return t
    m = int(multiple)
    while stage_mb(model, layout, channels, t, copies) > budget:
        axis = int(np.argmax(t))
        smaller = max(m, (t[axis] // 2) // m * m)
        if smaller == t[axis]:
            break
        t[axis] = smaller
    return t
