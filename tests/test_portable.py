"""Portable, large-file-safe I/O (issue 12 item 4): volinfer.portable and its fallbacks.

* positioned reads and writes go in bounded chunks and continue after short transfers (a single ``preadv`` over
  2 GiB returns at most 0x7ffff000 bytes on Linux: that was reported as a truncated file);
* with every native call switched off (the ``HAS_*`` flags), a NIfTI run (.nii, .nii.gz, interrupted + resumed)
  writes the same bytes as with them;
* volinfer imports and runs where ``resource`` and ``fcntl`` do not exist (Windows), and nothing outside the
  platform module imports them.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from models import tiny_unet

import volinfer
from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.io.reader import StripChannel, VolumeSource, StoredLayout
from volinfer.io.targets import OutputLock

FALLBACK_FLAGS = ("HAS_PREADV", "HAS_PREAD", "HAS_PWRITE", "HAS_FALLOCATE", "HAS_RESOURCE", "HAS_FCNTL",
                  "HAS_STATVFS", "HAS_WAIT4", "HAS_PROC")


@pytest.fixture
def fallbacks(monkeypatch):
    """Every native path off, psutil hidden, and tiny I/O chunks: what volinfer does on a bare platform."""
    for flag in FALLBACK_FLAGS:
        monkeypatch.setattr(portable, flag, False)
    monkeypatch.setattr(portable, "_psutil", lambda: None)
    monkeypatch.setattr(portable, "MAX_IO_BYTES", 1000)


def _file(tmp_path, n=10_007, seed=0) -> tuple[Path, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("flags", [{}, {"HAS_PREADV": False}, {"HAS_PREADV": False, "HAS_PREAD": False}])
def test_reads_go_in_bounded_chunks(tmp_path, monkeypatch, flags):
    """Every call moves at most MAX_IO_BYTES (1 KiB here), and together they fill the buffer exactly."""
    for k, v in flags.items():
        monkeypatch.setattr(portable, k, v)
    monkeypatch.setattr(portable, "MAX_IO_BYTES", 1024)
    sizes = []
    for name in ("preadv", "pread", "read"):
        real = getattr(os, name, None)
        if real is None:  # not on this platform
            continue

        def spy(*a, _real=real, _name=name):
            sizes.append(len(a[1][0]) if _name == "preadv" else a[1])
            return _real(*a)
        monkeypatch.setattr(os, name, spy)
    path, data = _file(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = np.empty(9000, np.uint8)
        assert portable.pread_into(fd, buf, 1003) == 9000
        assert buf.tobytes() == data[1003:10003]
        assert portable.pread(fd, 5000, 7000) == data[7000:]  # end of file: fewer bytes, no error
    finally:
        os.close(fd)
    assert sizes and max(sizes) <= 1024 and len(sizes) >= 9000 // 1024 + 3


@pytest.mark.skipif(not portable.HAS_PREADV, reason="wraps os.preadv")
def test_short_reads_are_continued_not_taken_for_truncation(tmp_path, monkeypatch):
    """A read that returns fewer bytes than asked (as Linux does past 0x7ffff000) is continued; only a real end of
    file reads short. Through the NIfTI reader: whole planes and strips equal nibabel's voxels."""
    real = os.preadv
    calls = []

    def short(fd, bufs, offset):
        calls.append(offset)
        return real(fd, [memoryview(bufs[0])[:333]], offset)  # at most 333 bytes per call
    monkeypatch.setattr(os, "preadv", short)
    vol = np.random.default_rng(1).integers(-500, 500, (23, 19, 11)).astype(np.int16)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    with VolumeSource.open([path], depth=11) as src:
        np.testing.assert_array_equal(src.readers[0].planes(2, 9), vol[:, :, 2:9])
        np.testing.assert_array_equal(src.read(0, ((3, 20), (4, 17), (1, 10))), vol[3:20, 4:17, 1:10])
    assert len(calls) > 10
    with open(path, "r+b") as f:  # now really truncated: the reader still says so
        f.truncate(path.stat().st_size - 100)
    ch = StripChannel(StoredLayout(path=path, shape=vol.shape, dtype=np.dtype(np.int16), offset=352, slope=1.0,
                              inter=0.0))
    try:
        with pytest.raises(VolinferError, match="shorter than its header"):
            ch.planes(0, 11)
    finally:
        ch.close()


@pytest.mark.skipif(not portable.HAS_PWRITE, reason="wraps os.pwrite")
def test_writes_go_in_bounded_chunks_and_short_writes_are_continued(tmp_path, monkeypatch):
    real = os.pwrite
    sizes = []

    def short(fd, buf, offset):
        sizes.append(len(buf))
        return real(fd, memoryview(buf)[:77], offset)  # at most 77 bytes per call
    monkeypatch.setattr(os, "pwrite", short)
    monkeypatch.setattr(portable, "MAX_IO_BYTES", 1024)
    data = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 6000)
    fd = os.open(path, os.O_WRONLY)
    try:
        portable.pwrite_all(fd, data, 500)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 500 + data.tobytes() + b"\0" * 500
    assert max(sizes) <= 1024 and len(sizes) >= 5000 // 77
    monkeypatch.setattr(os, "pwrite", lambda fd, buf, offset: 0)  # no progress at all: disk full, not a loop
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            portable.pwrite_all(fd, data, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_seek_fallback_writes_and_reserve_without_fallocate(tmp_path, fallbacks):
    path = tmp_path / "s.bin"
    fd = portable.open_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        portable.reserve(fd, 4096)
        assert os.fstat(fd).st_size == 4096
        portable.pwrite_all(fd, b"abc" * 700, 1000)
        assert portable.pread(fd, 2100, 1000) == b"abc" * 700
        portable.reserve(fd, 100)  # never shrinks
        assert os.fstat(fd).st_size == 4096
    finally:
        os.close(fd)
    assert portable.disk_free(tmp_path) > 0  # shutil.disk_usage


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="compares with /proc (Linux)")
def test_memory_fallbacks(monkeypatch):
    from volinfer.run.report import peak_rss_mb

    native = portable.peak_rss_mb()
    assert native > 10 and abs(portable.memory_status()["peak_mb"] - native) < 0.2 * native + 20
    monkeypatch.setattr(portable, "HAS_RESOURCE", False)
    assert abs(portable.peak_rss_mb() - native) < 0.2 * native + 20  # VmHWM (psutil has no peak on Linux)
    monkeypatch.setattr(portable, "HAS_PROC", False)
    monkeypatch.setattr(portable, "_psutil", lambda: None)
    assert portable.peak_rss_mb() is None and peak_rss_mb() == 0.0  # unknown, and the report still prints
    assert portable.memory_status() == {"peak_mb": None, "rss_mb": None}
    assert portable.available_mb() > 0  # sysconf
    with open("/proc/meminfo") as f:
        total = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) / 1024
    assert abs(portable.total_mb() - total) < 0.01 * total  # sysconf's figure
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert portable.available_mb() == portable.DEFAULT_AVAILABLE_MB and portable.total_mb() is None


def test_child_figures_without_wait4(monkeypatch):
    """The polling path still reports the exit status, and a peak/CPU figure with psutil (None without)."""
    monkeypatch.setattr(portable, "HAS_WAIT4", False)
    code = "import sys, time; b = bytearray(60 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5); sys.exit(3)"
    ans = portable.wait_child(subprocess.Popen([sys.executable, "-c", code]))
    assert ans["rc"] == 3 and not ans["killed"] and ans["peak_mb"] > 60 and ans["cpu_s"] is not None
    monkeypatch.setattr(portable, "_psutil", lambda: None)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ans = portable.wait_child(p, should_kill=lambda: True)
    assert ans["killed"] and ans["rc"] != 0 and ans["peak_mb"] is None


def test_lock_without_fcntl(tmp_path, monkeypatch):
    """O_EXCL lock files: a second holder is refused, a dead owner's lock is taken over, the file goes on release."""
    monkeypatch.setattr(portable, "HAS_FCNTL", False)
    target = tmp_path / "o.nii"
    with OutputLock(target) as lock:
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(VolinferError, match="another volinfer run"):
            OutputLock(target).acquire()
    assert not lock.path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(str(dead.pid))  # stale: its owner is gone
    assert not portable.pid_alive(dead.pid) and portable.pid_alive(os.getpid())
    with OutputLock(target):
        pass
    lock.path.write_text("")  # being created right now by another run
    with pytest.raises(VolinferError, match="another volinfer run"):
        OutputLock(target).acquire()


# ------------------------------------------------------------------------------------------- end to end, bitwise

def _run(tmp_path, model, vol, name, **kw):
    out = tmp_path / name
    volinfer.predict(str(vol), model, str(out), tile=16, overlap=4, **kw)
    return out.read_bytes()


def _interrupted_then_resumed(tmp_path, model, vol, name, monkeypatch):
    """KeyboardInterrupt at the 5th block written, then resume: returns the resumed output's bytes."""
    from volinfer.io.writer import NiftiWriter

    real, calls = NiftiWriter.write, [0]

    def write(self, *a):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        real(self, *a)
    with monkeypatch.context() as m:
        m.setattr(NiftiWriter, "write", write)
        with pytest.raises(VolinferError, match="resume"):
            _run(tmp_path, model, vol, name)
    assert not (tmp_path / name).exists() and calls[0] == 5
    return _run(tmp_path, model, vol, name, resume=True)


def test_fallback_paths_write_the_same_bytes(tmp_path, monkeypatch):
    """.nii and .nii.gz, fresh and resumed, from a .nii input (positioned reads): native calls vs fallbacks."""
    import openvino as ov

    model = tmp_path / "m.xml"
    m = tiny_unet(levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(m, str(model))
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.random.default_rng(3).integers(0, 300, (37, 30, 45)).astype(np.int16), np.eye(4)),
             str(vol))
    native = {name: _run(tmp_path, model, vol, name) for name in ("a.nii", "a.nii.gz")}
    for flag in FALLBACK_FLAGS:
        monkeypatch.setattr(portable, flag, False)
    monkeypatch.setattr(portable, "_psutil", lambda: None)
    monkeypatch.setattr(portable, "MAX_IO_BYTES", 1000)  # a plane strip is 2220 bytes: several calls each
    monkeypatch.setattr(os, "preadv", None, raising=False)  # any native call left would fail loudly
    monkeypatch.setattr(os, "pread", None, raising=False)
    monkeypatch.setattr(os, "pwrite", None, raising=False)
    monkeypatch.setattr(os, "posix_fallocate", None, raising=False)
    for name in ("a.nii", "a.nii.gz"):
        assert _run(tmp_path, model, vol, "b" + name[1:]) == native[name], name
        assert _interrupted_then_resumed(tmp_path, model, vol, "c" + name[1:], monkeypatch) == native[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.xml", "m.bin", "v.nii", *native, "b.nii", "b.nii.gz", "c.nii", "c.nii.gz"])  # no lock/temp/journal left


# ------------------------------------------------------------------------------------------------------ imports

def test_volinfer_imports_and_runs_without_resource_and_fcntl(tmp_path):
    """As on Windows: the modules do not exist. volinfer imports, locks with O_EXCL files, and runs."""
    code = f"""
import sys
sys.modules["resource"] = None
sys.modules["fcntl"] = None
import numpy as np, nibabel as nib
import volinfer
from volinfer import portable
from volinfer.io.targets import OutputLock
assert not portable.HAS_RESOURCE and not portable.HAS_FCNTL
sys.path.insert(0, {str(Path(__file__).parent)!r})
from models import tiny_unet
m = tiny_unet(levels=2)
m.set_rt_info("4", ["volinfer", "size_multiple"])
import openvino as ov
ov.save_model(m, {str(tmp_path / "m.xml")!r})
vol = np.random.default_rng(0).standard_normal((20, 24, 28)).astype(np.float32)
nib.save(nib.Nifti1Image(vol, np.eye(4)), {str(tmp_path / "v.nii")!r})
rep = volinfer.predict({str(tmp_path / "v.nii")!r}, {str(tmp_path / "m.xml")!r}, {str(tmp_path / "o.nii.gz")!r},
                       tile=16)
print("peak", rep.peak_rss_mb)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert nib.load(str(tmp_path / "o.nii.gz")).shape == (20, 24, 28)
    assert float(p.stdout.split()[-1]) > 0  # psutil or /proc gave a peak without resource


def test_no_module_level_os_specific_imports_outside_portable():
    root = Path(volinfer.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        if path.name == "portable.py":
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in (
                "resource", "fcntl", "msvcrt", "termios", "pwd", "grp")]
    assert not bad, bad


_FRAGMENTS = """
import sys
import numpy as np
from volinfer.portable import lean_allocator
if sys.argv[1] == "lean":
    assert lean_allocator()
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
big = np.ones(16 << 20, np.uint8)
del big  # glibc's default: its mmap threshold rises to 16 MB here, its trim threshold to 32 MB
base = rss()
temp = [np.ones(3 << 20, np.uint8) for _ in range(8)]  # 24 MB of temporaries, then freed
del temp
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"), reason="glibc's allocator")
def test_lean_allocator_returns_freed_blocks_to_the_system():
    """With the fixed mmap threshold, freed large temporaries leave the process; with glibc's default (its
    thresholds raised by a freed 16 MB block) they come from the heap and stay resident once freed."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_", "LD_"))}
    held = {mode: int(subprocess.run([sys.executable, "-c", _FRAGMENTS, mode], capture_output=True, text=True,
                                     check=True, env=env).stdout) for mode in ("default", "lean")}
    assert held["lean"] < 8, held
    assert held["default"] >= 20, held  # the test tells the two apart on this allocator
