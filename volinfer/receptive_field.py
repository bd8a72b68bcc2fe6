"""Measuring a model's receptive-field radius by perturbation.

Crop stitching equals whole-volume inference when each tile's discarded margin is at least this radius. Deriving it from
the graph is brittle (pooling, interpolation, attention); measuring is not: change one input voxel and see how far the
output moves. A few probe positions cover the phases of strided layers; the widest reach wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov

from .model import TileModel


@dataclass(frozen=True)
class ReceptiveField:
    """Radius (voxels) per axis; ``bounded`` is False when the influence reached the tile's edge (a lower bound)."""

    radius: tuple[int, int, int]
    bounded: bool

    def __str__(self) -> str:
        text = "x".join(map(str, self.radius))
        return text if self.bounded else f">= {text} (reaches the tile edge; measure with a larger --tile)"


def measure_receptive_field(model: TileModel, tol: float = 1e-5, probes: int = 2, seed: int = 0) -> ReceptiveField:
    """Perturb voxels near the tile centre and report the farthest output voxel that changed by more than ``tol``
    (relative to the output's range). Runs in f32 on the CPU, whatever precision the model was compiled for."""
    compiled = model.core.compile_model(model.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    buf = model.new_input_buffer()
    view = model.input_view(buf)
    rng = np.random.default_rng(seed)
    view[...] = rng.standard_normal(view.shape).astype(buf.dtype)
    req.set_input_tensor(ov.Tensor(buf, shared_memory=True))

    def run() -> np.ndarray:
        req.infer()
        return np.array(model.output_view(req), dtype=np.float64)

    base = run()
    scale = max(float(np.abs(base).max()), 1e-12)
    centre = np.array(model.tile) // 2
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
        reach = np.abs(hit - np.array(p)).max(axis=0)
        radius = np.maximum(radius, reach)
        lo, hi = hit.min(axis=0), hit.max(axis=0)
        if (lo == 0).any() or (hi == np.array(model.tile) - 1).any():
            bounded = False
    return ReceptiveField(tuple(int(r) for r in radius), bounded)  # type: ignore[arg-type]
