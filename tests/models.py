"""Small OpenVINO models built in a few lines with the opset API, for tests (no files, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def _conv(x, cin: int, cout: int, k: int, rng: np.random.Generator, layout: str):
    w = (rng.standard_normal((cout, cin, k, k, k)) / np.sqrt(cin * k**3)).astype(np.float32)
    p = k // 2
    y = ops.convolution(x, ops.constant(w), [1, 1, 1], [p, p, p], [p, p, p], [1, 1, 1])
    b = rng.standard_normal((1, cout, 1, 1, 1)).astype(np.float32) * 0.1
    return ops.add(y, ops.constant(b))


def tiny_unet(in_ch: int = 1, out_ch: int = 2, layout: str = "NCDHW", seed: int = 0, static: int | None = None,
              levels: int = 1) -> ov.Model:
    """conv3-relu, (avgpool2 → conv3-relu → nearest upsample ×2) × levels, concat skip, conv1 → out_ch.

    Needs sizes divisible by 2**levels. Receptive-field radius: 1 + sum over levels of 2**l * 1 (+ pooling) —
    small enough that crop stitching with a 16-voxel margin is exact.
    """
    rng = np.random.default_rng(seed)
    dims = [static] * 3 if static else [-1, -1, -1]
    shape = [1, in_ch, *dims] if layout == "NCDHW" else [1, *dims, in_ch]
    param = ops.parameter(shape, np.float32, name="image")
    x = param if layout == "NCDHW" else ops.transpose(param, ops.constant(np.array([0, 4, 1, 2, 3])))
    x = ops.relu(_conv(x, in_ch, 4, 3, rng, layout))
    skip = x
    for _ in range(levels):
        x = ops.avg_pool(x, [2, 2, 2], [0, 0, 0], [0, 0, 0], [2, 2, 2], exclude_pad=True)
        x = ops.relu(_conv(x, 4, 4, 3, rng, layout))
    for _ in range(levels):
        x = ops.interpolate(x, ops.constant(np.array([2.0, 2.0, 2.0], np.float32)), "nearest", "scales",
                            axes=ops.constant(np.array([2, 3, 4], np.int64)),
                            coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    x = ops.concat([x, skip], 1)
    y = _conv(x, 8, out_ch, 1, rng, layout)
    if layout == "NDHWC":
        y = ops.transpose(y, ops.constant(np.array([0, 2, 3, 4, 1])))
    y.output(0).get_tensor().set_names({"logits"})
    m = ov.Model([y], [param], "tiny_unet")
    ov.layout_helpers.set_layout(m.input(0), ov.Layout(layout))
    return m


def save_unet2(path, **settings) -> Path:
    """The two-level tiny U-Net (size multiple 4, stored) saved as IR at ``path``, with extra stored ``settings``."""
    m = tiny_unet(levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    for key, value in settings.items():
        m.set_rt_info(str(value), ["volinfer", key])
    ov.save_model(m, str(path))
    return Path(path)


def stream_unet(seed: int = 0, softmax: bool = True, in_channels: int = 1) -> ov.Model:
    """A U-Net made of every operation the layer-streaming engine runs (size multiple 4): strided and dilated
    convolutions, a grouped convolution, max pooling, both transposed-convolution shapes (k3 s2 p1 op1 and k2 s2),
    PReLU, residual addition, channel concatenation and a channel softmax. Dynamic spatial input, NCDHW."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> ov.Node:
        return ops.constant((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))

    def bias(c: int) -> ov.Node:
        return ops.constant((rng.standard_normal((1, c, 1, 1, 1)) * 0.1).astype(np.float32))

    def conv(x, cin, cout, k=3, s=1, p=1, d=1):
        return ops.add(ops.convolution(x, w(cout, cin, k, k, k), [s] * 3, [p] * 3, [p] * 3, [d] * 3), bias(cout))

    def prelu(x, c):
        return ops.prelu(x, ops.constant(np.full((c, 1, 1, 1), 0.2, np.float32)))

    param = ops.parameter([1, in_channels, -1, -1, -1], np.float32, name="image")
    e0 = prelu(conv(param, in_channels, 6), 6)                                     # full resolution
    e1 = prelu(conv(e0, 6, 8, s=2), 8)                                    # 1/2, strided
    e1 = ops.add(e1, conv(e1, 8, 8, d=2, p=2))                            # dilated residual
    g = ops.group_convolution(e1, ops.constant(rng.standard_normal((2, 4, 4, 3, 3, 3)).astype(np.float32) * 0.1),
                              [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    e2 = ops.max_pool(prelu(g, 8), [2] * 3, [1] * 3, [0] * 3, [0] * 3, [2] * 3).output(0)  # 1/4
    b = prelu(conv(e2, 8, 12), 12)
    u1 = ops.convolution_backprop_data(b, w(12, 8, 3, 3, 3), [2] * 3, pads_begin=[1] * 3, pads_end=[1] * 3,
                                       output_padding=[1] * 3)            # back to 1/2
    d1 = prelu(conv(ops.concat([u1, e1], 1), 16, 8), 8)
    u0 = ops.convolution_backprop_data(d1, w(8, 6, 2, 2, 2), [2] * 3, pads_begin=[0] * 3, pads_end=[0] * 3)  # full
    y = conv(ops.concat([u0, e0], 1), 12, 3, k=1, p=0)
    if softmax:
        y = ops.softmax(y, 1)
    m = ov.Model([y], [param], "stream_unet")
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    return m


def mvn_model(seed: int = 0) -> ov.Model:
    """A convolution, an MVN over the spatial axes (InstanceNorm without affine) and a 1x1 convolution: the smallest
    model with a normalisation layer (size multiple 1)."""
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    w = np.random.default_rng(seed).standard_normal((4, 1, 3, 3, 3)).astype(np.float32)
    x = ops.convolution(p, ops.constant(w), [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    x = ops.mvn(x, ops.constant(np.array([2, 3, 4], np.int64)), True, 1e-5, "inside_sqrt")
    y = ops.convolution(x, ops.constant(np.ones((2, 4, 1, 1, 1), np.float32)), [1] * 3, [0] * 3, [0] * 3, [1] * 3)
    m = ov.Model([y], [p], "mvn")
    m.set_rt_info("1", ["volinfer", "size_multiple"])
    return m
