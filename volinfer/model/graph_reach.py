"""The receptive field read from the graph: how far each output voxel reaches into the input, by arithmetic on the
kernel, stride, dilation and padding of every operation (no inference, no memory beyond the graph).

Along each input axis, every tensor of the model is described by a :class:`Reach`: its position ``j`` reads input
voxels ``[scale*j + lo, scale*j + hi]``. The input starts at scale 1, lo = hi = 0; a convolution or pooling window
(a :class:`volinfer.model.stream_graph.ZWindow`, the description the streaming engine uses for the same operations)
multiplies the scale by its stride and widens lo/hi by its padding and reach; a transposed convolution divides the
scale; interpolation divides it by its size ratio and widens by its taps and by how far its coordinate mode maps
positions from ``j/ratio`` (``align_corners``: up to a voxel); element-wise operations take the union of their
inputs. At the output (scale 1) the radius along each axis is ``ceil(max(-lo, hi))``, an upper bound on what a perturbation probe
would find, and exact for plain convolution stacks.

Spatial normalisation layers (``MVN``, ``GroupNormalization``) are treated as frozen to whole-volume statistics, the
way volinfer runs them (:mod:`volinfer.run.norm_stats`): per-channel affine maps. Any other reduction over space
(global pooling, ``NormalizeL2``, softmax over space) reaches the whole volume: the field is unbounded
(:class:`Whole`). An operation
this module does not know raises :class:`NotAnalysable` naming it; the caller then measures by perturbation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import openvino as ov

from volinfer.model.stream_graph import POINTWISE, WINDOW, ZWindow
from volinfer.model.layout import Layout

#: Element-wise beyond the streaming engine's list (ops it does not stream but that act voxel by voxel).
ELEMENTWISE = POINTWISE | {"BatchNormInference", "Clamp", "LeakyRelu", "Identity", "Erf", "Swish", "Exp", "Sqrt"}
#: Normalisations over space, frozen to whole-volume statistics when volinfer runs them.
FROZEN_NORMS = frozenset(["MVN", "GroupNormalization"])
#: Reductions: global when they reduce over a spatial axis.
REDUCTIONS = frozenset(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "NormalizeL2"])
#: Interpolation: which source voxels a mode reads around the source coordinate x, as (low, high) offsets from x.
TAPS = {"linear": (-1, 1), "linear_onnx": (-1, 1), "bilinear_pillow": (-1, 1), "cubic": (-2, 2),
        "bicubic_pillow": (-2, 2)}
NEAREST = {"floor": (-1, 0), "ceil": (0, 1), "round_prefer_floor": (Fraction(-1, 2), Fraction(1, 2)),
           "round_prefer_ceil": (Fraction(-1, 2), Fraction(1, 2)), "simple": (-1, 1)}


def coordinate_offsets(mode: str, ratio: Fraction) -> tuple[Fraction, Fraction]:
    """Bounds of ``x - j/ratio``, where x is the source coordinate output position j maps to. ``align_corners``
    maps j to ``j*(n_in-1)/(n_out-1)``, which drifts from ``j/ratio`` by up to ``|1/ratio - 1|`` across the axis."""
    inv = 1 / ratio
    spread = {"asymmetric": [Fraction(0)], "half_pixel": [Fraction(0), (inv - 1) / 2],
              "pytorch_half_pixel": [Fraction(0), (inv - 1) / 2], "align_corners": [Fraction(0), inv - 1],
              "tf_half_pixel_for_nn": [Fraction(0), inv / 2]}.get(mode, [Fraction(-1), Fraction(1)])
    return min(spread), max(spread)


class NotAnalysable(Exception):
    """The graph holds an operation (or a use of one) whose reach is not known here; the message names it."""


@dataclass(frozen=True)
class Reach:
    """Along one input axis: position ``j`` of a tensor reads input voxels ``[scale*j + lo, scale*j + hi]``."""

    scale: Fraction = Fraction(1)
    lo: Fraction = Fraction(0)
    hi: Fraction = Fraction(0)

    def through(self, w: ZWindow, p_lo: int | None = None) -> "Reach":
        """After a convolution / pooling (``w.kind`` "conv") or transposed convolution ("transposed") window.
        ``p_lo``: a smaller begin padding that is also possible (derived padding), used for the low side."""
        a, r = self.scale, w.reach
        p_lo = w.p if p_lo is None else p_lo
        if w.kind == "conv":
            return Reach(a * w.s, self.lo - a * w.p, self.hi + a * (r - p_lo))
        return Reach(a / w.s, self.lo + a * Fraction(p_lo - r, w.s), self.hi + a * Fraction(w.p, w.s))

    def resampled(self, ratio: Fraction, lo: Fraction, hi: Fraction) -> "Reach":
        """After interpolation to ``ratio`` times the size, position j reading source voxels within
        ``[j/ratio + lo, j/ratio + hi]``."""
        a = self.scale
        return Reach(a / ratio, self.lo + a * lo, self.hi + a * hi)

    def shifted(self, begin: int) -> "Reach":
        """After padding ``begin`` voxels in front (position j then holds what j - begin held)."""
        return Reach(self.scale, self.lo - self.scale * begin, self.hi - self.scale * begin)

    def union(self, other: "Reach") -> "Reach":
        """What an element-wise operation of two such tensors reads (they must be at the same scale)."""
        if self.scale != other.scale:
            raise NotAnalysable(f"tensors at different scales ({self.scale} and {other.scale}) are combined")
        return Reach(self.scale, min(self.lo, other.lo), max(self.hi, other.hi))

    def radius(self) -> int:
        """Voxels an output position reaches on its farther side (at scale 1)."""
        return max(0, math.ceil(max(-self.lo, self.hi)))


@dataclass(frozen=True)
class Whole:
    """A tensor that reads the whole volume along some axis; ``why`` names the operation that made it so."""

    why: str


#: What a tensor reads: {tensor axis: (input spatial axis, Reach)}, or a :class:`Whole`.
State = Any


def _shape(out: ov.Output) -> list[int]:
    ps = out.get_partial_shape()
    if not ps.is_static:
        raise NotAnalysable(f"{out.get_node().get_type_name()} {out.get_node().get_friendly_name()} has a dynamic "
                            f"shape at the probe size")
    return [d.get_length() for d in ps]


def _constant(out: ov.Output) -> np.ndarray | None:
    node = out.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _kernel(op: ov.Node) -> list[int]:
    t = op.get_type_name()
    if t in ("MaxPool", "AvgPool"):
        return [int(k) for k in op.get_attributes()["kernel"]]
    return _shape(op.input_value(1))[-3:]


def _windows(op: ov.Node) -> list[tuple[ZWindow, int]]:
    """Per spatial axis of a window op: its ZWindow (padding at its largest possible begin value) and the smallest
    possible begin padding (they differ only where OpenVINO derives the padding: SAME, or an explicit output
    shape)."""
    a = op.get_attributes()
    n_in, n_out = _shape(op.input_value(0))[2:], _shape(op.output(0))[2:]
    k, s = _kernel(op), [int(v) for v in a["strides"]]
    d = [int(v) for v in a.get("dilations", [1] * len(k))]
    if len(k) != len(n_in) or len(s) != len(n_in):
        raise NotAnalysable(f"{op.get_type_name()} {op.get_friendly_name()} is not a 3-D window")
    transposed = "BackpropData" in op.get_type_name()
    pad_mode = str(a.get("auto_pad", "explicit")).lower()
    out = []
    for i in range(len(n_in)):
        reach = (k[i] - 1) * d[i]
        if transposed:
            total = (n_in[i] - 1) * s[i] + reach + 1 + int(a.get("output_padding", [0] * 3)[i]) - n_out[i]
        else:
            total = max((n_out[i] - 1) * s[i] + reach + 1 - n_in[i], 0)
        if pad_mode == "valid":
            lo = hi = 0
        elif pad_mode == "explicit" and not (transposed and op.get_input_size() > 2):
            lo = hi = int(a["pads_begin"][i])
        else:
            lo, hi = total // 2, total - total // 2
        out.append((ZWindow("transposed" if transposed else "conv", k[i], s[i], hi, d[i]), lo))
    return out


def _window(op: ov.Node, state: State) -> State:
    windows = _windows(op)
    new = {}
    for axis, (src, reach) in state.items():
        if axis < 2:
            raise NotAnalysable(f"{op.get_type_name()} {op.get_friendly_name()} folds space into channels")
        w, p_lo = windows[axis - 2]
        new[axis] = (src, reach.through(w, p_lo))
    return new


def _interpolate(op: ov.Node, state: State) -> State:
    n_in, n_out = _shape(op.input_value(0)), _shape(op.output(0))
    a = op.get_attributes()
    mode = str(a.get("mode", "")).lower()
    taps = NEAREST.get(str(a.get("nearest_mode", "")).lower(), (-1, 1)) if mode == "nearest" else TAPS.get(mode)
    if taps is None:
        raise NotAnalysable(f"Interpolate {op.get_friendly_name()} uses mode {mode!r}")
    out = {}
    for axis, (src, reach) in state.items():
        ratio = Fraction(n_out[axis], n_in[axis])
        lo, hi = coordinate_offsets(str(a.get("coordinate_transformation_mode", "")).lower(), ratio)
        out[axis] = (src, reach.resampled(ratio, lo + taps[0], hi + taps[1]))
    return out


def _transpose(op: ov.Node, state: State) -> State:
    perm = _constant(op.input_value(1))
    if perm is None:
        raise NotAnalysable(f"Transpose {op.get_friendly_name()} has a computed order")
    order = [int(v) for v in np.atleast_1d(perm)]
    return {new: state[old] for new, old in enumerate(order) if old in state}


def _reduce(op: ov.Node, state: State) -> State:
    """A reduction: global over a spatial axis, else the axes it keeps (``keep_dims`` or not)."""
    rank = len(_shape(op.input_value(0)))
    axes = _constant(op.input_value(1))
    if axes is None:
        return Whole(f"{op.get_type_name()} {op.get_friendly_name()} reduces over computed axes")
    reduced = {int(v) % rank for v in np.atleast_1d(axes)}
    if reduced & set(state):
        return Whole(f"{op.get_type_name()} {op.get_friendly_name()} reduces over space")
    if op.get_type_name() == "NormalizeL2" or op.get_attributes().get("keep_dims", False):
        return dict(state)
    return {axis - sum(r < axis for r in reduced): v for axis, v in state.items()}


def _elementwise(op: ov.Node, states: list[State | None]) -> State:
    """Union of the inputs' reaches, aligned as numpy broadcasting aligns axes (from the right)."""
    out_rank = len(_shape(op.output(0)))
    merged: dict[int, tuple[int, Reach]] = {}
    for port, st in enumerate(states):
        if st is None:
            continue
        shift = out_rank - len(_shape(op.input_value(port)))
        for axis, (src, reach) in st.items():
            key = axis + shift
            if key in merged:
                if merged[key][0] != src:
                    raise NotAnalysable(f"{op.get_type_name()} {op.get_friendly_name()} mixes spatial axes")
                reach = merged[key][1].union(reach)
            merged[key] = (src, reach)
    return merged


def _along(op: ov.Node, rank_port: int = 0) -> int:
    rank = len(_shape(op.input_value(rank_port)))
    return int(op.get_attributes()["axis"]) % rank


def _step(op: ov.Node, states: list[State | None]) -> State:
    """The state of ``op``'s output 0 from its inputs' states (None: not fed by the image)."""
    t, name = op.get_type_name(), op.get_friendly_name()
    whole = next((s for s in states if isinstance(s, Whole)), None)
    if whole is not None:
        return whole
    data = states[0]
    if t in WINDOW and t != "Interpolate":  # the stream counts interpolation as a window op; its reach is below
        if any(s is not None for s in states[1:]):
            raise NotAnalysable(f"{t} {name} computes its weights from the image")
        return _window(op, data)
    if t in FROZEN_NORMS:
        return dict(data)
    if t in ("Interpolate", "Transpose", "Pad") and any(s is not None for s in states[1:]):
        raise NotAnalysable(f"{t} {name} computes its parameters from the image")
    if t == "Interpolate":
        return _interpolate(op, data)
    if t == "Transpose":
        return _transpose(op, data)
    if t in REDUCTIONS:
        return _reduce(op, data)
    if t in ("Softmax", "LogSoftmax") and _along(op) in data:
        return Whole(f"{t} {name} normalises over space")
    if t == "Concat" and _along(op) in _elementwise(op, states):
        raise NotAnalysable(f"Concat {name} joins tensors along space")
    if t == "Pad":
        return _pad(op, data)
    if t in ("Reshape", "Squeeze", "Unsqueeze"):
        return _reshape(op, data)
    if t in ELEMENTWISE:
        return _elementwise(op, states)
    raise NotAnalysable(f"{t} {name}: its reach is not known (measured by perturbation instead)")


def _reshape(op: ov.Node, state: State) -> State:
    """A reshape that only adds or drops size-1 axes (a channels-last transpose of one channel becomes one):
    the axes of more than one voxel keep their order."""
    a, b = _shape(op.input_value(0)), _shape(op.output(0))
    ia, ob = [i for i, d in enumerate(a) if d != 1], [i for i, d in enumerate(b) if d != 1]
    if [a[i] for i in ia] != [b[i] for i in ob] or any(axis not in ia for axis in state):
        raise NotAnalysable(f"{op.get_type_name()} {op.get_friendly_name()} regroups space ({a} -> {b})")
    where = dict(zip(ia, ob))
    return {where[axis]: v for axis, v in state.items()}


def _pad(op: ov.Node, state: State) -> State:
    begin = _constant(op.input_value(1))
    if begin is None:
        raise NotAnalysable(f"Pad {op.get_friendly_name()} has computed pads")
    b = [int(v) for v in np.atleast_1d(begin)]
    return {axis: (src, reach.shifted(b[axis])) for axis, (src, reach) in state.items()}


def _walk(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> tuple[ov.Model, dict[Any, State]]:
    """Every tensor's state in ``model`` reshaped to ``tile`` (see the module text); the reshaped model."""
    m = model.clone()
    shape = Layout.of(layout).tensor_shape(channels, tile)
    try:
        m.reshape({m.input(0): ov.PartialShape(shape)})
    except Exception as e:  # noqa: BLE001 - the probe path reports shape problems in the user's terms
        raise NotAnalysable(f"the model rejects the shape {shape}: {e}") from None
    first = Layout.of(layout).spatial_axes[0]
    states: dict[Any, State] = {}
    param = m.input(0).get_node()
    states[(param.get_friendly_name(), 0)] = {first + i: (i, Reach()) for i in range(3)}
    for op in m.get_ordered_ops():
        t = op.get_type_name()
        if t in ("Parameter", "Constant", "Result", "ShapeOf"):
            continue
        ins = [states.get((i.get_source_output().get_node().get_friendly_name(), i.get_source_output().get_index()))
               for i in op.inputs()]
        if all(s is None for s in ins):
            continue  # constants and shape arithmetic
        state = _step(op, ins)
        for port in range(op.get_output_size()):
            states[(op.get_friendly_name(), port)] = state
    return m, states


def graph_radius(model: ov.Model, layout: str, channels: int, tile: Sequence[int],
                 output_index: int = 0) -> tuple[int, int, int] | Whole:
    """Receptive-field radius per tile axis of ``model`` (its single input reshaped to ``tile``), or a
    :class:`Whole` naming the operation that reads the whole volume (unbounded). Raises :class:`NotAnalysable`."""
    m, states = _walk(model, layout, channels, tile)
    src = m.output(output_index).get_node().input_value(0)
    final = states.get((src.get_node().get_friendly_name(), src.get_index()))
    if isinstance(final, dict) and sorted(_shape(src)[a] for a in final) != sorted(int(t) for t in tile):
        raise NotAnalysable(f"the output's spatial size {_shape(src)} differs from the input's {list(tile)}")
    return _radius(final)


def stride_period(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> tuple[int, int, int] | None:
    """Per tile axis, the input shift that moves every tensor of the model by whole positions: the least common
    multiple of the strides accumulated on the way (a stride-2 pooling: 2; four of them: 16). Crop tiles are exact
    only at offsets that are multiples of it (a tile starting at an odd voxel pools other pairs than whole-volume
    inference does). None when the graph is not analysable."""
    try:
        _, states = _walk(model, layout, channels, tile)
    except NotAnalysable:
        return shape_period(model, layout, channels)
    period = [1, 1, 1]
    for state in states.values():
        if isinstance(state, dict):
            for src, reach in state.values():
                period[src] = math.lcm(period[src], reach.scale.numerator)
    return tuple(period)  # type: ignore[return-value]


#: The input edge :func:`shape_period` infers shapes at (divisible by every power of two up to 128).
PERIOD_PROBE = 384


def shape_period(model: ov.Model, layout: str, channels: int) -> tuple[int, int, int] | None:
    """:func:`stride_period` for a graph arithmetic cannot follow (a GroupNorm exported as a Reshape that regroups
    space, an interpolation to a shape computed at run time), by shape inference: at :data:`PERIOD_PROBE` a side,
    then with one axis doubled, the dimensions of the tensors computed from the input that double with it are that
    axis (whatever the graph's internal layout); per axis, the least common multiple of the whole factors by which
    they are smaller than the input (two stride-2 poolings: 4). None when shape inference cannot say."""
    base = _fed_shapes(model, layout, channels, [PERIOD_PROBE] * 3)
    if base is None:
        return None
    period = [1, 1, 1]
    for a in range(3):
        tile = [PERIOD_PROBE] * 3
        tile[a] *= 2
        varied = _fed_shapes(model, layout, channels, tile)
        if varied is None:
            return None
        for key, dims in base.items():
            other = varied.get(key)
            if other is None or len(other) != len(dims):
                continue
            for n, m in zip(dims, other):
                if m == 2 * n and 1 < n < PERIOD_PROBE and PERIOD_PROBE % n == 0:
                    period[a] = math.lcm(period[a], PERIOD_PROBE // n)
    return tuple(period)  # type: ignore[return-value]


def _fed_shapes(model: ov.Model, layout: str, channels: int,
                tile: Sequence[int]) -> dict[tuple[str, int], list[int]] | None:
    """The static shapes of every tensor computed from the input (weights are 5-D too) with the input at ``tile``."""
    m = model.clone()
    try:
        m.reshape({m.input(0): ov.PartialShape(Layout.of(layout).tensor_shape(channels, list(tile)))})
    except Exception:  # noqa: BLE001  (a static or unusual input: nothing to infer)
        return None
    fed: set[str] = set()
    shapes: dict[tuple[str, int], list[int]] = {}
    for op in m.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() != "Parameter" and not any(
                i.get_source_output().get_node().get_friendly_name() in fed for i in op.inputs()):
            continue
        fed.add(name)
        for k, out in enumerate(op.outputs()):
            ps = out.get_partial_shape()
            if ps.is_static:
                shapes[(name, k)] = [d.get_length() for d in ps]
    return shapes


def _radius(final: State | None) -> tuple[int, int, int] | Whole:
    if final is None:
        raise NotAnalysable("the output does not depend on the input")
    if isinstance(final, Whole):
        return final
    by_axis = {src: reach for src, reach in final.values()}
    if sorted(by_axis) != [0, 1, 2] or any(r.scale != 1 for r in by_axis.values()):
        raise NotAnalysable("the output is not at the input's resolution along every axis")
    return tuple(by_axis[i].radius() for i in range(3))  # type: ignore[return-value]
