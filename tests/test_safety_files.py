"""Safety of files and state (issue 10): outputs never destroy inputs or foreign data, one run per output at a time,
resume keyed on content, failures late in a run stay resumable, signals stop batches, hostile Zarr metadata."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer import VolinferError
from volinfer.cli import main
from volinfer.io.targets import OutputLock
from volinfer.io.writer import NiftiWriter

zarr = pytest.importorskip("zarr")

RUN = ["--tile", "32", "--overlap", "24", "-q"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def env(tmp_path):
    vol = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(3).integers(0, 400, (36, 28, 70)).astype(np.int16), np.eye(4)),
             str(vol))
    return tmp_path, vol, save_unet2(tmp_path / "m.xml")


def _zarr_input(path, shape=(40, 36, 30)):
    z = zarr.create_array(store=str(path), shape=shape, chunks=(16, 16, 16), dtype="float32")
    z[:] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return z[:]


def _interrupt_at(monkeypatch, n, exc=KeyboardInterrupt):
    """Make the n-th block write of the process raise ``exc`` (an interruption part-way through a run)."""
    real, calls = NiftiWriter.write, [0]

    def write(self, *a):
        calls[0] += 1
        if calls[0] == n:
            raise exc()
        real(self, *a)

    monkeypatch.setattr(NiftiWriter, "write", write)
    return calls


# --- class 1: outputs never overwrite inputs or foreign data -------------------------------------------------------

def test_zarr_output_onto_its_input_is_refused_and_input_intact(env):
    tmp, _, xml = env
    data = _zarr_input(tmp / "data.zarr")
    r = invoke("run", tmp / "data.zarr", "-m", xml, "-o", tmp / "data.zarr", "--overwrite", *RUN)
    assert r.exit_code == 2 and "also an input" in r.output
    np.testing.assert_array_equal(zarr.open_array(str(tmp / "data.zarr"))[:], data)
    r = invoke("run", tmp / "data.zarr", "-m", xml, "-o", tmp / "data.zarr" / "seg.zarr", *RUN)
    assert r.exit_code == 2 and "inside the input" in r.output
    assert not (tmp / "data.zarr" / "seg.zarr").exists()


def test_input_array_inside_output_group_is_refused(env):
    tmp, _, xml = env
    g = zarr.open_group(str(tmp / "g.zarr"), mode="w")
    raw = g.create_array("raw", shape=(40, 36, 30), chunks=(16, 16, 16), dtype="float32")
    raw[:] = 1.5
    r = invoke("run", tmp / "g.zarr" / "raw", "-m", xml, "-o", tmp / "g.zarr", "--overwrite", *RUN)
    assert r.exit_code == 2 and "input" in r.output
    assert (zarr.open_array(str(tmp / "g.zarr" / "raw"))[:] == 1.5).all()


def test_to_zarr_overwrite_replaces_only_volinfer_stores(env):
    tmp, vol, _ = env
    plain = tmp / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("precious")
    r = invoke("to-zarr", vol, plain, "--overwrite")
    assert r.exit_code == 2 and "only replaces Zarr stores that volinfer wrote" in r.output
    assert (plain / "notes.txt").read_text() == "precious"
    assert invoke("to-zarr", vol, tmp / "ours.zarr").exit_code == 0
    assert invoke("to-zarr", vol, tmp / "ours.zarr", "--overwrite").exit_code == 0  # its own store: replaced
    # the mark is the root group's attribute: zarr sees no object it does not recognise, and a plain zarr group
    # (no volinfer attribute) stays protected
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(zarr.open_group(str(tmp / "ours.zarr")).keys()) == ["0"]
    zarr.open_group(str(tmp / "foreign.zarr"), mode="w", attributes={"volinfer": {"written_by": "someone"}})
    r = invoke("to-zarr", vol, tmp / "foreign.zarr", "--overwrite")
    assert r.exit_code == 2 and (tmp / "foreign.zarr" / "zarr.json").exists()
    r = invoke("to-zarr", vol, tmp, "--overwrite")  # a directory holding the input itself
    assert r.exit_code == 2 and vol.exists()


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_link_to_input_as_output_is_refused(env, how):
    tmp, vol, xml = env
    before = vol.read_bytes()
    link = tmp / "link.nii.gz"
    (os.symlink if how == "symlink" else os.link)(vol, link)
    r = invoke("run", vol, "-m", xml, "-o", link, "--overwrite", *RUN)
    assert r.exit_code == 2 and "also an input" in r.output
    assert vol.read_bytes() == before


def test_overwrite_refused_before_the_run_when_directory_not_writable(env, monkeypatch):
    tmp, vol, xml = env
    sub = tmp / "ro"
    sub.mkdir()
    (sub / "o.nii").write_bytes(b"old")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(sub) else real(p, m, **k))
    monkeypatch.setattr(NiftiWriter, "write", lambda *a: pytest.fail("the run started"))
    r = invoke("run", vol, "-m", xml, "-o", sub / "o.nii", "--overwrite", *RUN)
    assert r.exit_code == 2 and "not writable" in r.output


# --- class 2: one run per output --------------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["o.nii.gz", "o.zarr"])
def test_second_run_on_a_locked_output_fails_fast(env, out):
    tmp, vol, xml = env
    src = vol
    if out.endswith(".zarr"):
        _zarr_input(tmp / "in.zarr")
        src = tmp / "in.zarr"
    with OutputLock(tmp / out):
        t0 = time.perf_counter()
        r = invoke("run", src, "-m", xml, "-o", tmp / out, *RUN)
        assert r.exit_code == 2 and "another volinfer run is writing this output" in r.output
        assert time.perf_counter() - t0 < 5
    assert not (tmp / out).exists()
    assert invoke("run", src, "-m", xml, "-o", tmp / out, *RUN).exit_code == 0  # lock released: runs
    assert not list(tmp.glob(".*lock"))


def test_long_output_name_works(env):
    tmp, vol, xml = env
    out = tmp / ("n" * 233 + ".nii.gz")
    assert len(out.name) == 240
    r = invoke("run", vol, "-m", xml, "-o", out, *RUN)
    assert r.exit_code == 0, r.output
    assert nib.load(str(out)).shape == (36, 28, 70)
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["vol.nii.gz", "m.xml", "m.bin", out.name])


# --- class 3: resume keyed on content ---------------------------------------------------------------------------------

def test_resume_after_input_content_change_is_refused(env, monkeypatch):
    tmp, vol, xml = env
    out = tmp / "o.nii"
    _interrupt_at(monkeypatch, 4)  # crop writes one block per z-row (6 rows here)
    assert invoke("run", vol, "-m", xml, "-o", out, *RUN).exit_code == 130
    monkeypatch.undo()
    st = vol.stat()
    img = nib.load(str(vol))
    data = np.asanyarray(img.dataobj).copy()
    data[-1, -1, -1] += 1  # one voxel of other content, same name, mtime restored
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(vol))
    os.utime(vol, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = invoke("run", vol, "-m", xml, "-o", out, "--resume", *RUN)
    assert r.exit_code == 2 and "cannot resume: inputs" in r.output


def test_resume_after_model_weights_change_is_refused(env, monkeypatch):
    tmp, vol, xml = env
    out = tmp / "o.nii"
    _interrupt_at(monkeypatch, 4)  # crop writes one block per z-row (6 rows here)
    assert invoke("run", vol, "-m", xml, "-o", out, *RUN).exit_code == 130
    monkeypatch.undo()
    binf = xml.with_suffix(".bin")
    st = binf.stat()
    w = bytearray(binf.read_bytes())
    w[100] ^= 0x01
    binf.write_bytes(bytes(w))
    os.utime(binf, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = invoke("run", vol, "-m", xml, "-o", out, "--resume", *RUN)
    assert r.exit_code == 2 and "cannot resume: model.weights" in r.output


def test_zarr_resume_with_another_model_is_refused(env, monkeypatch):
    import volinfer.run.distributed as dist
    from volinfer.run.distributed import run_zarr

    tmp, _, xml = env
    _zarr_input(tmp / "in.zarr")
    other = tmp / "other"
    other.mkdir()
    xml2 = save_unet2(other / "m.xml", stitch="gaussian")
    real = dist.run_block
    calls = []

    def stop_after_two(job, block):
        calls.append(block)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(job, block)

    monkeypatch.setattr(dist, "run_block", stop_after_two)
    with pytest.raises(dist.Interrupted):
        run_zarr(tmp / "in.zarr", xml, tmp / "o.zarr", tile=32, overlap=24, kind="raw", block=16)
    monkeypatch.undo()
    with pytest.raises(VolinferError, match="cannot resume: model"):
        run_zarr(tmp / "in.zarr", xml2, tmp / "o.zarr", tile=32, overlap=24, kind="raw", block=16, resume=True,
                 stitch="crop")
    rep = run_zarr(tmp / "in.zarr", xml, tmp / "o.zarr", tile=32, overlap=24, kind="raw", block=16, resume=True)
    assert ", 2 already complete" in rep.extra["blocks"]


# --- class 7: late or lost failures -----------------------------------------------------------------------------------

def _gz_header(path):
    head = path.read_bytes()[:10]
    return head[3], int.from_bytes(head[4:8], "little")  # flags (FNAME = 8), mtime


def test_resumed_nii_gz_is_byte_identical(env, monkeypatch):
    tmp, vol, xml = env
    args = [vol, "-m", xml, "--stitch", "gaussian", "--kind", "raw", *RUN]
    ref, out = tmp / "ref.nii.gz", tmp / "out.nii.gz"
    assert invoke("run", *args, "-o", ref).exit_code == 0
    assert _gz_header(ref) == (0, 0)  # no file name, no time: reproducible bytes
    _interrupt_at(monkeypatch, 40)
    assert invoke("run", *args, "-o", out).exit_code == 130
    monkeypatch.undo()
    journal = json.loads((tmp / ".out.nii.gz.partial.json").read_text())
    assert 0 < journal["rows_done"] < journal["rows_total"]
    assert invoke("run", *args, "-o", out, "--resume").exit_code == 0
    assert out.read_bytes() == ref.read_bytes()


def test_compression_failure_keeps_result_and_resumes(env, monkeypatch):
    tmp, vol, xml = env
    ref, out = tmp / "ref.nii.gz", tmp / "out.nii.gz"
    assert invoke("run", vol, "-m", xml, "-o", ref, *RUN).exit_code == 0

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NiftiWriter, "_compress", full)
    r = invoke("run", vol, "-m", xml, "-o", out, *RUN)
    assert r.exit_code == 2 and "No space left" in r.output and "--resume" in r.output
    assert (tmp / ".out.nii.gz.partial.nii").exists() and not out.exists()
    monkeypatch.undo()
    r = invoke("run", vol, "-m", xml, "-o", out, *RUN[:-1], "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles"] == 0  # only the compression was left to do
    assert out.read_bytes() == ref.read_bytes()


def test_no_room_for_compressed_copy_is_refused_before_the_run(env, monkeypatch):
    tmp, vol, xml = env

    class Tiny:
        f_bavail, f_frsize = 100, 4096  # 400 kB: room for the temporary file, not for a float copy too

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny())
    monkeypatch.setattr(NiftiWriter, "write", lambda *a: pytest.fail("the run started"))
    r = invoke("run", vol, "-m", xml, "-o", tmp / "o.nii.gz", "--kind", "raw", *RUN)
    assert r.exit_code == 2 and "not enough disk space" in r.output
    assert sorted(p.name for p in tmp.iterdir()) == ["m.bin", "m.xml", "vol.nii.gz"]



def test_no_room_for_a_tiff_output_is_refused_before_the_run(env, monkeypatch):
    """A TIFF output is checked as a NIfTI one is (it was not: the run started and failed at the first full write),
    and a nearly full disk is said in KB, not "0 MB free"."""
    pytest.importorskip("tifffile")
    from volinfer.io.tiff_io import TiffWriter

    tmp, vol, xml = env

    class Tiny:
        f_bavail, f_frsize = 75, 4096  # 300 kB

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny())
    monkeypatch.setattr(TiffWriter, "write", lambda *a: pytest.fail("the run started"))
    r = invoke("run", vol, "-m", xml, "-o", tmp / "o.tif", "--kind", "probabilities", *RUN)
    assert r.exit_code == 2 and "not enough disk space" in r.output and "300 KB free" in r.output, r.output
    assert sorted(p.name for p in tmp.iterdir()) == ["m.bin", "m.xml", "vol.nii.gz"]

def test_disk_full_while_writing_journal_is_one_line_and_resumable(env, monkeypatch):
    import volinfer.io.journal as jmod

    tmp, vol, xml = env
    out = tmp / "o.nii"
    armed = {"calls": 0}

    class FullOs:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            armed["calls"] += 1
            if armed["calls"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

    monkeypatch.setattr(jmod, "os", FullOs())
    r = invoke("run", vol, "-m", xml, "-o", out, *RUN)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "progress journal" in r.output
    monkeypatch.undo()
    assert json.loads((tmp / ".o.nii.partial.json").read_text())["rows_done"] == 1
    assert invoke("run", vol, "-m", xml, "-o", out, "--resume", *RUN).exit_code == 0
    assert invoke("run", vol, "-m", xml, "-o", tmp / "ref.nii", *RUN).exit_code == 0
    assert out.read_bytes() == (tmp / "ref.nii").read_bytes()


def _batch_dir(tmp, n=3):
    d = tmp / "vols"
    d.mkdir()
    for i in range(n):
        data = np.random.default_rng(i).integers(0, 300, (36, 28, 70)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(d / f"v{i}.nii.gz"))
    return d


def test_batch_resume_skips_finished_and_resumes_interrupted(env, monkeypatch):
    tmp, _, xml = env
    d = _batch_dir(tmp)
    assert invoke("run", d, "-m", xml, "-o", tmp / "ref", *RUN).exit_code == 0
    _interrupt_at(monkeypatch, 9)  # crop writes 6 blocks per volume: part-way through v1
    r = invoke("run", d, "-m", xml, "-o", tmp / "out", *RUN)
    assert r.exit_code == 130 and "--resume" in r.output
    monkeypatch.undo()
    assert (tmp / "out" / "v0.nii.gz").exists() and not (tmp / "out" / "v2.nii.gz").exists()
    assert (tmp / "out" / ".v1.nii.gz.partial.json").exists()
    r = CliRunner().invoke(main, ["run", str(d), "-m", str(xml), "-o", str(tmp / "out"), *RUN[:-1], "--resume",
                                  "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert len(runs) == 2 and runs[0]["tiles"] < runs[1]["tiles"]  # v0 skipped, v1 resumed, v2 whole
    for i in range(3):
        name = f"v{i}.nii.gz"
        assert (tmp / "out" / name).read_bytes() == (tmp / "ref" / name).read_bytes()


SLOW_BATCH = """
import os, sys, time
from volinfer.io.writer import NiftiWriter
real = NiftiWriter.write
def write(self, *a):
    open(os.environ["READY"], "w").close()
    time.sleep(0.05)
    real(self, *a)
NiftiWriter.write = write
from volinfer.cli import main
sys.argv = ["volinfer"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_batch_within_seconds(env, sig, code):
    tmp, _, xml = env
    d = _batch_dir(tmp, 4)
    ready = tmp / f"ready{int(sig)}"  # one per case: a stale one would send the signal before the run starts
    # a shell without job control starts background jobs with SIGINT ignored, and the child inherits that (a volinfer
    # started so keeps ignoring it, rightly): give the child the default disposition, as a terminal would
    p = subprocess.Popen([sys.executable, "-c", SLOW_BATCH, "run", str(d), "-m", str(xml), "-o", str(tmp / "out"),
                          *RUN], env={**os.environ, "READY": str(ready)}, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        t0 = time.time()
        p.send_signal(sig)
        err = p.communicate(timeout=30)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert time.time() - t0 < 5 and "--resume" in err and "Traceback" not in err
    assert list((tmp / "out").glob(".v0.nii.gz.partial.json"))  # resumable state left


# --- class 8 (Zarr part): metadata bombs ------------------------------------------------------------------------------

def test_huge_zarr_metadata_is_refused_fast_in_little_memory(tmp_path):
    zarr.create_array(store=str(tmp_path / "bomb.zarr"), shape=(100000,) * 3, chunks=(64,) * 3, dtype="float32")
    code = ("import resource, time, sys\n"
            "from volinfer.io.zarr_io import open_zarr_source\n"
            "from volinfer.errors import VolinferError\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.time()\n"
            "try:\n    open_zarr_source(sys.argv[1])\nexcept VolinferError as e:\n    print('refused:', e)\n"
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.zarr")], capture_output=True, text=True,
                       timeout=120)
    out = p.stdout.splitlines()
    assert out[0].startswith("refused:") and "chunk file(s) exist" in out[0], p.stdout + p.stderr
    secs, grew_kb = out[1].split()
    assert float(secs) < 10 and int(grew_kb) < 100_000  # generous: the machine may be busy; a scan takes hours
    r = invoke("run", tmp_path / "bomb.zarr", "-m", save_unet2(tmp_path / "m.xml"), "-o", tmp_path / "o.zarr")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "declares shape" in r.output
    zarr.create_array(store=str(tmp_path / "fat.zarr"), shape=(2048,) * 3, chunks=(1024,) * 3, dtype="float32")
    r = invoke("to-nifti", tmp_path / "fat.zarr", tmp_path / "fat.nii")
    assert r.exit_code == 2 and "rechunk" in r.output


# --- NIfTI-2 output -------------------------------------------------------------------------------------------------

def test_output_wider_than_nifti1_is_written_as_nifti2(tmp_path):
    n = 40000
    z = zarr.create_array(store=str(tmp_path / "long.zarr"), shape=(1, 2, n), chunks=(1, 2, 4096), dtype="int16")
    data = np.arange(2 * n, dtype=np.int16).reshape(1, 2, n)
    z[:] = data
    r = invoke("to-nifti", tmp_path / "long.zarr", tmp_path / "long.nii.gz")
    assert r.exit_code == 0, r.output
    img = nib.load(str(tmp_path / "long.nii.gz"))
    assert isinstance(img, nib.Nifti2Image) and img.shape == (n, 2, 1)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data.transpose(2, 1, 0))
    with gzip.open(tmp_path / "long.nii.gz") as f:
        assert int.from_bytes(f.read(4), "little") == 540
    shutil.rmtree(tmp_path / "long.zarr")
