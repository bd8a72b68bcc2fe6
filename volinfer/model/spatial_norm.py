"""Normalisation layers that use statistics of their whole input (InstanceNorm, GroupNorm): finding and freezing them.

Such a layer makes every output voxel depend on every input voxel of the tile, so a tiled run differs from
whole-volume inference however wide the margins are. Freezing each layer's mean and variance to constants removes
that global dependence: frozen to the statistics of the whole volume, tiled inference with margins that cover the
(now bounded) receptive field is exact in volinfer's sense (:mod:`volinfer.run.fidelity`). In OpenVINO these
layers are ``MVN`` and ``GroupNormalization`` nodes; a layer counts only when it reduces over a spatial axis (an MVN
over channels alone, LayerNorm style, is local to each voxel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import openvino.passes as ov_passes
from volinfer.model.layout import Layout

NORM_OPS = ("MVN", "GroupNormalization")
#: Reductions over space that cannot be frozen here: any of them makes the receptive field the whole tile.
GLOBAL_REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                     "ReduceLogicalAnd", "ReduceLogicalOr")
#: Every other op whose output at one voxel can depend on all voxels along the axes it works over (its axes from a
#: constant input 1 or an ``axis`` attribute): normalising, sorting, prefix sums, Fourier transforms over space.
GLOBAL_AXIS_OPS = ("NormalizeL2", "Softmax", "LogSoftmax", "TopK", "CumSum", "DFT", "IDFT", "RDFT", "IRDFT")
#: Ops that mix over space by construction: global (adaptive) pooling, matrix products over flattened voxels
#: (attention), Einstein sums over a spatial index.
GLOBAL_MIX_OPS = ("AdaptiveAvgPool", "AdaptiveMaxPool", "MatMul", "Einsum")
#: Ops whose output depends on where a voxel lies in the tile, not only on its neighbourhood: interpolation with
#: ``align_corners`` (output j reads input j·(n_in−1)/(n_out−1), which moves with the tile's size), sampling at a
#: computed grid. No tiling reproduces whole-volume inference through them; only one tile over the volume does.
POSITION_OPS = ("Interpolate", "GridSample")
_CANDIDATES = NORM_OPS + GLOBAL_REDUCE_OPS + GLOBAL_AXIS_OPS + GLOBAL_MIX_OPS + POSITION_OPS


@dataclass(frozen=True)
class NormLayer:
    """One spatial normalisation node: ``name`` (friendly name), ``kind`` (op type), ``reduced`` (axes of its input
    the statistics run over), ``spatial`` (input axis holding volume x, y, z), ``eps``/``inside_sqrt``/``variance``
    as the op computes, ``groups`` (GroupNormalization, or an MVN over channel groups flattened by a Reshape: ``flat``,
    the statistics then run over the groups of the Reshape's 5-D input and the layer ends at the Reshape back)."""

    name: str
    kind: str
    reduced: tuple[int, ...]
    spatial: tuple[int, int, int]
    eps: float
    inside_sqrt: bool = True
    variance: bool = True
    groups: int = 0
    flat: bool = False  # a GroupNorm exported through ONNX: Reshape to (N, groups, -1), MVN, Reshape back


Shapes = dict[str, list[list[int] | None]]


def _input_shapes(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> Shapes:
    """Input shapes of every candidate node at ``tile`` (shape inference only, after constant folding: a scale that
    reaches an Interpolate through a Convert leaves its output size unknown otherwise). Unknown lengths are -1; an
    input of unknown rank is None."""
    m = model.clone()
    shape = Layout.of(layout).tensor_shape(channels, tile)
    m.reshape({m.input(0): ov.PartialShape(shape)})
    return _shapes_of(m)


def _shapes_of(m: ov.Model) -> Shapes:
    """:func:`_input_shapes` of ``m`` (a clone: folded in place) at its own input shape."""
    folding = ov_passes.Manager()
    folding.register_pass(ov_passes.ConstantFolding())
    folding.run_passes(m)
    m.validate_nodes_and_infer_types()
    out: Shapes = {}
    for op in m.get_ordered_ops():
        if op.get_type_name() in _CANDIDATES:
            shapes = [op.input_value(i).get_partial_shape() for i in range(op.get_input_size())]
            out[op.get_friendly_name()] = [[d.get_length() if d.is_static else -1 for d in ps]
                                           if ps.rank.is_static else None for ps in shapes]
    return out


def _const_axes(op: ov.Node, index: int, rank: int) -> tuple[int, ...] | None:
    """Axes held by the constant input ``index`` of ``op`` (normalised to ``rank``); None when not a constant."""
    if op.get_input_size() <= index:
        return None
    src = op.input_value(index).get_node()
    if src.get_type_name() != "Constant":
        return None
    return tuple(sorted({int(a) % rank for a in np.atleast_1d(src.get_data())}))


def _axes_of(op: ov.Node, rank: int) -> tuple[int, ...] | None:
    """Axes of input 0 that an MVN (v6 from its constant input, v1 from its attributes), reduce or axis op works
    over; None when they cannot be read from the graph (a computed axes input: assume any)."""
    kind = op.get_type_name()
    if kind == "MVN" and op.get_input_size() == 1:  # MVN-1: spatial (and channel) axes
        first = 1 if op.get_attributes().get("across_channels") else 2
        return tuple(range(first, rank))
    if kind in ("Softmax", "LogSoftmax", "TopK"):
        return (int(op.get_attributes()["axis"]) % rank,)
    if kind == "GroupNormalization":
        return tuple(range(2, rank))
    if kind in ("DFT", "IDFT", "IRDFT"):  # complex input: a trailing (real, imaginary) axis the axes do not count
        return _const_axes(op, 1, rank - 1)
    return _const_axes(op, 1, rank)


def _einsum_mixed(equation: str, shapes: list[list[int]]) -> list[tuple[int, int]]:
    """(input, axis) pairs of an Einsum that are summed away (their label is absent from the output)."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    mixed = []
    for i, term in enumerate(lhs.split(",")):
        if "." in term or i >= len(shapes):
            return [(j, a) for j, s in enumerate(shapes) for a in range(len(s))]  # ellipsis: assume any
        mixed += [(i, a) for a, label in enumerate(term) if label not in rhs]
    return mixed


def _mixed(op: ov.Node, shapes: list[list[int]]) -> list[tuple[int, int]] | None:
    """(input, axis) pairs over which ``op`` combines values of different positions; None when unknown (any)."""
    kind, rank = op.get_type_name(), len(shapes[0])
    if kind == "Interpolate":
        attrs = op.get_attributes()
        aligned = attrs.get("coordinate_transformation_mode") == "align_corners" or attrs.get("align_corners")
        return [(0, a) for a in range(2, rank)] if aligned else []
    if kind == "GridSample":
        return None
    if kind in ("AdaptiveAvgPool", "AdaptiveMaxPool"):
        return [(0, a) for a in range(2, rank)]
    if kind == "MatMul":
        if min(len(shapes[0]), len(shapes[1])) < 2:
            return [(0, rank - 1), (1, 0)]
        attrs = op.get_attributes()
        return [(0, rank - 2 if attrs.get("transpose_a") else rank - 1),
                (1, len(shapes[1]) - (1 if attrs.get("transpose_b") else 2))]
    if kind == "Einsum":
        return _einsum_mixed(str(op.get_attributes().get("equation", "")), shapes)
    axes = _axes_of(op, rank)
    return None if axes is None else [(0, a) for a in axes]


def _varying(probes: list[Shapes], name: str) -> list[list[int]] | None:
    """Per input of node ``name``: every axis whose length moved between probes at tiles that differ along one axis
    at a time, or that shape inference left unknown (volume-sized, as far as anyone can tell). None when the node
    or the rank of an input is unknown at some probe."""
    shapes = [p.get(name) for p in probes]
    if any(s is None or any(i is None for i in s) for s in shapes):
        return None
    moved = []
    for i in range(len(shapes[0])):  # type: ignore[arg-type]
        base = shapes[0][i]  # type: ignore[index]
        moved.append(sorted({a for p in shapes for a, (u, v) in enumerate(zip(base, p[i]))  # type: ignore
                             if u != v or u < 0 or v < 0}))
    return moved


def _norm_layer(op: ov.Node, probes: list[Shapes], reduced: tuple[int, ...]) -> NormLayer | None:
    """``op`` (MVN / GroupNormalization) as a layer that can be frozen, or None when its x, y, z axes are unclear."""
    name = op.get_friendly_name()
    spatial = []
    for axis in range(3):
        base, grown = probes[0][name][0], probes[axis + 1][name][0]  # type: ignore[index]
        moved = [i for i, (a, b) in enumerate(zip(base, grown)) if a != b or a < 0]  # type: ignore[arg-type]
        spatial.append(moved[0] if len(moved) == 1 else -1)
    if -1 in spatial or not reduced:
        return None
    attrs = op.get_attributes()
    return NormLayer(
        name=name, kind=op.get_type_name(), reduced=reduced, spatial=tuple(spatial),  # type: ignore[arg-type]
        eps=float(attrs.get("eps", attrs.get("epsilon", 1e-5))),
        inside_sqrt=str(attrs.get("eps_mode", "INSIDE_SQRT")).upper() == "INSIDE_SQRT",
        variance=bool(attrs.get("normalize_variance", True)), groups=int(attrs.get("num_groups", 0)))


def find_norm_layers(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> tuple[list[NormLayer],
                                                                                                list[str]]:
    """The spatial normalisation layers of ``model`` in topological order, and the names of every other op that
    combines values across space (global reductions and pooling, NormalizeL2, softmax/sort/prefix sums over space,
    products over flattened voxels) or depends on positions in the tile (:data:`POSITION_OPS`): none can be frozen,
    each makes the receptive field the whole tile. Which input axes are space is found by shape inference at tiles
    that differ along one axis at a time; where the graph does not say (axes computed at run time, lengths unknown),
    the op counts as global: "not exact" is the safe mistake. Ops on constants alone (folded away) are skipped."""
    base = [int(t) for t in tile]
    probes = [_input_shapes(model, layout, channels, base)]
    for axis in range(3):
        t = list(base)
        t[axis] *= 2
        probes.append(_input_shapes(model, layout, channels, t))
    layers: list[NormLayer] = []
    unsupported: list[str] = []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind not in _CANDIDATES or name not in probes[0]:
            continue  # not a candidate, or computed from constants alone (folded)
        groups = _flat_groups(op) if kind == "MVN" and layout == "NCDHW" else 0
        if groups:  # a GroupNorm exported through ONNX before opset 18: one group normalisation
            layers.append(_flat_layer(op, groups))
            continue
        moved = _varying(probes, name)
        mixed = _mixed(op, probes[0][name]) if moved is not None else None  # type: ignore[arg-type]
        if mixed is not None and not any(a in moved[i] for i, a in mixed):  # type: ignore[index]
            continue  # local to each voxel (channel-wise normalisation, a reduction over channels)
        layer = _norm_layer(op, probes, tuple(a for _, a in mixed)) if kind in NORM_OPS and mixed else None
        if layer is None:
            unsupported.append(f"{kind} {name}")
        else:
            layers.append(layer)
    return layers, unsupported


def fixed_shape_global_ops(model: ov.Model, layout: str) -> list[str]:
    """For a model whose input shape is fixed (no probes at other tiles): every normalisation layer, and every other
    candidate op that combines values along an axis past batch and channels (channels last for ``NDHWC``) or along
    axes the graph does not say; the same safe side as :func:`find_norm_layers`."""
    shapes = _shapes_of(model.clone())
    found = []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind not in _CANDIDATES or name not in shapes:
            continue
        ins = shapes.get(name)
        known = ins is not None and all(i is not None for i in ins)
        mixed = _mixed(op, ins) if known else None  # type: ignore[arg-type]
        rank = len(ins[0]) if known else 0  # type: ignore[index, arg-type]
        channel = rank - 1 if layout == "NDHWC" and rank == 5 else 1
        if kind in NORM_OPS or mixed is None or any(a not in (0, channel) for i, a in mixed if i == 0):
            found.append(f"{kind} {name}")
    return found


def _flat_layer(op: ov.Node, groups: int) -> NormLayer:
    """A flattened group MVN (:func:`_flat_groups`) as a :class:`NormLayer` over (x, y, z) of its 5-D input, with
    eps, its placement and ``normalize_variance`` as the op computes them."""
    attrs = op.get_attributes()
    return NormLayer(name=op.get_friendly_name(), kind=op.get_type_name(), reduced=(2, 3, 4),
                     spatial=(2, 3, 4), eps=float(attrs.get("eps", attrs.get("epsilon", 1e-5))),
                     inside_sqrt=str(attrs.get("eps_mode", "INSIDE_SQRT")).upper() == "INSIDE_SQRT",
                     variance=bool(attrs.get("normalize_variance", True)), groups=groups, flat=True)


def _flat_groups(op: ov.Node) -> int:
    """Groups of an MVN that normalises channel groups of a 5-D tensor flattened by a Reshape to (1, G, -1) and is
    reshaped straight back to 5-D, after at most a per-group scale and shift (how ONNX exports PyTorch's GroupNorm
    before opset 18: Reshape, InstanceNormalization, Reshape); 0 for any other MVN."""
    src = op.input_value(0)
    into = src.get_partial_shape()
    if src.get_node().get_type_name() != "Reshape" or into.rank.is_dynamic or into.rank.get_length() != 3:
        return 0
    x = src.get_node().input_value(0).get_partial_shape()
    if x.rank.is_dynamic or x.rank.get_length() != 5 or x[1].is_dynamic or into[1].is_dynamic:
        return 0
    g, c = into[1].get_length(), x[1].get_length()
    if _axes_of(op, 3) != (2,) or g <= 0 or c % g or flat_chain(op, g) is None:
        return 0
    return g


def flat_chain(op: ov.Node, groups: int) -> tuple[list[tuple[str, np.ndarray]], ov.Node] | None:
    """After a flattened group MVN: the per-group Multiply/Add steps (their constant values, one per group) and the
    Reshape back to 5-D; None when the chain is anything else. Shape computations (ShapeOf) on the way are ignored:
    they only feed those steps' operands."""
    node, steps = op, []
    for _ in range(4):
        nxt = [t.get_node() for t in node.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
        if len(nxt) != 1:
            return None
        node = nxt[0]
        kind = node.get_type_name()
        if kind == "Reshape" and node.get_output_partial_shape(0).rank.get_length() == 5:
            return steps, node
        if kind not in ("Multiply", "Add") or node.input_value(0).get_node() is not _prev(node, steps, op):
            return None
        values = _group_constant(node.input_value(1), groups)
        if values is None:
            return None
        steps.append((kind, values))
    return None


def _prev(node: ov.Node, steps: list[Any], op: ov.Node) -> ov.Node:
    """The chain node ``node`` must read as its first input: the MVN, or the previous step."""
    return node.input_value(0).get_node() if steps or node.input_value(0).get_node() is op else op


def _group_constant(out: ov.Output, groups: int) -> np.ndarray | None:
    """One value per group of a constant operand (possibly reshaped or converted), broadcast from one value."""
    node = out.get_node()
    while node.get_type_name() in ("Reshape", "Unsqueeze", "Squeeze", "Convert"):
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    v = np.asarray(node.get_data(), np.float64).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, groups)
    return v if v.size == groups else None


def node_named(model: ov.Model, name: str) -> ov.Node:
    """The node of ``model`` with friendly name ``name`` (the first, in topological order)."""
    for op in model.get_ordered_ops():
        if op.get_friendly_name() == name:
            return op
    raise KeyError(name)


def stat_tensor(model: ov.Model, layer: NormLayer) -> ov.Output:
    """The tensor whose statistics ``layer`` computes (its data input; a flattened GroupNorm's 5-D input)."""
    x = node_named(model, layer.name).input_value(0)
    return x.get_node().input_value(0) if layer.flat else x


def freeze(model: ov.Model, layer: NormLayer, mean: np.ndarray, var: np.ndarray) -> None:
    """Replace ``layer`` in ``model`` (in place) by ``(x - mean) / sqrt(var + eps)`` with constant ``mean``/``var``
    (shaped like its input with the reduced axes of length 1; GroupNormalization: per group, shape (groups,))."""
    op = node_named(model, layer.name)
    x = stat_tensor(model, layer)
    if layer.groups:
        c = x.get_partial_shape()[1].get_length()
        per = c // layer.groups
        rank = x.get_partial_shape().rank.get_length()
        cshape = [1, c] + [1] * (rank - 2)
        mean = np.repeat(np.asarray(mean, np.float64).reshape(-1), per).reshape(cshape)
        var = np.repeat(np.asarray(var, np.float64).reshape(-1), per).reshape(cshape)
    inv = 1.0 / (np.sqrt(var + layer.eps) if layer.inside_sqrt else np.sqrt(var) + layer.eps)
    dtype = x.get_element_type().to_dtype()
    y = ops.subtract(x, ops.constant(np.asarray(mean, dtype)))
    if layer.variance:
        y = ops.multiply(y, ops.constant(np.asarray(inv, dtype)))
    if layer.kind == "GroupNormalization":
        scale = ops.unsqueeze(op.input_value(1), ops.constant(np.array([0], np.int64)))
        bias = ops.unsqueeze(op.input_value(2), ops.constant(np.array([0], np.int64)))
        scale = ops.unsqueeze(scale, ops.constant(np.arange(2, rank, dtype=np.int64)))
        bias = ops.unsqueeze(bias, ops.constant(np.arange(2, rank, dtype=np.int64)))
        y = ops.add(ops.multiply(y, scale), bias)
    end = op
    if layer.flat:  # the per-group scale and shift as per-channel constants, then in place of the Reshape back
        chain = flat_chain(op, layer.groups)
        assert chain is not None
        for kind, values in chain[0]:
            per_channel = np.asarray(np.repeat(values, per).reshape(cshape), dtype)
            y = (ops.multiply if kind == "Multiply" else ops.add)(y, ops.constant(per_channel))
        end = chain[1]
    end.output(0).replace(y.output(0))
    model.validate_nodes_and_infer_types()


class Moments:
    """Count, mean and M2 (sum of squared deviations) per statistics group, combined exactly in float64 (Chan et
    al.): the whole-volume mean and variance from tile cores, without cancellation."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: np.ndarray | float = 0.0
        self.m2: np.ndarray | float = 0.0

    def add(self, block: np.ndarray, axes: tuple[int, ...]) -> None:
        b = np.asarray(block, dtype=np.float64)
        n = float(np.prod([b.shape[a] for a in axes]))
        if n == 0:
            return
        mean = b.mean(axis=axes, keepdims=True)
        m2 = ((b - mean) ** 2).sum(axis=axes, keepdims=True)
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, population variance), as MVN and GroupNormalization compute them."""
        return np.asarray(self.mean), np.asarray(self.m2) / max(self.n, 1.0)


def group_view(x: np.ndarray, layer: NormLayer) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` arranged so that the statistics are a reduction over the returned axes (GroupNormalization: channels
    split into groups first)."""
    if not layer.groups:
        return x, layer.reduced
    n, c = x.shape[:2]
    g = x.reshape(n, layer.groups, c // layer.groups, *x.shape[2:])
    return g, tuple(range(2, g.ndim))


def frozen_like(model: ov.Model, layers: list[NormLayer]) -> ov.Model:
    """A copy of ``model`` with every layer of ``layers`` frozen to mean 0 and variance 1: the structure, not the
    values, of the model that whole-volume statistics will make (what a run plans with before it knows them)."""
    out = model.clone()
    for layer in layers:
        x = stat_tensor(out, layer)
        if layer.groups:
            shape = [layer.groups]
        else:
            ps = x.get_partial_shape()
            shape = [1 if i == 0 or i in layer.reduced else ps[i].get_length() for i in range(ps.rank.get_length())]
        freeze(out, layer, np.zeros(shape), np.ones(shape))
    return out
