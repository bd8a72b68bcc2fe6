"""The volume's own size against the model's size multiple: running a network that takes any size at the volume's
own size, and saying what a padded run is exact against.

Runs pad the volume at the high end to the model's size multiple (tiles start on it, so crop stitching is exact).
A network whose IR takes the volume's own size (a decoder that resizes to its skip connection's size, a trace that
kept the sizes symbolic) computes something else on the padded volume than on the volume itself: its pooling grid
ends elsewhere and its resize factors follow the size. A red-team pass measured a TorchScript U-Net of that kind
(size multiple 4) on a 97x45x70 volume: padded to 100x48x72, 82.7% of the labels of PyTorch's ``model(volume)``,
while the run said exact. So such a model runs as ONE tile at the volume's own size whenever that tile fits the
memory budget (:func:`unpadded_model`: the run is then the model's own inference on the volume), and a run that
pads it anyway (a forced tile, ``--engine stream``, a budget too small, Zarr block runs) is reported not exact
(:func:`judged`). A model whose IR rejects the volume's size needs the padding; its verdict says it is exact for
the padded volume, and not exact where `volinfer convert` measured that the source model itself takes sizes the IR
cannot (``source_sizes`` stored in the IR: MONAI's BasicUNet pads inside its decoder in PyTorch, but its trace
kept only the branch for multiples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import openvino as ov
import openvino.passes as ov_passes

from volinfer.model.layout import Layout
from volinfer.model.memory import accepts, activation_bytes_per_voxel, default_budget_mb, weights_mb
from volinfer.model.tile_model import TileModel
from volinfer.run.fidelity import Fidelity
from volinfer.run.tile_buffers import TileBuffers, tile_need_mb

#: The key `volinfer convert` stores, in the IR's settings, its measurement of sizes the source model takes that the
#: IR does not (a dict: ``shape`` run, ``ir`` "rejects"); absent when not measured or when the IR takes them too.
SOURCE_SIZES_KEY = "source_sizes"


def fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


@dataclass(frozen=True)
class Padding:
    """How a run meets the volume's own ``shape``: ``padded`` is the volume padded to the model's size ``multiple``
    (a fixed-size model's grid pads further, to its tile), ``takes_own_size``: the model's IR takes
    ``shape`` itself, ``why_padded``: what kept such a model padded (what to change), ``source``: convert's
    measurement that the source takes sizes its IR does not (None: not measured, or it does not)."""

    shape: tuple[int, int, int]
    padded: tuple[int, int, int]
    multiple: int
    pad_mode: str = "constant"
    takes_own_size: bool = False
    why_padded: str = ""
    source: dict[str, Any] | None = None
    own_size: bool = False  # the run is one tile at the volume's own size (nothing padded)


def padded_shape(shape: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """The volume padded at the high end to the size multiple, as the tile grid pads it."""
    return tuple(-(-int(n) // multiple) * multiple for n in shape)  # type: ignore[return-value]


def takes_size(model: ov.Model, layout: str, channels: int, shape: Sequence[int], output: int = 0) -> bool:
    """Shape inference only, strict: does the IR ``model`` take an input of spatial ``shape`` and return its output
    ``output`` at that very size? Constant-folded first: an Interpolate whose scale reaches it through a Convert
    leaves its size unknown before, and a Concat then merges it with any skip size (a pooling U-Net at 21x18x15
    passed :func:`volinfer.model.memory.accepts` so, and failed once folded)."""
    shape = [int(n) for n in shape]
    if not accepts(model, layout, channels, shape):
        return False
    m = model.clone()
    lay = Layout.of(layout)
    try:
        m.reshape({m.input(0): ov.PartialShape(lay.tensor_shape(channels, shape))})
        folding = ov_passes.Manager()
        folding.register_pass(ov_passes.ConstantFolding())
        folding.run_passes(m)
        m.validate_nodes_and_infer_types()
    except Exception:  # noqa: BLE001  (shapes that do not meet once folded: the IR rejects the size)
        return False
    out = m.output(output).get_partial_shape()
    if out.rank.is_dynamic or out.rank.get_length() != 5:
        return False
    return all(out[a].is_static and out[a].get_length() == n for a, n in zip(lay.spatial_axes, shape))


def takes_own_size(tm: TileModel, shape: Sequence[int]) -> bool:
    """Does the model (a file whose input is not fixed) take the volume at its own ``shape``
    (:func:`takes_size`)?"""
    return not tm.declared_input.is_static and takes_size(tm.model, tm.layout, tm.in_channels, shape,
                                                          tm.output_index)


def unpadded_need_mb(tm: TileModel, shape: Sequence[int], buffers: TileBuffers | None) -> float:
    """The predicted memory (MB) of one tile at the volume's own ``shape``, as the planner predicts a tile's: the
    runtime, the weights, the live tensors at that shape, the tiles engine's buffers."""
    per_voxel = activation_bytes_per_voxel(tm.model, tm.layout, tm.in_channels, shape)
    return tile_need_mb(per_voxel, weights_mb(tm.model), buffers, tuple(shape), (0, 0, 0), (1, 1, 1))


def unpadded_model(tm: TileModel, shape: Sequence[int], settings: Any, buffers: TileBuffers | None,
                   blocked: str = "") -> tuple[TileModel | None, Padding | None]:
    """For a volume off the model's size multiple whose own size the IR takes: the model fixed at ONE tile of the
    volume's own ``shape`` (size multiple 1 for this run, no padding) when nothing the user asked for rules it out
    and it fits the memory budget, else None; and the run's :class:`Padding`.
    ``settings``: the run's :class:`volinfer.run.settings.RunSettings`; ``blocked``: why this way of running cannot
    take one tile at the volume's size (empty: it can)."""
    shape = tuple(int(n) for n in shape)
    padded = padded_shape(shape, tm.multiple)
    t = settings.tiling
    source = tm.settings.extra.get(SOURCE_SIZES_KEY)
    pad = Padding(shape, padded, tm.multiple, t.pad_mode, source=source if isinstance(source, dict) else None)
    if padded == shape or not takes_own_size(tm, shape):
        return None, pad
    why = blocked or _ruled_out(tm, shape, t, buffers)
    if why:
        return None, Padding(shape, padded, tm.multiple, t.pad_mode, True, why, pad.source)
    own = tm.with_multiple(1).at(shape, compile=False)
    own.tile_given = True  # planning must not change it (and the stream, which pads, is not weighed)
    return own, Padding(shape, shape, tm.multiple, t.pad_mode, True, own_size=True)


def _ruled_out(tm: TileModel, shape: tuple[int, int, int], t: Any, buffers: TileBuffers | None) -> str:
    """Why the run cannot take one tile at the volume's own size (``t``: its tiling settings), in words that say
    what to change; empty when it can."""
    if tm.tile_given:
        return f"--tile {fmt(tm.tile)} was forced: without it one tile at the volume's size runs"
    if t.engine == "stream":
        return "--engine stream pads to the size multiple: --engine auto or tiles runs one tile at the volume's size"
    budget = t.max_memory_mb or default_budget_mb(weights_mb(tm.model))
    need = unpadded_need_mb(tm, shape, buffers)
    if need > budget:
        return (f"one tile at the volume's size needs about {need:.0f} MB, more than the {budget:.0f} MB budget: "
                f"--max-memory {int(np.ceil(need))}M runs it")
    return ""


def judged(fid: Fidelity, pad: Padding | None, grid_padded: Sequence[int]) -> Fidelity:
    """``fid`` (the tiling's verdict) saying what it is exact against: the model's own inference on the volume (run
    at its own size), the padded volume (a model that needs the padding; ``grid_padded``: what the tile grid padded
    the volume to), or not exact where the model (or the source it came from) takes the volume's own size and
    computes otherwise there."""
    if pad is None or tuple(grid_padded) == pad.shape and not pad.own_size:
        return fid  # nothing padded
    if not fid.exact and not pad.takes_own_size and pad.source is None:
        return fid
    size, padded, m = fmt(pad.shape), fmt(grid_padded), pad.multiple
    if pad.own_size:
        fid.meaning = (f"exact: one tile over the volume at its own size {size} (the model takes it, so nothing was "
                       f"padded to its size multiple {m}): the output is the model's own inference on the volume")
        return fid
    padding = "zero" if pad.pad_mode == "constant" else pad.pad_mode
    if pad.takes_own_size:
        fid.exact = False
        fid.reasons.append(f"the volume ran padded to {padded} ({padding} padding to the size multiple {m}) although "
                           f"the model takes its own size {size}, where it computes otherwise (its pooling grid and "
                           f"resize factors follow the size); {pad.why_padded}")
        return fid
    if pad.source is not None:
        fid.exact = False
        fid.reasons.append(f"the volume ran padded to {padded} ({padding} padding to the size multiple {m}): "
                           f"`volinfer convert` measured that the source model itself takes sizes off that multiple "
                           f"(it ran {fmt(pad.source.get('shape', ()))}; this IR rejects it), so it would not "
                           f"have padded; run volumes whose sizes are multiples of {m}, or export the model so that "
                           f"it takes any size")
        return fid
    rest = fid.meaning[len("exact: "):] if fid.meaning.startswith("exact: ") else fid.meaning
    to = f"the model's size multiple {m}" if tuple(grid_padded) == pad.padded else "the model's fixed input size"
    fid.meaning = (f"exact for the volume padded to {padded} ({padding} padding to {to}; "
                   f"a network that takes any size in its own framework may pad differently inside) and cropped "
                   f"back to {size}: {rest}")
    return fid
