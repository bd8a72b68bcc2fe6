"""Every failing command says one line on stderr when stderr is a file (a batch log, CI, ``2>log``): no progress
bar frames, no TensorFlow/absl C++ log lines, no torch warnings; ``-q`` keeps a successful command silent.

The commands run as real subprocesses with stderr redirected to a file, as a batch job runs them (a test runner's
captured streams would hide what the C++ frameworks write to descriptor 2)."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from models import save_unet2

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        if bool(x.mean() > -1e9):  # data-dependent Python branch: torch's tracer warns (TracerWarning)
            return self.c(x)
        return self.c(x) * 2


def build():
    return Net()
'''


def volinfer(*args, cwd, env_extra=None):
    """Run ``python -m volinfer ARGS`` with stderr to a file; (exit status, stdout, stderr lines)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VOLINFER_DEBUG": ""}
    env.update(env_extra or {})
    err = cwd / "stderr.txt"
    with open(err, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "volinfer", *map(str, args)], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=f, timeout=300)
    return r.returncode, r.stdout.decode(), err.read_text().splitlines()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oneline")
    save_unet2(tmp / "m.xml", tile=32)
    nib.save(nib.Nifti1Image(np.zeros((9, 8, 7), np.int16), np.eye(4)), str(tmp / "vol.nii.gz"))
    (tmp / "bad.onnx").write_text("not an onnx model\n")
    (tmp / "bad.nii.gz").write_bytes(b"garbage")
    (tmp / "notzarr").mkdir()
    zarr = pytest.importorskip("zarr")
    z = zarr.create_array(str(tmp / "bad.zarr"), shape=(36, 40, 48), chunks=(8, 8, 8), dtype="float32")
    z[:] = np.random.default_rng(0).standard_normal((36, 40, 48)).astype(np.float32)
    for chunk in sorted(p for p in (tmp / "bad.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")[5:9]:
        chunk.write_bytes(b"garbage")  # a region read fails while zarr's other chunk tasks are still pending
    (tmp / "fac.py").write_text(FACTORY)
    torch = pytest.importorskip("torch")
    torch.save({"c.weight": torch.zeros(2, 1, 3, 3, 3), "c.bias": torch.zeros(2)}, tmp / "w.pth")
    return tmp


FAILING = {
    "non-ONNX .onnx (TensorFlow frontend logs)": ["convert", "bad.onnx", "-o", "x.xml"],
    "--set NaN": ["convert", "m.xml", "-o", "x.xml", "--set", "gain=NaN"],
    "--weights with --random-weights": ["convert", "fac.py:build", "--weights", "w.pth", "--random-weights",
                                        "-o", "x.xml"],
    "convert after finished stages (parity fails)": ["convert", "fac.py:build", "--random-weights", "-o", "x.xml",
                                                      "--tolerance", "1e-30", "--no-speed-profile"],
    "run, corrupt volume": ["run", "bad.nii.gz", "-m", "m.xml", "-o", "o.nii.gz"],
    "run, missing model": ["run", "vol.nii.gz", "-m", "nope.xml", "-o", "o.nii.gz"],
    "plan, bad tile": ["plan", "vol.nii.gz", "-m", "m.xml", "--tile", "0"],
    "info, missing weights": ["info", "bad.onnx.xml"],
    "to-zarr, corrupt volume": ["to-zarr", "bad.nii.gz", "-o", "z.zarr"],
    "to-nifti, not a store": ["to-nifti", "notzarr", "-o", "n.nii.gz"],
    # usage errors, which click shows as usage, hint and message on three lines
    "run, unknown precision": ["run", "vol.nii.gz", "-m", "m.xml", "-o", "o.nii.gz", "--precision", "f64"],
    "run, no model": ["run", "vol.nii.gz", "-o", "o.nii.gz"],
    "run, unknown option": ["run", "vol.nii.gz", "-m", "m.xml", "-o", "o.nii.gz", "--bogus"],
    "unknown command": ["frobnicate"],
    "convert, no model": ["convert"],
    "run, damaged Zarr chunk": ["run", "bad.zarr", "-m", "m.xml", "-o", "o.nii.gz"],
    "run, unusable cache directory": ["run", "vol.nii.gz", "-m", "m.xml", "-o", "o.nii.gz", "--cache-dir",
                                      "/proc/no-such-dir"],
}
USAGE = {"run, unknown precision", "run, no model", "run, unknown option", "unknown command", "convert, no model"}


@pytest.mark.parametrize("case", list(FAILING))
def test_a_failing_command_writes_exactly_one_line(files, case):
    if case == "info, missing weights":
        (files / "bad.onnx.xml").write_text("<net/>")
    status, out, err = volinfer(*FAILING[case], cwd=files)
    assert status != 0 and out == ""
    assert len(err) == 1, f"{case}: {err}"
    assert err[0].startswith("error: "), err
    assert not (files / "x.xml").exists() and not (files / "o.nii.gz").exists()
    if case in USAGE:
        assert status == 2 and "--help'" in err[0], err


def test_quiet_convert_is_silent_and_debug_shows_the_framework_noise(files):
    args = ["convert", "fac.py:build", "--random-weights", "-o", "q.xml", "--no-receptive-field",
            "--no-speed-profile"]
    status, out, err = volinfer(*args, "-q", cwd=files)
    assert status == 0 and out == "" and err == []
    status, _, err = volinfer("convert", "bad.onnx", "-o", "x.xml", cwd=files, env_extra={"VOLINFER_DEBUG": "1"})
    assert status != 0 and any("text_format" in line for line in err)  # what the capture hides, shown on request


def test_stage_lines_not_bar_frames_when_stderr_is_a_file(files):
    status, _, err = volinfer("convert", "m.xml", "-o", "s.xml", "--no-speed-profile", cwd=files)
    assert status == 0
    text = "\n".join(err)
    assert "\r" not in text and "%|" not in text
    assert "convert: parity check: done in" in text and "convert: export to OpenVINO: done in" in text


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_set_refuses_non_finite_numbers(text):
    from converters.inputs import parse_set
    from volinfer.errors import VolinferError

    with pytest.raises(VolinferError, match="not finite"):
        parse_set([f"gain={text}"])
    from converters.settings import ConvertSettings

    with pytest.raises(VolinferError, match="not finite"):  # the Python API too
        ConvertSettings.from_kwargs(fixed={"gain": float(text.strip("[]").split(",")[-1])})
    assert parse_set(["gain=1e30", "flag=false"]) == {"gain": 1e30, "flag": False}


def test_random_weights_only_where_it_is_true(files):
    from converters.sources import load
    from volinfer.errors import VolinferError

    with pytest.raises(VolinferError, match="contradicts --weights"):
        load(f"{files / 'fac.py'}:build", weights=str(files / "w.pth"), random_weights=True)
    with pytest.raises(VolinferError, match="for file.py:factory"):
        load(str(files / "m.xml"), random_weights=True)

