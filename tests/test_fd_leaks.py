"""File descriptors, threads, Dask clusters and temporary files are released on every path (issue 12 item 4):
successful runs and failing ones (bad input, refused output, an exception injected mid-run, a KeyboardInterrupt),
to NIfTI and to Zarr, in this process and on a local Dask cluster. Counted with /proc/self/fd (Linux)."""

from __future__ import annotations

import gc
import os
import re
import threading
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from models import save_unet2

import volinfer
from volinfer.errors import VolinferError
from volinfer.io.reader import VolumeSource

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc/self/fd")

OPTS = dict(tile=16, overlap=4)


def open_fds() -> list[str]:
    """Open descriptors with what they point to, after a garbage collection (objects in reference cycles)."""
    gc.collect()
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # the directory's own fd, closed by now
            pass
    return sorted(out)


def _threads() -> list[str]:
    """Live threads, less the pools that grow on demand and stay (zarr's asyncio executor, tqdm's monitor)."""
    return sorted(t.name for t in threading.enumerate()
                  if not re.fullmatch(r"asyncio_\d+|tqdm_monitor|ThreadPoolExecutor-\d+_\d+", t.name))


@pytest.fixture
def env(tmp_path):
    xml = save_unet2(tmp_path / "m.xml")
    vol = np.random.default_rng(5).integers(0, 300, (30, 26, 41)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    return tmp_path, xml


def _fail_at(monkeypatch, cls, n, exc):
    """Make ``cls.write`` raise a new ``exc`` at its n-th call (mid-run). A new instance each time: one exception
    object raised again and again would keep every earlier run's frames alive in its traceback."""
    real, calls = cls.write, [0]

    def write(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise exc()
        return real(self, *a, **k)
    monkeypatch.setattr(cls, "write", write)


def _scenarios(tmp, xml, monkeypatch):
    """Each a callable that runs once (raising or not); leaves nothing open."""
    from volinfer.io.writer import NiftiWriter
    from volinfer.io.zarr_writer import ZarrWriter

    def ok(src, out, **kw):
        return lambda: volinfer.predict(str(tmp / src), xml, str(tmp / out), overwrite=True, **OPTS, **kw)

    def failing(src, out, cls, exc):
        def run():
            with monkeypatch.context() as m:
                _fail_at(m, cls, 3, exc)
                volinfer.predict(str(tmp / src), xml, str(tmp / out), overwrite=True, **OPTS)
        return run

    (tmp / "short.nii").write_bytes((tmp / "v.nii").read_bytes()[:-500])
    (tmp / "exists.nii").write_bytes(b"x")
    return {
        "nii": ok("v.nii", "o.nii"),
        "nii.gz from .nii.gz": ok("v.nii.gz", "o.nii.gz"),
        "zarr": ok("v.nii", "o.zarr"),
        "array": lambda: volinfer.predict(np.zeros((20, 20, 20), np.float32), xml, **OPTS),
        "missing input": ok("nope.nii", "o2.nii"),
        "truncated input": ok("short.nii", "o2.nii"),
        "refused output": lambda: volinfer.predict(str(tmp / "v.nii"), xml, str(tmp / "exists.nii"), **OPTS),
        "bad output name": ok("v.nii", "o.txt"),
        "exception mid-run nii.gz": failing("v.nii", "e.nii.gz", NiftiWriter, RuntimeError),
        "exception mid-run zarr": failing("v.nii", "e.zarr", ZarrWriter, RuntimeError),
        "interrupt mid-run nii.gz": failing("v.nii.gz", "i.nii.gz", NiftiWriter, KeyboardInterrupt),
        "interrupt mid-run zarr": failing("v.nii", "i.zarr", ZarrWriter, KeyboardInterrupt),
        "resume nii.gz": ok("v.nii.gz", "i.nii.gz", resume=True),
        "to-zarr": lambda: volinfer.io.zarr_convert.nifti_to_zarr(tmp / "v.nii.gz", tmp / "c.zarr", chunks=16,
                                                          overwrite=True),
        "to-nifti": lambda: (tmp / "c.nii.gz").unlink(missing_ok=True) or volinfer.io.zarr_convert.zarr_to_nifti(
            tmp / "c.zarr", tmp / "c.nii.gz"),
    }


def _run_all(scenarios) -> dict[str, str]:
    outcome = {}
    for name, fn in scenarios.items():
        try:
            fn()
            outcome[name] = "ok"
        except (VolinferError, RuntimeError, KeyboardInterrupt) as e:
            outcome[name] = type(e).__name__
    return outcome


def test_no_descriptor_thread_or_temporary_file_left_by_runs_that_succeed_or_fail(env, monkeypatch):
    import volinfer.io.zarr_convert  # noqa: F401

    tmp, xml = env
    scenarios = _scenarios(tmp, xml, monkeypatch)
    first = _run_all(scenarios)  # warm-up: OpenVINO, zarr and numcodecs open what they keep for the process
    assert first["nii"] == first["zarr"] == first["resume nii.gz"] == first["to-nifti"] == "ok", first
    assert first["missing input"] == first["truncated input"] == first["refused output"] == "VolinferError"
    assert first["exception mid-run nii.gz"] == first["exception mid-run zarr"] == "RuntimeError"
    assert first["interrupt mid-run nii.gz"] == "Interrupted" or "VolinferError" in first["interrupt mid-run nii.gz"]
    fds, threads = open_fds(), _threads()
    for _ in range(3):
        assert _run_all(scenarios) == first
    extra = sorted(set(open_fds()) - set(fds))
    assert not extra, extra
    assert _threads() == threads and not [t for t in threads if t.startswith("volinfer")]
    leftovers = sorted(p.name for p in tmp.iterdir() if p.name.startswith(".") and "lock" in p.name)
    assert not leftovers, leftovers
    assert not [p.name for p in tmp.iterdir() if ".partial" in p.name and not p.name.startswith(".i.")]


def test_a_failing_second_input_closes_the_first(env):
    tmp, _ = env
    bad = tmp / "bad.nii"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)), str(bad))
    VolumeSource.open([tmp / "v.nii"], depth=16).close()
    fds = open_fds()
    for _ in range(3):
        with pytest.raises(VolinferError, match="differs"):
            VolumeSource.open([tmp / "v.nii", bad], depth=16)
    assert open_fds() == fds


def test_dask_cluster_runs_release_everything(env):
    """A Zarr run on a local Dask cluster (one worker), succeeding and failing: no descriptor or thread is left."""
    pytest.importorskip("dask.distributed")
    from volinfer.run.distributed import run_zarr
    from volinfer.io.zarr_convert import nifti_to_zarr

    tmp, xml = env
    nifti_to_zarr(tmp / "v.nii", tmp / "in.zarr", chunks=16)

    import dask.distributed

    def interrupted(futures):  # Ctrl-C while the cluster works
        raise KeyboardInterrupt

    def runs():
        run_zarr(tmp / "in.zarr", xml, tmp / "d.zarr", block=32, overwrite=True, workers=1, **OPTS)
        with pytest.raises(VolinferError):  # refused output
            run_zarr(tmp / "in.zarr", xml, tmp / "exists.nii", block=32, workers=1, **OPTS)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dask.distributed, "as_completed", interrupted)
            with pytest.raises((KeyboardInterrupt, VolinferError)):
                run_zarr(tmp / "in.zarr", xml, tmp / "d.zarr", block=32, workers=1, resume=True, **OPTS)
    (tmp / "exists.nii").write_bytes(b"x")
    runs()
    fds, threads = open_fds(), _threads()
    runs()
    runs()
    extra = sorted(set(open_fds()) - set(fds))
    assert not extra, extra
    assert not Counter(_threads()) - Counter(threads), _threads()
