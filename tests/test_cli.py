"""The command line: happy paths, and one clear line for every bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import save_unet2, tiny_unet

from volinfer.cli import main

RNG = np.random.default_rng(3)


@pytest.fixture
def files(tmp_path):
    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(RNG.integers(0, 300, (37, 33, 29)).astype(np.int16), np.eye(4)), str(vol))
    xml = save_unet2(tmp_path / "m.xml", tile=32)
    two = tmp_path / "two.xml"
    ov.save_model(tiny_unet(in_ch=2, levels=2), str(two))
    return tmp_path, vol, xml, two


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_writes_labels_and_json_report(files):
    tmp, vol, xml, _ = files
    out = tmp / "seg.nii.gz"
    r = invoke("run", vol, "-m", xml, "-o", out, "--json", "--overlap", "24")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["tiles"] == 4 and rep["stitch"] == "crop" and rep["peak_rss_mb"] > 0
    assert rep["overhead_ratio"] > 0 and rep["output"] == str(out)
    seg = nib.load(str(out))
    assert seg.shape == (37, 33, 29) and seg.get_data_dtype() == np.uint8


def test_info_shows_settings_and_receptive_field(files):
    _, _, xml, _ = files
    r = invoke("info", xml)
    assert r.exit_code == 0, r.output
    assert "size_multiple 4" in r.output and "radius 10x10x10" in r.output


@pytest.mark.parametrize("make,expected", [
    (lambda t: t / "missing.nii", "no such file"),
    (lambda t: (t / "nothing_here").mkdir() or t / "nothing_here", "no .nii or .nii.gz files found"),
    (lambda t: (t / "notes.nii").write_text("hello, not a volume") and t / "notes.nii", "not a readable NIfTI"),
    (lambda t: (t / "empty.nii").write_bytes(b"") or t / "empty.nii", "file is empty"),
])
def test_bad_inputs_give_one_line(files, make, expected):
    tmp, _, xml, _ = files
    r = invoke("run", make(tmp), "-m", xml, "-o", tmp / "o.nii")
    assert r.exit_code == 2
    assert expected in r.output and r.output.count("\n") == 1
    assert not (tmp / "o.nii").exists()


def test_channel_mismatch_and_rejected_tile(files):
    tmp, vol, xml, two = files
    r = invoke("run", vol, "-m", two, "-o", tmp / "o.nii", "--tile", "32")
    assert r.exit_code == 2 and "1 channel(s) but the model expects 2" in r.output
    r = invoke("run", vol, "-m", xml, "-o", tmp / "o.nii", "--tile", "30")
    assert r.exit_code == 2 and "divisible by 4" in r.output
    r = invoke("run", vol, "-m", tmp / "nope.xml", "-o", tmp / "o.nii")
    assert r.exit_code == 2 and "no such model file" in r.output
    r = invoke("run", vol, vol, "-m", xml, "-o", tmp / "o.nii")
    assert r.exit_code == 2 and "2 channel(s) but the model expects 1" in r.output
    r = invoke("run", vol, "-m", xml, "-o", vol, "--overwrite")
    assert r.exit_code == 2 and "also an input" in r.output
    assert sorted(p.name for p in tmp.iterdir()) == ["m.bin", "m.xml", "two.bin", "two.xml", "vol.nii.gz"]


def test_real_process_prints_no_traceback(files):
    tmp, _, xml, _ = files
    p = subprocess.run([sys.executable, "-m", "volinfer", "run", str(tmp / "nope.nii"), "-m", str(xml), "-o",
                        str(tmp / "o.nii")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {tmp / 'nope.nii'}: no such file"


def test_demo_runs_and_segments(tmp_path):
    r = invoke("demo", "--out-dir", tmp_path, "--size", "70,60,50", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert float(rep["extra"]["dice"].split()[0]) > 0.9
    assert (tmp_path / "demo_labels.nii.gz").exists() and rep["tiles"] >= 1 and rep["exact"] is True


def test_batch_directory_continues_past_a_bad_volume(files):
    tmp, vol, xml, _ = files
    batch = tmp / "batch"
    batch.mkdir()
    good = np.random.default_rng(5).integers(0, 300, (20, 24, 18)).astype(np.int16)
    nib.save(nib.Nifti1Image(good, np.eye(4)), str(batch / "a.nii"))
    nib.save(nib.Nifti1Image(good[:, :, :9], np.eye(4)), str(batch / "b.nii.gz"))
    (batch / "c.nii").write_bytes(b"broken")
    (batch / "d.tif").write_bytes(b"a TIFF stack the batch does not take")  # said, not silently left out
    (batch / "._a.nii").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # hidden: left out, as a glob leaves it
    out = tmp / "segs"
    r = invoke("run", batch, "-m", xml, "-o", out, "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert len(rep["runs"]) == 2 and [f["input"] for f in rep["failed"]] == [str(batch / "c.nii")]
    assert rep["skipped"] == [str(batch / "d.tif")]
    names = sorted(p.name for p in out.iterdir())
    assert names == [".volinfer-batch.json", "a.nii", "b.nii.gz"]  # the record of the finished volumes, hidden
    assert nib.load(str(out / "b.nii.gz")).shape == (20, 24, 9)


def test_nan_voxels_are_refused_or_replaced(tmp_path, files):
    _, _, xml, _ = files
    data = np.random.default_rng(6).standard_normal((20, 20, 20)).astype(np.float32)
    data[3, 4, 5] = np.nan
    data[7, 7, 7] = np.inf
    src = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    r = invoke("run", src, "-m", xml, "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "2 NaN/Inf voxel(s)" in r.output and "--nan-value" in r.output
    assert not (tmp_path / "o.nii").exists()
    r = invoke("run", src, "-m", xml, "-o", tmp_path / "o.nii", "--nan-value", "0", "--json", "--kind", "raw")
    assert r.exit_code == 0, r.output
    assert "2 voxel(s) replaced by 0.0" in json.loads(r.stdout)["extra"]["nan/inf"]
    clean = data.copy()
    clean[~np.isfinite(clean)] = 0
    nib.save(nib.Nifti1Image(clean, np.eye(4)), str(tmp_path / "clean.nii"))
    invoke("run", tmp_path / "clean.nii", "-m", xml, "-o", tmp_path / "c.nii", "--kind", "raw")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "o.nii")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "c.nii")).dataobj))


def test_corrupt_and_inconsistent_files(tmp_path, files):
    _, vol, xml, _ = files
    raw = vol.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    r = invoke("run", tmp_path / "trunc.nii.gz", "-m", xml, "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "truncated or corrupt" in r.output
    img = nib.load(str(vol))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "u.nii"))
    b = (tmp_path / "u.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(b[:-1000])
    r = invoke("run", tmp_path / "short.nii", "-m", xml, "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "truncated, or the header's dimensions are wrong" in r.output
    nib.save(nib.Nifti1Image(data[:, :, 0], np.eye(4)), str(tmp_path / "flat.nii"))
    r = invoke("run", tmp_path / "flat.nii", "-m", xml, "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "got 2-D" in r.output
    nib.save(nib.Nifti1Image(data[..., None, None].repeat(2, 3).repeat(2, 4), np.eye(4)), str(tmp_path / "5d.nii"))
    r = invoke("run", tmp_path / "5d.nii", "-m", xml, "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "got 5-D" in r.output
    other = tmp_path / "shifted.nii"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 1, 1, 1])), str(other))
    two = tmp_path / "two.xml"
    r = invoke("run", vol, other, "-m", two, "-o", tmp_path / "o.nii", "--tile", "32")
    assert r.exit_code == 2 and "affine differs" in r.output
    (tmp_path / "half.bin").write_bytes(xml.with_suffix(".bin").read_bytes()[:100])
    (tmp_path / "half.xml").write_text(xml.read_text())
    r = invoke("run", vol, "-m", tmp_path / "half.xml", "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "truncated?" in r.output
    (tmp_path / "model.pt").write_bytes(b"x")
    r = invoke("run", vol, "-m", tmp_path / "model.pt", "-o", tmp_path / "o.nii")
    assert r.exit_code == 2 and "expected .xml (OpenVINO IR) or .onnx" in r.output
    assert not (tmp_path / "o.nii").exists()


def test_file_size_limit_and_unwritable_directory(tmp_path, files):
    _, vol, xml, _ = files
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000));"
        "from volinfer.cli import main; sys.argv = ['volinfer', 'run', sys.argv[1], '-m', sys.argv[2], '-o', sys.argv[3]];"
        "main()"
    )
    out = tmp_path / "big.nii"
    p = subprocess.run([sys.executable, "-c", code, str(vol), str(xml), str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "File too large" in p.stderr and p.stderr.count("\n") == 1
    assert not list(tmp_path.glob("*big*"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = invoke("run", vol, "-m", xml, "-o", locked / "o.nii")
        import os
        if os.geteuid() != 0:  # root writes anywhere; the check is then moot
            assert r.exit_code == 2 and "not writable" in r.output
    finally:
        locked.chmod(0o700)


def test_constant_tiles_reuse_one_inference_with_identical_output(tmp_path, files):
    _, _, xml, _ = files
    data = np.zeros((70, 64, 60), np.int16)
    data[10:30, 12:40, 8:30] = np.random.default_rng(8).integers(0, 500, (20, 28, 22))
    src = tmp_path / "mostly_air.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    r1 = invoke("run", src, "-m", xml, "-o", tmp_path / "a.nii", "--kind", "raw", "--json", "--overlap", "16")
    r2 = invoke("run", src, "-m", xml, "-o", tmp_path / "b.nii", "--kind", "raw", "--overlap", "16",
                "--no-constant-reuse")
    assert r1.exit_code == 0 and r2.exit_code == 0
    rep = json.loads(r1.stdout)
    reused = int(rep["extra"]["constant"].split()[0])
    assert 0 < reused < rep["tiles"]
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "a.nii")).dataobj),
                                  np.asarray(nib.load(str(tmp_path / "b.nii")).dataobj))


def test_values_that_overflow_a_narrow_model_input_are_refused(tmp_path):
    import openvino.opset13 as ops

    p = ops.parameter([1, 1, -1, -1, -1], np.float16, name="x")
    x = ops.convert(p, "f32")
    y = ops.convolution(x, ops.constant(np.ones((2, 1, 1, 1, 1), np.float32)), [1] * 3, [0] * 3, [0] * 3, [1] * 3)
    xml = tmp_path / "f16.xml"
    ov.save_model(ov.Model([y], [p]), str(xml))
    src = tmp_path / "wide.nii"
    data = np.random.default_rng(9).integers(0, 100_000, (20, 20, 20)).astype(np.int32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    r = invoke("run", src, "-m", xml, "-o", tmp_path / "o.nii", "--tile", "16")
    assert r.exit_code == 2 and "input type float16 holds" in r.output and not (tmp_path / "o.nii").exists()
    r = invoke("run", src, "-m", xml, "-o", tmp_path / "o.nii", "--tile", "16", "--normalize", "scale:0.001:0",
               "--kind", "raw")
    assert r.exit_code == 0, r.output
    out = np.asarray(nib.load(str(tmp_path / "o.nii")).dataobj)
    np.testing.assert_allclose(out[..., 0], data * 0.001, rtol=1e-3)


def test_a_tile_far_larger_than_the_volume_runs_as_the_volume(tmp_path):
    """--tile 2000 on a 23x17x11 volume: the tile is clamped to the padded volume (it ran out of memory reshaping
    the model to 2000³ and 4000x2000x2000 to look for normalisation layers first); the output is the whole-volume
    one. A Zarr input into a TIFF stack runs in this process (blocks write Zarr or NIfTI; it was refused with 'must
    end in .nii or .nii.gz (or .tif/.tiff, or .zarr)')."""
    import zarr

    xml = save_unet2(tmp_path / "m.xml")
    vol = np.random.default_rng(3).standard_normal((23, 17, 11)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    for tile in ("2000", "auto"):
        r = invoke("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / f"{tile}.nii", "--tile", tile, "-q",
                   "--precision", "f32", "--kind", "raw")
        assert r.exit_code == 0, r.output
    a, b = (np.asarray(nib.load(str(tmp_path / f"{t}.nii")).dataobj) for t in ("2000", "auto"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=vol.shape[::-1], dtype="float32", chunks=(8, 8, 8))
    z[:] = vol.transpose(2, 1, 0)
    r = invoke("run", tmp_path / "v.zarr", "-m", xml, "-o", tmp_path / "z.tif", "-q", "--precision", "f32")
    assert r.exit_code == 0, r.output
    r = invoke("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "n.tif", "-q", "--precision", "f32")
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "z.tif"), tifffile.imread(tmp_path / "n.tif"))
