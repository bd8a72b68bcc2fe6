"""Safety of inputs, option values and error messages (issue 10, classes 5, 6 and 8): every case is refused with one
line or computed right, never a wrong answer with exit 0, never a traceback."""

import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import save_unet2, tiny_unet
from nibabel.testing import data_path

from volinfer import TileModel, VolinferError, predict
from volinfer.cli import main
from volinfer.cliutil import friendly_errors
from volinfer.errors import framework_message
from volinfer.model.tile_model import CompileOptions
from volinfer.io.reader import VolumeSource

RNG = np.random.default_rng(10)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output


@pytest.fixture
def xml(tmp_path):
    return save_unet2(tmp_path / "m.xml", tile=32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _whole_volume(xml: Path, vol: np.ndarray) -> np.ndarray:
    """Independent reference: the saved model on the whole volume zero-padded to its size multiple (4), at f32, in
    one go; (2, x, y, z)."""
    shape = vol.shape
    padded = np.pad(vol, [(0, -n % 4) for n in shape])
    m = ov.Core().read_model(str(xml))
    m.reshape({0: [1, 1, *padded.shape]})
    cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = cm(padded[None, None].astype(np.float32))[0][0]
    return out[:, : shape[0], : shape[1], : shape[2]]


def _big_endian_gz(tmp_path: Path) -> Path:
    data = (RNG.standard_normal((23, 19, 27)) * 3).astype(">f4")
    hdr = nib.Nifti1Header(endianness=">")
    path = tmp_path / "be.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4), header=hdr), str(path))
    return path


@pytest.mark.parametrize("source", ["nibabel anatomical.nii (>i2)", "written .nii.gz (>f4)"])
def test_big_endian_input_gives_the_right_raw_and_probabilities(tmp_path, xml, source):
    path = Path(data_path) / "anatomical.nii" if source.startswith("nibabel") else _big_endian_gz(tmp_path)
    img = nib.load(str(path))
    assert img.header.endianness == ">"
    vol = np.asarray(img.dataobj).astype(np.float32)  # nibabel's own reading: native values
    ref = _whole_volume(xml, vol)
    scale = float(np.abs(ref).max())
    for kind in ("raw", "probabilities"):
        out = tmp_path / f"{kind}.nii"
        predict(path, xml, out, kind=kind)  # default: an exact tiling
        got = nib.load(str(out))
        values = np.moveaxis(np.asarray(got.dataobj), -1, 0)  # read as the output header declares
        want = ref if kind == "raw" else _softmax(ref)
        tol = 1e-5 * scale if kind == "raw" else 1e-5
        np.testing.assert_allclose(values, want, atol=tol, rtol=1e-5)


def test_big_endian_array_and_zarr_style_reader_are_native(xml):
    vol = RNG.standard_normal((20, 17, 13)).astype(np.float32)
    tm = TileModel(xml)
    a = predict(vol, tm, kind="raw")
    b = predict(vol.astype(">f4"), tm, kind="raw")
    np.testing.assert_array_equal(a, b)


def test_float64_beyond_float32_is_refused_or_scaled(tmp_path, xml):
    vol = RNG.standard_normal((18, 21, 15)) * 1e300
    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    r = invoke("run", path, "-m", xml, "-o", tmp_path / "o.nii")
    one_line_error(r)
    assert "float32" in r.output and "--normalize" in r.output and not (tmp_path / "o.nii").exists()
    tm = TileModel(xml)
    with pytest.raises(VolinferError, match="float32"):
        predict(vol, tm)
    scaled = predict(vol, tm, kind="raw", normalize={"kind": "scale", "scale": 1e-300, "shift": 0})
    want = predict((vol * 1e-300).astype(np.float32), tm, kind="raw")
    np.testing.assert_allclose(scaled, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(scaled).all()


def test_complex_and_rgb_inputs_are_refused_with_one_line(tmp_path, xml):
    cplx = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image((RNG.standard_normal((9, 8, 7)) + 1j).astype(np.complex64), np.eye(4)), str(cplx))
    rgb = tmp_path / "rgb.nii"
    rgb_dtype = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(np.zeros((9, 8, 7), rgb_dtype), np.eye(4))
    nib.save(img, str(rgb))
    assert nib.load(str(rgb)).get_data_dtype() == rgb_dtype
    for path, words in ((cplx, "imaginary"), (rgb, "RGB")):
        r = invoke("run", path, "-m", xml, "-o", tmp_path / "o.nii")
        one_line_error(r)
        assert words in r.output and not (tmp_path / "o.nii").exists()
    with pytest.raises(VolinferError, match="complex"):
        predict(np.ones((9, 8, 7), np.complex128), xml)


BAD_RUN_OPTIONS = [
    ["--overlap", "nan"], ["--overlap", "inf"], ["--overlap", "-1"], ["--overlap", "1.5"], ["--overlap", "0.2,0.3"],
    ["--overlap", "32"],  # the whole tile
    ["--sigma", "nan"], ["--sigma", "0"], ["--sigma", "-1"], ["--sigma", "inf"],
    ["--threshold", "1"], ["--threshold", "1.5"], ["--threshold", "0"], ["--threshold", "nan"],
    ["--requests", "0"], ["--requests", "2.5"], ["--threads", "0"], ["--streams", "-1"], ["--block", "0"],
    ["--chunks", "0"], ["--workers", "0"], ["--nan-value", "nan"], ["--nan-value", "inf"],
    ["--normalize", "percentile:5"], ["--normalize", "percentile:90:10"], ["--normalize", "percentile:0:101"],
    ["--normalize", "percentile:1:2:3"], ["--normalize", "scale:nan:0"], ["--normalize", "scale:1"],
    ["--normalize", "scale:1:inf"], ["--normalize", "scale:0:1"],
    ["--tile", "0"], ["--tile", "32,-4,32"], ["--tile", "32,32"], ["--max-memory", "nan"], ["--max-memory", "-2G"],
]


@pytest.mark.parametrize("option", BAD_RUN_OPTIONS, ids=lambda o: " ".join(o))
def test_bad_numeric_options_give_one_line_and_write_nothing(tmp_path, xml, option):
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(RNG.integers(0, 99, (13, 11, 9)).astype(np.int16), np.eye(4)), str(vol))
    r = invoke("run", vol, "-m", xml, "-o", tmp_path / "o.nii", *option)
    one_line_error(r)
    assert option[0] in r.output or "overlap" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "v.nii"]


@pytest.mark.parametrize("args", [
    ["plan", "v.nii", "-m", "m.xml", "--requests", "0"], ["plan", "v.nii", "-m", "m.xml", "--tiles", "64,0"],
    ["info", "m.xml", "--tile", "-8"], ["to-zarr", "v.nii", "o.zarr", "--chunks", "0"],
    ["convert", "m.xml", "-o", "n.xml", "--tile", "0"], ["convert", "m.xml", "-o", "n.xml", "--overlap", "1.5"],
    ["convert", "m.xml", "-o", "n.xml", "--tolerance", "nan"],
    ["convert", "m.xml", "-o", "n.xml", "--spacing", "1,0,1"],
    ["convert", "m.xml", "-o", "n.xml", "--calibration-tiles", "0"],
    ["convert", "m.xml", "-o", "n.xml", "--channels", "0"],
], ids=lambda a: " ".join(a))
def test_bad_numeric_options_of_other_commands(tmp_path, xml, args):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / "v.nii"))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke(*[tmp_path / a if a.endswith((".nii", ".xml", ".zarr")) else a for a in args])
    one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_valid_edge_values_are_accepted(tmp_path, xml):
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(RNG.integers(0, 99, (13, 11, 9)).astype(np.int16), np.eye(4)), str(vol))
    for option in (["--overlap", "0"], ["--overlap", "4,8,1"], ["--overlap", "0.5"],
                   ["--normalize", "percentile:0:100"], ["--requests", "1"]):
        r = invoke("run", vol, "-m", xml, "-o", tmp_path / "o.nii", "-q", "--overwrite", *option)
        assert r.exit_code == 0, (option, r.output)
    one = tmp_path / "one.xml"  # a threshold applies to one-channel labels (argmax labels refuse it)
    ov.save_model(tiny_unet(out_ch=1), str(one))
    r = invoke("run", vol, "-m", one, "-o", tmp_path / "o.nii", "-q", "--overwrite", "--threshold", "1.5",
               "--activation", "none")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=float("nan"), stitch="gaussian"), "sigma"),
    (dict(sigma=0.0, stitch="gaussian"), "sigma"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(overlap=1.5), "overlap"),
    (dict(overlap=float("inf")), "overlap"),
    (dict(overlap=[0.25, float("nan"), 0.25]), "overlap"),
    (dict(normalize={"kind": "scale", "scale": float("nan"), "shift": 0}), "scale"),
    (dict(normalize={"kind": "zscore", "mean": 0, "std": 0}), "std"),
    (dict(normalize={"kind": "percentile", "lower": 60, "upper": 40}), "percentile"),
    (dict(nan_value=float("inf")), "nan_value"),
])
def test_python_api_refuses_bad_values(xml, kwargs, match):
    vol = RNG.standard_normal((12, 11, 9)).astype(np.float32)
    with pytest.raises(VolinferError, match=match):
        predict(vol, TileModel(xml), **kwargs)


@pytest.mark.parametrize("key,value", [
    ("tile", "[0, 32, 32]"), ("tile", "big"), ("size_multiple", "0"), ("overlap", "1.5"), ("overlap", "NaN"),
    ("stitch", "diagonal"), ("activation", "relu"), ("normalization", '{"kind": "zscore", "mean": 0, "std": 0}'),
    ("normalization", '"zscore"'), ("layout", "NHWC"), ("in_channels", "-2"), ("instance_norm", "3"),
    ("receptive_field", "[1, 2]"), ("labels", "7"),
])
def test_corrupt_stored_settings_give_one_line_naming_the_key(tmp_path, key, value):
    m = tiny_unet(levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    m.set_rt_info("32", ["volinfer", "tile"])
    m.set_rt_info(value, ["volinfer", key])
    xml = tmp_path / "bad.xml"
    ov.save_model(m, str(xml))
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.int16), np.eye(4)), str(vol))
    r = invoke("run", vol, "-m", xml, "-o", tmp_path / "o.nii")
    one_line_error(r)
    assert f"'{key}'" in r.output and not (tmp_path / "o.nii").exists()


def test_openvino_messages_keep_the_meaningful_line():
    m = tiny_unet(levels=2)
    with pytest.raises(RuntimeError) as e:
        m.reshape({0: [1, 3, 8, 8, 8]})
    assert str(e.value).startswith("Check '")  # OpenVINO's boilerplate first
    msg = framework_message(e.value)
    assert "Data batch channel count (3) does not match filter input channel count (1)" in msg
    assert "Check '" not in msg and "\n" not in msg
    with pytest.raises(RuntimeError) as e:
        ov.Core().compile_model(tiny_unet(static=8), "NOSUCHDEVICE")
    assert str(e.value).startswith("Exception from src/")
    assert framework_message(e.value).startswith('Device with "NOSUCHDEVICE" name is not registered')
    with pytest.raises(VolinferError, match='Device with "NOSUCHDEVICE" name is not registered'):
        TileModel(tiny_unet(static=8), options=CompileOptions(device="NOSUCHDEVICE"))


def test_unexpected_exceptions_are_one_line_with_a_hint(monkeypatch):
    @click.command()
    @friendly_errors
    def boom() -> None:
        raise ValueError("something odd\nsecond line")

    r = CliRunner().invoke(boom, [])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "internal error (ValueError: something odd second line)" in r.output and "VOLINFER_DEBUG=1" in r.output
    monkeypatch.setenv("VOLINFER_DEBUG", "1")
    r = CliRunner().invoke(boom, [])
    assert isinstance(r.exception, ValueError)


def _gzip_bomb(path: Path, dims: tuple[int, int, int]) -> int:
    """A .nii.gz whose header claims ``dims`` (int16) but whose body is empty; the trailer's size (mod 2**32) still
    matches when the claimed bytes are a multiple of 2**32."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(dims)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw))
    return 352 + int(np.prod(dims, dtype=np.int64)) * 2


def test_gzip_header_claiming_huge_size_is_refused_before_allocating(tmp_path, xml):
    bomb = tmp_path / "bomb.nii.gz"
    claimed = _gzip_bomb(bomb, (4096, 4096, 4096))
    assert claimed % 2**32 == int.from_bytes(bomb.read_bytes()[-4:], "little")  # passes the ISIZE check alone
    tracemalloc.start()
    try:
        with pytest.raises(VolinferError, match="compressed bytes can hold"):
            VolumeSource.open([bomb], depth=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak  # nothing near the declared cross-section (4096 x 4096 x 32 planes = 1 GiB)
    r = invoke("run", bomb, "-m", xml, "-o", tmp_path / "o.nii")
    one_line_error(r)


def test_nifti2_dims_whose_product_overflows_are_refused(tmp_path):
    hdr = nib.Nifti2Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((2**31, 2**31, 2**32))  # 2**94 voxels * 2 bytes: 0 modulo 2**64
    path = tmp_path / "huge2.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(VolinferError, match="header describes"):
            VolumeSource.open([path], depth=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


def test_a_real_process_refuses_a_gzip_bomb_with_flat_memory(tmp_path, xml):
    bomb = tmp_path / "bomb.nii.gz"
    _gzip_bomb(bomb, (4096, 4096, 4096))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest process would
    # report its parent's peak
    code = ("import sys\nfrom volinfer.cli import main\n"
            "try:\n    main(['run', sys.argv[1], '-m', sys.argv[2], '-o', sys.argv[3]])\n"
            "except SystemExit as e:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "    print(e.code, int(hwm) // 1024)\n")
    p = subprocess.run([sys.executable, "-c", code, str(bomb), str(xml), str(tmp_path / "o.nii")],
                       capture_output=True, text=True, env={**os.environ}, timeout=120)
    code_, rss_mb = map(int, p.stdout.split())
    assert code_ == 2 and p.stderr.count("\n") == 1 and "compressed bytes" in p.stderr
    assert rss_mb < 600
