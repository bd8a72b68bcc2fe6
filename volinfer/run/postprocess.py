"""Turning raw model output into what the user asked to keep: labels, probabilities, or the raw output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volinfer import validate
from volinfer.tiling.blockwise import blockwise
from volinfer.errors import VolinferError
from volinfer.options import OUTPUT_KINDS

ACTIVATIONS = ("softmax", "sigmoid", "none")


def smallest_label_dtype(n_labels: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds label values ``0 .. n_labels - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_labels - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise VolinferError(f"{n_labels} labels do not fit in 32 bits")


@dataclass(frozen=True)
class OutputSpec:
    """What to keep from the model's ``model_channels`` output channels.

    * ``labels``: argmax over channels (several channels) or ``activation(x) > threshold`` (one channel); smallest
      unsigned dtype. Sigmoid with several channels gives one binary mask per kept channel (multi-label models).
    * ``probabilities``: activated output of the kept channels, float16 or float32.
    * ``raw``: the model's output of the kept channels, float32.
    """

    model_channels: int
    kind: str = "labels"
    activation: str = "softmax"
    keep: tuple[int, ...] | None = None
    threshold: float = 0.5
    float_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise VolinferError(f"output kind must be one of {', '.join(OUTPUT_KINDS)}; got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise VolinferError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        if self.float_dtype not in ("float16", "float32"):
            raise VolinferError(f"probability dtype must be float16 or float32; got {self.float_dtype!r}")
        validate.threshold(self.threshold, self.activation)
        for c in self.keep or ():
            if not 0 <= c < self.model_channels:
                raise VolinferError(f"channel {c} does not exist; the model outputs {self.model_channels} channels")

    @property
    def channels(self) -> tuple[int, ...]:
        return self.keep if self.keep is not None else tuple(range(self.model_channels))

    @property
    def masks(self) -> bool:
        """Whether the labels are one binary mask per kept channel (one channel, or sigmoid): the only output that
        takes the threshold and, among labels, the choice of channels."""
        return self.kind == "labels" and (self.model_channels == 1 or self.activation == "sigmoid")

    @property
    def out_channels(self) -> int:
        """Channels in the written volume (1 means a 3-D output)."""
        if self.kind == "labels" and not self.masks:
            return 1
        return len(self.channels)

    @property
    def dtype(self) -> np.dtype:
        if self.kind == "labels":
            return np.dtype(np.uint8) if self.masks else smallest_label_dtype(self.model_channels)
        if self.kind == "probabilities":
            return np.dtype(self.float_dtype)
        return np.dtype(np.float32)

    @property
    def labels_from_probabilities(self) -> bool:
        """Whether these labels can be taken from the activated output instead of the raw one (argmax of the
        probabilities, or each kept channel's probability above the threshold): what a run mapping its output back
        from the model's voxel size does, resampling probabilities and labelling them on the volume's own grid, as
        nnU-Net does. Not for a one-channel softmax, whose probability is 1 everywhere."""
        return self.kind == "labels" and not (self.model_channels == 1 and self.activation == "softmax")

    def label_probabilities(self, probs: np.ndarray, out: np.ndarray) -> None:
        """Write the labels of ``probs`` (all ``model_channels`` activated channels, (C, ...)) into ``out``
        (out_channels, ...): see :attr:`labels_from_probabilities`."""
        if not self.masks:
            _argmax(probs, out[0])
            return
        np.greater(probs[list(self.channels)], self.threshold, out=out, casting="unsafe")

    def __call__(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Write the post-processed ``raw`` block (C, ...) into ``out`` (out_channels, ...) of :attr:`dtype`."""
        blockwise(self._apply, out, raw, step=16)

    def _apply(self, raw: np.ndarray, out: np.ndarray) -> None:
        if self.kind == "labels" and not self.masks:
            _argmax(raw, out[0])
            return
        sel = raw[list(self.channels)] if self.keep is not None else raw
        if self.kind == "labels":  # binary masks, thresholded in logit space when an activation applies
            if self.activation == "sigmoid" or (self.activation == "softmax" and self.model_channels == 1):
                t = float(np.log(self.threshold / (1.0 - self.threshold)))
            else:
                t = self.threshold
            np.greater(sel, t, out=out, casting="unsafe")
            return
        if self.kind == "raw" or self.activation == "none":
            out[...] = sel
            return
        if self.activation == "sigmoid":
            out[...] = 1.0 / (1.0 + np.exp(-sel, dtype=np.float32))
            return
        shifted = raw - raw.max(axis=0, keepdims=True)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=0, keepdims=True)
        out[...] = shifted[list(self.channels)] if self.keep is not None else shifted


def _argmax(raw: np.ndarray, out: np.ndarray) -> None:
    """``out = argmax(raw, axis=0)`` (first index on ties), as channel-by-channel comparisons: much faster than
    ``np.argmax`` over a leading axis for the few channels segmentation models have."""
    if raw.shape[0] == 2:
        np.greater(raw[1], raw[0], out=out, casting="unsafe")
        return
    best = raw[0].copy()
    out[...] = 0
    for c in range(1, raw.shape[0]):
        better = raw[c] > best
        out[better] = c
        np.maximum(best, raw[c], out=best)


