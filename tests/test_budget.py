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
from volinfer.bench.child_peak import measured_run
from test_resume import KILLER

from volinfer import portable
from volinfer.cli import main
from volinfer.model import memory
from volinfer.run.settings import TilingSettings


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
    high = memory.default_budget_mb()
    monkeypatch.setattr(portable, "available_mb", lambda: 300.0)
    assert memory.default_budget_mb() == high == memory.DEFAULT_MEMORY_FRACTION * portable.machine_mb()
    run = memory.default_budget_mb(20.0)  # a run's default: capped at runtime + weights + working memory
    assert run == min(high, memory.RUNTIME_FLOOR_MB + 20.0 + memory.DEFAULT_WORKING_MB)
    monkeypatch.setattr(portable, "machine_mb", lambda: 2000.0)  # a small machine: a quarter of it
    assert memory.default_budget_mb(20.0) == 500.0


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


# ---- one planner, one objective: the least predicted time within the budget, the leanest within 10% of it ----

def _norm_model_plan(budget_mb):
    """A 256³ volume through a model with 13 normalisation layers (every multi-tile run needs 13 statistics passes),
    ~65 bytes of model memory per tile voxel (one 256³ tile: ~1.2 GB), preferred tile 128³."""
    from volinfer.model.receptive_field import ReceptiveField
    from volinfer.run.fidelity import TilingProblem, plan_exact

    weighed = []
    best = plan_exact(TilingProblem((256, 256, 256), 16, ReceptiveField((40, 40, 40), True), (128, 128, 128), 65.0,
                                    5.0, budget_mb, 13, False, True), weighed)
    return best, weighed


def test_a_normalisation_model_runs_as_one_tile_when_it_fits_the_budget():
    """The issue's MONAI InstanceNorm UNet at 256³: one tile (no statistics pass) fits a 6 GB budget; the hidden
    "speed budget" (preferred tile + 384 MB) chose 8 tiles and 13 statistics passes, ~10x the predicted time."""
    best, weighed = _norm_model_plan(6000.0)
    assert best.counts == (1, 1, 1) and best.norm_passes == 0 and best.memory_mb > 1000
    tiled = [t for t in weighed if t.counts != (1, 1, 1) and t.within_budget]
    assert tiled and all(t.cost > 5 * best.cost for t in tiled)  # each pays 13 passes over the volume
    lean, _ = _norm_model_plan(800.0)  # a budget below the single tile: the statistics passes are the price
    assert lean.counts != (1, 1, 1) and lean.norm_passes == 13 and lean.memory_mb <= 800


@pytest.mark.parametrize("stream_voxel_cost", [1.5, 0.6])
def test_stream_and_tiles_are_weighed_by_the_same_objective(tmp_path, monkeypatch, stream_voxel_cost):
    """``--engine auto`` streams when the stream is predicted fastest (or within 10% and leaner), tiles otherwise;
    the stream's predicted time is the planner's cost of the voxels its bands evaluate. (A streamed voxel costing
    0.6 tiled ones makes the stream win, 1.5 the tiles where one tile fits, on this small model.)"""
    from volinfer.model.tile_model import TileModel
    from volinfer.run import setup
    from volinfer.run.settings import RunSettings
    from volinfer.run.setup import choose_stream, plan_tiling, stream_cost
    from volinfer.run.stream import NOMINAL_VOXEL_S

    monkeypatch.setattr(setup, "STREAM_VOXEL_COST", stream_voxel_cost)
    m = stream_unet()
    m.set_rt_info("[18, 18, 18]", ["volinfer", "receptive_field"])
    ov.save_model(m, str(tmp_path / "s.xml"))
    shape, chosen = (120, 120, 40), set()
    for budget in (4000.0, 210.0):
        tm = TileModel(tmp_path / "s.xml", compile=False)
        choice = plan_tiling(tm, shape, TilingSettings(max_memory_mb=budget))
        choose_stream(tm, shape, choice, RunSettings.from_kwargs(None, max_memory_mb=budget))
        sp, cost = choice.stream_option
        assert cost == stream_cost(tm, shape, sp, choice.voxel_cost)
        voxels = np.prod(sp.padded) * sp.bands(shape[1], 4).count * sp.bands(shape[1], 4).tile / sp.padded[1]
        # no speed profile: voxels (calls and spill traffic counted in voxels at a nominal rate)
        calls = sp.calls_per_band * sp.bands_count * setup.STREAM_CALL_S / NOMINAL_VOXEL_S
        assert cost == pytest.approx(stream_voxel_cost * voxels + calls + sp.spill_cost(False))
        planned = choice.planned
        faster = cost < planned.cost / 1.1 or (cost <= 1.1 * planned.cost and sp.peak_mb < planned.memory_mb)
        assert (choice.stream is not None) == faster, (budget, cost, planned)
        chosen.add(choice.stream is not None)
    # a streamed voxel cheaper than a tiled one: the stream wins at every budget; dearer: not where one tile fits
    assert chosen == {True} if stream_voxel_cost < 1 else False in chosen


# ---- every probe honours the budget ----

def test_receptive_field_probe_stays_within_max_memory(tmp_path):
    """A 120-class model with no stored receptive field: the run-time probe (64³ at first, float64 copies of every
    class) peaked at ~1090 MB under --max-memory 400M; it now probes within the budget (measured ~240 MB)."""
    from models import tiny_unet

    m = tiny_unet(out_ch=120, levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(m, str(tmp_path / "c120.xml"))
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 100, (40, 44, 36)).astype(np.int16), np.eye(4)),
             str(vol))
    peak, rep = measured_run([vol, "-m", tmp_path / "c120.xml", "-o", tmp_path / "o.nii", "--max-memory", "400M"],
                             tmp_path / "run.hwm")
    assert peak <= 400, peak
    assert rep["exact"] and any("measured now" in n for n in rep["notes"])


@pytest.mark.parametrize("radius", [10, 40])
def test_tiles_count_the_strips_that_span_the_volume(tmp_path, radius):
    """The reader's input strip and crop stitching's output strips span the whole x extent: on a long volume they
    outweigh the model. The planner counted the model alone: 2400x52x44, 8 raw output channels, --max-memory 250M
    peaked at ~352 MB (receptive field 10) and ~425 MB (40: the only exact tilings keep y and z whole). It now plans
    within the budget: smaller exact tiles (~180 MB), equal to whole-volume inference computed here in f32; with the
    wider receptive field no exact tiling fits, and the most faithful tiling that does (~165 MB) says so."""
    from models import tiny_unet

    m = tiny_unet(out_ch=8, levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    m.set_rt_info(json.dumps([radius] * 3), ["volinfer", "receptive_field"])
    ov.save_model(m, str(tmp_path / "m.xml"))
    v = np.random.default_rng(0).standard_normal((2400, 52, 44)).astype(np.float32)
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / "v.nii"))
    peak, rep = measured_run([tmp_path / "v.nii", "-m", tmp_path / "m.xml", "-o", tmp_path / "o.nii", "--engine",
                              "tiles", "--kind", "raw", "--precision", "f32", "--max-memory", "250M"],
                             tmp_path / "run.hwm")
    assert peak <= 250, (peak, rep["tile"])
    assert rep["exact"] == (radius == 10) and rep["tiles"] > 16, rep
    if radius == 40:
        assert any("no exact tiling fits in 250 MB" in n for n in rep["notes"]), rep["notes"]
        return
    whole = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(v[None, None])[0][0]  # (c, x, y, z)
    out = np.asarray(nib.load(str(tmp_path / "o.nii")).dataobj)
    # exact: crop margins cover the receptive field (each voxel beyond it moves the output by < 1e-5 of its range;
    # summed, ~1.1e-4 of the range at 0.01% of voxels here); a misplaced core would be off by O(1)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), whole, atol=1e-3 * float(np.ptp(whole)))


def test_zarr_run_plans_within_max_memory(tmp_path):
    """A Zarr input plans its tile within --max-memory, the tile `volinfer plan` predicts (it planned without it)."""
    import zarr
    from models import save_unet2

    from volinfer.run.distributed import run_zarr
    from volinfer.run.plan import _handle, _plan_tiling, volume_facts
    from volinfer.run.settings import RunSettings

    xml = save_unet2(tmp_path / "m.xml")
    z = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=(53, 61, 70), chunks=(16, 16, 16), dtype="float32")
    z[:] = np.random.default_rng(0).standard_normal((53, 61, 70)).astype(np.float32)
    tiles = {}
    for budget in (None, 160.0):
        rep = run_zarr(tmp_path / "in.zarr", xml, tmp_path / f"o{budget}.zarr", kind="raw", max_memory_mb=budget,
                       block=64)
        s = RunSettings.from_kwargs(None, max_memory_mb=budget, norm_stats="tile")
        tm, _, _ = _plan_tiling(_handle(xml, s), volume_facts([tmp_path / "in.zarr"]), s)
        assert rep.tile == tm.tile
        tiles[budget] = np.prod(rep.tile)
    assert tiles[160.0] < tiles[None]


def test_plan_of_a_zarr_store_plans_as_the_run_takes_it(tmp_path, monkeypatch):
    """`volinfer run` takes a Zarr store block by block, tile by tile, with per-tile statistics, unless the planner
    streams it (then in this process, like a NIfTI file, with the whole volume's statistics), or --engine stream asks
    for that. `volinfer plan` plans each as the run does (it listed a stream for a block run, refused --engine stream
    for a normalisation model, then planned block tiles that took 486 tiles where the stream runs in seconds)."""
    import zarr
    from models import mvn_model, stream_unet

    from volinfer.run import setup
    from volinfer.run.plan import plan_run

    monkeypatch.setattr(setup, "STREAM_CALL_S", 0.0)  # (a stream's calls would dwarf a volume this small)
    monkeypatch.setattr(setup, "STREAM_VOXEL_COST", 0.3)  # the stream: the plan for the NIfTI file
    ov.save_model(stream_unet(), str(tmp_path / "s.xml"))
    ov.save_model(mvn_model(), str(tmp_path / "mvn.xml"))
    v = np.random.default_rng(1).standard_normal((40, 36, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / "v.nii"))
    z = zarr.create_array(store=str(tmp_path / "v.zarr"), shape=v.shape, chunks=(16, 16, 16), dtype="float32")
    z[:] = v
    assert plan_run([tmp_path / "v.nii"], tmp_path / "s.xml").engine == "stream"
    assert plan_run([tmp_path / "v.zarr"], tmp_path / "s.xml").engine == "stream"  # the planner's choice
    assert plan_run([tmp_path / "v.zarr"], tmp_path / "s.xml", engine="tiles").engine == "tiles"  # block by block
    assert plan_run([tmp_path / "v.zarr"], tmp_path / "s.xml", engine="stream").engine == "stream"
    assert plan_run([tmp_path / "v.zarr"], tmp_path / "mvn.xml", engine="stream").engine == "stream"
    monkeypatch.setattr(setup, "STREAM_VOXEL_COST", 50.0)  # tiles win: the store runs block by block again
    assert plan_run([tmp_path / "v.zarr"], tmp_path / "s.xml").engine == "tiles"


def test_a_zarr_store_the_planner_streams_runs_in_this_process(tmp_path, monkeypatch):
    """A local Zarr run with no options streams when the planner would stream the same volume from NIfTI: exact
    (whole-volume inference), the stream's staging slab counted in the plan (chunks deeper than the planes it
    reads), and said; --engine tiles keeps the blocks (their completion markers); the output is the same store."""
    import zarr
    from models import stream_unet
    from test_stream import whole_volume

    from volinfer.cli import main
    from volinfer.run import setup

    monkeypatch.setattr(setup, "STREAM_CALL_S", 0.0)
    monkeypatch.setattr(setup, "STREAM_VOXEL_COST", 0.3)
    ov.save_model(stream_unet(), str(tmp_path / "s.xml"))
    v = (np.cumsum(np.random.default_rng(2).standard_normal((37, 29, 45)), axis=2) * 0.3).astype(np.float32)
    img = nib.Nifti1Image(v, np.diag([800.0, 800.0, 1500.0, 1.0]))  # a microscope's micrometres
    img.header.set_xyzt_units("micron")
    nib.save(img, str(tmp_path / "v.nii"))
    assert CliRunner().invoke(main, ["to-zarr", str(tmp_path / "v.nii"), "-o", str(tmp_path / "v.zarr"),
                                     "--chunks", "16", "-q"]).exit_code == 0
    ref = whole_volume(tmp_path / "s.xml", v)  # (C, x, y, z), f32
    outs = {}
    for engine in ("auto", "tiles"):
        for out in (tmp_path / f"{engine}.zarr", tmp_path / f"{engine}.nii"):
            r = CliRunner().invoke(main, ["run", str(tmp_path / "v.zarr"), "-m", str(tmp_path / "s.xml"), "-o",
                                          str(out), "--engine", engine, "--precision", "f32", "--kind", "raw",
                                          "--json"])
            assert r.exit_code == 0, r.output
        g = zarr.open_group(str(tmp_path / f"{engine}.zarr"), mode="r")
        hdr = nib.load(str(tmp_path / f"{engine}.nii")).header
        outs[engine] = (json.loads(r.stdout), np.asarray(g["0"]), g["0"].chunks, dict(g.attrs)["ome"],
                        (hdr.get_xyzt_units(), int(hdr["sform_code"]), hdr.get_zooms()))
    rep, got, chunks, ome, nifti = outs["auto"]
    assert rep["engine"] == "stream" and any("ran in this process, layer by layer" in n for n in rep["notes"])
    np.testing.assert_allclose(got.transpose(0, 3, 2, 1), ref, atol=2e-5)
    rep_t, got_t, chunks_t, ome_t, nifti_t = outs["tiles"]
    assert rep_t["engine"] == "tiles" and not any("ran in this process" in n for n in rep_t["notes"])
    assert got_t.shape == got.shape
    # the same store whichever way it ran: the input's chunks and unit (the stream's said 64 and millimetre), and
    # the same NIfTI header (the NIfTI-born store's own)
    assert chunks == chunks_t == (3, 16, 16, 16) and ome == ome_t and nifti == nifti_t  # (3 channels)
    assert {ax.get("unit") for ax in ome["multiscales"][0]["axes"] if ax["type"] == "space"} == {"micrometer"}
    assert nifti[0][0] == "micron"


def test_the_stream_counts_a_chunked_stores_staging_slab():
    """Reading a store kept 128 planes deep, the stream holds a staging slab that deep and the stored voxels read
    into it (measured at 512³ int16 in 128³ chunks: 255-267 MB beside the plan): counted in its plan's peak, and
    nothing for files read plane by plane."""
    from models import stream_unet

    from volinfer.model.tile_model import TileModel
    from volinfer.run import pipeline
    from volinfer.run.settings import RunSettings
    from volinfer.run.stream import staging_mb

    m = stream_unet()
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    tm = TileModel(m, compile=False)
    s = RunSettings.from_kwargs(None, engine="stream", precision="f32")
    shape = (64, 48, 40)
    flat, deep = (pipeline.plan(tm, shape, s, stored=(2, "nothing"), stored_depth=d).choice.stream for d in (1, 16))
    in_ten = deep.graph.tensors[deep.graph.input_key]
    assert staging_mb(flat, 1, 2) == 0.0 and staging_mb(deep, deep.read_planes, 2) == 0.0
    assert staging_mb(deep, 16, 2) == pytest.approx(16 * (in_ten.plane_bytes + 2 * 2 * 64 * 48) / 1e6)
    assert deep.peak_mb - flat.peak_mb == pytest.approx(staging_mb(deep, 16, 2))


# ---- a model file straight from ONNX says what it costs and how to avoid it ----

def test_an_onnx_model_says_what_convert_would_have_stored(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from volinfer import predict

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1))
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16, 16), str(tmp_path / "m.onnx"), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {2: "d", 3: "h", 4: "w"}, "logits": {2: "d", 3: "h", 4: "w"}})
    vol = np.random.default_rng(0).standard_normal((20, 18, 22)).astype(np.float32)
    _, rep = predict(vol, tmp_path / "m.onnx", report=True, progress=False)
    note = next(n for n in rep.notes if "stores none of what `volinfer convert` measures once" in n)
    assert "receptive field" in note and "volinfer convert m.onnx -o model.xml" in note
    m = stream_unet()  # everything convert stores but the speed profile: nothing worth saying
    m.set_rt_info("[18, 18, 18]", ["volinfer", "receptive_field"])
    m.set_rt_info(json.dumps({"precision": "bf16", "faithful": True, "label_agreement": 1.0, "prob_max_abs": 0.0,
                              "input_abs_max": 3.0}),
                  ["volinfer", "precision_check"])
    ov.save_model(m, str(tmp_path / "s.xml"))
    _, rep = predict(vol, tmp_path / "s.xml", report=True, progress=False)
    assert not any("measures once" in n for n in rep.notes)


def test_per_voxel_cost_rises_beyond_the_largest_tile_measured(tmp_path):
    """The speed profile clamps beyond its largest tile; the planner does not trust that flat line (huge tiles are
    slower per voxel): the cost rises linearly in log2(voxels) to HUGE_TILE_COST x over UNMEASURED_DOUBLINGS."""
    from volinfer.model import speed_profile as sp
    from volinfer.model.settings import ModelSettings
    from volinfer.model.tile_model import CompileOptions, TileModel
    from volinfer.run.setup import HUGE_TILE_COST, UNMEASURED_DOUBLINGS, planner_voxel_cost

    m = stream_unet()
    settings = ModelSettings(size_multiple=4)
    prof = sp.SpeedProfile("f32", "CPU", "Test CPU", ((4096, 2.0), (32768, 1.0)), ())
    settings.extra[sp.KEY] = prof.as_dict()
    settings.to_model(m)
    ov.save_model(m, str(tmp_path / "p.xml"))
    cost, source = planner_voxel_cost(TileModel(tmp_path / "p.xml", compile=False,
                                                options=CompileOptions(precision="f32")))
    assert cost(4096) == pytest.approx(2e-6) and cost(32768) == pytest.approx(1e-6)  # measured: as stored
    steps = 2 ** UNMEASURED_DOUBLINGS
    assert cost(32768 * 2) == pytest.approx(1e-6 * (1 + (HUGE_TILE_COST - 1) / UNMEASURED_DOUBLINGS))
    assert cost(32768 * steps) == pytest.approx(1e-6 * HUGE_TILE_COST) == cost(32768 * steps * 64)
    assert "beyond the largest tile measured" in source


def test_default_budget_refuses_only_what_the_machine_cannot_hold(tmp_path, monkeypatch):
    """Under the default budget a model whose smallest tile exceeds it still runs when the machine can hold it;
    refused, saying what it needs, only beyond the machine's memory. A given --max-memory is a hard limit."""
    from models import save_unet2

    from volinfer.errors import VolinferError
    from volinfer.model.tile_model import TileModel
    from volinfer.run.setup import plan_tiling

    xml = save_unet2(tmp_path / "m.xml", receptive_field="[10, 10, 10]")

    def plan(max_memory_mb=None):
        return plan_tiling(TileModel(xml, compile=False), (60, 52, 44), TilingSettings(max_memory_mb=max_memory_mb))

    monkeypatch.setattr(memory, "DEFAULT_MEMORY_FRACTION", 1e-6)  # a default budget of a few KB
    assert any("no exact tiling fits" in n for n in plan().notes)  # runs: the machine has the memory
    with pytest.raises(VolinferError, match="--max-memory 20 MB is too small"):
        plan(20.0)
    monkeypatch.setattr(portable, "machine_mb", lambda: 100.0)
    with pytest.raises(VolinferError, match=r"needs about \d+ MB even at tile .*more than this machine's 100 MB"):
        plan()


def test_a_zarr_output_the_stream_fills_only_in_bands_goes_through_a_nifti_file(tmp_path, monkeypatch):
    """A Zarr output whose whole cross-sections the stream cannot hold (its writer keeps z-slabs; the reference U-Net
    at 1024³ would need ~2 GB) was left to block tiles (858x the volume evaluated for that network): the store now
    streams in bands of y rows into a temporary NIfTI file, then is written slab by slab, with the store's geometry
    and chunks; nothing temporary is left, and whole-volume labels come out."""
    import zarr
    from models import stream_unet
    from test_stream import whole_volume

    from volinfer.run import setup, zarr_route

    monkeypatch.setattr(setup, "STREAM_CALL_S", 0.0)
    monkeypatch.setattr(setup, "STREAM_VOXEL_COST", 0.3)
    real = zarr_route.streams
    monkeypatch.setattr(zarr_route, "streams",  # as if only bands fitted the budget
                        lambda path, handle, s, output=None: None if output is not None and str(output).endswith(
                            ".zarr") else real(path, handle, s, output))
    ov.save_model(stream_unet(), str(tmp_path / "s.xml"))
    v = (np.cumsum(np.random.default_rng(3).standard_normal((37, 29, 45)), axis=2) * 0.3).astype(np.float32)
    img = nib.Nifti1Image(v, np.diag([800.0, 800.0, 1500.0, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, str(tmp_path / "v.nii"))
    assert CliRunner().invoke(main, ["to-zarr", str(tmp_path / "v.nii"), "-o", str(tmp_path / "v.zarr"),
                                     "--chunks", "16", "-q"]).exit_code == 0
    r = CliRunner().invoke(main, ["run", str(tmp_path / "v.zarr"), "-m", str(tmp_path / "s.xml"), "-o",
                                  str(tmp_path / "o.zarr"), "--precision", "f32", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["engine"] == "stream" and any("into a temporary NIfTI file" in n for n in rep["notes"])
    g = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    got = np.asarray(g["0"]).transpose(2, 1, 0)
    np.testing.assert_array_equal(got, whole_volume(tmp_path / "s.xml", v).argmax(0))
    assert g["0"].chunks == (16, 16, 16)
    assert {ax.get("unit") for ax in dict(g.attrs)["ome"]["multiscales"][0]["axes"]} == {"micrometer"}
    assert sorted(p.name for p in tmp_path.iterdir() if "o.zarr" in p.name) == ["o.zarr"]
