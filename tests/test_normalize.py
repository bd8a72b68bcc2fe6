"""Whole-volume normalisation statistics against numpy on the whole volume: percentiles (np.percentile), z-score and
min-max, on odd-shaped volumes that span several slabs of the streaming statistics pass, for .nii and .nii.gz (with
the file's scl_slope/scl_inter applied). An identity model makes the run's output the normalised input itself."""

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from volinfer import predict
from volinfer.errors import VolinferError

SHAPE = (37, 29, 53)  # statistics slabs are tile-deep (16 planes): 16 + 16 + 16 + 5
TILE = 16


def identity_model(path):
    """1 → 1 channel, a 1x1x1 convolution with weight 1: output = input, exactly."""
    image = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    y = ops.convolution(image, ops.constant(np.ones((1, 1, 1, 1, 1), np.float32)), [1, 1, 1], [0, 0, 0], [0, 0, 0],
                        [1, 1, 1])
    m = ov.Model([y], [image], "identity")
    m.set_rt_info("1", ["volinfer", "size_multiple"])
    m.set_rt_info("[0, 0, 0]", ["volinfer", "receptive_field"])
    ov.save_model(m, str(path))
    return path


def _volume(tmp_path, suffix, stored):
    """Heavy-tailed intensities (so that every percentile is far from its neighbours), stored as ``stored`` with a
    slope and intercept; returns the path and the real-world values numpy sees."""
    rng = np.random.default_rng(7)
    raw = rng.standard_normal(SHAPE) * 40 + rng.standard_exponential(SHAPE) ** 3 * 30
    raw[:, :, 40:] += 500  # the last slabs differ from the first: a pass that stops early is caught
    data = np.clip(raw, -30000, 30000).astype(stored)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / f"v{suffix}"
    nib.save(img, str(path))
    values = np.asarray(nib.load(str(path)).dataobj).astype(np.float64)  # scaled by nibabel: slope 0.5, inter 10
    np.testing.assert_allclose(values, data.astype(np.float64) * 0.5 + 10.0)
    return path, values


def _run(tmp_path, path, spec):
    out, rep = predict(str(path), str(identity_model(tmp_path / "id.xml")), tile=TILE, overlap=0, kind="raw",
                       normalize=spec, report=True, reuse_constant=False)
    return np.squeeze(out), rep.normalization


CASES = [(".nii", np.int16), (".nii.gz", np.int16), (".nii", np.float32), (".nii.gz", np.float32)]


@pytest.mark.parametrize("suffix,stored", CASES)
@pytest.mark.parametrize("lower,upper", [(0.5, 99.5), (2.0, 97.0)])
def test_percentile_matches_numpy_on_the_whole_volume(tmp_path, suffix, stored, lower, upper):
    path, x = _volume(tmp_path, suffix, stored)
    lo, hi = np.percentile(x, [lower, upper])
    clipped = np.clip(x, lo, hi)
    expected = (clipped - clipped.mean()) / clipped.std()
    out, desc = _run(tmp_path, path, {"kind": "percentile", "lower": lower, "upper": upper})
    np.testing.assert_allclose(desc["clip"][0], [lo, hi], rtol=1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the check can fail: neighbouring percentiles give visibly different outputs on this volume
    lo2, hi2 = np.percentile(x, [lower + 0.5, upper - 0.5])
    other = np.clip(x, lo2, hi2)
    assert np.abs((other - other.mean()) / other.std() - expected).max() > 1e-2


@pytest.mark.parametrize("suffix,stored", CASES)
def test_zscore_and_minmax_match_numpy(tmp_path, suffix, stored):
    path, x = _volume(tmp_path, suffix, stored)
    out, desc = _run(tmp_path, path, {"kind": "zscore"})
    np.testing.assert_allclose(out, (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-5)
    out, desc = _run(tmp_path, path, {"kind": "minmax"})
    np.testing.assert_allclose(out, (x - x.min()) / (x.max() - x.min()), rtol=1e-5, atol=1e-6)
    assert abs(out.min()) < 1e-6 and abs(out.max() - 1.0) < 1e-6


def test_sampled_percentiles_of_a_large_volume_see_thin_structures():
    """Above ~13M voxels the percentiles come from a sample; it must represent every plane. A bright lesion six
    planes thick holds 1.6% of the voxels, so the 99.5th percentile lies inside it (numpy: ~1000); a sample that
    skips planes (every 8th voxel in memory order takes only planes z = 0 and 8 of each 16-plane slab) misses it
    and clips the lesion to the background (~125)."""
    from volinfer.run.normalize import Normalizer
    from volinfer.io.reader import VolumeSource

    shape = (320, 240, 192)  # 14.7 M voxels: sampled
    vol = np.random.default_rng(3).normal(100.0, 10.0, shape).astype(np.float32)
    vol[:, :120, 49:55] += 900.0
    norm = Normalizer({"kind": "percentile", "lower": 0.5, "upper": 99.5}, 1)
    norm.fit(VolumeSource.from_array(vol), 16)
    lo, hi = norm.clip[0]
    ref_lo, ref_hi = np.percentile(vol, [0.5, 99.5])
    assert ref_hi > 900
    # finite tolerance, in rank: the share of the volume below each clip value is within 0.05 points of its target
    n = vol.size
    assert abs(np.count_nonzero(vol < lo) / n * 100 - 0.5) < 0.05, (lo, ref_lo)
    assert abs(np.count_nonzero(vol < hi) / n * 100 - 99.5) < 0.05, (hi, ref_hi)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16])
def test_integer_sums_are_exact_over_chunks(monkeypatch, dtype):
    """The pre-pass's integer sums (normalize.integer_sums), chunk by chunk through a float64 buffer, equal Python's
    exact integer sums: at the type's extremes, on a transposed slab (as the reader gives), across chunk ends."""
    from volinfer.run import normalize

    monkeypatch.setattr(normalize, "SUM_CHUNK", 1000)  # many chunks, the last one short
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    planes = rng.integers(info.min, info.max, (5, 41, 37), endpoint=True).astype(dtype)
    planes[0, 0, :3] = [info.min, info.max, info.min]
    slab = planes.transpose(2, 1, 0)  # (x, y, z) view of (z, y, x) bytes
    values = [int(v) for v in planes.ravel()]
    assert normalize.integer_sums(slab) == (len(values), sum(values), sum(v * v for v in values))


def test_read_ahead_keeps_order_raises_the_readers_error_and_stops_its_thread():
    """The pre-pass reads the next slab in a thread (prepass.read_ahead): slabs arrive in order, a reader's error
    is raised in the caller, and closing early leaves no thread reading."""
    import threading

    from volinfer.run.prepass import read_ahead

    def slabs(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise VolinferError("file is shorter than its header says")
            yield np.full((2, 2, 1), i)

    assert [int(s[0, 0, 0]) for s in read_ahead(slabs(7))] == list(range(7))
    with pytest.raises(VolinferError, match="shorter"):
        for _ in read_ahead(slabs(7, fail_at=4)):
            pass
    it = read_ahead(slabs(1000))
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "volinfer-read-ahead"]
