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

NORM_OPS = ("MVN", "GroupNormalization")
#: Reductions over space that cannot be frozen here: any of them makes the receptive field the whole tile.
GLOBAL_REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1")


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


def _input_shapes(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> dict[str, list[int]]:
    """Static input-0 shape of every MVN / GroupNormalization / reduction node at ``tile`` (shape inference only)."""
    m = model.clone()
    shape = [1, channels, *tile] if layout == "NCDHW" else [1, *tile, channels]
    m.reshape({m.input(0): ov.PartialShape(shape)})
    out = {}
    for op in m.get_ordered_ops():
        if op.get_type_name() in NORM_OPS + GLOBAL_REDUCE_OPS:
            ps = op.input_value(0).get_partial_shape()
            if ps.is_static:
                out[op.get_friendly_name()] = [d.get_length() for d in ps]
    return out


def _axes_of(op: ov.Node, rank: int) -> tuple[int, ...]:
    """Reduction axes of an MVN (v6 from its constant input, v1 from its attributes) or reduce op."""
    if op.get_type_name() == "MVN" and op.get_input_size() == 1:  # MVN-1: spatial (and channel) axes
        first = 1 if op.get_attributes().get("across_channels") else 2
        return tuple(range(first, rank))
    src = op.input_value(1).get_node()
    if src.get_type_name() != "Constant":
        return ()
    return tuple(sorted(int(a) % rank for a in np.atleast_1d(src.get_data())))


def find_norm_layers(model: ov.Model, layout: str, channels: int, tile: Sequence[int]) -> tuple[list[NormLayer],
                                                                                                list[str]]:
    """The spatial normalisation layers of ``model`` in topological order, and the names of spatial reductions that
    cannot be frozen (global pooling, hand-written statistics). Which input axis is volume x, y or z is found by
    shape inference at tiles that differ along one axis at a time."""
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
        if kind not in NORM_OPS + GLOBAL_REDUCE_OPS or name not in probes[0]:
            continue
        groups = _flat_groups(op) if kind == "MVN" and layout == "NCDHW" else 0
        if groups:
            layers.append(_norm_layer(op, (2, 3, 4), (2, 3, 4), groups, flat=True))
            continue
        shapes = [p.get(name) for p in probes]
        if any(s is None for s in shapes):
            continue
        spatial = []
        for axis in range(3):
            moved = [i for i, (a, b) in enumerate(zip(shapes[0], shapes[axis + 1])) if a != b]
            spatial.append(moved[0] if len(moved) == 1 else -1)
        rank = len(shapes[0])
        reduced = tuple(range(2, rank)) if kind == "GroupNormalization" else _axes_of(op, rank)
        if not set(reduced) & {a for a in spatial if a >= 0}:
            continue  # local to each voxel (channel-wise normalisation, or a reduction over channels)
        if kind in GLOBAL_REDUCE_OPS or -1 in spatial or not reduced:
            unsupported.append(f"{kind} {name}")
            continue
        layers.append(_norm_layer(op, reduced, tuple(spatial), int(op.get_attributes().get("num_groups", 0))))
    return layers, unsupported


def _norm_layer(op: ov.Node, reduced: tuple[int, ...], spatial: tuple[int, ...], groups: int,
                flat: bool = False) -> NormLayer:
    """``op`` as a :class:`NormLayer`, with eps, its placement and ``normalize_variance`` as the op computes them."""
    attrs = op.get_attributes()
    return NormLayer(name=op.get_friendly_name(), kind=op.get_type_name(), reduced=reduced,
                     spatial=spatial, eps=float(attrs.get("eps", attrs.get("epsilon", 1e-5))),  # type: ignore[arg-type]
                     inside_sqrt=str(attrs.get("eps_mode", "INSIDE_SQRT")).upper() == "INSIDE_SQRT",
                     variance=bool(attrs.get("normalize_variance", True)), groups=groups, flat=flat)


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
