"""The receptive field read from the graph (volinfer.model.graph_reach) against the perturbation probe measured on
the same models: equal for convolution/pooling stacks (strides, dilations, paddings, transposed convolutions,
channels-last graphs), never smaller anywhere; global reductions unbounded; unknown operations probed, within the
memory budget."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from models import _conv, stream_unet, tiny_unet

from volinfer.model import receptive_field as rfm
from volinfer.model.graph_reach import Whole, graph_radius
from volinfer.model.receptive_field import measure_receptive_field
from volinfer.model.tile_model import TileModel


def _w(rng, cout, cin, k):
    return ops.constant((rng.standard_normal((cout, cin, *k)) / np.sqrt(cin * np.prod(k))).astype(np.float32))


def dilated_stack() -> ov.Model:
    """Anisotropic kernels, dilation 2, max pooling with padding, a convolution padded at the end only (it reaches
    forward: the high side dominates), all stride 1: reaches differ per axis and per side."""
    rng = np.random.default_rng(3)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = ops.relu(ops.convolution(p, _w(rng, 4, 1, (5, 3, 1)), [1, 1, 1], [2, 1, 0], [2, 1, 0], [1, 1, 1]))
    x = ops.relu(ops.convolution(x, _w(rng, 4, 4, (3, 3, 3)), [1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]))
    x = ops.max_pool(x, [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [3, 3, 3]).output(0)
    x = ops.relu(ops.convolution(x, _w(rng, 4, 4, (5, 5, 5)), [1, 1, 1], [0, 0, 0], [4, 4, 4], [1, 1, 1]))
    return ov.Model([_conv(x, 4, 2, 3, rng, "NCDHW")], [p], "dilated_stack")


def strided_stack() -> ov.Model:
    """The dilated stack, then a stride-2 convolution, a transposed convolution back up (k4 s2 p1), another
    stride-2 convolution and a transposed one with output padding (k3 s2 p1 op1)."""
    rng = np.random.default_rng(3)
    x = dilated_stack().output(0).get_node().input_value(0)
    p = x.get_node()
    while p.get_type_name() != "Parameter":
        p = p.input_value(0).get_node()
    x = ops.relu(ops.convolution(x, _w(rng, 4, 2, (3, 3, 3)), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]))
    x = ops.relu(ops.convolution_backprop_data(x, _w(rng, 4, 4, (4, 4, 4)), [2, 2, 2], pads_begin=[1, 1, 1],
                                               pads_end=[1, 1, 1]))
    x = ops.convolution(x, _w(rng, 4, 4, (3, 3, 3)), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    x = ops.convolution_backprop_data(x, _w(rng, 4, 2, (3, 3, 3)), [2, 2, 2], pads_begin=[1, 1, 1],
                                      pads_end=[1, 1, 1], output_padding=[1, 1, 1])
    return ov.Model([x], [p], "strided_stack")


def instance_norm_stack() -> ov.Model:
    rng = np.random.default_rng(4)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = _conv(p, 1, 3, 3, rng, "NCDHW")
    x = ops.mvn(x, ops.constant(np.array([2, 3, 4], np.int64)), True, 1e-5, "inside_sqrt")
    x = ops.relu(_conv(ops.relu(x), 3, 3, 5, rng, "NCDHW"))
    return ov.Model([ops.softmax(x, 1)], [p], "in_stack")


def _both(model: ov.Model, tile: int, layout: str = "NCDHW"):
    tm = TileModel(model, tile=tile, compile=False)
    return measure_receptive_field(tm), measure_receptive_field(tm, graph=False)


@pytest.mark.parametrize("build,tile", [(dilated_stack, 32), (instance_norm_stack, 24)])
def test_graph_equals_the_probe_on_convolution_stacks(build, tile):
    graph, probe = _both(build(), tile)
    assert graph.method == "graph" and probe.method == "probe" and graph.bounded and probe.bounded
    assert graph.radius == probe.radius, (graph, probe)
    assert len(set(graph.radius)) > 1 or build is instance_norm_stack  # per-axis reaches really differ
    if build is instance_norm_stack:
        assert graph.radius == (3, 3, 3)  # the MVN frozen: 1 + 2, not the whole tile


@pytest.mark.parametrize("build,slack", [(strided_stack, 1), (lambda: tiny_unet(levels=2), 3), (stream_unet, 1),
                                          (lambda: tiny_unet(levels=1, layout="NDHWC"), 1)])
def test_graph_bounds_the_probe_with_strides_interpolation_and_channels_last(build, slack):
    """Transposed convolutions and upsampling read source positions the graph bounds for every phase at once: a
    little wider than the widest phase the probe finds, never narrower."""
    m = build()
    layout = "NDHWC" if m.input(0).get_partial_shape()[4].is_static else "NCDHW"
    tm = TileModel(m, tile=48, layout=layout, compile=False)
    graph, probe = measure_receptive_field(tm), measure_receptive_field(tm, graph=False)
    assert graph.method == "graph" and probe.bounded
    assert all(p <= g <= p + slack for g, p in zip(graph.radius, probe.radius)), (graph, probe)


def _global_net(kind: str) -> ov.Model:
    rng = np.random.default_rng(5)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = _conv(p, 1, 2, 3, rng, "NCDHW")
    if kind == "l2":
        x = ops.normalize_l2(x, ops.constant(np.array([2, 3, 4], np.int64)), 1e-6, "add")
    else:
        x = ops.multiply(x, ops.reduce_mean(x, ops.constant(np.array([2, 3, 4], np.int64)), True))
    return ov.Model([x], [p], kind)


@pytest.mark.parametrize("kind,op", [("l2", "NormalizeL2"), ("mean", "ReduceMean")])
def test_global_reductions_are_unbounded(kind, op):
    m = _global_net(kind)
    found = graph_radius(m, "NCDHW", 1, [16, 16, 16])
    assert isinstance(found, Whole) and op in found.why
    rf = measure_receptive_field(TileModel(m, tile=16, compile=False))
    assert not rf.bounded and rf.method == "graph" and op in str(rf)


def _rolled() -> ov.Model:
    """A Roll by 8 along x (an operation the arithmetic does not know): the probe measures it; at 16 voxels the
    roll wraps the perturbation onto the probe's edge, from 32 on it does not (reach 8 + 2)."""
    rng = np.random.default_rng(6)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = _conv(p, 1, 2, 3, rng, "NCDHW")
    x = ops.roll(x, ops.constant(np.array([8], np.int64)), ops.constant(np.array([2], np.int64)))
    return ov.Model([_conv(ops.relu(x), 2, 2, 3, rng, "NCDHW")], [p], "rolled")


def test_unknown_operation_is_probed_within_the_memory_budget():
    tm = TileModel(_rolled(), tile=16, compile=False)
    rf = measure_receptive_field(tm)
    assert rf.method == "probe" and rf.bounded and rf.radius == (10, 2, 2)  # grown once: 16 → 32
    one = rfm.probe_mb(tm, (16, 16, 16))
    tight = measure_receptive_field(tm, max_memory_mb=one + 1)  # the first probe fits, no larger one does
    assert tight.bounded is False and f"within {one + 1:.0f} MB" in tight.reason and "lower bound" in tight.reason
    assert "over the" in measure_receptive_field(tm, max_memory_mb=one / 2).reason  # not even the first


def test_stride_period_is_where_tiles_may_start():
    from volinfer.model.graph_reach import stride_period

    assert stride_period(tiny_unet(levels=2), "NCDHW", 1, [32] * 3) == (4, 4, 4)  # two stride-2 poolings
    assert stride_period(strided_stack(), "NCDHW", 1, [48] * 3) == (2, 2, 2)  # down, up, down, up
    assert stride_period(dilated_stack(), "NCDHW", 1, [32] * 3) == (1, 1, 1)
    # not analysable: shape inference says the period (no down-sampling here; two poolings behind a Roll: 4)
    assert stride_period(_rolled(), "NCDHW", 1, [16] * 3) == (1, 1, 1)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    pooled = ops.max_pool(ops.max_pool(p, [2] * 3, [1] * 3, [0] * 3, [0] * 3, [2] * 3).output(0), [2] * 3, [1] * 3,
                          [0] * 3, [0] * 3, [2] * 3).output(0)
    rolled = ops.roll(pooled, ops.constant(np.array([1], np.int64)), ops.constant(np.array([2], np.int64)))
    assert stride_period(ov.Model([rolled], [p], "pooled_roll"), "NCDHW", 1, [16] * 3) == (4, 4, 4)
