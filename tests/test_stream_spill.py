"""Spilling skip connections to disk in the layer-streaming engine (volinfer.run.stream.SpilledBuffer,
volinfer.io.plane_store): the streamed output is still whole-volume inference, computed independently here (OpenVINO
runs the whole padded volume through the unmodified model in one call); spill files never outlive a run; a disk
too small for the spill is refused before any work; the planner spills when the budget asks for it.

Spill is forced with ``stream.SPILL = "always"`` and one plane per segment call (``CHUNK_BYTES = 1``: on these
small volumes a chunk of 2 MB would be the whole volume, and nothing would wait long enough to be worth spilling).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest

import volinfer.run.stream as stream
from models import stream_unet
from stream_models import from_torch, monai_basic_unet, torch_upsample_unet
from test_stream import whole_volume
from volinfer import api, portable, predict
from volinfer.errors import VolinferError
from volinfer.io import plane_store
from volinfer.io.plane_store import SPILL_MARK, PlaneFile, PlaneStore, PlaneWindow, remove_stale, spill_location
from volinfer.model.memory import weights_mb
from volinfer.run.stream import fixed_mb
from volinfer.model.tile_model import TileModel


def _volume(shape, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal(shape), axis=2).astype(np.float32) * 0.3


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    monkeypatch.setattr(stream, "SPILL", "always")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (IR path, size multiple): U-Nets with skip connections (channel concatenation)."""
    d = tmp_path_factory.mktemp("spill")
    out = {}
    for name, make, m in (("stream_unet", stream_unet, 4), ("basic_unet", monai_basic_unet, 16),
                          ("upsample_unet", lambda: from_torch(torch_upsample_unet(False, "trilinear"), 4), 4)):
        ov.save_model(make(), str(d / f"{name}.xml"))
        out[name] = (d / f"{name}.xml", m)
    return out


def _spill_files(directory) -> list:
    return [p for p in os.listdir(directory) if SPILL_MARK in p]


@pytest.mark.parametrize("name,shape", [("stream_unet", (37, 29, 45)), ("stream_unet", (20, 16, 9)),
                                        ("stream_unet", (19, 23, 1)), ("stream_unet", (24, 20, 130)),
                                        ("basic_unet", (21, 18, 75)), ("basic_unet", (17, 20, 11)),
                                        ("upsample_unet", (25, 19, 61))])
def test_spilled_stream_equals_whole_volume_inference_f32(models, forced, monkeypatch, name, shape):
    """Odd shapes (padding on every axis), z from one plane to far beyond the receptive field: with every skip
    connection that can spill read back from disk, the streamed output is the unspilled stream's, bit for bit, and
    whole-volume inference to float32 rounding (relative to the output's range: BasicUNet's reaches ~4, and calls
    of one plane sum in another order than one whole-volume call)."""
    path, m = models[name]
    vol = _volume(shape, seed=shape[2])
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False, report=True)
    ref = whole_volume(path, vol, multiple=m)
    assert np.abs(np.moveaxis(out, -1, 0) - ref).max() <= (1e-4 if name != "basic_unet" else 2e-4) * max(
        1.0, np.abs(ref).max())
    monkeypatch.setattr(stream, "SPILL", "never")
    np.testing.assert_array_equal(out, predict(vol, path, engine="stream", precision="f32", kind="raw",
                                               progress=False))
    if shape[2] >= 45:  # long enough for skip connections to wait: they went to disk and came back
        assert rep.spill is not None and rep.spill["read_mb"] > 0, rep.notes
        assert rep.spill["read_mb"] >= rep.spill["written_mb"] * 0.9
        if shape[2] > 100:  # the file is a ring: it holds the farthest lag, not the tensor
            assert rep.spill["disk_mb"] < rep.spill["written_mb"] / 2


@pytest.mark.parametrize("name,shape", [("stream_unet", (33, 30, 70)), ("basic_unet", (30, 26, 64))])
def test_spilled_stream_bf16_labels(models, forced, monkeypatch, name, shape):
    """bf16 planes spilled as bf16 bits: the unspilled bf16 stream's output bit for bit, labels as whole-volume
    f32 inference's up to bf16 rounding (the unspilled stream's own 99.8% on this random 3-class net). bf16 taken
    as native: on a CPU without it a bf16 request runs f32, and what bf16 stores is tested on every CPU."""
    from volinfer.model import precision

    monkeypatch.setattr(precision, "native_reduced", lambda core, device: "bf16")
    path, m = models[name]
    vol = _volume(shape, seed=7)
    raw, rep = predict(vol, path, engine="stream", precision="bf16", kind="raw", progress=False, report=True)
    assert rep.precision == "bf16" and rep.spill is not None and rep.spill["read_mb"] > 0
    ref = whole_volume(path, vol, multiple=m).argmax(0)
    assert (raw.argmax(-1) == ref).mean() >= 0.995
    monkeypatch.setattr(stream, "SPILL", "never")
    np.testing.assert_array_equal(raw, predict(vol, path, engine="stream", precision="bf16", kind="raw",
                                               progress=False))


def test_spilled_instance_norm_unet(forced, tmp_path):
    """A MONAI UNet with InstanceNorm: the statistics passes stream unspilled, the final run spills its skip
    connections; the output is PyTorch's whole-volume inference."""
    from test_stream_norm import _save, _torch_whole, _unet
    from test_stream_norm import _volume as norm_volume

    net = _unet("instance")
    xml = _save(net, tmp_path / "inorm.xml")
    vol = norm_volume((21, 19, 60), seed=3)
    out, rep = predict(vol, xml, engine="stream", precision="f32", kind="raw", progress=False, report=True)
    assert rep.spill is not None and rep.spill["read_mb"] > 0, rep.notes
    got, ref = np.moveaxis(out, -1, 0), _torch_whole(net, vol)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _plans(path, shape):
    """(unspilled, fully spilled) plans of the model at ``path`` for ``shape``, f32."""
    tm = TileModel(str(path), compile=False)
    plan = stream.plan_stream(tm, shape, "f32")
    return plan, plan.spilling(len(plan.spill_options))


def test_spill_forced_by_a_small_budget(models, monkeypatch, tmp_path):
    """A budget the unspilled stream does not fit but the spilled one does: the planner spills (without spill it
    would cut the cross-section into bands), the summary and --json say what and how much disk, and the output is
    whole-volume inference."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    path, m = models["stream_unet"]
    shape = (40, 36, 120)
    plain, spilled = _plans(path, shape)
    assert spilled.memory_mb < plain.memory_mb and spilled.spill
    out_bytes = 4 * TileModel(str(path), compile=False).out_channels  # kind raw: float32, every channel
    fixed = fixed_mb(weights_mb(ov.Core().read_model(str(path)))) + stream.output_rows_mb(plain, shape, out_bytes)
    budget = fixed + (plain.memory_mb + spilled.memory_mb) / 2
    vol = _volume(shape, seed=5)
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", max_memory_mb=budget,
                       progress=False, report=True)
    assert rep.grid[1] == 1, "one band: spilling made the whole cross-section fit"
    assert rep.spill is not None and rep.spill["tensors"] >= 1 and rep.spill["disk_mb"] > 0
    assert "spilled to disk" in " ".join(rep.notes) and "spill " in rep.summary()
    assert rep.as_dict()["spill"]["written_mb"] > 0
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), whole_volume(path, vol, multiple=m), atol=1e-4, rtol=0)
    monkeypatch.setattr(stream, "SPILL", "never")  # without spill: refused (or bands of rows, were they to fit)
    with pytest.raises(VolinferError, match="--engine stream needs about"):
        predict(vol, path, engine="stream", precision="f32", kind="raw", max_memory_mb=budget, progress=False)


def test_spill_in_bands_of_rows(forced, tmp_path):
    """A budget below even the spilled whole cross-section: bands of y rows, each band spilling its own skip
    connections (files closed band by band); the output matches whole-volume inference to the tiling deviation."""
    path = tmp_path / "wide.xml"
    ov.save_model(stream_unet(seed=10), str(path))
    shape = (28, 150, 60)
    tm = TileModel(str(path), compile=False)
    fixed = fixed_mb(weights_mb(tm.model))
    whole = stream.plan_stream(tm, shape, "f32")
    narrow = stream.plan_stream(tm, shape, "f32", fits=lambda p: False, margin_y=24)
    assert whole.spill and narrow.spill
    vol = _volume(shape, seed=11)
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False, report=True,
                       max_memory_mb=fixed + (whole.memory_mb + narrow.memory_mb) / 2)
    assert rep.grid[1] > 1 and rep.spill is not None and rep.spill["read_mb"] > 0, rep.notes
    assert np.abs(np.moveaxis(out, -1, 0) - whole_volume(path, vol)).max() < 1e-3


def test_precision_changed_after_planning_resizes_the_spill(models, forced):
    """The guard moving a bf16 plan to f32: the same buffers stay spilled, sized for f32 planes (chunks, rings,
    windows, disk), as a plan made in f32 would spill them."""
    path, _ = models["stream_unet"]
    tm = TileModel(str(path), compile=False)
    shape = (40, 36, 120)
    plan = stream.plan_stream(tm, shape, "bf16")
    keys, disk = set(plan.spill), plan.spill_disk_bytes
    assert keys
    plan.store_in("f32")
    fresh = stream.plan_stream(tm, shape, "f32")
    assert set(plan.spill) == keys == set(fresh.spill)
    assert plan.spill == fresh.spill and plan.spill_disk_bytes > disk
    assert plan.buffers_mb == pytest.approx(fresh.buffers_mb) and plan.capacities == fresh.capacities


def test_planner_weighs_spill_by_time(models, monkeypatch):
    """With a cost, the planner's objective decides: spill traffic priced like the rest of the run (cheap here)
    buys the leaner plan; priced as dear as a whole run, it does not."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    path, _ = models["stream_unet"]
    tm = TileModel(str(path), compile=False)
    shape = (40, 36, 120)
    cheap = stream.plan_stream(tm, shape, "f32", fits=lambda p: True, cost=lambda p: 100.0 + p.spill_s)
    assert cheap.spill
    dear = stream.plan_stream(tm, shape, "f32", fits=lambda p: True, cost=lambda p: 100.0 + 1e6 * p.spill_s)
    assert not dear.spill
    assert stream.plan_stream(tm, shape, "f32").spill == {}  # no budget, no cost: nothing spills


def test_file_traffic_is_priced_by_what_the_page_cache_keeps(models, monkeypatch, tmp_path):
    """Spill and strip files whose written pages stay within what the OS keeps in memory (Linux's dirty-background
    setting: bytes, else a share of the machine) are read back from memory and cost memory copies; beyond it they go
    to the disk, at the disk's rate. A machine setting, read the same on every run."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "dirty_background_bytes").write_text("0\n")
    (vm / "dirty_background_ratio").write_text("10\n")
    monkeypatch.setattr(portable, "PROC_VM", str(vm))
    monkeypatch.setattr(portable, "HAS_PROC", True)
    monkeypatch.setattr(portable, "machine_mb", lambda: 8000.0)
    assert portable.writeback_allowance_mb() == pytest.approx(800.0)
    (vm / "dirty_background_bytes").write_text(str(300 << 20))
    assert portable.writeback_allowance_mb() == pytest.approx(300.0)
    moved = 6e9
    assert stream.traffic_s(moved, 200 << 20) == pytest.approx(moved / stream.CACHED_BYTES_PER_S)
    assert stream.traffic_s(moved, 400 << 20) == pytest.approx(moved / stream.SPILL_BYTES_PER_S)
    assert stream.CACHED_BYTES_PER_S > stream.SPILL_BYTES_PER_S
    # a plan's spill is priced by its own files' size
    path, _ = models["stream_unet"]
    plan = stream.plan_stream(TileModel(str(path), compile=False), (40, 36, 120), "f32", fits=lambda p: True,
                              cost=lambda p: 100.0 - p.spill_saved_mb)
    assert plan.spill
    moved = sum(o.traffic_bytes for o in plan.spill.values())
    assert plan.spill_disk_bytes < moved  # (ring files: the files hold less than goes through them)
    between = (plan.spill_disk_bytes + moved) // 2
    (vm / "dirty_background_bytes").write_text(str(between))  # the files fit, their traffic would not
    assert plan.spill_s == pytest.approx(moved / stream.CACHED_BYTES_PER_S)
    (vm / "dirty_background_bytes").write_text(str(plan.spill_disk_bytes - 1))  # the files outgrow it
    assert plan.spill_s == pytest.approx(moved / stream.SPILL_BYTES_PER_S)
    # skewed bands: the strips of two bands count with the spill's files
    from volinfer.run import skewed_bands
    skewed = skewed_bands.plan_skewed(TileModel(str(path), compile=False), (30, 200, 24), "f32", 3, None)
    strips, files = 2 * skewed.skew.strip_bytes, skewed.spill_disk_bytes
    assert skewed.strips_disk_bytes > 0 and files >= skewed.strips_disk_bytes
    moved = skewed.skew.spill_bytes + strips
    (vm / "dirty_background_bytes").write_text(str(files))
    assert skewed.spill_s == pytest.approx(moved / stream.CACHED_BYTES_PER_S)
    (vm / "dirty_background_bytes").write_text(str(files - 1))
    assert skewed.spill_s == pytest.approx(moved / stream.SPILL_BYTES_PER_S)


def test_spill_files_are_deleted_after_a_run_and_after_an_error(models, forced, monkeypatch, tmp_path):
    """Spill files live beside the output while the run needs them and are gone after it, also when the run fails
    part-way (files kept linked here, as where the OS cannot unlink open files)."""
    monkeypatch.setattr(plane_store, "UNLINK_OPEN", False)
    seen = []
    real_open = PlaneStore.open

    def open_(self, *a, **k):
        f = real_open(self, *a, **k)
        seen.append(f.path)
        assert f.path.exists()
        return f

    monkeypatch.setattr(PlaneStore, "open", open_)
    path, _ = models["stream_unet"]
    vol = _volume((24, 20, 90))
    out = tmp_path / "out.nii"
    rep = predict(vol, path, out, engine="stream", precision="f32", progress=False)
    assert seen and all(p.parent == tmp_path and p.name.startswith(".out.nii" + SPILL_MARK) for p in seen)
    assert rep.spill is not None and not _spill_files(tmp_path)
    seen.clear()
    calls = [0]
    real_done = stream.StreamRun.done

    def failing_done(self, upto):
        calls[0] += self.compute  # not the planner's dry runs
        if calls[0] == 3:
            assert _spill_files(tmp_path), "spill files exist mid-run"
            raise RuntimeError("boom")
        real_done(self, upto)

    monkeypatch.setattr(stream.StreamRun, "done", failing_done)
    with pytest.raises(RuntimeError, match="boom"):
        predict(vol, path, tmp_path / "out2.nii", engine="stream", precision="f32", progress=False)
    assert seen and not _spill_files(tmp_path)


def test_sigkill_leaves_no_spill_file(models, tmp_path):
    """Killed mid-run (SIGKILL: no cleanup runs): the spill files were unlinked as soon as they were open, nothing
    is left beside the output."""
    if os.name == "nt":
        pytest.skip("POSIX unlink of open files")
    import nibabel as nib

    path, _ = models["stream_unet"]
    src = tmp_path / "in.nii"
    nib.save(nib.Nifti1Image(_volume((24, 20, 90)), np.eye(4)), str(src))
    code = ("import os, signal, sys\n"
            "import volinfer.run.stream as s\n"
            "d = sys.argv[1]\n"
            "s.CHUNK_BYTES, s.SPILL = 1, 'always'\n"
            "calls = [0]\n"
            "real = s.StreamRun.done\n"
            "def done(self, upto):\n"
            "    calls[0] += self.compute\n"
            "    if calls[0] == 3:\n"
            "        assert [p for p in os.listdir(d) if '.spill' in p or 'volinfer-spill' in p] == []\n"
            "        print('spilling', sum(b.__class__.__name__ == 'SpilledBuffer' for b in self.bufs.values()),"
            " flush=True)\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(self, upto)\n"
            "s.StreamRun.done = done\n"
            "from volinfer.cli import main\n"
            "sys.argv = ['volinfer'] + sys.argv[2:]\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path), "run", str(src), "-m", str(path), "-o",
                        str(tmp_path / "out.nii"), "--engine", "stream", "--precision", "f32"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert "spilling" in p.stdout and "spilling 0" not in p.stdout
    assert not _spill_files(tmp_path)


def test_next_run_removes_a_killed_runs_leftovers(models, tmp_path):
    """Spill files of a process that is gone, named after this output, are deleted by the next run on it; those of
    a live process, and other outputs' files, are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.nii{SPILL_MARK}{dead.pid}-1"
    alive = tmp_path / f".out.nii{SPILL_MARK}{os.getpid()}-7"
    other = tmp_path / f".other.nii{SPILL_MARK}{dead.pid}-1"
    for f in (stale, alive, other):
        f.write_bytes(b"x" * 1000)
    path, _ = models["stream_unet"]
    predict(_volume((16, 16, 20)), path, tmp_path / "out.nii", engine="stream", precision="f32", progress=False)
    assert not stale.exists() and alive.exists() and other.exists()


def test_too_small_disk_is_refused_before_any_work(models, forced, monkeypatch, tmp_path):
    """A disk without room for the spill: a one-line error saying what the spill needs, before anything runs."""
    monkeypatch.setattr(portable, "disk_free", lambda p: 10 << 20)
    monkeypatch.setattr(api, "run_stream", lambda *a, **k: pytest.fail("the run started"))
    path, _ = models["stream_unet"]
    with pytest.raises(VolinferError, match=r"needs \d+ MB of disk .* which has 10 MB free"):
        predict(_volume((24, 20, 90)), path, tmp_path / "out.nii", engine="stream", precision="f32",
                progress=False)
    assert not (tmp_path / "out.nii").exists()


# ---- the plane store alone ----

def test_ring_file_round_trip(tmp_path):
    """A ring file of 5 planes: writes that wrap, windows that wrap, read back as written."""
    store = PlaneStore(tmp_path, ".t")
    planes = np.arange(23 * 6, dtype=np.uint16).reshape(23, 2, 3)
    f = store.open(planes[0].nbytes, ring=5)
    win = PlaneWindow(f, (2, 3), np.uint16, 4)
    for a in range(0, 23, 2):  # writer 2 planes a step, reader 1-3 planes behind it
        f.write(a, planes[a: a + 2])
        hi = min(a + 2, 23)
        lo = max(0, hi - 3)
        np.testing.assert_array_equal(win.get(lo, hi, hi), planes[lo:hi])
    assert f.written == planes.nbytes
    store.close()
    assert not list(tmp_path.iterdir())


def test_plane_file_writes_a_region_of_each_plane(tmp_path):
    """A region of rows-first planes (a strip: a few rows of each) is written plane by plane, wrapping in a ring,
    and reads back as that region."""
    store = PlaneStore(tmp_path, ".t", background=False)
    planes = np.arange(7 * 5 * 3, dtype=np.uint16).reshape(7, 5, 3)
    region = planes[:, 1:3]  # 2 rows of each plane: not contiguous
    assert not region.flags.c_contiguous
    f = store.open(region[0].nbytes, ring=4)
    f.write(0, region[:3])
    f.write(3, region[3:6])  # wraps the ring
    out = np.empty((3, 2, 3), np.uint16)
    f.read(3, out)
    np.testing.assert_array_equal(out, planes[3:6, 1:3])
    assert f.written == region[:6].nbytes
    store.close()


def test_joined_planes_read_a_strips_rows_then_a_spills(tmp_path):
    """A decoder's window over rows [1, 5) of rows-first planes: rows 1-2 from the strip's file (which holds rows
    0-2 of planes 0-5 only: later planes' strip rows read as zeros), rows 3-4 from a ring spill file."""
    store = PlaneStore(tmp_path, ".t", background=False)
    planes = np.arange(9 * 6 * 2, dtype=np.uint16).reshape(9, 6, 2) + 1
    strip = store.open(planes[0, :3].nbytes)
    strip.write(0, planes[:6, :3])
    spill = store.open(planes[0, 3:5].nbytes, ring=4)
    win = PlaneWindow(plane_store.JoinedPlanes(strip, 1, 2, 6, spill), (4, 2), np.uint16, 3)
    want = planes[:, 1:5].copy()
    want[6:, :2] = 0
    for a in range(9):  # the spill written a plane at a time, read one plane behind
        spill.write(a, planes[a: a + 1, 3:5])
        np.testing.assert_array_equal(win.get(max(0, a - 1), a + 1, a + 1), want[max(0, a - 1): a + 1])
    only = PlaneWindow(plane_store.JoinedPlanes(strip, 0, 3, 6, None), (3, 2), np.uint16, 2)
    np.testing.assert_array_equal(only.get(4, 6, 6), planes[4:6, :3])
    store.close()


def test_spill_location_names_files_after_the_output(tmp_path):
    d, prefix = spill_location(tmp_path / "x" / "out.nii.gz")
    assert d == tmp_path / "x" and prefix == ".out.nii.gz"
    assert spill_location(None)[0].is_dir()
    long = spill_location(tmp_path / ("n" * 250 + ".nii"))[1]
    assert len(long) < 64
    assert remove_stale(tmp_path / "missing", ".x") == []


def test_plane_file_unlinked_at_once(tmp_path):
    if os.name == "nt":
        pytest.skip("POSIX unlink of open files")
    f = PlaneFile(tmp_path / "a", 8, unlink=True)
    f.write(0, np.zeros(4, np.uint16))
    assert not list(tmp_path.iterdir())
    out = np.empty(4, np.uint16)
    f.read(0, out)
    f.close()


def test_dry_passes_are_shared_by_graphs_alike_along_z(models, monkeypatch):
    """The planner sizes bands of other widths with one bookkeeping pass along z (stream._DRY_PASSES): what it
    remembers for one cross-section is what a fresh pass finds for another (capacities and spill options), and a
    graph of another depth gets its own pass."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    monkeypatch.setattr(stream, "_DRY_PASSES", {})
    tm = TileModel(str(models["stream_unet"][0]), compile=False)

    def sized(shape):
        graph = stream.stream_graph_for(tm, shape)
        chunks, spill = stream.chunking(graph), []
        rows = stream.takes([(0, graph.tensors[graph.output_key].n)])
        return stream.plan_capacities(graph, stream.READ_PLANES, rows, chunks, spill), spill

    sized((40, 36, 120))
    remembered = sized((40, 20, 120))
    assert len(stream._DRY_PASSES) == 1
    stream._DRY_PASSES.clear()
    assert sized((40, 20, 120)) == remembered
    assert remembered[1] and remembered[1][0].saved_bytes > 0  # the far skip connections can spill
    sized((40, 20, 60))
    assert len(stream._DRY_PASSES) == 2
