""".nii.gz output compressed while the run goes (volinfer.io.gzip_writer.GzipStreamer) and gzip through ISA-L or the
standard library (volinfer.io.gzipio): exact bytes, valid files from both libraries, resumable failures."""

import errno
import gzip
import json
import time
import zlib

import nibabel as nib
import numpy as np
import pytest
from models import save_unet2

from volinfer import VolinferError, predict
from volinfer.io import gzipio
from volinfer.io import gzip_writer as G
from volinfer.io import writer as W
from volinfer.errors import Interrupted
from volinfer.io.journal import ResumableError
from volinfer.io.reader import VolumeSource

BACKENDS = ["zlib"] + (["isal"] if gzipio._isal_zlib is not None else [])
RUN = dict(tile=32, overlap=24, kind="raw")  # two float32 channels: two compressed parts


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A small int16 volume, the tiny U-Net as IR, and slabs small enough that every run streams many of them."""
    monkeypatch.setattr(G, "SLAB_BYTES", 3000)  # not a multiple of a plane: slabs straddle rows
    vol = tmp_path / "vol.nii.gz"
    data = np.random.default_rng(5).integers(0, 400, (36, 28, 70)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(vol))
    return tmp_path, vol, save_unet2(tmp_path / "m.xml")


def _streamers(monkeypatch):
    """Record every GzipStreamer made, and make each sync() wait until the background thread has compressed all
    that the sync made final (so that what the tests check does not depend on thread scheduling). Returns the
    streamers and, per sync, the bytes of each part compressed by then."""
    made, progress, real_init, real_sync = [], [], G.GzipStreamer.__init__, W.NiftiWriter.sync

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    def sync(self):
        real_sync(self)
        gz = self._gz
        deadline = time.monotonic() + 20
        while gz is not None and gz._ready() and gz.error is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if gz is not None:
            progress.append([p.pos - p.start for p in gz._parts])

    monkeypatch.setattr(G.GzipStreamer, "__init__", init)
    monkeypatch.setattr(W.NiftiWriter, "sync", sync)
    return made, progress


@pytest.mark.parametrize("backend", BACKENDS)
def test_gz_output_is_the_nii_output_compressed_while_running(env, monkeypatch, backend):
    tmp, vol, xml = env
    monkeypatch.setattr(gzipio, "BACKEND", backend)
    made, progress = _streamers(monkeypatch)
    predict(vol, xml, tmp / "o.nii", **RUN)
    predict(vol, xml, tmp / "o.nii.gz", **RUN)
    raw = (tmp / "o.nii").read_bytes()
    packed = (tmp / "o.nii.gz").read_bytes()
    assert gzip.decompress(packed) == raw  # bitwise: header, both channels (the stdlib checks CRC and size)
    assert packed[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + packed[8:10]  # no name, mtime 0
    assert len(made) == 1 and len(made[0]._parts) == 2
    sizes = [p.end - p.start for p in made[0]._parts]
    assert progress == sorted(progress) and progress[-1] == sizes
    running = [d for d in progress if d != sizes]  # syncs before the last row was final
    assert len(running) >= 4 and running[0][0] < running[-1][0]  # compressed row by row as the run went
    assert all(0.5 * s < d for d, s in zip(running[-1], sizes))  # most of each part before the last row
    assert sorted(p.name for p in tmp.iterdir()) == ["m.bin", "m.xml", "o.nii", "o.nii.gz", "vol.nii.gz"]


def test_stdlib_fallback_writes_a_valid_file_and_reads_gz(env, monkeypatch):
    tmp, vol, xml = env
    monkeypatch.setattr(gzipio, "BACKEND", "zlib")
    monkeypatch.setattr(gzipio, "_isal_zlib", None)  # as if isal were not installed
    monkeypatch.setattr(gzipio, "_igzip", None)
    assert gzipio.backend() == "zlib"
    predict(vol, xml, tmp / "o.nii.gz", tile=32, overlap=24)  # labels: one part
    monkeypatch.undo()
    img = nib.load(str(tmp / "o.nii.gz"))
    ref = predict(vol, xml, tile=32, overlap=24)
    np.testing.assert_array_equal(np.asarray(img.dataobj), ref)
    assert img.get_data_dtype() == ref.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_gz_is_byte_identical_with_small_slabs(env, monkeypatch, backend):
    tmp, vol, xml = env
    monkeypatch.setattr(gzipio, "BACKEND", backend)
    args = dict(RUN, stitch="gaussian")
    predict(vol, xml, tmp / "ref.nii.gz", **args)
    real, calls = W.NiftiWriter.write, [0]

    def write(self, *a):
        calls[0] += 1
        if calls[0] == 40:
            raise KeyboardInterrupt
        real(self, *a)

    monkeypatch.setattr(W.NiftiWriter, "write", write)
    with pytest.raises(Interrupted):
        predict(vol, xml, tmp / "out.nii.gz", **args)
    monkeypatch.setattr(W.NiftiWriter, "write", real)
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith(".out"))
    assert left == [".out.nii.gz.partial.json", ".out.nii.gz.partial.nii"]  # compressed parts removed
    predict(vol, xml, tmp / "out.nii.gz", resume=True, **args)
    assert (tmp / "out.nii.gz").read_bytes() == (tmp / "ref.nii.gz").read_bytes()


def test_compression_failure_mid_run_is_resumable(env, monkeypatch):
    tmp, vol, xml = env
    out = tmp / "out.nii.gz"
    _streamers(monkeypatch)
    real, calls = G.GzipStreamer._compress_slab, [0]

    def slab(self, part):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, part)

    monkeypatch.setattr(G.GzipStreamer, "_compress_slab", slab)
    with pytest.raises(ResumableError, match="No space left.*--resume"):
        predict(vol, xml, out, **RUN)
    journal = json.loads((tmp / ".out.nii.gz.partial.json").read_text())
    assert 0 < journal["rows_done"] < journal["rows_total"]  # stopped part-way, at the next row
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".out")) == [
        ".out.nii.gz.partial.json", ".out.nii.gz.partial.nii"]
    assert not out.exists()
    monkeypatch.undo()
    predict(vol, xml, out, resume=True, **RUN)
    predict(vol, xml, tmp / "ref.nii", **RUN)
    assert gzip.decompress(out.read_bytes()) == (tmp / "ref.nii").read_bytes()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_on_several_threads_give_the_same_bytes_as_one(tmp_path, monkeypatch, backend):
    """Five parts (ranges of unequal length, one empty) made final in uneven steps, compressed by 1, 2 and 3 threads:
    the same bytes every time, and a gzip file whose content is the source (the stdlib checks CRC and size). With
    several threads, more than one of them must have compressed slabs."""
    import threading

    monkeypatch.setattr(gzipio, "BACKEND", backend)
    monkeypatch.setattr(G, "SLAB_BYTES", 1000)
    rng = np.random.default_rng(7)
    data = (rng.integers(0, 4, 23_456, dtype=np.uint8) * 50).tobytes()  # compressible, not trivially
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    cuts = [0, 348, 5000, 17_001, 17_001, len(data)]
    ranges = list(zip(cuts[:-1], cuts[1:]))
    real, who = G.GzipStreamer._compress_slab, set()

    def slab(self, part):
        who.add(threading.current_thread().name)
        real(self, part)

    monkeypatch.setattr(G.GzipStreamer, "_compress_slab", slab)
    outs = []
    for threads in (1, 2, 3):
        who.clear()
        out = tmp_path / f"out{threads}.gz"
        gz = G.GzipStreamer(src, out, ranges, [tmp_path / f"p{threads}.{i}" for i in range(1, len(ranges))],
                            threads=threads)
        for frac in (0.1, 0.45, 0.8):
            gz.advance([a + int((b - a) * frac) for a, b in ranges])
            time.sleep(0.01)
        gz.finish()
        outs.append(out.read_bytes())
        assert len(who) == threads
    assert gzip.decompress(outs[0]) == data
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out1.gz", "out2.gz", "out3.gz", "src.bin"]


def test_crc32_combine_matches_crc_of_concatenation():
    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 0), (0, 5), (7, 0), (1, 1), (1000, 33), (4096, 65537)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert gzipio._crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)
    if gzipio._isal_zlib is not None:  # lengths past 2**32 (the trailer's size wraps, the CRC must not)
        for n2 in (2**32 + 7, 3 * 2**33 + 1):
            assert gzipio._crc32_combine(123456789, 987654321, n2) == gzipio._isal_zlib.crc32_combine(
                123456789, 987654321, n2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_deflate_data_in_gz_input_is_one_volinfer_error(tmp_path, monkeypatch, backend):
    """A valid NIfTI header and 40 of 64 planes of voxels (gzip members that nibabel reads the header from), then a
    member whose deflate stream is invalid (a block of the reserved type 3), with a trailer that agrees with the
    header: the decompressor's own exception type (zlib.error, IsalError) must come out as the one-line error."""
    monkeypatch.setattr(gzipio, "BACKEND", backend)
    img = nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4))
    img.header["vox_offset"] = 352
    head = img.header.binaryblock + b"\0" * 4  # header and an empty extension block: vox_offset 352
    planes = np.random.default_rng(3).integers(-30000, 30000, (40, 64, 64)).astype(np.int16).tobytes()
    body = b"\x1f\x8b\x08\x00\0\0\0\0\x00\xff" + b"\x07" + b"\0" * 64  # BFINAL=1, BTYPE=11: invalid
    trailer = (0).to_bytes(4, "little") + (len(head) + 64**3 * 2).to_bytes(4, "little")
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(gzip.compress(head, mtime=0) + gzip.compress(planes, 1, mtime=0) + body + trailer)
    with VolumeSource.open([p], depth=8) as src:
        np.testing.assert_array_equal(src.read(0, ((0, 64), (0, 64), (0, 8))),
                                      np.frombuffer(planes, np.int16).reshape(40, 64, 64)[:8].transpose(2, 1, 0))
        with pytest.raises(VolinferError, match="corrupt compressed data"):
            src.read(0, ((0, 64), (0, 64), (40, 48)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gz_input_reads_the_same_with_either_library(tmp_path, monkeypatch, backend):
    monkeypatch.setattr(gzipio, "BACKEND", backend)
    monkeypatch.setattr(gzipio, "READ_THREAD", backend == "isal")
    data = np.random.default_rng(2).integers(-900, 900, (33, 21, 19)).astype(np.int16)
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(p))
    with VolumeSource.open([p], depth=6) as src:
        for z0 in range(0, 19, 4):
            np.testing.assert_array_equal(src.read(0, ((2, 31), (0, 21), (z0, min(19, z0 + 6)))),
                                          data[2:31, :, z0 : z0 + 6])
