"""The command line: happy paths, and one clear line for every bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import tiny_unet

from volinfer.cli import main

RNG = np.random.default_rng(3)


@pytest.fixture
def files(tmp_path):
    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(RNG.integers(0, 300, (37, 33, 29)).astype(np.int16), np.eye(4)), str(vol))
    model = tiny_unet(levels=2)
    model.set_rt_info("4", ["volinfer", "size_multiple"])
    model.set_rt_info("32", ["volinfer", "tile"])
    xml = tmp_path / "m.xml"
    ov.save_model(model, str(xml))
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
    (lambda t: t, "is a directory"),
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
                        str(tmp / "o.nii")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {tmp / 'nope.nii'}: no such file"


def test_demo_runs_and_segments(tmp_path):
    r = invoke("demo", "--out-dir", tmp_path, "--size", "70,60,50", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert float(rep["extra"]["dice"].split()[0]) > 0.9
    assert (tmp_path / "demo_labels.nii.gz").exists() and rep["tiles"] >= 2
