"""Tiled inference against independently computed whole-volume references."""

import numpy as np
import openvino as ov
import pytest
from conftest import whole_volume_reference
from models import tiny_unet

from volinfer import TileModel, VolinferError, predict
from volinfer.tiling.geometry import TileGrid, padded_size
from volinfer.model.receptive_field import measure_receptive_field
from volinfer.tiling.weights import tile_weights_1d

RNG = np.random.default_rng(42)


def _raw(out: np.ndarray) -> np.ndarray:
    """predict() returns (x, y, z, c); references are (c, x, y, z)."""
    return np.moveaxis(out, -1, 0)


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize("shape", [(157, 131, 97), (40, 70, 33)])
def test_crop_stitching_equals_whole_volume_inference(layout, shape):
    model = tiny_unet(levels=2, layout=layout)
    vol = RNG.standard_normal(shape).astype(np.float32)
    tm = TileModel(model.clone(), tile=32, layout=layout)
    tm.multiple = 4  # as stored by `volinfer convert`; set directly here
    out = predict(vol, tm, kind="raw", stitch="crop", overlap=16)
    ref = whole_volume_reference(model, vol[None], 32, 4, layout)
    assert out.shape == (*shape, 2)
    np.testing.assert_allclose(_raw(out), ref, atol=2e-5, rtol=0)


def test_crop_is_not_exact_when_margin_is_below_receptive_field(unet2):
    vol = RNG.standard_normal((60, 50, 40)).astype(np.float32)
    tm = TileModel(unet2.clone(), tile=32)
    rf = measure_receptive_field(tm)
    assert rf.bounded and 4 <= max(rf.radius) < 16
    ref = whole_volume_reference(unet2, vol[None], 32, 4)
    exact = predict(vol, tm, kind="raw", overlap=2 * max(rf.radius) + 2)
    np.testing.assert_allclose(_raw(exact), ref, atol=2e-5, rtol=0)
    sloppy = predict(vol, tm, kind="raw", overlap=0)
    assert np.abs(_raw(sloppy) - ref).max() > 1e-2  # the check above can fail


def test_multichannel_input_and_volume_smaller_than_tile():
    model = tiny_unet(in_ch=3, out_ch=4, levels=1)
    vol = RNG.standard_normal((3, 21, 13, 9)).astype(np.float32)
    tm = TileModel(model.clone(), tile=32)
    out = predict(vol, tm, kind="raw", channel_axis=0)
    ref = whole_volume_reference(model, vol, 2, 2)  # the model's own whole-volume inference: padded to its multiple
    np.testing.assert_allclose(_raw(out), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("pad_mode", ["edge", "reflect", "constant"])
def test_padding_modes_match_numpy_pad_of_the_whole_volume(unet2, pad_mode):
    vol = RNG.standard_normal((45, 38, 29)).astype(np.float32)
    tm = TileModel(unet2.clone(), tile=32)
    tm.multiple = 4
    out = predict(vol, tm, kind="raw", overlap=16, pad_mode=pad_mode)
    ref = whole_volume_reference(unet2, vol[None], 32, 4, pad_mode=pad_mode)
    np.testing.assert_allclose(_raw(out), ref, atol=2e-5, rtol=0)


def _reference_blend(model: ov.Model, vol: np.ndarray, tile: int, overlap: int, mode: str) -> np.ndarray:
    """In-RAM blend with full-volume numerator and denominator: what MONAI does, done independently."""
    grid = TileGrid.build(vol.shape, (tile,) * 3, (1, 1, 1), (overlap,) * 3, "blend")
    padded = [padded_size(n, tile, 1) for n in vol.shape]
    pv = np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])
    m = model.clone()
    m.reshape({0: [1, 1, tile, tile, tile]})
    cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    w1 = tile_weights_1d(mode, tile).astype(np.float64)
    w3 = w1[:, None, None] * w1[None, :, None] * w1[None, None, :]
    num = np.zeros((2, *padded))
    den = np.zeros(padded)
    for t in grid:
        x, y, z = t.start
        sl = (slice(x, x + tile), slice(y, y + tile), slice(z, z + tile))
        out = cm(pv[sl][None, None])[0][0]
        num[(slice(None), *sl)] += out * w3
        den[sl] += w3
    return (num / den)[:, : vol.shape[0], : vol.shape[1], : vol.shape[2]]


@pytest.mark.parametrize("mode", ["gaussian", "mean"])
def test_blending_equals_in_ram_reference(mode):
    model = tiny_unet(levels=0)
    vol = RNG.standard_normal((53, 41, 37)).astype(np.float32)
    out = predict(vol, TileModel(model.clone(), tile=24), kind="raw", stitch=mode, overlap=10)
    ref = _reference_blend(model, vol, 24, 10, mode)
    np.testing.assert_allclose(_raw(out), ref, atol=1e-4, rtol=1e-5)


def test_output_kinds(unet2):
    vol = RNG.standard_normal((30, 26, 22)).astype(np.float32)
    tm = TileModel(unet2.clone(), tile=16)
    raw = _raw(predict(vol, tm, kind="raw"))
    labels = predict(vol, tm, kind="labels")
    assert labels.dtype == np.uint8 and labels.shape == vol.shape
    np.testing.assert_array_equal(labels, raw.argmax(0))
    probs = predict(vol, tm, kind="probabilities", activation="softmax")
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_raw(probs), np.exp(raw) / np.exp(raw).sum(0), atol=1e-6)
    p1 = predict(vol, tm, kind="probabilities", activation="sigmoid", channels=[1], prob_dtype="float16")
    assert p1.dtype == np.float16 and p1.shape == vol.shape
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-raw[1])), atol=1e-3)
    masks = predict(vol, tm, kind="labels", activation="sigmoid")
    assert masks.shape == (*vol.shape, 2)
    np.testing.assert_array_equal(masks, np.moveaxis(raw > 0, 0, -1))


def test_receptive_field_of_known_stack():
    import openvino.opset13 as ops

    p = ops.parameter([1, 1, -1, -1, -1], np.float32)
    w = ops.constant(np.ones((1, 1, 3, 3, 3), np.float32))
    x = ops.convolution(p, w, [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    x = ops.convolution(x, w, [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    x = ops.convolution(x, ops.constant(np.ones((1, 1, 5, 1, 3), np.float32)), [1] * 3, [2, 0, 1], [2, 0, 1], [1] * 3)
    rf = measure_receptive_field(TileModel(ov.Model([x], [p]), tile=24))
    assert rf.radius == (4, 2, 3) and rf.bounded


def test_tile_not_multiple_of_stored_size_multiple_is_explained(unet2):
    with pytest.raises(VolinferError, match="divisible by 4"):
        TileModel(unet2, tile=30)


def test_tile_the_model_rejects_is_explained():
    with pytest.raises(VolinferError, match="rejected by the model"):
        TileModel(tiny_unet(levels=2), tile=30)  # no stored multiple: OpenVINO's shape inference refuses it
