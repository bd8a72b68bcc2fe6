"""Does the converted model compute what the source computes? Criteria that accept faithful conversions of deep
normalisation networks (which amplify f32 rounding) and still reject wrong ones.

Parity (source in its own framework vs the saved IR in OpenVINO at f32, same input):

* ``max_abs`` = max |ref - got|; ``max_rel`` = max_abs / max |ref|.
* For segmentation outputs (5-D, >= 2 channels) ``agreement`` = fraction of voxels whose argmax label is equal.
* Passed when ``max_rel <= tolerance`` (1e-4 with f32 weights, 1e-2 with FP16 weights), **or** when labels agree on
  at least ``LABEL_AGREEMENT_MIN`` (99.9 %) of voxels and ``max_rel <= loose_bound(tolerance)`` (the larger of 5 %
  and 10 x the default tolerance; 10 x an explicit ``--tolerance``). Deep InstanceNorm networks differ between frameworks by a few 1e-3 relative with labels
  99.99 % equal: accepted. Perturbed weights or a wrong layout move labels by far more than 0.1 %: rejected.

Weights: FP16 by default, but only when they pass parity; when they fail and FP32 weights pass, the IR keeps FP32
weights and :class:`WeightsReport` says so, with the FP16 try's deviation (an explicit ``--fp16`` refuses instead).

INT8 (the quantised IR vs the f32 IR, on the calibration tiles): passed when labels agree on at least
``INT8_AGREEMENT_MIN`` (99 %) of voxels and the mean Dice over foreground labels present in either is at least
``INT8_DICE_MIN`` (0.95); single-channel outputs need ``max_rel <= INT8_REL_MAX`` (10 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from volinfer.model.layout import Layout

LABEL_AGREEMENT_MIN = 0.999
LOOSE_REL_MIN = 0.05
INT8_AGREEMENT_MIN = 0.99
INT8_DICE_MIN = 0.95
INT8_REL_MAX = 0.10


def loose_bound(tolerance: float) -> float:
    return max(LOOSE_REL_MIN, 10 * tolerance)


@dataclass
class ParityReport:
    """Source vs IR on the same input: the conversion's accuracy, or why it could not be checked."""

    max_abs: float | None
    max_rel: float | None
    tolerance: float
    shape: list[int]
    reference: str
    passed: bool | None  # None: not checked
    agreement: float | None = None  # argmax label agreement (segmentation outputs)
    checked: bool = True
    reason: str | None = None  # why not checked
    criterion: str | None = None  # which rule accepted it

    def __str__(self) -> str:
        if not self.checked:
            return f"parity not checked: {self.reason} (reference would be {self.reference})"
        verdict = "ok" if self.passed else "FAILED"
        labels = f", labels agree {100 * self.agreement:.3f}%" if self.agreement is not None else ""
        tol = "reported only" if self.tolerance == float("inf") else f"tolerance {self.tolerance:g}"
        how = f"; {self.criterion}" if self.criterion else ""
        return (f"parity {verdict}: max |diff| {self.max_abs:.3g}, relative {self.max_rel:.3g}{labels} "
                f"({tol}{how}) on input {self.shape}, reference {self.reference}")

    def brief(self) -> str:
        """``relative R[, labels agree L%], tolerance T``: the measured deviation in a few words."""
        labels = f", labels agree {100 * self.agreement:.3f}%" if self.agreement is not None else ""
        return f"relative {self.max_rel:.3g}{labels}, tolerance {self.tolerance:g}"


@dataclass
class WeightsReport:
    """How the IR stores its weights (``f16``, ``f32`` or ``int8``) and why; ``fp16_parity`` is the FP16 try that
    parity rejected when FP32 weights were kept for that reason (None otherwise)."""

    dtype: str
    reason: str
    fp16_parity: ParityReport | None = None

    def __str__(self) -> str:
        return f"weights stored as {self.dtype}: {self.reason}"

    def as_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "reason": self.reason,
                "fp16_parity": dict(self.fp16_parity.__dict__) if self.fp16_parity else None}


def channel_axis(shape: Sequence[int], layout: str) -> int | None:
    """The class axis of a 5-D segmentation output (>= 2 channels), else None."""
    if len(shape) != 5:
        return None
    axis = Layout.of(layout).channel_axis
    return axis if shape[axis] >= 2 else None


def compare(pairs: list[tuple[np.ndarray, np.ndarray]], layout: str) -> tuple[float, float, float | None]:
    """max-abs, relative error and label agreement (None when no output is a segmentation) over output pairs."""
    max_abs, max_rel, agree, total = 0.0, 0.0, 0, 0
    for ref, got in pairs:
        ref64 = np.asarray(ref, np.float64)
        d = float(np.abs(ref64 - got).max()) if ref64.size else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / max(float(np.abs(ref64).max()) if ref64.size else 0.0, 1e-12))
        axis = channel_axis(ref.shape, layout)
        if axis is not None:
            a, b = ref64.argmax(axis), np.asarray(got).argmax(axis)
            agree += int((a == b).sum())
            total += a.size
    return max_abs, max_rel, (agree / total if total else None)


def judge(max_rel: float, agreement: float | None, tolerance: float,
          loose: float | None = None) -> tuple[bool, str | None]:
    """The parity verdict and, when accepted on labels, the rule that accepted it. ``loose`` defaults to
    :func:`loose_bound`; an explicit ``--tolerance`` passes ``10 * tolerance`` (no 5 % floor)."""
    loose = loose_bound(tolerance) if loose is None else loose
    if max_rel <= tolerance:
        return True, None
    if agreement is not None and agreement >= LABEL_AGREEMENT_MIN and max_rel <= loose:
        return True, f"accepted on labels: >= {100 * LABEL_AGREEMENT_MIN:g}% equal and relative error <= {loose:g}"
    return False, None


def mean_dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean Dice over the foreground labels (> 0) present in either label map; None when there are none."""
    scores = []
    for lab in np.union1d(np.unique(a), np.unique(b)):
        if lab == 0:
            continue
        x, y = a == lab, b == lab
        scores.append(2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0))
    return float(np.mean(scores)) if scores else None


@dataclass
class Int8Report:
    """INT8 IR vs the f32 IR on the calibration tiles."""

    agreement: float | None
    dice: float | None
    max_rel: float
    tiles: int
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        parts = []
        if self.agreement is not None:
            parts.append(f"labels agree {100 * self.agreement:.2f}% (need >= {100 * INT8_AGREEMENT_MIN:g}%)")
            parts.append(f"mean Dice {self.dice:.4f} (need >= {INT8_DICE_MIN:g})" if self.dice is not None
                         else "no foreground labels")
        else:
            parts.append(f"relative error {self.max_rel:.3g} (need <= {INT8_REL_MAX:g})")
        return f"INT8 vs FP32 {verdict}: {', '.join(parts)} on {self.tiles} calibration tile(s)"


def judge_int8(pairs: list[tuple[np.ndarray, np.ndarray]], layout: str) -> Int8Report:
    """Label agreement / Dice of INT8 against f32 over all calibration tiles (``pairs`` = (f32, int8) outputs)."""
    _, max_rel, agreement = compare(pairs, layout)
    dice = None
    if agreement is not None:
        axis = channel_axis(pairs[0][0].shape, layout)
        a = np.concatenate([np.asarray(r).argmax(axis).ravel() for r, _ in pairs])
        b = np.concatenate([np.asarray(g).argmax(axis).ravel() for _, g in pairs])
        dice = mean_dice(a, b)
        passed = agreement >= INT8_AGREEMENT_MIN and (dice is None or dice >= INT8_DICE_MIN)
    else:
        passed = max_rel <= INT8_REL_MAX
    return Int8Report(agreement, dice, max_rel, len(pairs), passed)
