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
