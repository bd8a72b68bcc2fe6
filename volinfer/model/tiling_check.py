"""Measuring what crop tiling actually changes, once, at convert time: tiled against whole on a small probe.

The receptive-field radius (:mod:`volinfer.model.receptive_field`) is the farthest reach of ONE input voxel's
influence above a tolerance (1e-5 of the output range). A tile border replaces ALL the context beyond the margin by
padding, and many influences each below the tolerance add up: deep networks (stride-16 U-Nets) move their outputs by
a few percent at tile seams even when the margins cover the measured radius. This check puts a number on it: a
probe volume two tiles wide per axis, tiles whose margins are exactly the radius (the narrowest margins the planner
uses), random normal input, f32; the stitched crop cores against one inference over the whole probe, compared as
the run will output them (after the stored activation): largest absolute difference, that difference relative to the
whole output's range, and label agreement (argmax over channels).

Spatial normalisation layers are frozen to the whole probe's statistics for both, as runs freeze them to whole-volume
statistics. The result (a dict) is stored in the IR as ``tiling_check`` and quoted by exact runs.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
import openvino as ov

from volinfer.errors import framework_message
from volinfer.model.receptive_field import MAX_PROBE_TILE, ReceptiveField, frozen_at, probe_mb
from volinfer.model.layout import Layout
from volinfer.model.tile_model import TileModel
from volinfer.tiling.geometry import AxisPlan, plan_axis_crop

#: The stored key (rt_info ``volinfer/tiling_check``).
KEY = "tiling_check"


def probe_geometry(radius: Sequence[int], multiple: int) -> list[AxisPlan]:
    """Per axis: the smallest tile (a multiple of ``multiple``) whose crop margins of ``radius`` leave a core, and a
    probe of tile + stride voxels, so that the axis is cut into exactly two tiles with margins of ``radius``."""
    m = max(1, int(multiple))
    plans = []
    for r in radius:
        t = -(-(2 * int(r) + m) // m) * m
        stride = (t - 2 * int(r)) // m * m
        plans.append(plan_axis_crop(t + stride, t, m, int(r)))
    return plans


def _activated(out: np.ndarray, activation: str) -> np.ndarray:
    """(C, x, y, z) outputs as the run writes probabilities: softmax over channels, sigmoid, or as they are."""
    x = out.astype(np.float64)
    if activation == "softmax":
        x = np.exp(x - x.max(axis=0, keepdims=True))
        return x / x.sum(axis=0, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def _channels_first(model: TileModel, result: Any, compiled: ov.CompiledModel) -> np.ndarray:
    out = np.asarray(result[compiled.output(model.output_index)])[0]
    return np.array(Layout.of(model.layout).to_cxyz(out), dtype=np.float32)


def _tiled_and_whole(model: TileModel, plans: list[AxisPlan], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole probe's output and its crop-stitched tiles' outputs, (C, x, y, z), both in f32 on the CPU, for the
    probe input ``x`` (the model's input layout, batch 1)."""
    core = ov.Core()
    probe = [a.size for a in plans]
    tile = [a.tile for a in plans]
    frozen = frozen_at(model, probe, x, core)  # whole-probe statistics, for the whole run and for every tile
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    whole_c = core.compile_model(frozen, "CPU", config)
    whole = _channels_first(model, whole_c(x), whole_c)
    del whole_c
    at_tile = frozen.clone()
    at_tile.reshape({at_tile.input(0): ov.PartialShape(model.input_shape_for(tile))})
    tile_c = core.compile_model(at_tile, "CPU", config)
    view = Layout.of(model.layout).to_cxyz(x[0])
    tiled = np.full_like(whole, np.nan)
    for idx in itertools.product(*(range(a.count) for a in plans)):
        starts = [a.starts[i] for a, i in zip(plans, idx)]
        cores = [a.cores[i] for a, i in zip(plans, idx)]
        part = view[(slice(None), *(slice(s, s + t) for s, t in zip(starts, tile)))]
        inp = Layout.of(model.layout).from_cxyz(part)[None]
        out = _channels_first(model, tile_c(np.ascontiguousarray(inp)), tile_c)
        local = tuple(slice(a - s, b - s) for (a, b), s in zip(cores, starts))
        tiled[(slice(None), *(slice(a, b) for a, b in cores))] = out[(slice(None), *local)]
    return tiled, whole


def compare(tiled: np.ndarray, whole: np.ndarray, activation: str) -> dict[str, Any]:
    """Largest absolute difference of (activated) outputs, relative to the whole output's range, and label agreement
    (argmax over channels; None for a single channel)."""
    a, b = _activated(tiled, activation), _activated(whole, activation)
    max_abs = float(np.abs(a - b).max())
    span = float(b.max() - b.min())
    agree = float((a.argmax(axis=0) == b.argmax(axis=0)).mean()) if a.shape[0] >= 2 else None
    return {"max_abs": max_abs, "max_rel": max_abs / span if span > 0 else 0.0, "output_range": span,
            "label_agreement": agree}


def _skip(reason: str) -> dict[str, Any]:
    return {"measured": False, "reason": reason}


#: Makes the probe's input: given the probe's spatial size, (input in the model's layout with batch 1, its description).
ProbeInput = Callable[[list[int]], tuple[np.ndarray, str]]


def random_input(model: TileModel, seed: int = 0) -> ProbeInput:
    """Seeded standard-normal input: what a model sees of normalised data, without its structure."""
    def make(probe: list[int]) -> tuple[np.ndarray, str]:
        x = np.random.default_rng(seed).standard_normal(model.input_shape_for(probe))
        return x.astype(np.float32), f"random normal (seed {seed})"
    return make


def check_tiling(model: TileModel, rf: ReceptiveField | None, activation: str = "none",
                 probe_input: ProbeInput | None = None, max_tile: int | None = None,
                 max_memory_mb: float | None = None) -> dict[str, Any]:
    """Tiled (crop margins = the receptive-field radius) against whole on a probe two tiles wide per axis (see the
    module docs), on ``probe_input`` (default: :func:`random_input`; a crop of a real volume is better: the deviation
    grows with the input's distance from the zero padding). Returns the stored record: ``measured`` True with
    ``max_abs``, ``max_rel`` (of the output range), ``label_agreement``, the geometry and the input's description,
    or ``measured`` False with ``reason``. ``max_memory_mb``: a probe priced above it is not run. Never raises."""
    if rf is None or not rf.measured:
        return _skip("the receptive field was not measured")
    if not rf.bounded:
        return _skip(f"the receptive field ({rf}) is not bounded")
    if model.declared_input.is_static:
        return _skip("the model's input shape is fixed, so no probe two tiles wide can run")
    limit = max_tile or MAX_PROBE_TILE
    try:
        plans = probe_geometry(rf.radius, model.multiple)
        probe = [a.size for a in plans]
        if max(probe) > limit:
            return _skip(f"the probe ({'x'.join(map(str, probe))}) would exceed the largest probe edge {limit}")
        need = probe_mb(model, probe) + 4 * model.out_channels * float(np.prod(probe)) / 2**20  # + the tiled copy
        if max_memory_mb and need > max_memory_mb:
            return _skip(f"the probe ({'x'.join(map(str, probe))}) needs ~{need:.0f} MB, over the "
                         f"{max_memory_mb:.0f} MB budget")
        x, source = (probe_input or random_input(model))(probe)
        tiled, whole = _tiled_and_whole(model, plans, np.ascontiguousarray(x, dtype=np.float32))
        record = compare(tiled, whole, activation)
    except Exception as e:  # noqa: BLE001 - the model refused the probe, ran out of memory: "not measured"
        return _skip(f"the probe failed: {framework_message(e)[:200]}")
    record = {k: (round(v, 9) if isinstance(v, float) else v) for k, v in record.items()}
    return {"measured": True, **record, "margin": [int(r) for r in rf.radius], "tile": [a.tile for a in plans],
            "probe": probe, "activation": activation, "input": source, "precision": "f32"}


def stored(extra: dict[str, Any], radius: Sequence[int] | None) -> dict[str, Any] | None:
    """The stored check when it is a well-formed measurement made with margins equal to ``radius`` (the receptive
    field the run plans with), else None."""
    rec = extra.get(KEY)
    if not isinstance(rec, dict) or rec.get("measured") is not True or radius is None:
        return None
    try:
        ok = [int(v) for v in rec["margin"]] == [int(v) for v in radius]
        float(rec["max_abs"]), float(rec["max_rel"])
    except (KeyError, TypeError, ValueError):
        return None
    return rec if ok else None


#: A stored check beyond both of these says crop tiles with margins equal to the receptive field are not faithful
#: for the model (its output depends on more than the radius says, e.g. an interpolation to a skip connection's
#: size, whose sampling positions follow the tile's extent): fewer labels equal than the precision check accepts,
#: and a deviation of more than 1% of the output range (ties alone move labels, not values).
UNFAITHFUL_LABELS = 0.999
UNFAITHFUL_REL = 0.01


def unfaithful(rec: dict[str, Any] | None) -> str | None:
    """Why a stored check (:func:`stored`) shows crop tiling unfaithful for the model, or None."""
    if rec is None:
        return None
    rel, labels = float(rec["max_rel"]), rec.get("label_agreement")
    if rel <= UNFAITHFUL_REL or (labels is not None and float(labels) >= UNFAITHFUL_LABELS):
        return None
    return f"tiles with margins of the receptive field measured unfaithful at convert ({describe(rec)})"


def percent(share: float) -> str:
    """A share as a percentage with enough digits that anything short of 1 never reads as 100%."""
    if share >= 1.0:
        return "100%"
    digits = 4
    while digits < 9 and round(100 * share, digits) >= 100:
        digits += 1
    return f"{100 * share:.{digits}f}%"


def describe(rec: dict[str, Any]) -> str:
    """``max |diff| 0.026 (2.6% of the output range), labels 99.9999% equal`` for a stored measurement."""
    text = f"max |diff| {float(rec['max_abs']):.2g} ({100 * float(rec['max_rel']):.2g}% of the output range)"
    if rec.get("max_abs") == 0:
        text = "max |diff| 0"
    if rec.get("label_agreement") is not None:
        text += f", labels {percent(float(rec['label_agreement']))} equal"
    return text


def note(rec: dict[str, Any]) -> str:
    """The line `volinfer convert` and `volinfer info` print about the check."""
    if not rec.get("measured"):
        return f"tiling deviation not measured: {rec.get('reason', 'unknown reason')}"
    size = "x".join(map(str, rec.get("probe", [])))
    margin = "x".join(map(str, rec.get("margin", [])))
    space = rec.get("space") or ("probabilities" if rec.get("activation") in ("softmax", "sigmoid") else "outputs")
    text = (f"crop tiles with margins = the receptive field ({margin}) vs one inference over a {size} probe "
            f"({rec.get('input', 'random input')} input, f32, {space}): {describe(rec)}")
    if str(rec.get("input", "")).startswith("random"):
        text += ("; inputs far from zero (un-normalised intensities) deviate more: --calibration-volume measures "
                 "it on real data")
    return text
