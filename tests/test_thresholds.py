"""One-channel models at thresholds other than 0.5, against numpy thresholding of the model's own whole-volume
output: a logits model (volinfer applies the sigmoid) through the CLI, and a model ending in Sigmoid (its output
is the probability; no second activation) through the API."""

import json

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from click.testing import CliRunner
from conftest import whole_volume_reference
from models import tiny_unet

from volinfer import TileModel, predict
from volinfer.cli import main

SHAPE = (53, 47, 45)  # larger than the tile on every axis: the run pads as the reference does
TILE, MULTIPLE, OVERLAP = 40, 4, 26  # crop margins (13) cover the receptive field read from the graph (13)


def _models():
    logits = tiny_unet(out_ch=1, levels=2, seed=3)
    same = tiny_unet(out_ch=1, levels=2, seed=3)  # the same network, built apart (models must not share nodes)
    prob = ov.Model([ops.sigmoid(same.output(0).get_node().input_value(0))], same.get_parameters(), "ends_in_sigmoid")
    for m in (logits, prob):
        m.set_rt_info(str(MULTIPLE), ["volinfer", "size_multiple"])
    return logits, prob


@pytest.fixture(scope="module")
def case():
    vol = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32) * 10
    logits, prob = _models()
    p = whole_volume_reference(prob, vol[None], TILE, MULTIPLE)[0].astype(np.float64)
    p_from_logits = 1 / (1 + np.exp(-whole_volume_reference(logits, vol[None], TILE, MULTIPLE)[0].astype(np.float64)))
    for t in (0.2, 0.8):  # the thresholds change many labels here: a run that ignores them is caught
        assert 0.02 < np.mean((p > t) != (p > 0.5)) < 0.98
    return vol, logits, prob, p, p_from_logits


def _check(labels, p, t):
    """Equal to numpy's ``p > t`` except where p is within float32 rounding of t."""
    ref = p > t
    near = np.abs(p - t) < 1e-5
    assert near.mean() < 1e-3
    assert labels.dtype == np.uint8 and labels.shape == p.shape
    np.testing.assert_array_equal(labels[~near], ref[~near])


@pytest.mark.parametrize("t", [0.2, 0.8])
def test_cli_threshold_on_logits_model(tmp_path, case, t):
    vol, logits, _, _, p = case
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    ov.save_model(logits, str(tmp_path / "m.xml"), compress_to_fp16=False)  # the weights the reference used
    r = CliRunner().invoke(main, ["run", str(tmp_path / "v.nii"), "-m", str(tmp_path / "m.xml"), "-o",
                                  str(tmp_path / "o.nii"), "--tile", str(TILE), "--overlap", str(OVERLAP),
                                  "--threshold", str(t), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exact"] is True
    _check(np.asarray(nib.load(str(tmp_path / "o.nii")).dataobj), p, t)


@pytest.mark.parametrize("t", [0.2, 0.8])
def test_api_threshold_on_model_ending_in_sigmoid(case, t):
    vol, _, prob, p, _ = case
    tm = TileModel(prob.clone(), tile=TILE)
    labels = predict(vol, tm, overlap=OVERLAP, threshold=t)
    _check(np.squeeze(labels), p, t)
    probs = predict(vol, TileModel(prob.clone(), tile=TILE), overlap=OVERLAP, kind="probabilities")
    np.testing.assert_allclose(np.squeeze(probs), p, atol=1e-5)  # no second sigmoid


@pytest.mark.parametrize("channels, activation, keep, threshold", [
    (3, "softmax", None, 0.5), (4, "none", None, 0.5), (3, "sigmoid", (0, 2), 0.3), (1, "sigmoid", None, 0.7),
    (1, "none", None, 0.25)])
def test_labels_of_the_activated_output_equal_labels_of_the_raw_one(channels, activation, keep, threshold):
    """A run mapped back from the model's voxel size labels the resampled probabilities (OutputSpec.
    label_probabilities); at any one voxel those labels must be what the raw output gives (argmax of logits =
    argmax of softmax; sigmoid above a probability = logit above its logit), masks and kept channels included."""
    from volinfer.run.postprocess import OutputSpec

    raw = np.random.default_rng(channels).normal(0, 3, (channels, 7, 6, 5)).astype(np.float32)
    labels = OutputSpec(channels, kind="labels", activation=activation, keep=keep, threshold=threshold)
    probs = OutputSpec(channels, kind="probabilities", activation=activation)
    assert labels.labels_from_probabilities
    want = np.zeros((labels.out_channels, 7, 6, 5), labels.dtype)
    labels(raw, want)
    p = np.zeros((channels, 7, 6, 5), np.float32)
    probs(raw, p)
    got = np.zeros_like(want)
    labels.label_probabilities(p, got)
    np.testing.assert_array_equal(got, want)
    assert not OutputSpec(1, kind="labels", activation="softmax").labels_from_probabilities  # (probability 1)
