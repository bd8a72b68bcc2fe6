"""``--precision auto``: reduced precision (bf16/f16) only where the hardware runs it natively AND the model's outputs
stay faithful in it.

Faithfulness is a property of the model, not of the hardware: deep normalisation networks and some TensorFlow U-Nets
move their probabilities by 0.1 in reduced precision while random inputs hide it. So the verdict is measured once, on
a calibration tile (a crop of a real volume when one is given), comparing f32 with the reduced precision on the same
input, and stored in the IR (``precision_check``) with the largest input magnitude it saw. Without a stored verdict,
``auto`` runs f32; and a verdict says nothing about inputs far larger than those it was measured on (raw intensities
fed to a model checked on normalised ones move probabilities by up to 0.9 in bf16 on the benchmark's U-Net while its
check on a normalised tile passed), so a run whose normalised input reaches beyond :data:`RANGE_FACTOR` times that
magnitude runs f32 (:func:`outside_checked`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openvino as ov
from volinfer.model.layout import Layout

#: A reduced precision is faithful when labels agree on at least this share of voxels ...
MIN_LABEL_AGREEMENT = 0.999
#: ... and (activated) probabilities move by at most this much anywhere.
MAX_PROB_ABS = 0.05

PRECISIONS = ("auto", "f32", "bf16", "f16")

#: A stored verdict covers inputs up to this many times the largest magnitude of the input it was measured on.
RANGE_FACTOR = 4.0
#: The largest magnitude assumed for verdicts stored without one (the synthetic tile is zero-mean, unit-variance).
DEFAULT_CHECKED_ABS_MAX = 5.0


def native_reduced(core: ov.Core, device: str) -> str | None:
    """The reduced precision ``device`` executes natively (bf16 on CPUs with AVX-512 BF16/AMX, f16 on GPUs and
    on CPUs that advertise FP16), or None."""
    try:
        caps = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        return None
    if device.upper().startswith("CPU"):
        return "bf16" if "BF16" in caps else ("f16" if "FP16" in caps else None)
    return "f16" if "FP16" in caps else None


def _activated(raw: np.ndarray, channel_axis: int, already: bool) -> np.ndarray:
    x = raw.astype(np.float64)
    if already:
        return x
    if x.shape[channel_axis] == 1:
        return 1.0 / (1.0 + np.exp(-x))
    x = x - x.max(axis=channel_axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=channel_axis, keepdims=True)


def _labels(prob: np.ndarray, channel_axis: int) -> np.ndarray:
    return prob.argmax(axis=channel_axis) if prob.shape[channel_axis] > 1 else (prob > 0.5)


def compare(model: ov.Model, x: np.ndarray, precision: str, output: int, channel_axis: int,
            probabilities: bool, device: str = "CPU", threads: int | None = None) -> dict[str, Any]:
    """Run ``model`` on ``x`` in f32 and in ``precision`` and measure what changed: label agreement and the largest
    change of probabilities. ``probabilities``: the output already is probabilities (no activation applied)."""
    core = ov.Core()
    outs = []
    for p in ("f32", precision):
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": p}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(model, device, config)
        outs.append(np.asarray(compiled(x)[compiled.output(output)]))
    ref, red = (_activated(o, channel_axis, probabilities) for o in outs)
    agree = float((_labels(ref, channel_axis) == _labels(red, channel_axis)).mean())
    prob_abs = float(np.abs(ref - red).max())
    ok = agree >= MIN_LABEL_AGREEMENT and prob_abs <= MAX_PROB_ABS
    return {"precision": precision, "label_agreement": round(agree, 6), "prob_max_abs": round(prob_abs, 5),
            "faithful": ok, "criteria": f"labels >= {MIN_LABEL_AGREEMENT:.1%} equal, probabilities within "
                                        f"{MAX_PROB_ABS}"}


def resolve(requested: str, stored: dict[str, Any] | None, core: ov.Core, device: str) -> tuple[str, str]:
    """The precision to compile with, and why (for the summary and ``--json``)."""
    if requested != "auto":
        emulated = requested != "f32" and native_reduced(core, device) != requested  # OpenVINO computes in f32
        why = "asked for"
        if stored and stored.get("precision") == requested and not stored.get("faithful"):
            why += (f", although `volinfer convert` measured {requested} unfaithful for this model (labels "
                    f"{stored.get('label_agreement')} equal, probabilities off by up to {stored.get('prob_max_abs')})"
                    + ("" if emulated else ": outputs differ from f32 inference by about that much"))
        if emulated:  # f32 throughout: bf16 planes between a stream's layers only lost precision (labels 99.5%)
            return "f32", (f"{why} {requested}, but {device} has no native {requested}: OpenVINO computes in f32 "
                           f"here, and so does this run (a stream's planes included): what --precision f32 gives")
        return requested, why
    native = native_reduced(core, device)
    if native is None:
        return "f32", f"{device} has no native reduced precision"
    if not stored:
        return "f32", f"{native} not verified for this model (`volinfer convert` checks and stores it)"
    if stored.get("precision") != native:
        return "f32", f"the stored check is for {stored.get('precision')}, {device} runs {native}"
    if not stored.get("faithful"):
        return "f32", (f"{native} changed this model's outputs too much (labels {stored.get('label_agreement')}, "
                       f"probabilities by {stored.get('prob_max_abs')})")
    return native, (f"{native} is native here and faithful for this model (labels {stored.get('label_agreement')} "
                    f"equal, probabilities within {stored.get('prob_max_abs')})")


def smooth_tile(shape: list[int], seed: int = 0) -> np.ndarray:
    """A float32 input of ``shape`` (N, C, D, H, W or channels last) that looks more like an image than white noise
    does: blobs on a few scales plus mild noise, zero mean and unit variance. Random noise alone hides precision
    problems that real data shows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 0.2
    dims = [d for d in range(len(shape)) if shape[d] > 8]
    grids = np.meshgrid(*[np.arange(shape[d], dtype=np.float32) for d in dims], indexing="ij")
    field = np.zeros(grids[0].shape, np.float32)
    for _ in range(8):
        centre = [rng.uniform(0, shape[d]) for d in dims]
        r = rng.uniform(3, max(4, min(shape[d] for d in dims) / 3))
        field += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * r * r)).astype(np.float32)
    index = tuple(slice(None) if d in dims else None for d in range(len(shape)))
    x += field[index] * 2.0
    return ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)


def check_model(model: ov.Model, layout: str, channels: int, tile: list[int], output: int, probabilities: bool,
                x: np.ndarray | None = None, runtime: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The stored verdict for ``--precision auto``: f32 against ``precision`` (auto: the device's native reduced
    precision) on ``x`` (a calibration tile; a synthetic image-like tile when None). None when there is nothing to
    verify (f32, or a device without reduced precision). ``runtime``: ``device`` (CPU), ``precision`` (auto),
    ``threads``."""
    runtime = runtime or {}
    device, precision, threads = runtime.get("device", "CPU"), runtime.get("precision", "auto"), runtime.get("threads")
    core = ov.Core()
    native = native_reduced(core, device) if precision == "auto" else (None if precision == "f32" else precision)
    if native is None:
        return None
    shape = Layout.of(layout).tensor_shape(channels, tile)
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(shape)})
    x = smooth_tile(shape) if x is None else x
    record = compare(m, x, native, output, Layout.of(layout).channel_axis, probabilities, device, threads)
    record["input_abs_max"] = round(float(np.abs(x).max()), 4)
    return record


def outside_checked(stored: dict[str, Any] | None, abs_max: float) -> str | None:
    """Why a stored reduced-precision verdict does not cover a run whose model input reaches ``|x| = abs_max``, or
    None when it does."""
    if not stored:
        return None
    try:
        checked = float(stored.get("input_abs_max") or DEFAULT_CHECKED_ABS_MAX)
    except (TypeError, ValueError):
        checked = DEFAULT_CHECKED_ABS_MAX
    if abs_max <= RANGE_FACTOR * checked:
        return None
    return (f"its stored check saw model inputs within ±{checked:.3g}, this volume reaches ±{abs_max:.4g} "
            f"(more than {RANGE_FACTOR:g}x)")
