"""The input sizes the converted IR takes against those the source takes: measured once at convert, stored for runs.

A source that runs at sizes off the IR's size multiple while the IR rejects them (MONAI's BasicUNet replicate-pads
its decoder in PyTorch; the trace at a multiple kept only the branch that needs none) makes every run on such a
volume pad it, which the source itself would not do: a red-team pass measured 63-88% of labels equal to PyTorch's
``model(volume)`` on a 61x77x53 volume, while the run said exact. :func:`source_sizes` runs the source once at a
size off the multiple and, when only the source takes it, returns what `volinfer run` reads to report such padded
runs not exact (:data:`volinfer.run.own_size.SOURCE_SIZES_KEY`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import openvino as ov

from volinfer.model.graph_reach import stride_period
from volinfer.model.layout import Layout
from volinfer.run.own_size import fmt, takes_size

from .source import Source


def off_multiple(tile: Sequence[int], multiple: int) -> list[int]:
    """A shape near ``tile`` whose every size is off the ``multiple`` (one less, then one multiple less per axis
    where that stays positive: the axes differ, so a mix-up of axes shows)."""
    out = []
    for i, t in enumerate(tile):
        n = int(t) - 1 - multiple * i
        out.append(n if n > 1 else int(t) - 1)
    return out


def source_sizes(src: Source, model: ov.Model, layout: str, channels: int, tile: Sequence[int], multiple: int | None,
                 notes: list[str]) -> dict[str, Any] | None:
    """When the source model runs at a size off the size ``multiple`` (a shape near ``tile``) that the IR ``model``
    rejects: what to store (``shape`` run, ``ir`` "rejects") and a note; None when the IR takes it too (runs then
    run such volumes unpadded), when the source rejects it too, or when there is no multiple to be off."""
    if not multiple or multiple < 2 or min(tile) <= 2:
        return None
    shape = off_multiple(tile, multiple)
    lay = Layout.of(layout)
    if takes_size(model, layout, channels, shape):
        return None
    x = np.random.default_rng(0).standard_normal(lay.tensor_shape(channels, shape)).astype(np.float32)
    try:
        outputs = src.run(x)
    except Exception:  # noqa: BLE001  (the source rejects the size too, or cannot run here: nothing to say)
        return None
    if not any(np.ndim(o) == 5 and [np.shape(o)[a] for a in lay.spatial_axes] == shape for o in outputs):
        return None
    notes.append(f"the source model runs at {fmt(shape)} itself, but this IR takes only sizes divisible by "
                 f"{multiple} (the export kept only how the model treats multiples): `volinfer run` pads other "
                 f"volumes to the multiple, which the source would not do, and reports such runs not exact; run "
                 f"volumes whose sizes are multiples of {multiple}, or export the model so that it takes any size")
    return {"shape": shape, "ir": "rejects"}


def fixed_size(model: ov.Model, layout: str, channels: int, tile: Sequence[int], multiple: int | None) -> bool:
    """Whether the IR ``model`` (spatial dims left dynamic) runs only at its ``tile``: it takes the tile, but not
    one size ``multiple`` more along every axis, which any network whose sizes follow its strides takes (a static
    ONNX export bakes its Resize sizes: the dims stay dynamic, the graph does not; probe_multiple then finds the
    tile itself as the "size multiple")."""
    if not multiple or not takes_size(model, layout, channels, tile):
        return False
    return not takes_size(model, layout, channels, [int(t) + multiple for t in tile])


def as_fixed(model: ov.Model, layout: str, channels: int, tile: Sequence[int], multiple: int,
             notes: list[str]) -> int | None:
    """``model`` reshaped in place to its one input size ``tile`` (a run then tiles volumes at it, as for a
    ``--static`` conversion), with the note that says so (``multiple``: what the probe took for its size multiple,
    one more of which it rejects); returns its size multiple for tile starts: the period of
    its strides (pooling windows of a tile start where the whole volume's do), None without strides."""
    lay = Layout.of(layout)
    model.reshape({model.input(0): ov.PartialShape(lay.tensor_shape(channels, list(tile)))})
    period = stride_period(model, layout, channels, list(tile))
    multiple = math.lcm(*period) if period else None
    if multiple and any(int(t) % multiple for t in tile):
        multiple = None
    notes.append(f"this model runs only at {fmt(tile)}: its graph fixes that size (a static export bakes the sizes of "
                 f"its Resize layers), it rejects {fmt([int(t) + multiple for t in tile])}; stored as a fixed-size model, so "
                 f"runs tile volumes at {fmt(tile)}" + (f" (tiles starting at multiples of its stride period "
                                                          f"{multiple})" if multiple else "")
                 + "; re-export it with dynamic spatial axes (torch.onnx.export(..., dynamic_axes=...)) to run "
                   "other sizes")
    return multiple
