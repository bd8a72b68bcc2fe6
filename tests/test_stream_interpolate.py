"""Interpolate/Resize in the layer-streaming engine: output plane j reads the source planes at the coordinate its
transformation gives (j·(n_in−1)/(n_out−1) with align_corners, (j+0.5)/scale−0.5 half-pixel, ...), a z-window
that moves with j. No tiling is exact for align_corners=True; the stream is whole-volume inference.

References, computed in the tests: OpenVINO f32 on the whole padded volume (the unmodified model), and PyTorch.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

import stream_models
from test_stream import _volume, whole_volume
from volinfer import predict
import volinfer.run.stream as stream
from volinfer.errors import VolinferError
from volinfer.model.stream_graph import InterpWindow, analyse
from volinfer.model.tile_model import CompileOptions, TileModel
from volinfer.model.memory import weights_mb
from volinfer.run.stream import fixed_mb
from volinfer.run.setup import run_multiple
from volinfer.run.stream import plan_stream

HAS_TORCH = importlib.util.find_spec("torch") is not None

#: (mode, coordinate transformation, nearest rounding): what PyTorch, ONNX and TensorFlow exports use, and the rest
CASES = [("linear_onnx", "align_corners", "floor"), ("linear_onnx", "pytorch_half_pixel", "floor"),
         ("linear", "half_pixel", "floor"), ("linear_onnx", "asymmetric", "floor"),
         ("nearest", "asymmetric", "floor"), ("nearest", "half_pixel", "round_prefer_floor"),
         ("nearest", "align_corners", "round_prefer_ceil"), ("nearest", "tf_half_pixel_for_nn", "ceil"),
         ("nearest", "asymmetric", "simple"), ("nearest", "pytorch_half_pixel", "round_prefer_floor")]


def _resample(mode: str, transform: str, nearest: str, scale: float) -> ov.Model:
    """Resize by ``scale`` (given as scales), then back to the input's size (given as sizes, computed from the
    input's shape as ONNX exports do): the output keeps the input's size, both interpolations see odd sizes."""
    p = ops.parameter([1, 1, -1, -1, -1], np.float32)
    axes = ops.constant(np.array([2, 3, 4], np.int64))
    y = ops.interpolate(ops.relu(p), ops.constant(np.array([scale] * 3, np.float32)), mode, "scales", None, None,
                        transform, nearest, axes=axes)
    y = ops.multiply(y, ops.constant(np.float32(1.3)))
    sizes = ops.gather(ops.shape_of(p), ops.constant(np.array([2, 3, 4])), ops.constant(np.array(0)))
    return ov.Model([ops.interpolate(y, sizes, mode, "sizes", None, None, transform, nearest, axes=axes)], [p])


@pytest.mark.parametrize("mode,transform,nearest", CASES)
def test_every_interpolation_streams_exactly(tmp_path, monkeypatch, mode, transform, nearest):
    """Up by 1.5 then back, and down to 0.6 then back: whole-volume inference to float32 rounding; the second with
    one output plane per call (every chunk start)."""
    for scale, chunk_bytes, shape in ((1.5, 2 << 20, (11, 9, 17)), (0.6, 1, (12, 7, 19))):
        monkeypatch.setattr(stream, "CHUNK_BYTES", chunk_bytes)
        path = tmp_path / f"resample{scale}.xml"
        ov.save_model(_resample(mode, transform, nearest, scale), str(path), compress_to_fp16=False)
        vol = _volume(shape, seed=int(scale * 10))
        out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False, report=True)
        # whole-volume inference on the volume padded to the run's size multiple (the resampling's stride period,
        # as `volinfer convert` would store it)
        ref = whole_volume(path, vol, multiple=run_multiple(TileModel(path, compile=False)))[0]
        assert rep.engine == "stream"
        np.testing.assert_allclose(out, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("n_in,n_out", [(7, 14), (12, 24), (5, 13), (9, 4)])
def test_align_corners_reads_the_planes_of_its_definition(n_in, n_out):
    """Source planes and weights of align_corners linear interpolation against the definition (float64), and every
    chunk's sources inside the planes the chunk reads."""
    win = InterpWindow(n_in=n_in, n_out=n_out, scale=n_out / n_in, linear=True, transform="align_corners")
    c = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    i0, i1, w = win.sources
    np.testing.assert_allclose(i0 + w, c, atol=1e-5)
    assert (i1 - i0 <= 1).all() and (i1 < n_in).all()
    for t in (1, 2, 3, 5):
        for a in range(0, n_out, t):
            lo, hi = win.input_range(a, t)
            assert lo <= i0[a: a + t].min() and i1[a: a + t].max() < hi
            assert hi - lo == win.input_planes(t)


def _torch_reference(net, vol: np.ndarray, multiple: int) -> np.ndarray:
    """PyTorch on the whole volume padded on the high side to the size multiple, cropped back: (C, x, y, z)."""
    import torch

    padded = [-(-n // multiple) * multiple for n in vol.shape]
    x = np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])
    with torch.no_grad():
        out = net(torch.from_numpy(x[None, None].astype(np.float32)))[0].numpy()
    return out[:, : vol.shape[0], : vol.shape[1], : vol.shape[2]]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("route", ["convert_model", "onnx"])
def test_trilinear_align_corners_unet_streams(tmp_path, route):
    """A U-Net upsampling with nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True), converted by
    OpenVINO from PyTorch or exported to ONNX (Resize): f32 streams equal whole-volume OpenVINO and PyTorch; bf16
    streams stay within bf16's rounding. Odd shapes: one plane, z below the receptive field, sizes not multiples
    of 4."""
    net = stream_models.torch_upsample_unet(seed=3)
    path = tmp_path / "up.xml"
    if route == "onnx":
        pytest.importorskip("onnx")
        import torch

        torch.onnx.export(net, torch.zeros(1, 1, 8, 8, 8), str(tmp_path / "up.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {2: "d", 3: "h", 4: "w"}}, opset_version=17)
        m = ov.Core().read_model(str(tmp_path / "up.onnx"))
        m.set_rt_info("4", ["volinfer", "size_multiple"])
    else:
        m = stream_models.from_torch(net, 4)
    assert any(op.get_type_name() == "Interpolate" for op in m.get_ops())
    ov.save_model(m, str(path))
    for i, shape in enumerate([(13, 11, 1), (9, 14, 6), (22, 17, 30)]):
        vol = _volume(shape, seed=20 + i)
        ref, torch_ref = whole_volume(path, vol), _torch_reference(net, vol, 4)
        for precision in ("f32", "bf16"):
            out = np.moveaxis(predict(vol, path, engine="stream", precision=precision, kind="raw", progress=False),
                              -1, 0)
            if precision == "f32":
                np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
                np.testing.assert_allclose(out, torch_ref, atol=1e-4, rtol=0)
            else:
                assert np.abs(out - ref).max() < 0.03
                assert (out.argmax(0) == ref.argmax(0)).mean() > 0.99


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_bands_only_where_interpolation_allows_them(tmp_path):
    """A budget below the whole cross-section: half-pixel upsampling streams in bands of y rows (shift-equivariant
    for band starts on the size multiple: equal to whole-volume inference); align_corners=True cannot (its
    coordinates scale with the extent: a band would be a tile), so --engine stream refuses within that budget
    instead of computing something else (with bands it claimed exactness at max |dp| 0.0019, labels 99.59%)."""
    shape = (20, 150, 28)
    vol = _volume(shape, seed=30)
    for align in (False, True):
        path = tmp_path / f"up{align}.xml"
        m = stream_models.from_torch(stream_models.torch_upsample_unet(align_corners=align, seed=4), 4)
        m.set_rt_info("[20, 20, 20]", ["volinfer", "receptive_field"])
        ov.save_model(m, str(path))
        tm = TileModel(path, compile=False, options=CompileOptions(precision="f32"))
        whole = plan_stream(tm, shape, "f32")
        narrow = plan_stream(tm, shape, "f32", fits=lambda p: False, margin_y=24)
        if align:
            assert narrow.band == whole.band
            budget = fixed_mb(weights_mb(tm.model)) + 0.8 * whole.memory_mb
            with pytest.raises(VolinferError, match="--max-memory"):
                predict(vol, path, engine="stream", precision="f32", max_memory_mb=budget, progress=False)
            continue
        assert narrow.band < whole.band
        budget = fixed_mb(weights_mb(tm.model)) + (whole.memory_mb + narrow.memory_mb) / 2
        out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", max_memory_mb=budget,
                           progress=False, report=True)
        assert rep.grid[1] > 1, rep.notes
        np.testing.assert_allclose(np.moveaxis(out, -1, 0), whole_volume(path, vol), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform,scale,bands", [("half_pixel", 2.0, True), ("asymmetric", 0.5, True),
                                                   ("align_corners", 2.0, False), ("half_pixel", 1.5, False)])
def test_bands_exact_only_for_whole_factors_without_align_corners(transform, scale, bands):
    """Bands along y are tiles along y: exact for whole up/down factors whose coordinates shift with the band."""
    graph = analyse(_resample("linear_onnx", transform, "floor", scale), [1, 1, 16, 24, 12], 4)
    assert graph.bands_exact(3) is bands
    assert graph.bands_exact(2) is bands and graph.bands_exact(4)  # z is never cut into bands
