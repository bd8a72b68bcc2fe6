"""The rest of a U-Net's vocabulary in the layer-streaming engine, from PyTorch as OpenVINO converts it: dilated,
depthwise and grouped convolutions, PReLU/LeakyReLU, pooling (ceil mode, padding counted or excluded), transposed
convolutions of any kernel/stride/padding/groups/dilation, sigmoid and softmax heads, TensorFlow-style auto_pad,
and deep-supervision models with several outputs (the stream computes the output the run asks for).

Reference: OpenVINO f32 on the whole padded volume (the unmodified model, one call), computed in the test.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

import stream_models
from test_stream import _volume
from volinfer import predict
from volinfer.errors import VolinferError

torch = pytest.importorskip("torch")

SHAPES = [(9, 12, 1), (14, 10, 23)]


def _whole(path, vol: np.ndarray, multiple: int, output: int = 0) -> np.ndarray:
    """Output ``output`` of the IR on the whole volume padded on the high side to the size multiple, cropped back:
    (C, x, y, z)."""
    padded = [-(-n // multiple) * multiple for n in vol.shape]
    m = ov.Core().read_model(str(path))
    m.reshape([1, 1, *padded])
    x = np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])[None, None]
    out = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[output][0]
    return out[:, : vol.shape[0], : vol.shape[1], : vol.shape[2]]


def _check(path, multiple: int, precisions=("f32",), output: int = 0, seed: int = 2) -> None:
    for shape in SHAPES:
        vol = _volume(shape, seed=seed)
        ref = _whole(path, vol, multiple, output)
        for precision in precisions:
            out = predict(vol, path, engine="stream", precision=precision, kind="raw", model_output=output,
                          progress=False)
            out = np.moveaxis(out if out.ndim == 4 else out[..., None], -1, 0)
            dev = np.abs(out - ref).max() / np.abs(ref).max()
            assert dev < (1e-5 if precision == "f32" else 0.03), (shape, precision, dev)


@pytest.mark.parametrize("transposed", [dict(), dict(tk=2, tp=0, top=0), dict(tk=4, tp=1, top=0, tg=2),
                                        dict(tk=3, tp=2, top=1, td=2), dict(tk=5, tp=2, top=1, tg=8)])
def test_vocabulary_streams_exactly(tmp_path, transposed):
    path = tmp_path / "vocabulary.xml"
    ov.save_model(stream_models.from_torch(stream_models.torch_vocabulary(**transposed), 2), str(path))
    _check(path, 2, ("f32", "bf16") if not transposed else ("f32",))


@pytest.mark.parametrize("ceil,include_pad", [(False, False), (True, True)])
def test_pooling_modes_stream_exactly(tmp_path, ceil, include_pad):
    """Average pooling padded along z with padding excluded (each plane rescaled by its window's planes inside the
    volume; counted padding runs in test_vocabulary_streams_exactly); ceil-mode pools keep their rounding."""
    path = tmp_path / "pools.xml"
    ov.save_model(stream_models.from_torch(stream_models.torch_vocabulary(ceil=ceil, include_pad=include_pad), 2),
                  str(path))
    _check(path, 2)


@pytest.mark.parametrize("auto_pad", ["same_upper", "same_lower"])
def test_auto_pad_convolutions_stream_exactly(tmp_path, auto_pad):
    """TensorFlow's "same" padding (OpenVINO's auto_pad): even and odd kernels, strided."""
    rng = np.random.default_rng(4)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32)
    x = ops.convolution(p, ops.constant(rng.standard_normal((3, 1, 4, 4, 4)).astype(np.float32)), [2] * 3, [0] * 3,
                        [0] * 3, [1] * 3, auto_pad=auto_pad)
    x = ops.interpolate(x, ops.constant(np.array([2.0] * 3, np.float32)), "nearest", "scales",
                        axes=ops.constant(np.array([2, 3, 4])))
    y = ops.convolution(x, ops.constant(rng.standard_normal((2, 3, 3, 3, 3)).astype(np.float32)), [1] * 3, [0] * 3,
                        [0] * 3, [1] * 3, auto_pad=auto_pad)
    m = ov.Model([y], [p])
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    path = tmp_path / "same.xml"
    ov.save_model(m, str(path))
    _check(path, 2)


def test_deep_supervision_streams_the_output_asked_for(tmp_path):
    """Outputs 0 (logits) and 2 (softmax head) stream, each equal to whole-volume inference of that output; output 1
    (half resolution) is refused in one line, as the tile engine refuses it."""
    path = tmp_path / "ds.xml"
    ov.save_model(stream_models.from_torch(stream_models.torch_deep_supervision(), 2), str(path))
    _check(path, 2, output=0)
    _check(path, 2, output=2)
    with pytest.raises(VolinferError, match="does not keep its input's spatial size"):
        predict(_volume((9, 12, 5)), path, engine="stream", model_output=1, progress=False)
