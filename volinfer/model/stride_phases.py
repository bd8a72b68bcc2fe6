"""A streamed transposed convolution with few output channels, computed as its stride phases.

OpenVINO's CPU kernels run a transposed convolution to 2 output channels (a U-Net's last up-sampling) at a tenth of
their convolution rate, and its DepthToSpace and the element-wise operations after it run on 2 channels padded to a
16-channel block. Output voxel ``o = s*Q + R`` of a transposed convolution (stride ``s``, padding ``p``) sums
``x[Q + d] * w[m]`` over the taps ``m = R + p - s*d``: for each phase ``R`` an ordinary correlation. So one
convolution over the low-resolution input, producing every phase of every output channel as a channel of its own,
computes the same arithmetic; aligned on the phases (padding chosen so position ``Q`` holds the outputs ``s*Q ..
s*Q + s - 1``) it computes exactly the chunk's planes and no crop along z. Per-channel element-wise operations after
it (bias, batch norm, PReLU, ...) act on the phase channels with their constants repeated per phase, and one
transposition interleaves the phases straight into the order the stream stores (``benchmarks/segment_costs.py``
times every segment of a plan: the reference U-Net's last up-sampling, 32->2 channels at 512², bf16, took 5.6 ms a
call as DepthToSpace phases, 2.2 ms this way, in a 512³ run on the idle machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops

#: Element-wise operations that act on each channel alone (with constants that are per channel or scalar): they
#: commute with interleaving the phases once their constants are repeated per phase.
PER_CHANNEL = frozenset("""Abs Add Clamp Convert Divide Elu Erf Exp Gelu HSigmoid HSwish Maximum Minimum Mish
Multiply Negative PRelu Relu Sigmoid SoftPlus Sqrt Subtract Swish Tanh""".split())


@dataclass(frozen=True)
class Phases:
    """A phase tensor: ``(1, s**3 * C, nz, ny, nx)`` in (N, C, z, s, s) order, channel ``((rz*s + ry)*s + rx)*C + c``
    holding output ``(c, s*qz + rz, s*qy + ry, s*qx + rx)``; ``crop``: per axis (z, s, s), the interleaved
    output's ``[lo, hi)`` the caller keeps."""

    out: ov.Output
    s: int
    channels: int
    crop: tuple[tuple[int, int], ...]


def constant_value(out: ov.Output) -> np.ndarray | None:
    """The value of a constant (possibly converted, e.g. f16-compressed) input; None otherwise."""
    node = out.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float32)


def _reach(k: int, s: int, p: int) -> tuple[int, int]:
    """The input offsets ``d`` (``i = Q + d``) phase-aligned outputs read: taps ``m = R + p - s*d`` in [0, k)."""
    return -((k - 1 - p) // s), (s - 1 + p) // s


def phase_convolution(node: ov.Node, w_src: ov.Output, perm: list[int], z_pad: int,
                      rows: tuple[int, int, int] | None = None) -> Phases | None:
    """The transposed convolution ``node`` (already in (N, C, z, s, s) order; ``w_src`` its original weights,
    ``perm`` the axis permutation that put them in that order) as one convolution over its stride phases. Along z
    its input holds exactly the planes a chunk of whole strides reads (no padding; ``z_pad``: the node's padding
    along z, which the streamed node no longer carries); in-plane its own padding and output size. ``rows``: (axis,
    lo, hi), a band's output rows ``[lo, hi)`` along spatial axis 1 or 2 (None: the node's whole output). None when
    the node does not qualify (groups, dilation, unequal strides, an output shape input, non-constant weights)."""
    if node.get_type_name() != "ConvolutionBackpropData" or node.get_input_size() != 2:
        return None
    a = node.get_attributes()
    s = int(a["strides"][0])
    if s < 2 or any(int(v) != s for v in a["strides"]) or any(int(d) != 1 for d in a["dilations"]):
        return None
    w = constant_value(w_src)
    wtype = {ov.Type.f32: np.float32, ov.Type.f16: np.float16}.get(w_src.get_element_type())
    if w is None or wtype is None:
        return None
    w = np.transpose(w, perm)
    cout, k = w.shape[1], w.shape[2:]
    data = node.input_value(0)
    n_in = [int(d.get_length()) for d in data.get_partial_shape()][2:]
    n_out = [int(d.get_length()) for d in node.get_output_partial_shape(0)][2:]
    pads = [z_pad] + [int(v) for v in a["pads_begin"]][1:]
    reach = [_reach(k[i], s, pads[i]) for i in range(3)]
    big = _phase_kernel(w, s, pads, reach)
    positions = [n_in[0] - (reach[0][1] - reach[0][0])] + [-(-n_out[i] // s) for i in (1, 2)]
    begin = [0] + [-reach[i][0] for i in (1, 2)]
    end = [0] + [positions[i] - 1 + reach[i][1] - (n_in[i] - 1) for i in (1, 2)]
    if min(begin) < 0 or min(end) < 0 or positions[0] < 1:
        return None
    try:
        conv = ops.convolution(data, ops.constant(big.astype(wtype)), [1, 1, 1], begin, end, [1, 1, 1])
    except Exception:  # noqa: BLE001  (types OpenVINO's convolution does not take: keep the transposed kernel)
        return None
    if conv.get_output_element_type(0) != node.get_output_element_type(0):
        return None
    crop = [(0, s * positions[0]), (0, n_out[1]), (0, n_out[2])]
    if rows is not None:
        crop[rows[0]] = (rows[1], rows[2])
    return Phases(conv.output(0), s, cout, tuple(crop))


def _phase_kernel(w: np.ndarray, s: int, pads: list[int], reach: list[tuple[int, int]]) -> np.ndarray:
    """The phase convolution's kernel ``(s**3 * cout, cin, Lz, Ly, Lx)`` from transposed weights ``(cin, cout, k)``:
    kernel index ``j`` reads input ``Q + reach[0] + j``, so phase ``R`` takes tap ``m = R + p - s*(reach[0] + j)``."""
    cin, cout, k = w.shape[0], w.shape[1], w.shape[2:]
    L = [hi - lo + 1 for lo, hi in reach]
    big = np.zeros((s ** 3 * cout, cin, *L), np.float32)
    for ph, r in enumerate(np.ndindex(s, s, s)):
        for j in np.ndindex(*L):
            m = [r[i] + pads[i] - s * (reach[i][0] + j[i]) for i in range(3)]
            if all(0 <= m[i] < k[i] for i in range(3)):
                big[ph * cout:(ph + 1) * cout, :, j[0], j[1], j[2]] = w[:, :, m[0], m[1], m[2]].T
    return big


def per_channel_chain(node: ov.Node, members: set[str], outputs: list[str]) -> list[tuple[ov.Node, int]] | None:
    """The segment's operations after ``node`` when they are one chain of per-channel element-wise operations
    (constant operands per channel or scalar), each read only by the next, the last (or ``node`` itself) the
    segment's only output: (operation, the input index the chain enters by); None otherwise."""
    chain: list[tuple[ov.Node, int]] = []
    cur = node.output(0)
    while True:
        readers = [t for t in cur.get_target_inputs() if t.get_node().get_friendly_name() in members]
        key = f"{cur.get_node().get_friendly_name()}:{cur.get_index()}"
        if not readers:
            names = {op.get_friendly_name() for op, _ in chain} | {node.get_friendly_name()}
            return chain if outputs == [key] and names == members else None
        op = readers[0].get_node()
        if len(readers) != 1 or key in outputs or not _acts_per_channel(op, readers[0].get_index()):
            return None
        chain.append((op, readers[0].get_index()))
        cur = op.output(0)


def _acts_per_channel(op: ov.Node, port: int) -> bool:
    """Whether ``op`` acts on each channel of its input ``port`` alone: every other input a constant per channel
    or scalar."""
    if op.get_type_name() not in PER_CHANNEL or op.get_output_size() != 1:
        return False
    channels = int(op.input(port).get_partial_shape()[1].get_length())
    for inp in op.inputs():
        if inp.get_index() == port:
            continue
        v = constant_value(inp.get_source_output())
        if v is None or not _per_channel_shape(v.shape, channels, op.get_type_name() == "PRelu"):
            return False
    return True


def _per_channel_shape(shape: tuple[int, ...], channels: int, prelu: bool) -> bool:
    if int(np.prod(shape)) == 1:
        return True
    if prelu:
        return tuple(shape) == (channels,)
    full = (1,) * (5 - len(shape)) + tuple(shape)
    return len(full) == 5 and full[1] == channels and all(d == 1 for i, d in enumerate(full) if i != 1)


def apply_chain(ph: Phases, chain: list[tuple[ov.Node, int]]) -> Phases:
    """``chain`` (see :func:`per_channel_chain`) moved onto the phase tensor: each operation reads it, its
    per-channel constants repeated for every phase."""
    cur = ph.out
    for op, port in chain:
        for inp in op.inputs():
            v = None if inp.get_index() == port else constant_value(inp.get_source_output())
            if v is not None and v.size > 1:
                tiled = np.tile(v.reshape(-1), ph.s ** 3)
                shape = tiled.shape if op.get_type_name() == "PRelu" else (1, tiled.size, 1, 1, 1)
                dtype = inp.get_element_type().to_dtype()
                inp.replace_source_output(ops.constant(tiled.reshape(shape).astype(dtype)).output(0))
        op.input(port).replace_source_output(cur)
        op.validate_and_infer_types()
        cur = op.output(0)
    return Phases(cur, ph.s, ph.channels, ph.crop)


def interleave(ph: Phases, order: list[int]) -> ov.Output:
    """The phases as the output tensor, its axes in ``order`` (indices into (N, C, z, s, s); N first), cropped:
    one transposition, of the phase tensor in channels-last order (OpenVINO's own layout for it) with the axes
    that stay neighbours merged."""
    n = [int(d.get_length()) for d in ph.out.get_partial_shape()][2:]
    s, c = ph.s, ph.channels
    last = ops.transpose(ph.out, ops.constant(np.array([0, 2, 3, 4, 1], np.int64)))
    sizes = [*n, s, s, s, c]  # (nz, ny, nx, rz, ry, rx, C)
    perm = [d for ax in order[1:] for d in ([6] if ax == 1 else [ax - 2, ax + 1])]
    groups: list[list[int]] = []
    for d in perm:
        if groups and groups[-1][-1] + 1 == d:
            groups[-1].append(d)
        else:
            groups.append([d])
    by_start = sorted(groups)
    merged = [int(np.prod([sizes[d] for d in g])) for g in by_start]
    x = ops.reshape(last, ops.constant(np.array(merged, np.int64)), False)
    x = ops.transpose(x, ops.constant(np.array([by_start.index(g) for g in groups], np.int64)))
    full = [1] + [c if ax == 1 else s * n[ax - 2] for ax in order[1:]]
    out = ops.reshape(x, ops.constant(np.array(full, np.int64)), False).output(0)
    begin, end, axes = [], [], []
    for i, ax in enumerate(order):
        if ax >= 2 and ph.crop[ax - 2] != (0, full[i]):
            begin.append(ph.crop[ax - 2][0])
            end.append(ph.crop[ax - 2][1])
            axes.append(i)
    if not axes:
        return out
    return ops.slice(out, np.array(begin, np.int64), np.array(end, np.int64), np.ones(len(axes), np.int64),
                     np.array(axes, np.int64)).output(0)
