"""`--input NAME` cuts the graph at that tensor for every format with named tensors (TF1 frozen graphs: see
test_converters_tf.py)."""

import numpy as np
import pytest


def test_input_cuts_an_ir_at_an_internal_tensor(tmp_path):
    """`--input NAME` on any format with named tensors: here an IR whose image passes through a scaling by a
    second input before the convolution; cut at the scaled tensor, the IR has one input and computes the
    convolution alone (checked against OpenVINO running the convolution on its own)."""
    import openvino as ov
    import openvino.opset13 as ops

    from converters import convert

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 1, 3, 3, 3)).astype(np.float32)
    raw = ops.parameter([1, 1, -1, -1, -1], np.float32, name="raw")
    scale = ops.parameter([1], np.float32, name="scale")
    img = ops.multiply(raw, scale)
    img.output(0).set_names({"img"})
    conv = ops.convolution(img, ops.constant(w), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    ov.save_model(ov.Model([conv], [raw, scale], "scaled"), str(tmp_path / "src.xml"), compress_to_fp16=False)
    r = convert(str(tmp_path / "src.xml"), tmp_path / "cut.xml", inputs=["img"], tile=16, fp16=False,
                speed_profile=False)
    assert r.parity.checked and r.parity.passed
    m = ov.Core().read_model(str(tmp_path / "cut.xml"))
    assert [sorted(p.output(0).get_names()) for p in m.get_parameters()] == [["img"]]
    x = rng.standard_normal((1, 1, 13, 11, 9)).astype(np.float32)
    p = ops.parameter([1, 1, 13, 11, 9], np.float32)
    ref = ov.Model([ops.convolution(p, ops.constant(w), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])], [p])
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    m.reshape({0: list(x.shape)})
    got = ov.Core().compile_model(m, "CPU", f32)(x)[0]
    np.testing.assert_allclose(got, ov.Core().compile_model(ref, "CPU", f32)(x)[0], rtol=1e-5, atol=1e-5)
    from volinfer.errors import VolinferError

    with pytest.raises(VolinferError, match="no input or tensor named imgg; the model's inputs: raw, scale"):
        convert(str(tmp_path / "src.xml"), tmp_path / "x.xml", inputs=["imgg"], tile=16)
