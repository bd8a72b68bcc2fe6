"""Interrupted runs (SIGKILL included) continue with --resume and give the same bytes as an uninterrupted run."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main

KILLER = """
import os, signal, sys
from volinfer.io.writer import NiftiWriter
calls = [0]
real = NiftiWriter.write
def write(self, *a):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, *a)
NiftiWriter.write = write
from volinfer.cli import main
sys.argv = ["volinfer"] + sys.argv[1:]
main()
"""


@pytest.fixture
def setup(tmp_path):
    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(11).integers(0, 400, (40, 36, 70)).astype(np.int16), np.eye(4)),
             str(vol))
    xml = save_unet2(tmp_path / "m.xml")
    return tmp_path, vol, xml


def _data(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("stitch,kill_at", [("crop", 9), ("gaussian", 110)])
def test_sigkill_then_resume_is_identical(setup, stitch, kill_at):
    tmp, vol, xml = setup
    args = [str(vol), "-m", str(xml), "--tile", "32", "--overlap", "24", "--stitch", stitch, "--kind", "raw", "-q"]
    ref = tmp / "ref.nii.gz"
    assert CliRunner().invoke(main, ["run", *args, "-o", str(ref)]).exit_code == 0
    out = tmp / "out.nii.gz"
    p = subprocess.run([sys.executable, "-c", KILLER, "run", *args, "-o", str(out)], capture_output=True,
                       env={**__import__("os").environ, "KILL_AT": str(kill_at)}, timeout=300)
    assert p.returncode == -9 and not out.exists()
    journal = json.loads((tmp / ".out.nii.gz.partial.json").read_text())
    assert 0 < journal["rows_done"] < journal["rows_total"]  # it really stopped part-way, after some rows
    r = CliRunner().invoke(main, ["run", *args, "-o", str(out), "--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tiles"] < json.loads(
        CliRunner().invoke(main, ["run", *args, "-o", str(tmp / "again.nii"), "--json"]).stdout)["tiles"]
    np.testing.assert_array_equal(_data(out), _data(ref))
    assert not list(tmp.glob(".out*"))  # journal and temporary file gone


def test_resume_with_other_settings_is_refused(setup):
    tmp, vol, xml = setup
    args = [str(vol), "-m", str(xml), "--tile", "32", "--overlap", "24", "-q", "-o", str(tmp / "o.nii")]
    p = subprocess.run([sys.executable, "-c", KILLER, "run", *args], capture_output=True,
                       env={**__import__("os").environ, "KILL_AT": "9"}, timeout=300)
    assert p.returncode == -9
    r = CliRunner().invoke(main, ["run", *args[:-3], "--overlap", "16", "-q", "-o", str(tmp / "o.nii"), "--resume"])
    assert r.exit_code == 2 and "cannot resume: options.overlap differ(s)" in r.output
    r = CliRunner().invoke(main, ["run", *args, "--resume"])
    assert r.exit_code == 0 and (tmp / "o.nii").exists()


def test_resume_without_interrupted_run_is_refused(setup):
    tmp, vol, xml = setup
    r = CliRunner().invoke(main, ["run", str(vol), "-m", str(xml), "--tile", "32", "-o", str(tmp / "x.nii"),
                                  "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in r.output
