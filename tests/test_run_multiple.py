"""A model file convert did not write (ONNX with free input sizes) still has a stride: the run must start crop tiles
on its stride period, as `volinfer convert` stores it, or report not exact. Reference: OpenVINO f32 on the whole
volume padded to that period (what whole-volume inference of a strided network sees)."""

import numpy as np
import openvino as ov
import pytest

import volinfer

torch = pytest.importorskip("torch")


def _size_following_unet(path):
    from torch import nn

    class Net(nn.Module):  # upsamples to the skip's own size: accepts any input size, pools pairs of voxels
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.c1 = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 6, 3, stride=2, padding=1)
            self.c2 = nn.Conv3d(10, 3, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.c0(x))
            b = torch.relu(self.c1(a))
            return self.c2(torch.cat([nn.functional.interpolate(b, size=a.shape[2:], mode="nearest"), a], 1))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), torch.zeros(1, 1, 16, 16, 16), str(path), input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {2: "a", 3: "b", 4: "c"}}, dynamo=False)


def test_unconverted_strided_model_tiles_on_its_stride_period(tmp_path):
    _size_following_unet(tmp_path / "m.onnx")
    vol = np.random.default_rng(0).standard_normal((31, 27, 21)).astype(np.float32)
    raw, rep = volinfer.predict(vol, tmp_path / "m.onnx", tile=16, kind="raw", normalize="none", precision="f32",
                                report=True, progress=False)
    padded = np.zeros((32, 28, 22), np.float32)  # the stride period is 2
    padded[:31, :27, :21] = vol
    core = ov.Core()
    model = core.read_model(str(tmp_path / "m.onnx"))
    model.reshape({model.input(0): ov.PartialShape([1, 1, *padded.shape])})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ref = compiled(padded[None, None])[0][0][:, :31, :27, :21]  # (C, x, y, z)
    diff = float(np.abs(np.moveaxis(raw, -1, 0) - ref).max())
    assert rep.tiles > 1
    # tiles at odd offsets pooled other pairs (0.4 of a 1.2 range): on the period they equal the padded volume's
    assert diff < 1e-4 * float(np.abs(ref).max()), (diff, rep.not_exact)
    # but the model takes the volume's own size, where it resizes by other factors: the forced tile pads, not exact
    assert not rep.exact and "although the model takes its own size 31x27x21" in rep.not_exact[-1], rep.not_exact
    assert "--tile 16x16x16 was forced" in rep.not_exact[-1]
