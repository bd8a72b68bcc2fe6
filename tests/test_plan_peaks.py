"""`volinfer plan` predicts the peak a run measures (within 20%), for both engines and both precisions, and plans in
the precision the run will use: ``--precision auto``'s guard decides before planning, not after."""

import json

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from models import stream_unet

from volinfer.bench.child_peak import measured_run
from volinfer.model.precision import native_reduced
from volinfer.run.plan import plan_run

#: A stored bf16 verdict measured on inputs within ±3 (as `volinfer convert` stores it).
CHECK = {"precision": "bf16", "faithful": True, "label_agreement": 0.9995, "prob_max_abs": 0.004,
         "input_abs_max": 3.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peaks")
    m = stream_unet()
    m.set_rt_info("[18, 18, 18]", ["volinfer", "receptive_field"])
    m.set_rt_info(json.dumps(CHECK), ["volinfer", "precision_check"])
    ov.save_model(m, str(tmp / "m.xml"))
    return tmp, tmp / "m.xml"


def _volume(tmp):
    vol = tmp / "v.nii"
    if not vol.exists():
        # large enough that the plan's variable part dominates the ~10 MB the runtime's own floor varies by
        data = np.random.default_rng(0).standard_normal((160, 152, 128)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(vol))
    return vol


def _measured(vol, xml, out, *extra):
    return measured_run([vol, "-m", xml, "-o", out, "--overwrite", *extra], out.with_suffix(".hwm"))


@pytest.mark.parametrize("engine", ["stream", "tiles"])
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_plan_predicts_the_measured_peak_within_20_percent(model, engine, precision):
    if precision == "bf16" and native_reduced(ov.Core(), "CPU") != "bf16":
        pytest.skip("this CPU has no native bf16")
    tmp, xml = model
    vol = _volume(tmp)
    plan = plan_run([vol], xml, engine=engine, precision=precision)
    assert plan.engine == engine
    # planning a stream compiles no tile as large as the budget allows: the model is measured at its own tile
    assert (np.prod(plan.measured_tile) < np.prod(plan.tile)) == (engine == "stream"), (plan.measured_tile, plan.tile)
    predicted = plan.stream_peak_mb if engine == "stream" else plan.peak_rss_mb
    peak, rep = _measured(vol, xml, tmp / f"{engine}_{precision}.nii", "--engine", engine, "--precision", precision)
    assert rep["engine"] == engine and rep["precision"] == precision
    assert abs(predicted - peak) <= 0.2 * peak, (predicted, peak)


def test_the_precision_guard_decides_before_planning(model):
    """Intensities far beyond the stored check's ±3 make ``--precision auto`` run f32: the plan (its stream plane
    buffers, its measured tile) is the f32 plan, not the bf16 one the stored verdict alone would give."""
    tmp, xml = model
    if native_reduced(ov.Core(), "CPU") is None:
        pytest.skip("this CPU has no reduced precision: auto is f32 anyway")
    vol = tmp / "raw.nii"
    data = np.random.default_rng(1).integers(0, 2000, (160, 152, 128)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(vol))
    auto = plan_run([vol], xml, engine="stream")
    f32 = plan_run([vol], xml, engine="stream", precision="f32")
    reduced = plan_run([vol], xml, engine="stream", precision=CHECK["precision"])
    assert auto.stream_peak_mb == f32.stream_peak_mb != reduced.stream_peak_mb
    peak, rep = _measured(vol, xml, tmp / "raw_out.nii", "--engine", "stream")
    assert rep["precision"] == "f32" and any("not verified for this input" in n for n in rep["notes"])
    assert abs(auto.stream_peak_mb - peak) <= 0.2 * peak, (auto.stream_peak_mb, peak)


@pytest.mark.parametrize("budget", [None, 180.0])
def test_a_streamed_plan_shows_the_tiling_engine_tiles_would_run(model, budget):
    """Where the run streams, the plan's tile figures (and its "with --engine tiles" lines) are the tiling `--engine
    tiles` plans, exact or not as that run would say, not the stream's bands read as tiles."""
    tmp, xml = model
    vol = _volume(tmp)
    streamed = plan_run([vol], xml, engine="stream", precision="f32", max_memory_mb=budget)
    tiled = plan_run([vol], xml, engine="tiles", precision="f32", max_memory_mb=budget)
    assert streamed.engine == "stream" and tiled.engine == "tiles" and streamed.tiles_unavailable is None
    assert (streamed.tile, streamed.tiles, streamed.exact, streamed.not_exact) == \
        (tiled.tile, tiled.tiles, tiled.exact, tiled.not_exact)
    assert streamed.tile[0] < 160 or streamed.tile[2] > 16, streamed.tile  # not a band of whole rows, 16 planes deep
    text = streamed.summary()
    assert f"  with --engine tiles:\ntile {'x'.join(map(str, tiled.tile))}: {tiled.tiles} tiles" in text, text
    # the candidates are the weighing the streamed run did: the chosen one is the stream
    assert [c["engine"] for c in streamed.candidates if c["chosen"]] == ["stream"]


def test_a_streamed_plan_says_when_engine_tiles_would_be_refused(model, monkeypatch):
    """Where `--engine tiles` would be refused (no tiling fits the budget), the streamed plan stands without tile
    figures and says why; its stream, candidates and JSON are whole."""
    from volinfer.errors import VolinferError
    from volinfer.run import plan as plan_mod

    tmp, xml = model
    vol = _volume(tmp)
    real = plan_mod._plan_tiling

    def refuse_tiles(handle, facts, s, *more):
        if s.tiling.engine == "tiles":
            raise VolinferError("--max-memory 200 MB is too small: the smallest tile needs about 250 MB")
        return real(handle, facts, s, *more)

    monkeypatch.setattr(plan_mod, "_plan_tiling", refuse_tiles)
    plan = plan_run([vol], xml, engine="stream", precision="f32")
    assert plan.engine == "stream" and plan.stream_peak_mb > 0 and plan.tiles == 0
    text = plan.summary()
    assert "with --engine tiles: refused (--max-memory 200 MB is too small" in text and "\ntile " not in text, text
    assert [c["engine"] for c in plan.candidates if c["chosen"]] == ["stream"]
    assert json.loads(json.dumps(plan.as_dict()))["tiles_unavailable"].startswith("refused")


def test_a_streamed_plan_measures_the_receptive_field_once(tmp_path, monkeypatch):
    """A model storing no receptive field: planning the stream and the tiling `--engine tiles` would run measures it
    once (the measurement can compile growing probe tiles)."""
    from volinfer.run import setup

    ov.save_model(stream_unet(), str(tmp_path / "m.xml"))
    vol = _volume(tmp_path)
    calls = []
    real = setup.measure_receptive_field
    monkeypatch.setattr(setup, "measure_receptive_field", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = plan_run([vol], tmp_path / "m.xml", engine="stream", precision="f32")
    assert plan.engine == "stream" and plan.tiles > 0 and len(calls) == 1, (plan.engine, plan.tiles, calls)


def test_a_probabilities_stream_counts_the_output_rows_it_holds(model):
    """The stream holds one row of post-processed output planes over its band and all of x until the writer takes it:
    for labels a byte a voxel, for probabilities every channel in float32. A wide, shallow volume made that 59 MB the
    plan left out (a red-team run peaked at 414 MB against a 371 MB plan and a 400M budget); now the plans differ by
    it and the probabilities run stays within its plan."""
    from volinfer.model.tile_model import TileModel

    tmp, xml = model
    vol = tmp / "wide.nii"
    data = np.random.default_rng(2).standard_normal((640, 480, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(vol))
    labels = plan_run([vol], xml, engine="stream", precision="f32", kind="labels")
    probs = plan_run([vol], xml, engine="stream", precision="f32", kind="probabilities")
    channels = TileModel(str(xml), compile=False).out_channels
    rows = 16 * 480 * 640 / 2**20  # one row of 16 output planes, the whole cross-section (one band)
    assert probs.stream_peak_mb - labels.stream_peak_mb >= 0.95 * rows * (4 * channels - 1), (probs, labels)
    peak, rep = _measured(vol, xml, tmp / "wide_out.nii", "--engine", "stream", "--precision", "f32", "--kind",
                          "probabilities")
    assert rep["engine"] == "stream" and peak <= 1.1 * probs.stream_peak_mb, (peak, probs.stream_peak_mb)
