"""A network cut into plane-streamable pieces: the model side of the layer-streaming engine.

Tiling recomputes every tile's margin, and a model that sees far (a U-Net's receptive field reaches 40+ voxels)
needs wide margins to be exact: the reference U-Net evaluates 4-6x the volume that way. Streaming the network
layer by layer along z computes every voxel of every layer once: each convolution keeps the few planes of its input
that its kernel still needs, skip connections keep the planes their decoder has not reached yet, and the output is
whole-volume inference, plane slab by plane slab, in memory that grows with the cross-section, not the volume.

This module reads an OpenVINO model and cuts it into *segments*: one z-window operation (convolution, transposed
convolution, pooling) followed by the operations that act plane by plane (bias, activation, batch norm, residual
additions, concatenation over channels), or plane-by-plane operations alone. Each segment becomes its own small
OpenVINO model, compiled at a static number of planes, whose inputs and outputs are stored z-first (planes
outermost) so that any run of planes is one contiguous block shared with OpenVINO without copies. A model with an
operation that is not plane-local (InstanceNorm over the volume, reshapes, attention) is reported as not streamable
and runs tile by tile instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino import passes

#: Operations that map each plane of their inputs to the same plane of their output (given constant operands that
#: do not vary along z): the ops a segment may carry after its z-window operation.
POINTWISE = frozenset("""
Abs Acos Acosh Add Asin Asinh Atan Atanh BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Ceiling Clamp Concat Convert
Cos Cosh Divide Elu Equal Erf Exp FakeConvert FakeQuantize Floor FloorMod Gelu Greater GreaterEqual HSigmoid HSwish
HardSigmoid Less LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr LogicalXor Maximum Minimum Mish Mod
Multiply Negative NotEqual PRelu Power Relu Round Select Selu Sigmoid Sign Sin Sinh SoftPlus SoftSign Softmax Sqrt
SquaredDifference Subtract Swish Tan Tanh
""".split())

#: Operations whose output plane j depends on a window of input planes along z.
WINDOW = frozenset(["Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                    "MaxPool", "AvgPool"])


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
        return int(np.prod(self.plane_shape)) * np.dtype(self.np_dtype).itemsize


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
    input_key: str
    output_key: str
    tensors: dict[str, StreamTensor]
    segments: list[Segment]
    producer: dict[str, int]  # tensor key -> segment index (the input has none)

    def store_in(self, precision: str) -> None:
        """Keep the planes between segments in ``precision`` (a bf16/f16 run computes in it anyway: storing it
        halves the buffers and the memory traffic); the input and the output stay float32."""
        for key, ten in self.tensors.items():
            ten.storage = "f32" if key in (self.input_key, self.output_key) else precision
            ten.channels_last = key != self.output_key


def _key(out: ov.Output) -> str:
    return f"{out.get_node().get_friendly_name()}:{out.get_index()}"


def _is_const_like(node: ov.Node, streamed: set[str]) -> bool:
    return not any(_key(i.get_source_output()) in streamed for i in node.inputs())


def _window_of(node: ov.Node, zaxis: int) -> tuple[ZWindow, float]:
    """The z-window of a convolution/pooling node whose data input has z at ``zaxis`` (a spatial axis)."""
    t = node.get_type_name()
    a = node.get_attributes()
    si = zaxis - 2
    if si < 0:
        raise NotStreamable(f"{t} {node.get_friendly_name()} convolves over the axis volinfer streams along")
    if t == "AvgPool" and (a["pads_begin"][si] or a["pads_end"][si]):
        raise NotStreamable(f"AvgPool {node.get_friendly_name()} pads along z (exclude-pad averages)")
    if t in ("MaxPool", "AvgPool"):
        k = int(a["kernel"][si])
        d = int(a.get("dilations", [1, 1, 1])[si]) if "dilations" in a else 1
        if t == "MaxPool" and node.get_output_size() > 1 and node.output(1).get_target_inputs():
            raise NotStreamable(f"MaxPool {node.get_friendly_name()} uses its indices output")
        return ZWindow("conv", k, int(a["strides"][si]), int(a["pads_begin"][si]), d), \
            (float("-inf") if t == "MaxPool" else 0.0)
    wshape = node.input(1).get_partial_shape()
    if wshape.is_dynamic:
        raise NotStreamable(f"{t} {node.get_friendly_name()} has dynamic weights")
    off = 3 if t.startswith("Group") else 2
    k = int(wshape[off + si].get_length())
    kind = "transposed" if "BackpropData" in t else "conv"
    if kind == "transposed" and node.get_input_size() > 2:
        raise NotStreamable(f"{t} {node.get_friendly_name()} takes an explicit output shape")
    return ZWindow(kind, k, int(a["strides"][si]), int(a["pads_begin"][si]), int(a["dilations"][si])), 0.0


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
        if t in ("Concat", "Softmax", "LogSoftmax") or (t == "FakeQuantize" and i == 0):
            continue
        r = shp.rank.get_length()
        for ax in range(2, out_rank):
            pos = ax - (out_rank - r)
            if pos >= 0 and shp[pos].get_length() != 1:
                raise NotStreamable(f"{t} {node.get_friendly_name()} has an operand that varies over space")
    a = node.get_attributes()
    if t in ("Concat", "Softmax", "LogSoftmax") and (int(a["axis"]) % out_rank) >= 2:
        raise NotStreamable(f"{t} {node.get_friendly_name()} works across space (axis {a['axis']})")


def analyse(model: ov.Model, full_shape: list[int], zaxis: int, output_index: int = 0) -> StreamGraph:
    """Cut ``model`` (single input, z at ``zaxis`` of it) into segments; ``full_shape``: the whole padded volume's
    input shape. Raises :class:`NotStreamable` naming the first operation that cannot be streamed."""
    model = model.clone()
    for i, node in enumerate(model.get_ordered_ops()):
        node.set_friendly_name(f"vi{i}")
    try:
        model.reshape({model.input(0): ov.PartialShape(full_shape)})
    except Exception as e:  # noqa: BLE001  (the tile path reports shape errors with the user's sizes)
        raise NotStreamable(f"the model rejects the whole-volume shape {full_shape}: {e}") from None
    if any(op.get_type_name() == "ShapeOf" for op in model.get_ordered_ops()):
        fold = passes.Manager()  # shape computations on streamed tensors (ONNX exports broadcast biases through
        fold.register_pass(passes.ConstantFolding())  # ShapeOf) are constants at a static shape: fold them (only
        fold.run_passes(model)  # then: folding also decompresses f16 weights, which the segments need not hold)
    param = model.input(0).get_node()
    zof: dict[str, int] = {_key(param.output(0)): zaxis}
    tensors: dict[str, StreamTensor] = {}
    seg_of: dict[str, int] = {}  # node name -> segment index
    segments: list[Segment] = []

    def tensor(out: ov.Output) -> StreamTensor:
        k = _key(out)
        if k not in tensors:
            shp = tuple(int(d) for d in out.get_shape())
            if len(shp) != 5 or zof[k] < 2 or shp[0] != 1:
                raise NotStreamable(f"{out.get_node().get_type_name()} {out.get_node().get_friendly_name()} "
                                    f"makes a tensor that is not (1, C, D, H, W)")
            tensors[k] = StreamTensor(k, shp[zof[k]], zof[k], shp)
        return tensors[k]

    tensor(param.output(0))
    for node in model.get_ordered_ops():
        t = node.get_type_name()
        name = node.get_friendly_name()
        if t in ("Parameter", "Constant") or _is_const_like(node, set(zof)):
            continue
        srcs = [i.get_source_output() for i in node.inputs()]
        zaxes = [zof.get(_key(s)) for s in srcs]
        if t == "Result":
            continue
        if node.get_output_size() != 1 and t != "MaxPool":
            raise NotStreamable(f"{t} {name} has several outputs")
        if t in WINDOW:
            if zaxes[0] is None or any(z is not None for z in zaxes[1:]):
                raise NotStreamable(f"{t} {name} takes streamed weights")
            window, pad = _window_of(node, zaxes[0])
            seg = Segment(len(segments), [name], name, window, pad, [(_key(srcs[0]), window)])
            segments.append(seg)
            seg_of[name] = seg.index
            tensor(srcs[0])
            zof[_key(node.output(0))] = zaxes[0]
            continue
        if t not in POINTWISE:
            raise NotStreamable(f"{t} {name} is not plane-local (volinfer streams convolutions, pooling, "
                                f"transposed convolutions and element-wise operations)")
        z = next(z for z in zaxes if z is not None)
        _pointwise_ok(node, zaxes, tensor(next(s for s, zz in zip(srcs, zaxes) if zz is not None)).n)
        zof[_key(node.output(0))] = z
        streamed = [s for s, zz in zip(srcs, zaxes) if zz is not None]
        owners = [seg_of.get(s.get_node().get_friendly_name()) for s in streamed]
        host = max((o for o in owners if o is not None), default=None)
        if host is None:
            seg = Segment(len(segments), [name])
            segments.append(seg)
            host = seg.index
        else:
            segments[host].nodes.append(name)
        seg_of[name] = host
        for s, o in zip(streamed, owners):
            seg = segments[host]
            tail = seg.inputs[1:] if seg.anchor is not None else seg.inputs
            if o != host and (_key(s), ZWindow()) not in tail:
                seg.inputs.append((_key(s), ZWindow()))
                tensor(s)
    out = model.output(output_index).get_node().input_value(0)
    out_key = _key(out)
    if out_key not in zof:
        raise NotStreamable("the model's output does not depend on its input")
    tensor(out)
    _set_outputs(model, segments, seg_of, out_key)
    producer = {k: s.index for s in segments for k in s.outputs}
    return StreamGraph(model, _key(param.output(0)), out_key, tensors, segments, producer)


def _set_outputs(model: ov.Model, segments: list[Segment], seg_of: dict[str, int], out_key: str) -> None:
    """Each segment's outputs: its tensors read by another segment or by the model's result."""
    read: set[str] = {out_key}
    for seg in segments:
        read.update(k for k, _ in seg.inputs)
    for seg in segments:
        for name in seg.nodes:
            k = f"{name}:0"
            if k in read and k not in seg.outputs:
                seg.outputs.append(k)


def _others(zaxis: int) -> list[int]:
    return [a for a in (2, 3, 4) if a != zaxis]


def _orders(zaxis: int) -> tuple[list[int], list[int]]:
    """For a native (N, C, s0, s1, s2) tensor streamed along ``zaxis``: the axis order a segment computes in (z
    the outermost spatial axis: OpenVINO's kernels vectorise along the innermost one, which must stay wide), and its
    spatial axes as native spatial indices (how the anchor's weights and attributes are permuted)."""
    q = [0, 1, zaxis, *_others(zaxis)]
    return q, [a - 2 for a in q[2:]]


def build_segment_model(graph: StreamGraph, seg: Segment, t: int) -> ov.Model:
    """The segment as a model computing ``t`` output planes: z-first inputs of the planes its window reads (padding
    planes included, supplied by the caller), z-first outputs of exactly ``t`` planes each.

    Inside, every tensor is in (N, C, z, s, s) order, the anchor's weights and attributes permuted to match:
    convolution commutes with a consistent permutation of its input's and its kernel's axes."""
    model = graph.model.clone()
    nodes = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    zaxis = graph.tensors[seg.inputs[0][0]].zaxis
    q, sp = _orders(zaxis)
    ports = _input_ports(seg, nodes)
    params = []
    for j, (key, win) in enumerate(seg.inputs):
        ten = graph.tensors[key]
        if ten.zaxis != zaxis:
            raise NotStreamable(f"segment {seg.index} mixes tensors streamed along different axes")
        planes = win.input_planes(t) if win.kind != "same" else t
        p = ops.parameter([1, planes, *ten.plane_shape], ten.ov_type, name=f"in{j}")
        made: dict[Any, ov.Output] = {}
        for inp, jj in ports:
            if jj == j:
                want = inp.get_element_type()
                if want not in made:  # convert, then transpose: OpenVINO folds the transpose into its reorder
                    cast = p if want == ten.ov_type else ops.convert(p, want)
                    to_q = [ten.order.index(a) for a in q]
                    made[want] = ops.transpose(cast, ops.constant(np.array(to_q, np.int64))).output(0)
                inp.replace_source_output(made[want])
        params.append(p)
    sliced: dict[str, ov.Output] = {}
    if seg.anchor is not None:
        sliced = _permute_anchor(nodes[seg.anchor], seg, t, sp)
    results = []
    for key in seg.outputs:
        name, idx = key.rsplit(":", 1)
        out = sliced.get(key) or nodes[name].output(int(idx))
        if out.get_element_type() != graph.tensors[key].ov_type:
            out = ops.convert(out, graph.tensors[key].ov_type).output(0)
        to_r = [q.index(a) for a in graph.tensors[key].order]
        results.append(ops.result(ops.transpose(out, ops.constant(np.array(to_r, np.int64)))))
    sub = ov.Model(results, params, f"segment{seg.index}")
    sub.validate_nodes_and_infer_types()
    for res, key in zip(sub.outputs, seg.outputs):
        want = [1, t, *graph.tensors[key].plane_shape]
        if list(res.get_shape()) != want:
            raise NotStreamable(f"segment {seg.index} computes {list(res.get_shape())} for {key}, expected {want}")
    return sub


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


def _permute_anchor(node: ov.Node, seg: Segment, t: int, sp: list[int]) -> dict[str, ov.Output]:
    """Run the anchor in (N, C, z, s, s) order without z padding (the caller supplies padding planes); a transposed
    convolution's output is sliced to the ``t`` planes the chunk owns. Returns replaced outputs by tensor key."""
    kind = node.get_type_name()
    a = node.get_attributes()
    for name in ("strides", "dilations", "pads_begin", "pads_end", "kernel", "output_padding"):
        if name in a and len(a[name]) == 3:
            v = [a[name][i] for i in sp]
            if name in ("pads_begin", "pads_end", "output_padding"):
                v[0] = 0
            node.set_attribute(name, v)
    if "auto_pad" in a:
        node.set_attribute("auto_pad", "explicit")
    w, perm = None, None
    if kind in ("MaxPool", "AvgPool"):
        node.set_attribute("rounding_type", "floor")
    else:
        lead = 3 if kind.startswith("Group") else 2
        perm = list(range(lead)) + [lead + i for i in sp]
        w = node.input_value(1)
        node.input(1).replace_source_output(ops.transpose(w, ops.constant(np.array(perm, np.int64))).output(0))
    node.validate_and_infer_types()
    if seg.window.kind != "transposed":
        return {}
    out = node.output(0)
    targets = list(out.get_target_inputs())
    off = seg.window.local_offset(t)
    phased = _phase_convolution(node, w, perm, off, t) if w is not None and _use_phases(node) else None
    sl = phased if phased is not None else ops.slice(out, np.array([off], np.int64), np.array([off + t], np.int64),
                                                     np.array([1], np.int64), np.array([2], np.int64)).output(0)
    for tin in targets:
        tin.replace_source_output(sl)
    return {f"{node.get_friendly_name()}:0": sl}


def _use_phases(node: ov.Node) -> bool:
    return int(node.get_output_partial_shape(0)[1].get_length()) <= PHASE_MAX_CHANNELS


#: Transposed convolutions with at most this many output channels run as their stride phases (see
#: :func:`_phase_convolution`). Measured per call, 2 planes, bf16, reference U-Net: 32->2 channels at 512² 14.4 ->
#: 6.5-8 ms; 64->16 at 256² 8 -> 13-17 ms (a k3 s2 kernel's phases hold 2.4x its taps, zeros included: worth it
#: only where OpenVINO's own transposed kernel is slow, with few output channels).
PHASE_MAX_CHANNELS = 8


def _constant_value(out: ov.Output) -> np.ndarray | None:
    """The value of a constant (possibly converted, e.g. f16-compressed) weight input; None otherwise."""
    node = out.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float32)


def _phase_convolution(node: ov.Node, w_src: ov.Output, perm: list[int], off: int, t: int) -> ov.Output | None:
    """A transposed convolution (already in (N, C, z, s, s) order, no z padding; ``w_src`` its original weights,
    ``perm`` the axis permutation that put them in that order) computed as one ordinary
    convolution producing every stride phase as channels, then DepthToSpace, then the crop to planes
    ``[off, off + t)`` along z and to the node's in-plane output. Output position ``o' = s*q + r`` of a transposed
    convolution sums ``x[q - l] * w[r + s*l]``: for phase ``r`` that is an ordinary correlation with the kernel taps
    ``r, r+s, ...`` reversed. Same arithmetic, kernels OpenVINO runs well. None when the node does not qualify
    (groups, dilation, unequal strides, an output shape input, non-constant weights)."""
    if node.get_type_name() != "ConvolutionBackpropData" or node.get_input_size() != 2:
        return None
    a = node.get_attributes()
    s = int(a["strides"][0])
    if s < 2 or any(int(v) != s for v in a["strides"]) or any(int(d) != 1 for d in a["dilations"]):
        return None
    w = _constant_value(w_src)
    if w is None:
        return None
    w = np.transpose(w, perm)
    cin, cout, k = w.shape[0], w.shape[1], w.shape[2:]
    L = [-(-kk // s) for kk in k]
    big = np.zeros((s ** 3 * cout, cin, *L), np.float32)
    for ph, r in enumerate(np.ndindex(s, s, s)):
        for l in np.ndindex(*L):
            m = [r[i] + s * l[i] for i in range(3)]
            if all(m[i] < k[i] for i in range(3)):
                big[ph * cout:(ph + 1) * cout, :, L[0] - 1 - l[0], L[1] - 1 - l[1], L[2] - 1 - l[2]] = \
                    w[:, :, m[0], m[1], m[2]].T
    data = node.input_value(0)
    n_in = [int(d.get_length()) for d in data.get_partial_shape()][2:]
    n_out = [int(d.get_length()) for d in node.get_output_partial_shape(0)][2:]
    pb = [int(v) for v in a["pads_begin"]]
    ends = [0] + [max(0, -(-(pb[i] + n_out[i]) // s) - n_in[i]) for i in (1, 2)]
    wtype = {ov.Type.f32: np.float32, ov.Type.f16: np.float16}.get(w_src.get_element_type())
    if wtype is None:
        return None
    try:
        conv = ops.convolution(data, ops.constant(big.astype(wtype)), [1, 1, 1], [LL - 1 for LL in L], ends,
                               [1, 1, 1])
    except Exception:  # noqa: BLE001  (types OpenVINO's convolution does not take: keep the transposed kernel)
        return None
    if conv.get_output_element_type(0) != node.get_output_element_type(0):
        return None
    d2s = ops.depth_to_space(conv, "blocks_first", s)
    begin = [off, pb[1], pb[2]]
    end = [off + t, pb[1] + n_out[1], pb[2] + n_out[2]]
    return ops.slice(d2s, np.array(begin, np.int64), np.array(end, np.int64), np.array([1, 1, 1], np.int64),
                     np.array([2, 3, 4], np.int64)).output(0)
