"""The default memory budget is a property of the machine (physical RAM, capped by a cgroup limit), not of the memory
free at the moment: the same command plans the same, and a killed run resumes while less memory is free."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import stream_unet
from test_resume import KILLER

from volinfer import portable
from volinfer.cli import main
from volinfer.run import fidelity


def _cgroup(tmp_path, monkeypatch, lines, files):
    """A fake /proc/self/cgroup and cgroup file system under ``tmp_path``."""
    (tmp_path / "cgroup").write_text("".join(ln + "\n" for ln in lines))
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    monkeypatch.setattr(portable, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(portable, "CGROUP_ROOT", str(tmp_path / "fs"))


def test_cgroup_v2_limit_tightest_on_the_path(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, ["0::/a/b"], {"a/b/memory.max": "max\n", "a/memory.max": str(3 << 30),
                                                 "memory.max": str(5 << 30)})
    assert portable.cgroup_limit_mb() == 3 * 1024
    assert portable.machine_mb() == min(3 * 1024, portable.total_mb())


def test_cgroup_v1_limit_and_unlimited(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, ["4:memory:/host/path", "0::/"], {"memory/memory.limit_in_bytes": str(1 << 30)})
    assert portable.cgroup_limit_mb() == 1024  # the container's own mount (the host path is not mounted here)
    assert portable.machine_mb() == 1024
    _cgroup(tmp_path, monkeypatch, ["4:memory:/"], {"memory/memory.limit_in_bytes": "9223372036854771712"})
    assert portable.cgroup_limit_mb() is None  # v1's "unlimited"
    assert portable.machine_mb() == portable.total_mb()


def test_default_budget_ignores_free_memory(monkeypatch):
    monkeypatch.setattr(portable, "available_mb", lambda: 20000.0)
    high = fidelity.default_budget_mb()
    monkeypatch.setattr(portable, "available_mb", lambda: 300.0)
    assert fidelity.default_budget_mb() == high == fidelity.DEFAULT_MEMORY_FRACTION * portable.machine_mb()


def test_killed_stream_run_resumes_with_less_free_memory(tmp_path, monkeypatch):
    """A stream run killed part-way, resumed while the machine has far less free memory (MemAvailable 500 MB: a
    budget from it would change the stream's bands): the same plan, accepted, the same bytes as an uninterrupted
    run."""
    xml = tmp_path / "m.xml"
    ov.save_model(stream_unet(), str(xml))
    vol = tmp_path / "vol.nii"
    rng = np.random.default_rng(3)
    nib.save(nib.Nifti1Image(rng.standard_normal((13, 100, 70)).astype(np.float32), np.eye(4)), str(vol))
    args = [str(vol), "-m", str(xml), "--engine", "stream", "--kind", "raw", "--precision", "f32", "-q"]
    out = tmp_path / "out.nii"
    p = subprocess.run([sys.executable, "-c", KILLER, "run", *args, "-o", str(out)], capture_output=True,
                       env={**os.environ, "KILL_AT": "2"}, timeout=300)
    assert p.returncode == -9 and not out.exists(), p.stderr.decode()[-2000:]
    journal = json.loads((tmp_path / ".out.nii.partial.json").read_text())
    assert 0 < journal["rows_done"] < journal["rows_total"]
    monkeypatch.setattr(portable, "available_mb", lambda: 500.0)
    r = CliRunner().invoke(main, ["run", *args, "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.nii"
    assert CliRunner().invoke(main, ["run", *args, "-o", str(ref)]).exit_code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(ref)).dataobj))
