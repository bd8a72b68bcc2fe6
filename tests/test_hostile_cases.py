"""Cases a red-team pass found on this round's main, each a class the fix closes: NIfTI scaling lost on the way to
Zarr, a replacement value float32 cannot hold, a benchmark of a non-model reporting success, Ctrl-C while the
command line is still starting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_to_zarr_keeps_intensity_scaling(tmp_path):
    data = np.arange(11 * 9 * 7, dtype=np.int16).reshape(11, 9, 7)
    img = nib.Nifti1Image(data, np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    assert _invoke("to-zarr", tmp_path / "s.nii", "-o", tmp_path / "s.zarr", "-q").exit_code == 0
    assert _invoke("to-nifti", tmp_path / "s.zarr", "-o", tmp_path / "b.nii", "-q").exit_code == 0
    want = data.astype(np.float64) * 2.0 + 10.0  # what the header says the voxels are
    np.testing.assert_array_equal(nib.load(str(tmp_path / "b.nii")).get_fdata(), want)


def test_nan_value_beyond_float32_is_refused(tmp_path):
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "n.nii"))
    xml = save_unet2(tmp_path / "m.xml")
    r = _invoke("run", tmp_path / "n.nii", "-m", xml, "-o", tmp_path / "o.nii", "--nan-value", "1e39")
    assert r.exit_code == 2 and "float32" in r.output and not (tmp_path / "o.nii").exists()


def test_bench_of_a_non_model_fails_in_one_line(tmp_path):
    (tmp_path / "mk.py").write_text("x = 1\n")
    r = _invoke("bench", "-s", "8", "-m", tmp_path / "mk.py", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "unsupported model type" in r.output


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "volinfer", "info", str(tmp_path / "none.xml")],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    time.sleep(0.1)  # still importing OpenVINO
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert p.returncode in (130, 2) and len(lines) == 1 and "Traceback" not in err.decode()
