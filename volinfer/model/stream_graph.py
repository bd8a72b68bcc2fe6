"""A network cut into plane-streamable pieces: the model side of the layer-streaming engine.

Tiling recomputes every tile's margin, and a model that sees far (a U-Net's receptive field reaches 40+ voxels)
needs wide margins to be exact: the reference U-Net evaluates 4-6x the volume that way. Streaming the network
layer by layer along z computes every voxel of every layer once: each convolution keeps the few planes of its input
that its kernel still needs, skip connections keep the planes their decoder has not reached yet, and the output is
whole-volume inference, plane slab by plane slab, in memory that grows with the cross-section, not the volume.

This module reads an OpenVINO model and cuts it into *segments*: one z-window operation (convolution, transposed
convolution, pooling, interpolation) followed by the operations that act plane by plane (bias, activation, batch
norm, residual additions, concatenation over channels), or plane-by-plane operations alone. Each segment becomes its
own small OpenVINO model, compiled at a static number of planes, whose inputs and outputs are stored z-first (planes
outermost) so that any run of planes is one contiguous block shared with OpenVINO without copies. A model with an
operation that is not plane-local (InstanceNorm over the volume, reshapes, attention) is reported as not streamable
and runs tile by tile instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.passes import ConstantFolding, Manager

from .stride_phases import Phases, apply_chain, constant_value, interleave, per_channel_chain, phase_convolution

#: The model axis skewed bands cut into rows (x = 2, y = 3, z = 4: z is streamed; :mod:`volinfer.model.band_cut`).
YAXIS = 3
#: Operations that map each plane of their inputs to the same plane of their output (given constant operands that
#: do not vary along z): the ops a segment may carry after its z-window operation.
POINTWISE = frozenset("""
Abs Acos Acosh Add Asin Asinh Atan Atanh BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Ceiling Clamp Concat Convert
Cos Cosh Divide Elu Equal Erf Exp FakeConvert FakeQuantize Floor FloorMod Gelu Greater GreaterEqual HSigmoid HSwish
HardSigmoid Less LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr LogicalXor Maximum Minimum Mish Mod
Multiply Negative NotEqual PRelu Power Relu Round Select Selu Sigmoid Sign Sin Sinh SoftPlus SoftSign Softmax Sqrt
SquaredDifference Subtract Swish Tan Tanh
""".split())

#: Plane-local when they work along the channel axis only (their axes input, at this index, is [1]; reductions
#: keep dims): channel slices (``x[:, ::2]``), channel sums/means/maxima, channel L2 normalisation.
ALONG_CHANNELS = {"Slice": 4, "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1,
                  "ReduceL1": 1, "ReduceL2": 1, "NormalizeL2": 1}

#: Operations whose output plane j depends on a window of input planes along z.
WINDOW = frozenset(["Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                    "MaxPool", "AvgPool", "Interpolate"])


class NotStreamable(Exception):
    """The model has an operation (or a use of one) that the layer-streaming engine cannot run exactly."""


@dataclass(frozen=True)
class ZWindow:
    """How output planes of an operation depend on its input planes along z.

    ``kind`` "same": plane j from plane j. "conv": plane j from ``[j*s - p, j*s - p + (k-1)*d]``. "transposed":
    plane j from every i with ``i*s - p + m*d == j`` for some kernel tap m.
    """

    kind: str = "same"
    k: int = 1
    s: int = 1
    p: int = 0
    d: int = 1

    @property
    def reach(self) -> int:
        return (self.k - 1) * self.d

    def chunk_multiple(self) -> int:
        """Output chunks start on multiples of this (a transposed convolution's taps repeat every stride)."""
        return self.s if self.kind == "transposed" else 1

    def input_range(self, a: int, t: int) -> tuple[int, int]:
        """Input planes [lo, hi) that output planes [a, a+t) need (may reach below 0 or past the end: padding)."""
        if self.kind == "same":
            return a, a + t
        if self.kind == "conv":
            return a * self.s - self.p, (a + t - 1) * self.s - self.p + self.reach + 1
        lo = -((self.reach - self.p - a) // self.s)  # ceil((a + p - reach) / s)
        return lo, (a + t - 1 + self.p) // self.s + 1

    def input_planes(self, t: int) -> int:
        """How many input planes one chunk of ``t`` output planes reads (constant for aligned chunk starts)."""
        lo, hi = self.input_range(0, t)
        return hi - lo

    def local_offset(self, t: int) -> int:
        """Transposed: where output plane ``a`` lies in the chunk's un-padded local output (aligned ``a``)."""
        lo, _ = self.input_range(0, t)
        return self.p - lo * self.s if self.kind == "transposed" else 0

    def call_inputs(self, a: int, t: int) -> list[np.ndarray]:
        """Inputs a segment call takes besides its planes (an interpolation's source planes and weights)."""
        return []


#: Interpolate's coordinate transformations: output plane j -> source coordinate, given (j, scale, n_in, n_out), in
#: float32 as OpenVINO computes them (an axis whose scale is 1 or whose size does not change maps j to j).
_TRANSFORMS = {
    "half_pixel": lambda j, s, n, m: (j + np.float32(0.5)) / s - np.float32(0.5),
    "pytorch_half_pixel": lambda j, s, n, m: (j + np.float32(0.5)) / s - np.float32(0.5) if m > 1 else j * 0,
    "asymmetric": lambda j, s, n, m: j / s,
    "tf_half_pixel_for_nn": lambda j, s, n, m: (j + np.float32(0.5)) / s,
    "align_corners": lambda j, s, n, m: j * (np.float32(n - 1) / np.float32(m - 1)) if m > 1 else j * 0,
}


@dataclass(frozen=True)
class InterpWindow(ZWindow):
    """Interpolation along z: output plane j reads the source plane(s) at the coordinate the transform gives (two,
    weighted, for linear; one for nearest). The window moves with j at the scale's rate: a chunk of output planes
    reads the planes its coordinates span, at most :meth:`input_planes` of them (read from the lowest)."""

    kind: str = "interp"
    n_in: int = 1
    n_out: int = 1
    scale: float = 1.0  # the z scale the coordinates use (the op's scale; out/in when it is given sizes)
    linear: bool = True
    transform: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"
    plane: tuple[tuple[int, float, int], ...] = ()  # the other resized axes: (model axis, scale, output size)

    @functools.cached_property
    def sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every output plane: its two source planes and the second one's weight (nearest: one plane, 0)."""
        j = np.arange(self.n_out, dtype=np.float32)
        if self.scale == 1.0 or self.n_in == self.n_out:
            c = j
        else:
            c = _TRANSFORMS[self.transform](j, np.float32(self.scale), self.n_in, self.n_out).astype(np.float32)
        top = self.n_in - 1
        if self.linear:
            c = np.clip(c, 0, top)
            i0 = np.minimum(np.floor(c), top).astype(np.int64)
            return i0, np.minimum(i0 + 1, top), (c - i0).astype(np.float32)
        i0 = _nearest(c, self.nearest_mode, self.scale < 1)
        i0 = np.clip(i0, 0, top)
        return i0, i0, np.zeros(self.n_out, np.float32)

    def input_range(self, a: int, t: int) -> tuple[int, int]:
        if a >= self.n_out:
            return self.n_in, self.n_in + self.input_planes(t)
        lo = int(self.sources[0][a: a + t].min())
        return lo, lo + self.input_planes(t)

    def input_planes(self, t: int) -> int:
        return _spans(self.sources, self.n_out, t)

    def chunk_multiple(self) -> int:
        return 1

    def call_inputs(self, a: int, t: int) -> list[np.ndarray]:
        """Planes [a, a+t)'s source planes, relative to the chunk's first input plane, and weights (planes past
        the output's end repeat its last)."""
        lo = self.input_range(a, t)[0]
        j = np.minimum(np.arange(a, a + t), self.n_out - 1)
        i0, i1, w = (v[j] for v in self.sources)
        if not self.linear:
            return [(i0 - lo).astype(np.int32)]
        shape = (1, 1, t, 1, 1)
        return [(i0 - lo).astype(np.int32), (i1 - lo).astype(np.int32), (1 - w).reshape(shape), w.reshape(shape)]


@dataclass(frozen=True)
class ExcludePadWindow(ZWindow):
    """An average pooling that excludes padding: the segment pools over zero padding planes as if they counted, and
    each output plane is then scaled by ``k / (planes of its window inside the volume)`` (a per-call input). The
    in-plane count is OpenVINO's own: the divisor of a box is the product of its per-axis counts."""

    n_in: int = 1

    def call_inputs(self, a: int, t: int) -> list[np.ndarray]:
        taps = (np.arange(a, a + t) * self.s - self.p)[:, None] + np.arange(self.k)[None, :] * self.d
        inside = ((taps >= 0) & (taps < self.n_in)).sum(axis=1)
        return [(self.k / np.maximum(inside, 1)).astype(np.float32).reshape(1, 1, t, 1, 1)]


def _nearest(c: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    """Interpolate's nearest-plane rounding of source coordinates ``c`` (float32), as OpenVINO rounds them."""
    fl = np.floor(c)
    if mode == "round_prefer_floor":
        r = np.where(c == fl + np.float32(0.5), fl, np.floor(c + np.float32(0.5)))
    elif mode == "round_prefer_ceil":
        r = np.floor(c + np.float32(0.5))
    elif mode == "floor":
        r = fl
    elif mode == "ceil":
        r = np.ceil(c)
    else:  # "simple"
        r = np.ceil(c) if downsample else np.trunc(c)
    return r.astype(np.int64)


def _spans(sources: tuple[np.ndarray, np.ndarray, np.ndarray], n_out: int, t: int) -> int:
    """The most source planes any aligned chunk of ``t`` output planes reads."""
    i0, i1, _ = sources
    starts = np.arange(0, n_out, t)
    lo = np.minimum.reduceat(i0, starts)
    hi = np.maximum.reduceat(i1, starts)
    return int((hi - lo).max()) + 1


@dataclass
class StreamTensor:
    """One streamed tensor: an output port of the original model, its z-length and its shape z-first."""

    key: str
    n: int  # planes along z (after the model's own padding rules: its full-volume size)
    zaxis: int  # index of z in the tensor's own shape
    shape: tuple[int, ...]  # full shape in the model's order
    storage: str = "f32"  # how planes are kept between segments: f32, or the run's reduced precision (bf16/f16)
    channels_last: bool = True  # see :attr:`order`

    @property
    def ov_type(self) -> ov.Type:
        return {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}[self.storage]

    @property
    def np_dtype(self) -> Any:
        """numpy's type for the stored planes (bf16 has none: its bits are kept as uint16)."""
        return {"f32": np.float32, "bf16": np.uint16, "f16": np.float16}[self.storage]

    @property
    def order(self) -> list[int]:
        """The stored axis order, in the tensor's own (N, C, s0, s1, s2) indices: N, z, then the other spatial axes
        with channels innermost (OpenVINO's channels-last ``acdeb``: a segment's inputs and outputs need no
        reorder) — or, for the model's output (``channels_last`` False), channels before them (the float32 output
        leaves OpenVINO planar, and post-processing reads channels as planes)."""
        others = _others(self.zaxis)
        return [0, self.zaxis, *others, 1] if self.channels_last else [0, self.zaxis, 1, *others]

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Shape of one stored plane (the batch of 1 dropped): planes are stored ``(planes, *plane_shape)``, z
        outermost, so any run of planes is one contiguous block."""
        return tuple(self.shape[i] for i in self.order[2:])

    def model_view(self, planes: np.ndarray) -> np.ndarray:
        """Stored planes ``(planes, *plane_shape)`` as a view in the tensor's own (N, C, s0, s1, s2) order."""
        return np.transpose(planes[None], [self.order.index(a) for a in range(5)])

    @property
    def plane_bytes(self) -> int:
        return math.prod(self.plane_shape) * np.dtype(self.np_dtype).itemsize  # (math: called per segment call)


@dataclass
class Segment:
    """A z-window operation (``anchor``; None for plane-by-plane pieces) with the plane-by-plane operations after it.

    ``inputs``: (tensor key, dependency) — the anchor's data input depends through the anchor's window, every other
    input plane by plane. ``outputs``: tensors other segments (or the model's result) read.
    """

    index: int
    nodes: list[str] = field(default_factory=list)
    anchor: str | None = None
    window: ZWindow = ZWindow()
    pad_value: float = 0.0  # what the anchor's padding planes hold (0; -inf for max pooling)
    inputs: list[tuple[str, ZWindow]] = field(default_factory=list)  # the anchor's data input first, when anchored
    outputs: list[str] = field(default_factory=list)


@dataclass
class StreamGraph:
    """A model cut into segments, in an order where every segment's inputs come from earlier ones (or the input)."""

    model: ov.Model  # the original, reshaped to the whole padded volume (shapes for every tensor)
    input_key: str  # the first (usually only) input
    output_key: str
    tensors: dict[str, StreamTensor]
    segments: list[Segment]
    producer: dict[str, int]  # tensor key -> segment index (the inputs have none)
    inputs: list[str] = field(default_factory=list)  # every input, in the model's parameter order
    keep: list[str] = field(default_factory=list)  # tensors computed whole besides the output (checkpoints)

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = [self.input_key]

    def bands_exact(self, axis: int) -> bool:
        """Whether bands along model ``axis`` (with margins) compute what the whole extent does: not when an
        interpolation resizes that axis with align_corners (its coordinates scale with the extent) or by a factor
        that is not a whole number (up or down: coordinates shift by fractions of a voxel between bands)."""
        for seg in self.segments:
            if not isinstance(seg.window, InterpWindow):
                continue
            for ax, scale, _ in seg.window.plane:
                whole = min(abs(scale - round(scale)), abs(1 / scale - round(1 / scale))) < 1e-6
                if ax == axis and (seg.window.transform == "align_corners" or not whole):
                    return False
        return True

    def store_in(self, precision: str) -> None:
        """Keep the planes between segments in ``precision`` (a bf16/f16 run computes in it anyway: storing it
        halves the buffers and the memory traffic); the input and the output stay float32."""
        for key, ten in self.tensors.items():
            ten.storage = "f32" if key == self.output_key or key in self.inputs else precision
            ten.channels_last = key != self.output_key


def _key(out: ov.Output) -> str:
    return f"{out.get_node().get_friendly_name()}:{out.get_index()}"


def _is_const_like(node: ov.Node, streamed: set[str]) -> bool:
    return not any(_key(i.get_source_output()) in streamed for i in node.inputs())


def _window_of(node: ov.Node, zaxis: int) -> tuple[ZWindow, float]:
    """The z-window of a convolution/pooling/interpolation node whose data input has z at ``zaxis`` (spatial)."""
    t = node.get_type_name()
    a = node.get_attributes()
    si = zaxis - 2
    if t == "Interpolate":
        return _interp_window(node, zaxis), 0.0
    if si < 0:
        raise NotStreamable(f"{t} {node.get_friendly_name()} convolves over the axis volinfer streams along")
    if t == "AvgPool":
        return _avg_pool_window(node, zaxis), 0.0
    if t == "MaxPool":
        if node.get_output_size() > 1 and node.output(1).get_target_inputs():
            raise NotStreamable(f"MaxPool {node.get_friendly_name()} uses its indices output")
        d = int(a["dilations"][si]) if "dilations" in a else 1
        return ZWindow("conv", int(a["kernel"][si]), int(a["strides"][si]), int(a["pads_begin"][si]), d), \
            float("-inf")
    wshape = node.input(1).get_partial_shape()
    if wshape.is_dynamic:
        raise NotStreamable(f"{t} {node.get_friendly_name()} has dynamic weights")
    off = 3 if t.startswith("Group") else 2
    k = int(wshape[off + si].get_length())
    kind = "transposed" if "BackpropData" in t else "conv"
    if kind == "transposed" and node.get_input_size() > 2:
        raise NotStreamable(f"{t} {node.get_friendly_name()} takes an explicit output shape")
    return ZWindow(kind, k, int(a["strides"][si]), int(a["pads_begin"][si]), int(a["dilations"][si])), 0.0


def window_along(node: ov.Node, axis: int) -> ZWindow:
    """The window of a convolution/pooling/interpolation node along model ``axis`` (what its output rows along that
    axis read of its input)."""
    return _window_of(node, axis)[0]


def interp_axes(node: ov.Node) -> dict[int, tuple[float, int]]:
    """An Interpolate (v4 or v11) node's resized axes: axis -> (scale its coordinates use, output size). Raises
    NotStreamable for what the stream does not run (modes other than nearest/linear, padding, non-constant sizes)."""
    t, name, a = node.get_type_name(), node.get_friendly_name(), node.get_attributes()
    version = node.get_type_info().version_id
    if version not in ("opset4", "opset11") or a["mode"] not in ("nearest", "linear", "linear_onnx"):
        raise NotStreamable(f"{t} {name} ({version}, mode {a.get('mode')}) is not streamed (nearest and linear "
                            f"Interpolate v4/v11 are)")
    if any(a["pads_begin"]) or any(a["pads_end"]):
        raise NotStreamable(f"{t} {name} pads its input")
    rank = node.get_input_partial_shape(0).rank.get_length()
    by_scale = a["shape_calculation_mode"] == "scales"
    given = constant_value(node.input_value(2 if version == "opset4" and by_scale else 1))
    axes_port = 3 if version == "opset4" else 2
    axes = (constant_value(node.input_value(axes_port)) if node.get_input_size() > axes_port
            else np.arange(rank, dtype=np.float32))
    if given is None or axes is None:
        raise NotStreamable(f"{t} {name} takes sizes or scales computed at run time")
    n_in = [int(d.get_length()) for d in node.get_input_partial_shape(0)]
    n_out = [int(d.get_length()) for d in node.get_output_partial_shape(0)]
    out = {}
    for ax, v in zip((int(x) % rank for x in axes), given.reshape(-1)):
        scale = float(np.float32(v)) if by_scale else float(np.float32(n_out[ax]) / np.float32(n_in[ax]))
        out[ax] = (scale, n_out[ax])
    return out


def _interp_window(node: ov.Node, zaxis: int) -> InterpWindow:
    """The z-window of an Interpolate node (see :class:`InterpWindow`)."""
    a, name = node.get_attributes(), node.get_friendly_name()
    axes = interp_axes(node)
    if any(ax < 2 and n != node.get_input_partial_shape(0)[ax].get_length() for ax, (_, n) in axes.items()):
        raise NotStreamable(f"Interpolate {name} resizes the batch or channel axis")
    n_in = node.get_input_partial_shape(0)[zaxis].get_length()
    scale, n_out = axes.get(zaxis, (1.0, n_in))
    linear = a["mode"] != "nearest"
    if linear and a["antialias"] and n_out < n_in:
        raise NotStreamable(f"Interpolate {name} antialiases while shrinking z (a window wider than two planes)")
    plane = tuple((ax, sc, n) for ax, (sc, n) in sorted(axes.items()) if ax not in (0, 1, zaxis))
    return InterpWindow(n_in=n_in, n_out=n_out, scale=scale, linear=linear,
                        transform=a["coordinate_transformation_mode"], nearest_mode=a["nearest_mode"], plane=plane)


def _along_channels(node: ov.Node) -> None:
    """Raise unless ``node`` (one of :data:`ALONG_CHANNELS`) works along the channel axis only."""
    t, name = node.get_type_name(), node.get_friendly_name()
    port = ALONG_CHANNELS[t]
    axes = constant_value(node.input_value(port)) if node.get_input_size() > port else None
    rank = node.get_output_partial_shape(0).rank.get_length()
    if axes is None or rank != 5 or any(int(a) % rank != 1 for a in axes.reshape(-1)):
        raise NotStreamable(f"{t} {name} works across space (volinfer streams it along channels only)")
    if t.startswith("Reduce") and not node.get_attributes().get("keep_dims", False):
        raise NotStreamable(f"{t} {name} drops the channel axis")


def _avg_pool_window(node: ov.Node, zaxis: int) -> ZWindow:
    """An AvgPool's z-window. Padding planes are supplied as zeros: averages that count them need nothing more;
    averages that exclude them (``exclude_pad``) are rescaled per output plane (:class:`ExcludePadWindow`). A
    window reaching past the padding (ceil rounding) would average a count OpenVINO defines its own way: refused."""
    a, si = node.get_attributes(), zaxis - 2
    k, s, pb = int(a["kernel"][si]), int(a["strides"][si]), int(a["pads_begin"][si])
    n_in = node.get_input_partial_shape(0)[zaxis].get_length()
    n_out = node.get_output_partial_shape(0)[zaxis].get_length()
    if (n_out - 1) * s - pb + k > n_in + int(a["pads_end"][si]):
        raise NotStreamable(f"AvgPool {node.get_friendly_name()} averages windows past its padding (ceil rounding)")
    if a["exclude-pad"] and (pb or a["pads_end"][si] or (n_out - 1) * s - pb + k > n_in):
        return ExcludePadWindow("conv", k, s, pb, n_in=n_in)
    return ZWindow("conv", k, s, pb)


def _pointwise_ok(node: ov.Node, zaxes: list[int | None], zlen: int) -> None:
    """Raise unless ``node`` maps planes to planes: streamed inputs share z; other operands do not vary along z."""
    t = node.get_type_name()
    za = [z for z in zaxes if z is not None]
    if len(set(za)) != 1:
        raise NotStreamable(f"{t} {node.get_friendly_name()} mixes tensors streamed along different axes")
    z = za[0]
    out_rank = node.get_output_partial_shape(0).rank.get_length()
    for i, inp in enumerate(node.inputs()):
        shp = inp.get_partial_shape()
        if zaxes[i] is not None:
            if shp.rank.get_length() != out_rank or shp[z].get_length() != zlen:
                raise NotStreamable(f"{t} {node.get_friendly_name()} broadcasts a streamed tensor along z")
            continue
        if t in ("Concat", "Softmax", "LogSoftmax") or (t == "FakeQuantize" and i == 0) or t in ALONG_CHANNELS:
            continue
        r = shp.rank.get_length()
        if t == "PRelu" and r == 1:  # a 1-D slope broadcasts along the channel axis (PReLU's own rule)
            continue
        for ax in range(2, out_rank):
            pos = ax - (out_rank - r)
            if pos >= 0 and shp[pos].get_length() != 1:
                raise NotStreamable(f"{t} {node.get_friendly_name()} has an operand that varies over space")
    a = node.get_attributes()
    if t in ("Concat", "Softmax", "LogSoftmax") and (int(a["axis"]) % out_rank) >= 2:
        raise NotStreamable(f"{t} {node.get_friendly_name()} works across space (axis {a['axis']})")


def analyse(model: ov.Model, full_shape: list[int] | None, zaxis: int, output_index: int = 0,
            same_size: bool = True, keep: tuple[int, ...] = ()) -> StreamGraph:
    """Cut ``model`` (z at ``zaxis`` of its inputs) into segments computing its output ``output_index`` (the
    operations other outputs alone need are left out: a deep-supervision model streams the output the run asks
    for); ``full_shape``: the whole padded volume's input shape (None: a model whose inputs are static already,
    e.g. a sub-network reading several tensors of a network, :mod:`volinfer.run.stream_stats`). Raises
    :class:`NotStreamable` naming the first operation that cannot be streamed. ``same_size``: the output must keep
    the input's spatial size (a run's output does; a sub-network ending inside the model, e.g. at a normalisation
    layer's input, need not). ``keep``: other outputs computed whole alongside (:attr:`StreamGraph.keep`, in that
    order; one that is an input is that input)."""
    model = _at_shape(model, full_shape)
    out = model.output(output_index).get_node().input_value(0)
    cut = _Cutter([p.output(0) for p in model.get_parameters()], zaxis)
    kept = [model.output(i).get_node().input_value(0) for i in keep]
    needed = set().union(*(_ancestors(o.get_node()) for o in [out, *kept]))
    for node in model.get_ordered_ops():
        if node.get_friendly_name() in needed:
            cut.add(node)
    out_key = _key(out)
    if out_key not in cut.zof or any(_key(o) not in cut.zof for o in kept):
        raise NotStreamable("the model's output does not depend on its input")
    shape = cut.tensor(out).shape  # (registers the output tensor)
    for o in kept:
        cut.tensor(o)
    if same_size and full_shape is not None and shape[2:] != tuple(full_shape[2:]):
        raise NotStreamable(f"the model's output {list(shape)} does not keep its input's spatial size "
                            f"{list(full_shape)}")
    _set_outputs(model, cut.segments, cut.seg_of, [out_key, *map(_key, kept)])
    producer = {k: s.index for s in cut.segments for k in s.outputs}
    return StreamGraph(model, cut.inputs[0], out_key, cut.tensors, cut.segments, producer, cut.inputs,
                       [_key(o) for o in kept])


def _at_shape(model: ov.Model, full_shape: list[int] | None) -> ov.Model:
    """A copy of ``model`` at the whole volume's static shape (None: as it is), its nodes named ``vi<i>`` (unique),
    interpolation values computed from shapes folded to constants (:func:`_fold_shapes`)."""
    model = model.clone()
    for i, node in enumerate(model.get_ordered_ops()):
        node.set_friendly_name(f"vi{i}")
    try:
        if full_shape is not None:
            model.reshape({model.input(0): ov.PartialShape(full_shape)})
        _fold_shapes(model)  # shape inference of folded values can refuse the shape too (a static input)
    except Exception as e:  # noqa: BLE001  (the tile path reports shape errors with the user's sizes)
        raise NotStreamable(f"the model rejects the whole-volume shape {full_shape}: "
                            f"{str(e).strip().splitlines()[0][:200]}") from None
    return model


def _fold_shapes(model: ov.Model) -> None:
    """Values computed from shapes (ONNX Resize sizes: ShapeOf -> Gather; ONNX biases reshaped to a rank read from
    their convolution's shape) and small f16-compressed constants (interpolation scales: shape inference does not
    see through their Convert) replaced by constants at the model's static shape. Folding the whole model would
    also turn f16-compressed weights into float32 copies, twice their memory: those stay."""
    if not {op.get_type_name() for op in model.get_ordered_ops()} & {"ShapeOf", "Interpolate"}:
        return  # nothing computed from shapes (and folding a clone at a 2048³ shape ran out of memory)
    folded = model.clone()
    folding = Manager()
    folding.register_pass(ConstantFolding())
    folding.run_passes(folded)
    twins = {n.get_friendly_name(): n for n in folded.get_ordered_ops()}
    for node in model.get_ordered_ops():
        twin = twins.get(node.get_friendly_name())
        if twin is None or twin.get_type_name() == "Constant" or twin.get_input_size() != node.get_input_size():
            continue
        for i in range(node.get_input_size()):
            value = twin.input_value(i).get_node()
            if value.get_type_name() != "Constant" or node.input_value(i).get_node().get_type_name() == "Constant":
                continue
            if int(np.prod(value.get_output_shape(0))) <= 16 or constant_value(node.input_value(i)) is None:
                node.input(i).replace_source_output(ops.constant(value.get_data().copy()).output(0))
    model.validate_nodes_and_infer_types()


def _ancestors(node: ov.Node) -> set[str]:
    """Names of ``node`` and every node it depends on."""
    seen: set[str] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n.get_friendly_name() not in seen:
            seen.add(n.get_friendly_name())
            todo.extend(i.get_source_output().get_node() for i in n.inputs())
    return seen


class _Cutter:
    """Builds the segments node by node, in topological order: a z-window operation opens a segment, plane-local
    operations join the latest segment their streamed inputs come from."""

    def __init__(self, sources: list[ov.Output], zaxis: int) -> None:
        self.inputs = [_key(s) for s in sources]
        self.zof: dict[str, int] = {k: zaxis for k in self.inputs}  # streamed tensor -> its z axis
        self.tensors: dict[str, StreamTensor] = {}
        self.seg_of: dict[str, int] = {}  # node name -> segment index
        self.segments: list[Segment] = []
        for s in sources:
            self.tensor(s)

    def tensor(self, out: ov.Output) -> StreamTensor:
        """The streamed tensor of ``out`` (made on first use, its shape checked)."""
        k = _key(out)
        if k not in self.tensors:
            shp = tuple(int(d) for d in out.get_shape())
            what = f"{out.get_node().get_type_name()} {out.get_node().get_friendly_name()}"
            if len(shp) != 5 or self.zof[k] < 2 or shp[0] != 1:
                raise NotStreamable(f"{what} makes a tensor that is not (1, C, D, H, W)")
            if 0 in shp:
                raise NotStreamable(f"{what} makes an empty tensor {list(shp)} at this volume's size")
            self.tensors[k] = StreamTensor(k, shp[self.zof[k]], self.zof[k], shp)
        return self.tensors[k]

    def add(self, node: ov.Node) -> None:
        t, name = node.get_type_name(), node.get_friendly_name()
        if t in ("Parameter", "Constant", "Result") or _is_const_like(node, set(self.zof)):
            return
        srcs = [i.get_source_output() for i in node.inputs()]
        zaxes = [self.zof.get(_key(s)) for s in srcs]
        if node.get_output_size() != 1 and t != "MaxPool":
            raise NotStreamable(f"{t} {name} has several outputs")
        if t in WINDOW:
            if zaxes[0] is None or any(z is not None for z in zaxes[1:]):
                raise NotStreamable(f"{t} {name} takes streamed weights")
            window, pad = _window_of(node, zaxes[0])
            self.segments.append(Segment(len(self.segments), [name], name, window, pad, [(_key(srcs[0]), window)]))
            self.seg_of[name] = len(self.segments) - 1
            self.tensor(srcs[0])
            self.zof[_key(node.output(0))] = zaxes[0]
            return
        if t in ALONG_CHANNELS:
            _along_channels(node)
        elif t not in POINTWISE:
            raise NotStreamable(f"{t} {name} is not plane-local (volinfer streams convolutions, pooling, "
                                f"interpolation, transposed convolutions and element-wise operations)")
        streamed = [s for s, zz in zip(srcs, zaxes) if zz is not None]
        _pointwise_ok(node, zaxes, self.tensor(streamed[0]).n)
        self.zof[_key(node.output(0))] = next(z for z in zaxes if z is not None)
        self._join(name, streamed)

    def _join(self, name: str, streamed: list[ov.Output]) -> None:
        """Put plane-local node ``name`` in the latest segment its ``streamed`` inputs come from (a new one when
        they all come from the input); inputs from other segments become that segment's plane-by-plane inputs."""
        owners = [self.seg_of.get(s.get_node().get_friendly_name()) for s in streamed]
        host = max((o for o in owners if o is not None), default=None)
        if host is None:
            self.segments.append(Segment(len(self.segments), [name]))
            host = len(self.segments) - 1
        else:
            self.segments[host].nodes.append(name)
        self.seg_of[name] = host
        seg = self.segments[host]
        for s, o in zip(streamed, owners):
            tail = seg.inputs[1:] if seg.anchor is not None else seg.inputs
            if o != host and (_key(s), ZWindow()) not in tail:
                seg.inputs.append((_key(s), ZWindow()))
                self.tensor(s)


def _set_outputs(model: ov.Model, segments: list[Segment], seg_of: dict[str, int], out_keys: list[str]) -> None:
    """Each segment's outputs: its tensors read by another segment or by the model's results (``out_keys``)."""
    read: set[str] = set(out_keys)
    for seg in segments:
        read.update(k for k, _ in seg.inputs)
    for seg in segments:
        for name in seg.nodes:
            k = f"{name}:0"
            if k in read and k not in seg.outputs:
                seg.outputs.append(k)


def _others(zaxis: int) -> list[int]:
    return [a for a in (4, 3, 2) if a != zaxis]


def _orders(zaxis: int) -> tuple[list[int], list[int]]:
    """For a native (N, C, s0, s1, s2) tensor streamed along ``zaxis``: the axis order a segment computes in (z
    the outermost spatial axis: OpenVINO's kernels vectorise along the innermost one, which must stay wide), and its
    spatial axes as native spatial indices (how the anchor's weights and attributes are permuted)."""
    q = [0, 1, zaxis, *_others(zaxis)]
    return q, [a - 2 for a in q[2:]]


def build_segment_model(graph: StreamGraph, seg: Segment, t: int, cut: Any = None) -> ov.Model:
    """The segment as a model computing ``t`` output planes: z-first inputs of the planes its window reads (padding
    planes included, supplied by the caller), z-first outputs of exactly ``t`` planes each.

    Inside, every tensor is in (N, C, z, s, s) order, the anchor's weights and attributes permuted to match:
    convolution commutes with a consistent permutation of its input's and its kernel's axes. ``cut`` (a
    :class:`volinfer.model.band_cut.SegmentCut`, with ``graph`` and ``seg`` as that band computes them): each input
    the rows the segment reads of its held rows, padding rows added where the volume ends; the anchor without its y
    padding; each output the segment's own rows."""
    model = graph.model.clone()
    nodes = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    zaxis = graph.tensors[seg.inputs[0][0]].zaxis
    q, sp = _orders(zaxis)
    pads_rows = cut is not None and pads_rows_itself(nodes.get(seg.anchor), seg)
    params = _segment_inputs(graph, seg, t, cut, _input_ports(seg, nodes), pads_rows)
    sliced: dict[str, Any] = {}  # outputs reworked for the chunk (a Phases: stride phases not yet interleaved)
    if isinstance(seg.window, InterpWindow):
        sliced = _interp_anchor(nodes[seg.anchor], seg.window, t, q, params)
    elif seg.anchor is not None:
        sliced = _permute_anchor(nodes[seg.anchor], seg, t, sp, params, cut, pads_rows)
    results = []
    for key in seg.outputs:
        name, idx = key.rsplit(":", 1)
        out = sliced.get(key) or nodes[name].output(int(idx))
        ph = out if isinstance(out, Phases) else None
        out = ph.out if ph is not None else out
        if out.get_element_type() != graph.tensors[key].ov_type:
            out = ops.convert(out, graph.tensors[key].ov_type).output(0)
        to_r = [q.index(a) for a in graph.tensors[key].order]
        if ph is not None:  # stride phases: interleaved straight into the stored order
            results.append(ops.result(interleave(replace(ph, out=out), to_r)))
            continue
        results.append(ops.result(ops.transpose(out, ops.constant(np.array(to_r, np.int64)))))
    sub = ov.Model(results, params, f"segment{seg.index}")  # an interpolation's call inputs after the planes
    sub.validate_nodes_and_infer_types()
    for res, key in zip(sub.outputs, seg.outputs):
        want = [1, t, *_with_rows(graph.tensors[key], cut.rows[1] - cut.rows[0] if cut is not None else None)]
        if list(res.get_shape()) != want:
            raise NotStreamable(f"segment {seg.index} computes {list(res.get_shape())} for {key}, expected {want}")
    return sub


def _segment_inputs(graph: StreamGraph, seg: Segment, t: int, cut: Any, ports: list[tuple[ov.Input, int]],
                    anchor_pads_rows: bool = False) -> list[ov.Node]:
    """The segment model's parameters, one per input (see :func:`build_segment_model`), each wired to the ports
    that read it: converted where a port takes another type, transposed to (N, C, z, s, s). Padding rows are
    concatenated where a band's input needs them, except to the anchor's input when ``anchor_pads_rows`` (it pads
    them itself)."""
    zaxis = graph.tensors[seg.inputs[0][0]].zaxis
    q, _ = _orders(zaxis)
    params = []
    for j, (key, win) in enumerate(seg.inputs):
        ten = graph.tensors[key]
        if ten.zaxis != zaxis:
            raise NotStreamable(f"segment {seg.index} mixes tensors streamed along different axes")
        planes = win.input_planes(t) if win.kind != "same" else t
        ic = cut.inputs[j] if cut is not None else None
        p = ops.parameter([1, planes, *_with_rows(ten, None if ic is None else ic.hi - ic.lo)], ten.ov_type,
                          name=f"in{j}")
        src = p.output(0)
        if ic is not None and (ic.pad_before or ic.pad_after) and not (anchor_pads_rows and j == 0):
            src = _pad_rows(src, ic, ten, seg.pad_value if seg.anchor is not None and j == 0 else 0.0)
        made: dict[Any, ov.Output] = {}
        for inp, jj in ports:
            if jj == j:
                want = inp.get_element_type()
                if want not in made:  # convert, then transpose: OpenVINO folds the transpose into its reorder
                    cast = src if want == ten.ov_type else ops.convert(src, want).output(0)
                    to_q = [ten.order.index(a) for a in q]
                    made[want] = ops.transpose(cast, ops.constant(np.array(to_q, np.int64))).output(0)
                inp.replace_source_output(made[want])
        params.append(p)
    return params




def _with_rows(ten: StreamTensor, rows: int | None) -> list[int]:
    """``ten``'s stored plane shape, with ``rows`` rows along y (None: as it is)."""
    shape = list(ten.plane_shape)
    if rows is not None:
        shape[ten.order.index(YAXIS) - 2] = rows
    return shape


def _pad_rows(rows: ov.Output, cut: Any, ten: StreamTensor, pad: float) -> ov.Output:
    """A band's rows of an input (z-first, stored order) with ``cut.pad_before`` and ``cut.pad_after`` padding rows
    of value ``pad`` around them, along the stored y axis (where the volume ends)."""
    axis = ten.order.index(YAXIS)
    shape = [int(d) for d in rows.get_shape()]
    pieces: list[ov.Output] = []
    for n in (cut.pad_before, -1, cut.pad_after):
        if n == -1:
            pieces.append(rows)
        elif n > 0:
            shp = list(shape)
            shp[axis] = n
            value = ops.convert(ops.constant(np.array(pad, np.float32)), ten.ov_type)
            pieces.append(ops.broadcast(value, ops.constant(np.array(shp, np.int64))).output(0))
    return ops.concat(pieces, axis).output(0)


def _input_ports(seg: Segment, nodes: dict[str, ov.Node]) -> list[tuple[ov.Input, int]]:
    """(consumer input, segment input index) for every edge into the segment: the anchor's data input reads input
    0; every other member reads the tensors plane by plane."""
    ports = []
    for j, (key, _) in enumerate(seg.inputs):
        src_name, src_idx = key.rsplit(":", 1)
        anchor_input = seg.anchor is not None and j == 0
        for name in ([seg.anchor] if anchor_input else seg.nodes):
            for inp in nodes[name].inputs():
                is_anchor_data = name == seg.anchor and inp.get_index() == 0
                if is_anchor_data != anchor_input:
                    continue
                so = inp.get_source_output()
                if so.get_node().get_friendly_name() == src_name and so.get_index() == int(src_idx):
                    ports.append((inp, j))
    return ports


def pads_rows_itself(anchor: ov.Node | None, seg: Segment) -> bool:
    """Whether ``seg``'s anchor pads its input with what the padding rows a band adds would hold (a convolution's
    zeros, max pooling's -inf, an average that counts its padding): then a band keeps the anchor's own padding
    along y where the volume ends, which is free, instead of concatenating padding rows, which copies the input."""
    if anchor is None or isinstance(seg.window, (InterpWindow, ExcludePadWindow)) or seg.window.kind == "transposed":
        return False
    kind, a = anchor.get_type_name(), anchor.get_attributes()
    if kind in ("Convolution", "GroupConvolution"):
        return seg.pad_value == 0.0
    if a.get("rounding_type", "floor").lower() != "floor":  # (ceil modes differ on windows starting in padding)
        return False
    if kind == "MaxPool":
        return seg.pad_value == -np.inf
    return kind == "AvgPool" and not a.get("exclude-pad", True) and seg.pad_value == 0.0


def _permute_anchor(node: ov.Node, seg: Segment, t: int, sp: list[int], params: list[ov.Node], cut: Any = None,
                    pads_rows: bool = False) -> dict[str, Any]:
    """Run the anchor in (N, C, z, s, s) order without z padding (the caller supplies padding planes); a transposed
    convolution's output is sliced to the ``t`` planes the chunk owns, an exclude-pad average rescaled per plane
    (its factors a call input appended to ``params``). Returns replaced outputs by tensor key. (Pooling keeps its
    rounding: a chunk's input planes hold exactly its windows, so floor and ceil agree along z.)"""
    kind = node.get_type_name()
    a = node.get_attributes()
    for name in ("strides", "dilations", "pads_begin", "pads_end", "kernel", "output_padding"):
        if name in a and len(a[name]) == 3:
            v = [a[name][i] for i in sp]
            if name in ("pads_begin", "pads_end", "output_padding"):
                v[0] = 0
                if cut is not None:  # a band's rows: its own padding where the volume ends, or rows supplied
                    edge = {"pads_begin": cut.inputs[0].pad_before, "pads_end": cut.inputs[0].pad_after}
                    v[sp.index(1)] = edge.get(name, 0) if pads_rows else 0
            node.set_attribute(name, v)
    if "auto_pad" in a:
        node.set_attribute("auto_pad", "explicit")
    w, perm = None, None
    if kind not in ("MaxPool", "AvgPool"):
        lead = 3 if kind.startswith("Group") else 2
        perm = list(range(lead)) + [lead + i for i in sp]
        w = node.input_value(1)
        node.input(1).replace_source_output(ops.transpose(w, ops.constant(np.array(perm, np.int64))).output(0))
    node.validate_and_infer_types()
    if isinstance(seg.window, ExcludePadWindow):
        factor = ops.parameter([1, 1, t, 1, 1], ov.Type.f32, name="exclude_pad_factor")
        params.append(factor)
        ftype = node.get_output_element_type(0)
        scale = factor if ftype == ov.Type.f32 else ops.convert(factor, ftype)
        return _rewire(node, ops.multiply(node.output(0), scale).output(0))
    if seg.window.kind != "transposed":
        return {}
    consumers = list(node.output(0).get_target_inputs())  # before the slices below add their own
    band = None if cut is None else (sp.index(1), cut.offset, cut.offset + cut.rows[1] - cut.rows[0])
    ph = phase_convolution(node, w, perm, seg.window.p, band) if w is not None and _use_phases(node) else None
    if ph is not None and ph.crop[0] == (0, t):
        chain = per_channel_chain(node, set(seg.nodes), seg.outputs)
        if chain is not None:  # interleaved once, into the stored order (build_segment_model)
            return {seg.outputs[0]: apply_chain(ph, chain)}
        return _rewire(node, interleave(ph, [0, 1, 2, 3, 4]), consumers)
    off = seg.window.local_offset(t)
    sl = _z_phases(node, seg.window, t)
    if sl is None:
        sl = ops.slice(node.output(0), np.array([off], np.int64), np.array([off + t], np.int64),
                       np.array([1], np.int64), np.array([2], np.int64)).output(0)
    if cut is not None:  # the band's own rows of the transposed output
        y = 2 + sp.index(1)
        sl = ops.slice(sl, np.array([cut.offset], np.int64), np.array([cut.offset + cut.rows[1] - cut.rows[0]], np.int64),
                       np.array([1], np.int64), np.array([y], np.int64)).output(0)
    return _rewire(node, sl, consumers)


def _rewire(node: ov.Node, out: ov.Output, consumers: list[ov.Input] | None = None) -> dict[str, ov.Output]:
    """Every consumer of ``node``'s output (``consumers``: those it had before ``out`` was built from it) reads
    ``out`` instead (the node's output, reworked for the chunk)."""
    for tin in consumers if consumers is not None else list(node.output(0).get_target_inputs()):
        if tin.get_node() != out.get_node():
            tin.replace_source_output(out)
    return {f"{node.get_friendly_name()}:0": out}


def _interp_anchor(node: ov.Node, win: InterpWindow, t: int, q: list[int],
                   params: list[ov.Node]) -> dict[str, ov.Output]:
    """An Interpolate in (N, C, z, s, s) order, made of its z part and its in-plane part (both interpolations are
    separable, so this is the same arithmetic): along z, the ``t`` output planes gather their source planes from
    the chunk's input planes and weigh them (indices and weights are inputs of every call, appended to ``params``:
    :meth:`InterpWindow.call_inputs`); in-plane, OpenVINO's own Interpolate on the other axes, same attributes."""
    a = node.get_attributes()
    data = node.input_value(0)
    ftype = data.get_element_type()
    names = ["index0"] if not win.linear else ["index0", "index1", "weight0", "weight1"]
    extra = [ops.parameter([t] if n.startswith("index") else [1, 1, t, 1, 1],
                           ov.Type.i32 if n.startswith("index") else ov.Type.f32, name=n) for n in names]
    params.extend(extra)
    axis = ops.constant(np.array(2, np.int64))
    z = ops.gather(data, extra[0], axis).output(0)
    if win.linear:
        w0, w1 = (w if ftype == ov.Type.f32 else ops.convert(w, ftype) for w in extra[2:])
        z = ops.add(ops.multiply(z, w0), ops.multiply(ops.gather(data, extra[1], axis), w1)).output(0)
    plane = {q.index(ax): (sc, n) for ax, sc, n in win.plane}
    if plane:
        by_scale = a["shape_calculation_mode"] == "scales"
        axes = sorted(plane)
        given = (np.array([plane[ax][0] for ax in axes], np.float32) if by_scale
                 else np.array([plane[ax][1] for ax in axes], np.int64))
        z = ops.interpolate(z, ops.constant(given), a["mode"], a["shape_calculation_mode"], [0] * 5, [0] * 5,
                            a["coordinate_transformation_mode"], a["nearest_mode"], a["antialias"], a["cube_coeff"],
                            ops.constant(np.array(axes, np.int64))).output(0)
    return _rewire(node, z)


def _use_phases(node: ov.Node) -> bool:
    return int(node.get_output_partial_shape(0)[1].get_length()) <= PHASE_MAX_CHANNELS


#: Transposed convolutions with at most this many output channels run as their stride phases (see
#: :mod:`volinfer.model.stride_phases`). Measured per call, 2 planes, bf16, reference U-Net: 32->2 channels at 512²
#: 14.4 -> 5.6 ms as DepthToSpace phases, 2.2 ms as phases aligned on the chunk with the bias and PReLU on the
#: phases; 64->16 at 256² 6.9 ms as z phases against 15.2-15.7 ms as aligned stride phases (busy machine; a k3 s2
#: kernel's phases hold 2.4x its taps, zeros included: worth it only where OpenVINO's own transposed kernel is slow,
#: with few output channels; k2 s2 ones, 64->32 to 256->128 channels, idle: no faster than OpenVINO's own). Wider
#: ones run as their z phases (:func:`_z_phases`), which halves the work of a k3 s2 kernel over 2-plane chunks:
#: 64->16 channels at 256², bf16, 7.35 -> 3.50 ms per call.
PHASE_MAX_CHANNELS = 8


def _z_phases(node: ov.Node, win: ZWindow, t: int) -> ov.Output | None:
    """A transposed convolution (already in (N, C, z, s, s) order, no z padding) computing exactly the chunk's
    ``t`` output planes: along z, output plane ``o`` with ``o + p = s*Q + R`` sums ``x[Q - l] * w[R + s*l]``, so
    each z phase ``R`` is a transposed convolution of stride 1 along z over the taps ``R, R+s, ...`` (in-plane the
    node's own strides, pads and kernel), cropped to ``t/s`` planes; the phases interleave into the chunk. The
    node's own kernel over the chunk's input planes would compute every phase of every input plane, most of it
    outside the chunk (2 planes computed per plane kept for a kernel of 3, stride 2). None where it does not apply
    (dilation along z, a chunk not a multiple of the stride, a phase without taps)."""
    s, p, k = win.s, win.p, win.k
    if s < 2 or win.d != 1 or t % s or node.get_input_size() != 2 or win.input_planes(t) <= t // s:
        return None  # (the last: the node's kernel computes no plane outside the chunk, e.g. kernel 2, stride 2)
    a = node.get_attributes()
    group = node.get_type_name().startswith("Group")
    kz = 3 if group else 2
    data, weights = node.input_value(0), node.input_value(1)
    lo_rel = -((win.reach - p) // s)  # lo - a/s for an aligned chunk start a
    n = t // s
    outs = []
    for j in range(s):
        r = (p + j) % s
        taps = list(range(r, k, s))
        if not taps:
            return None
        big_l = len(taps)
        start = (p + j - r) // s - (big_l - 1) - lo_rel
        x = _z_slice(data, start, start + n + big_l - 1)
        wj = ops.gather(weights, ops.constant(np.array(taps, np.int64)), ops.constant(np.array(kz, np.int64)))
        pads_b = [big_l - 1] + [int(v) for v in a["pads_begin"]][1:]
        pads_e = [big_l - 1] + [int(v) for v in a["pads_end"]][1:]
        strides = [1] + [int(v) for v in a["strides"]][1:]
        dil = [1] + [int(v) for v in a["dilations"]][1:]
        outp = [0] + [int(v) for v in a["output_padding"]][1:]
        make = ops.group_convolution_backprop_data if group else ops.convolution_backprop_data
        y = make(x, wj, strides, None, pads_b, pads_e, dil, "explicit", outp)
        outs.append(y.output(0))
    # interleave along z (plane a + s*u + j is phase j's plane u) with one concatenation of single planes, which
    # keeps OpenVINO's blocked layout (a new axis and a reshape would cost a reorder of the whole chunk)
    pieces = outs if n == 1 else [_z_slice(o, u, u + 1) for u in range(n) for o in outs]
    return ops.concat(pieces, 2).output(0)


def _z_slice(data: ov.Output, lo: int, hi: int) -> ov.Output:
    """Planes ``[lo, hi)`` along axis 2; taken before a transposition that feeds ``data`` (so OpenVINO still folds
    the transposition into the reorder to its convolution layout)."""
    node = data.get_node()
    order = constant_value(node.input_value(1)) if node.get_type_name() == "Transpose" else None
    axis, src = (2, data) if order is None else (int(order[2]), node.input_value(0))
    sl = ops.slice(src, np.array([lo], np.int64), np.array([hi], np.int64), np.array([1], np.int64),
                   np.array([axis], np.int64)).output(0)
    return sl if order is None else ops.transpose(sl, node.input_value(1)).output(0)
