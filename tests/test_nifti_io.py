"""Streaming NIfTI reading and writing: round trips, headers, atomic output."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, whole_volume_reference

from volinfer import TileModel, VolinferError, predict
from volinfer.io.reader import VolumeSource
from volinfer.io.writer import NiftiWriter

RNG = np.random.default_rng(7)


def _affine() -> np.ndarray:
    a = np.diag([0.8, 1.1, 2.5, 1.0])
    a[:3, 3] = [-90.0, 12.5, 40.0]
    a[0, 1] = 0.05  # oblique
    return a


def _save(path: Path, data: np.ndarray, slope: float | None = None) -> Path:
    img = nib.Nifti1Image(data, _affine())
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(slope, 3.0)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_reader_regions_match_nibabel(tmp_path, suffix):
    data = RNG.integers(-500, 500, size=(37, 29, 23)).astype(np.int16)
    p = _save(tmp_path / f"v{suffix}", data)
    with VolumeSource.open([p], depth=8) as src:
        assert src.shape == (37, 29, 23) and src.channels == 1
        for z0 in range(0, 23, 5):  # on-disk order, overlapping windows
            for y0 in (0, 10, 21):
                r = ((3, 30), (y0, min(29, y0 + 8)), (z0, min(23, z0 + 8)))
                np.testing.assert_array_equal(src.read(0, r), data[3:30, r[1][0] : r[1][1], r[2][0] : r[2][1]])


@pytest.mark.parametrize("in_suffix,out_suffix", [(".nii", ".nii"), (".nii.gz", ".nii.gz"), (".nii", ".nii.gz")])
def test_file_run_equals_array_run_and_keeps_geometry(tmp_path, unet2, in_suffix, out_suffix):
    data = RNG.integers(0, 1000, size=(45, 39, 41)).astype(np.int16)
    src = _save(tmp_path / f"in{in_suffix}", data, slope=0.01)
    out = tmp_path / f"out{out_suffix}"
    report = predict(src, TileModel(unet2.clone(), tile=32), out, kind="raw", overlap=24)
    assert report.output == str(out) and report.tiles >= 12
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, _affine(), atol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert img.header["sform_code"] == 2 and img.shape == (45, 39, 41, 2)
    scaled = data.astype(np.float32) * 0.01 + 3.0
    ref = whole_volume_reference(unet2, scaled[None], 32, 4)
    np.testing.assert_allclose(np.moveaxis(np.asarray(img.dataobj), -1, 0), ref, atol=3e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporaries left


def test_four_d_input_and_several_files_are_channels(tmp_path):
    from models import tiny_unet

    model = tiny_unet(in_ch=2, levels=1)
    a = RNG.standard_normal((20, 18, 14)).astype(np.float32)
    b = RNG.standard_normal((20, 18, 14)).astype(np.float32)
    four_d = _save(tmp_path / "ab.nii.gz", np.stack([a, b], -1))
    pa, pb = _save(tmp_path / "a.nii", a), _save(tmp_path / "b.nii.gz", b)
    tm = TileModel(model.clone(), tile=16)
    r1 = predict(four_d, tm, kind="raw", overlap=8)
    r2 = predict([pa, pb], tm, kind="raw", overlap=8)
    ref = whole_volume_reference(model, np.stack([a, b]), 2, 2)  # the model's own: padded to its multiple only
    np.testing.assert_allclose(np.moveaxis(r1, -1, 0), ref, atol=2e-5)
    np.testing.assert_array_equal(r1, r2)


def test_existing_output_needs_overwrite(tmp_path, unet2):
    src = _save(tmp_path / "in.nii", RNG.standard_normal((16, 16, 16)).astype(np.float32))
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(VolinferError, match="--overwrite"):
        predict(src, TileModel(unet2.clone(), tile=16), out)
    assert out.read_bytes() == b"keep me"
    predict(src, TileModel(unet2.clone(), tile=16), out, overwrite=True)
    assert nib.load(str(out)).shape == (16, 16, 16)


@pytest.mark.parametrize("failure", [VolinferError("disk trouble"), KeyboardInterrupt()])
def test_failed_run_leaves_target_untouched(tmp_path, unet2, monkeypatch, failure):
    from volinfer.errors import Interrupted

    src = _save(tmp_path / "in.nii", RNG.standard_normal((40, 40, 40)).astype(np.float32))
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"old result")
    calls = {"n": 0}
    real = NiftiWriter.write

    def failing(self, block, z0, y0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise failure
        real(self, block, z0, y0)

    monkeypatch.setattr(NiftiWriter, "write", failing)
    with pytest.raises(Interrupted if isinstance(failure, KeyboardInterrupt) else VolinferError, match="resume|disk"):
        predict(src, TileModel(unet2.clone(), tile=16), out, overwrite=True)
    assert out.read_bytes() == b"old result"
    left = sorted(p.name for p in tmp_path.iterdir())
    if isinstance(failure, KeyboardInterrupt):  # kept for --resume
        assert left == [".out.nii.gz.partial.json", ".out.nii.gz.partial.nii", "in.nii", "out.nii.gz"]
    else:
        assert left == ["in.nii", "out.nii.gz"]


@pytest.mark.skipif(not (SHARED_DATA / "mni152_t1_1mm.nii.gz").exists(), reason="shared MNI volume not present")
def test_real_mri_header_is_preserved(tmp_path):
    from volinfer.demo import demo_model_path

    src = SHARED_DATA / "mni152_t1_1mm.nii.gz"
    out = tmp_path / "seg.nii.gz"
    predict(src, demo_model_path(), out)
    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == a.shape == (197, 233, 189)
    np.testing.assert_allclose(b.affine, a.affine)
    assert b.header.get_data_dtype() == np.uint8
    assert (b.header["qform_code"], b.header["sform_code"]) == (a.header["qform_code"], a.header["sform_code"])
    labels = np.asarray(b.dataobj)
    assert set(np.unique(labels)) <= {0, 1} and 0 < labels.mean() < 1


def test_output_header_keeps_geometry_not_the_inputs_meaning(tmp_path, unet2):
    """An input's intent (a z-score map), description, scaling and display range say nothing of the output: they
    are cleared; its geometry and units are kept."""
    img = nib.Nifti1Image(np.random.default_rng(0).standard_normal((13, 11, 9)).astype(np.float32),
                          np.diag([0.5, 0.7, 2.0, 1.0]))
    img.header.set_intent("z score", name="tstat map")
    img.header["descrip"] = b"TE=30;Time=120000"
    img.header["cal_min"], img.header["cal_max"] = -5.0, 5.0
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp_path / "z.nii"))
    predict(tmp_path / "z.nii", unet2, tmp_path / "o.nii")
    h = nib.load(str(tmp_path / "o.nii")).header
    assert h.get_intent() == ("none", (), "") and h["descrip"].tobytes().rstrip(b"\0") == b"volinfer output"
    assert (h["cal_min"], h["cal_max"]) == (0, 0) and h.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(h.get_zooms(), (0.5, 0.7, 2.0))


@pytest.mark.parametrize("kind", ["zscore", "minmax", "percentile"])
def test_whole_volume_normalisation_matches_manual(tmp_path, unet2, kind):
    data = RNG.integers(-200, 3000, size=(41, 37, 45)).astype(np.int16)
    src = _save(tmp_path / "in.nii.gz", data)
    tm = TileModel(unet2.clone(), tile=32)
    got = predict(src, tm, kind="raw", overlap=24, normalize={"kind": kind})
    v = data.astype(np.float64)
    if kind == "zscore":
        manual = (v - v.mean()) / v.std()
    elif kind == "minmax":
        manual = (v - v.min()) / (v.max() - v.min())
    else:  # percentile clip then z-score; percentiles come from a subsample, so compare loosely
        lo, hi = np.percentile(v, [0.5, 99.5])
        c = np.clip(v, lo, hi)
        manual = (c - c.mean()) / c.std()
    want = predict(manual.astype(np.float32), tm, kind="raw", overlap=24, normalize={"kind": "none"})
    tol = 1e-4 if kind != "percentile" else 5e-2
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("backend", ["zlib", "isal"])
def test_corrupt_gzip_input_never_gives_wrong_voxels_silently(tmp_path, monkeypatch, backend):
    """Byte flips anywhere in a .nii.gz: reading every plane either raises one VolinferError or returns the original
    voxels (the gzip CRC/length check must run although nothing reads past the last voxel; Python's gzip reads in
    small pieces and never reaches the trailer by itself)."""
    from volinfer.io import gzipio
    from volinfer.io.reader import VolumeSource, scan_slabs

    if backend == "isal":
        pytest.importorskip("isal")
    monkeypatch.setattr(gzipio, "BACKEND", backend)

    vol = RNG.integers(0, 64, (61, 53, 47)).astype(np.int16)
    path = _save(tmp_path / "v.nii.gz", vol)
    good = path.read_bytes()
    silent = 0
    for pos in range(40, len(good) - 8, max(1, (len(good) - 48) // 60)):
        bad = bytearray(good)
        bad[pos] ^= 0x55
        (tmp_path / "bad.nii.gz").write_bytes(bytes(bad))
        try:
            with VolumeSource.open([tmp_path / "bad.nii.gz"], depth=5) as src:
                got = np.concatenate(list(scan_slabs(src.readers[0], src.shape, 5)), axis=2)
        except VolinferError:
            continue
        if not np.array_equal(got, vol):
            silent += 1
    assert silent == 0
