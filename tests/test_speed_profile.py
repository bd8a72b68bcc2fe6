"""The speed profile (issue 14): per-voxel cost measured at convert time, interpolated in log(voxels), and the planner
minimising evaluated voxels x per-voxel cost. No wall-clock speed is asserted: profiles here are synthetic, or only
checked to be positive, finite and stored."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import openvino as ov
import pytest

from models import tiny_unet
from volinfer.model import speed_profile as sp
from volinfer.model.receptive_field import ReceptiveField
from volinfer.model.settings import ModelSettings
from volinfer.run.fidelity import TilingProblem, plan_exact
from volinfer.run.settings import TilingSettings
from volinfer.run.stream import StreamPlan


def _profile(points, precision="bf16", cpu="Test CPU", device="CPU"):
    return sp.SpeedProfile(precision, device, cpu, tuple(points), ())


def test_interpolation_is_linear_in_log_voxels_and_clamped():
    p = _profile([(1000, 4.0), (8000, 1.0), (64000, 2.0)])
    assert p.s_per_mvox(1000) == pytest.approx(4.0)
    assert p.s_per_mvox(8000) == pytest.approx(1.0)
    assert p.s_per_mvox(64000) == pytest.approx(2.0)
    # geometric midpoints are arithmetic midpoints of the cost
    assert p.s_per_mvox(math.sqrt(1000 * 8000)) == pytest.approx(2.5)
    assert p.s_per_mvox(math.sqrt(8000 * 64000)) == pytest.approx(1.5)
    assert p.s_per_mvox(2000) == pytest.approx(3.0)  # a third of the way from 1000 to 8000 in log space
    # clamped at both ends
    assert p.s_per_mvox(10) == pytest.approx(4.0)
    assert p.s_per_mvox(10**9) == pytest.approx(2.0)


def test_stored_profile_round_trips_and_bad_ones_are_ignored():
    p = sp.SpeedProfile("bf16", "CPU", "Test CPU", ((8000, 1.0), (1000, 4.0)), ((20, 20, 20), (10, 10, 10)), 2)
    back = sp.SpeedProfile.from_dict(json.loads(json.dumps(p.as_dict())))
    assert back is not None and back.points == ((1000, 4.0), (8000, 1.0)) and back.precision == "bf16"
    for bad in (None, {}, {"precision": "f32"}, {"precision": "f32", "points": [[1000, -1.0]]},
                {"precision": "f32", "points": [[0, 1.0]]}, {"precision": "f32", "points": "x"},
                {"precision": "f32", "points": [[1000, float("nan")]]}, {"precision": "f32", "points": []}):
        assert sp.SpeedProfile.from_dict(bad) is None, bad


def test_voxel_cost_in_the_runs_precision_or_constant():
    p = _profile([(1000, 4.0), (8000, 1.0)], precision="bf16")
    cost, why = sp.voxel_cost(None, "f32")
    assert cost is None and why == "not measured: per-voxel cost assumed constant"
    cost, why = sp.voxel_cost(p, "bf16", here="Test CPU")
    assert cost(8000) == pytest.approx(1e-6) and why == "measured at convert on Test CPU (this CPU), bf16"
    cost, why = sp.voxel_cost(p, "f32", here="Other CPU")
    assert cost(8000) == pytest.approx(sp.REDUCED_SPEEDUP * 1e-6) and cost(1000) / cost(8000) == pytest.approx(4.0)
    assert "scaled" in why and "this CPU" not in why
    cost, why = sp.voxel_cost(p, "f16")
    assert cost is None and "assumed constant" in why
    cost, why = sp.voxel_cost(p, "bf16", device="GPU")
    assert cost is None and "assumed constant" in why


def test_profile_tiles_span_the_tile_to_the_largest_that_fits():
    assert sp.profile_tiles([128, 128, 128], 16) == [(128,) * 3, (256,) * 3, (176,) * 3]
    fits = lambda t: np.prod(t) <= 208**3  # noqa: E731
    assert sp.profile_tiles([128, 128, 128], 16, fits) == [(128,) * 3, (208,) * 3, (160,) * 3]
    assert sp.profile_tiles([64, 64, 32], 16, lambda t: np.prod(t) <= 96 * 96 * 64) == [
        (64, 64, 32), (96, 96, 64), (80, 80, 48)]
    assert sp.profile_tiles([64, 64, 64], 16, lambda t: np.prod(t) <= 64**3) == [(64, 64, 64)]
    assert sp.profile_tiles([4, 4, 4], 4, largest=1.1) == [(4, 4, 4)]


#: A 200³ volume, 1 KB of model memory per tile voxel, tiles up to ~2 Mvoxels within the budget (2 GB).
_ARGS = dict(shape=(200, 200, 200), multiple=8, rf=ReceptiveField((8, 8, 8), True), preferred=(64, 64, 64),
             mem_per_voxel=1024.0, weights_mb=1.0, budget_mb=151.0 + 2048, norm_layers=0,
             global_ops=False, whole_stats=True)


def _plan(voxel_cost=None):
    weighed = []
    best = plan_exact(TilingProblem(**_ARGS, voxel_cost=voxel_cost), weighed)
    return best, weighed


def _leanest_near_fastest(best, weighed, predicted):
    """``best`` is within 10% of the fastest weighed tiling in the budget, and none as fast is leaner."""
    fits = [t for t in weighed if t.within_budget]
    fastest = min(predicted(t) for t in fits)
    assert predicted(best) <= 1.1 * fastest + 1e-12
    assert best.memory_mb == min(t.memory_mb for t in fits if predicted(t) <= 1.1 * fastest + 1e-12)


def test_without_a_profile_the_fewest_evaluated_voxels_win_unless_a_leaner_one_is_within_10_percent():
    best, weighed = _plan()
    assert best is not None and all(t.voxel_s is None for t in weighed)
    _leanest_near_fastest(best, weighed, lambda t: t.evaluated)
    assert best in weighed and any(not t.within_budget for t in weighed)  # the front, and beyond the budget
    # a constant profile ranks exactly the same way
    flat, _ = _plan(lambda v: 3e-7)
    assert (flat.tile, flat.evaluated) == (best.tile, best.evaluated)


def test_a_profile_can_make_a_tiling_with_more_evaluated_voxels_the_fastest():
    _, plain = _plan()
    base = min((t for t in plain if t.within_budget), key=lambda t: t.evaluated)  # the fewest evaluated voxels
    small = float(np.prod(base.tile))
    # per-voxel cost falls steeply with tile size: tiles 12% larger than the voxel-minimal one cost a third per voxel
    prof = _profile([(int(small), 3.0), (int(1.12 * small), 1.0)])
    cost, _ = sp.voxel_cost(prof, "bf16")
    best, weighed = _plan(cost)
    assert best.evaluated > base.evaluated  # more voxels evaluated ...
    predicted = lambda t: t.evaluated * cost(float(np.prod(t.tile)))  # noqa: E731 - independent of the planner
    assert predicted(best) < predicted(base)  # ... but predicted faster
    assert best.voxel_s == pytest.approx(cost(float(np.prod(best.tile))))
    _leanest_near_fastest(best, weighed, predicted)


def _plan_tiling(tmp_path, profile, precision="f32"):
    """plan_tiling (a run in ``precision``) on a saved two-level tiny U-Net with ``profile`` (or none) stored."""
    from volinfer.model.tile_model import CompileOptions, TileModel
    from volinfer.run.setup import plan_tiling

    m = tiny_unet(levels=2)
    settings = ModelSettings(size_multiple=4, receptive_field=[6, 6, 6], tile=[16, 16, 16])
    if profile is not None:
        settings.extra[sp.KEY] = profile.as_dict()
    settings.to_model(m)
    path = tmp_path / "m.xml"
    ov.save_model(m, str(path))
    tm = TileModel(path, options=CompileOptions(precision=precision), compile=False)
    return plan_tiling(tm, (61, 53, 47), TilingSettings(max_memory_mb=200.0))


def test_plan_tiling_uses_the_stored_profile_in_the_runs_precision_and_says_so(tmp_path, monkeypatch):
    from volinfer.model import precision

    monkeypatch.setattr(precision, "native_reduced", lambda core, device: "bf16")  # a bf16 run on any CPU
    plain = _plan_tiling(tmp_path, None)
    assert plain.speed_source == "not measured: per-voxel cost assumed constant"
    assert plain.candidates and all(c.voxel_s is None for c in plain.candidates)
    prof = _profile([(4096, 2.0), (262144, 1.0)], precision="bf16")
    scaled = _plan_tiling(tmp_path, prof)
    assert scaled.speed_source.startswith("measured at convert on Test CPU, bf16 scaled x1.40 for f32")
    for c in scaled.candidates:
        assert c.voxel_s == pytest.approx(sp.REDUCED_SPEEDUP * prof.s_per_mvox(np.prod(c.tile)) / 1e6)
    f16 = _plan_tiling(tmp_path, _profile([(4096, 2.0)], precision="f16"), precision="bf16")
    assert "assumed constant" in f16.speed_source and all(c.voxel_s is None for c in f16.candidates)
    assert f16.tile == plain.tile


def test_plan_shows_each_candidates_predicted_time_and_the_cost_source(tmp_path):
    import nibabel as nib

    from volinfer.run.plan import plan_run

    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((37, 29, 23), np.int16), np.eye(4)), str(vol))
    m = tiny_unet(levels=2)
    settings = ModelSettings(size_multiple=4, receptive_field=[6, 6, 6], tile=[16, 16, 16])
    prof = _profile([(4096, 2.0), (32768, 1.0)], precision="f32", cpu="Elsewhere CPU")
    settings.extra[sp.KEY] = prof.as_dict()
    settings.to_model(m)
    ov.save_model(m, str(tmp_path / "m.xml"))
    plan = plan_run([vol], tmp_path / "m.xml", precision="f32", max_memory_mb=190.0)
    assert len(plan.candidates) > 1
    for c in (c for c in plan.candidates if c["engine"] == "tiles"):  # the profile's prediction, from its points
        want = c["tiles"] * np.prod(c["tile"]) * prof.s_per_mvox(np.prod(c["tile"])) / 1e6
        assert c["profile_time_s"] == pytest.approx(want, abs=0.051)
    assert any(tuple(c["tile"]) == tuple(plan.tile) for c in plan.candidates)
    text = plan.summary()
    assert "per-voxel cost: measured at convert on Elsewhere CPU, f32" in text
    assert text.count("voxels evaluated, predicted ") == len(plan.candidates)
    assert sum(c["chosen"] for c in plan.candidates) == 1
    assert json.loads(json.dumps(plan.as_dict()))["speed_source"] == plan.speed_source


def test_candidate_times_are_scaled_to_the_latency_measured_at_the_chosen_tile():
    from types import MethodType, SimpleNamespace

    from volinfer.run.fidelity import Tiling
    from volinfer.run.plan import Plan, _candidate_times, _candidates

    weighed = [Tiling((64, 64, 64), (0, 0, 0), (2, 1, 1), 2 * 64**3, 100.0, 0, voxel_s=2e-6, cost=2 * 64**3 * 2e-6),
               Tiling((32, 64, 64), (0, 0, 0), (4, 1, 1), 4 * 32 * 64**2, 90.0, 1, voxel_s=4e-6,
                      cost=4 * 32 * 64**2 * 4e-6 * 1.5)]
    stream = SimpleNamespace(padded=(128, 64, 64), band=40, out_planes=16, peak_mb=300.0, skew=None, spill={},
                             bands=lambda size, m: SimpleNamespace(count=2, tile=40))
    skewed = SimpleNamespace(padded=(128, 64, 64), band=24, out_planes=16, peak_mb=200.0, skew=object(),
                             spill={"a": 1}, bands=lambda size, m: SimpleNamespace(count=3, tile=24))
    for ns in (stream, skewed):  # (the real plan's count of evaluated voxels)
        ns.evaluated_voxels = MethodType(StreamPlan.evaluated_voxels, ns)
    choice = SimpleNamespace(candidates=weighed, planned=weighed[0], stream=None, voxel_cost=lambda v: 2e-6,
                             stream_option=(stream, 0.9), stream_alternatives=[(skewed, 1.1)])
    plan = Plan((64, 64, 64), 2, 300.0, time_s=5.0, inferences_per_tile=2, speed_source="measured")
    plan.candidates = _candidates(choice, (128, 64, 64), 4)
    _candidate_times(plan, choice)
    raw = {(64, 64, 64): 2 * 64**3 * 2e-6 * 2, (32, 64, 64): 4 * 32 * 64**2 * 4e-6 * 2.5,  # x (2 inferences per
           (128, 40, 16): 0.9, (128, 24, 16): 1.1}  # tile + half a statistics pass); streams' own costs
    for c in plan.candidates:
        assert c["profile_time_s"] == pytest.approx(raw[tuple(c["tile"])], abs=0.051)
        assert c["time_s"] == pytest.approx(5.0 * raw[tuple(c["tile"])] / raw[(64, 64, 64)], abs=0.051)
    assert [c["chosen"] for c in plan.candidates if c["engine"] == "tiles" and c["tile"] == [64, 64, 64]] == [True]
    streams = [(c["tiles"], c["chosen"], c["evaluated_x"]) for c in plan.candidates if c["engine"] == "stream"]
    assert streams == [(2, False, 1.25), (3, False, 1.0)]  # (skewed bands compute every row once)
    from volinfer.run.plan import _candidate_line
    line = next(_candidate_line(c) for c in plan.candidates if c["tiles"] == 3)
    assert "layer stream in 3 skewed bands along y, 1 skip(s) spilled, 1.00x voxels evaluated" in line
    assert plan.speed_source.startswith("measured; times x")


def test_the_time_budget_measures_the_models_tile_only_when_spent(monkeypatch):
    monkeypatch.setattr(sp, "MIN_TIMED_S", 0.0)
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    points, done = sp.measure(tiny_unet(levels=2), "NCDHW", 1, [(16,) * 3, (32,) * 3], cfg, budget_s=0.0)
    assert done == [(16, 16, 16)] and list(points) == [16**3] and points[16**3] > 0


def test_profile_of_a_tiny_model_round_trips_through_the_ir(tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "TOTAL_BUDGET_S", 60.0)  # every size (conftest measures only the first)
    monkeypatch.setattr(sp, "MIN_TIMED_S", 0.0)  # two timed inferences per size: the numbers are not checked
    m = tiny_unet(levels=2)
    prof = sp.profile_model(m, "NCDHW", 1, [16, 16, 16], 4, {"device": "CPU"}, None)
    settings = ModelSettings(size_multiple=4)
    settings.extra[sp.KEY] = prof.as_dict()
    settings.to_model(m)
    ov.save_model(m, str(tmp_path / "p.xml"))
    back = sp.stored(ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "p.xml"))).extra)
    assert back is not None and back.precision in ("f32", "bf16", "f16") and back.cpu
    assert [t for t in back.tiles] == [(16, 16, 16), (24, 24, 24), (32, 32, 32)]  # sorted by size
    assert [v for v, _ in back.points] == [16**3, 24**3, 32**3]
    assert all(math.isfinite(c) and c > 0 for _, c in back.points)
    assert back.points == prof.points
    assert "Mvox/s at 16³" in back.summary()


def test_convert_stores_a_profile_unless_told_not_to_and_info_shows_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from converters import convert
    from volinfer.cli import main

    monkeypatch.setattr(sp, "TOTAL_BUDGET_S", 60.0)
    m = tiny_unet(levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(m, str(tmp_path / "src.xml"))
    quick = dict(check=False, measure_rf=False, tile=16)
    r = convert(str(tmp_path / "src.xml"), tmp_path / "with.xml", **quick)
    stored = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "with.xml"))).extra
    prof = sp.stored(stored)
    assert prof is not None and all(c > 0 for _, c in prof.points)
    assert prof.tiles == ((16, 16, 16), (24, 24, 24), (32, 32, 32))
    assert any(n.startswith("speed: ") for n in r.notes)
    out = CliRunner().invoke(main, ["info", str(tmp_path / "with.xml"), "--no-measure"])
    assert out.exit_code == 0 and "speed        " in out.output and "Mvox/s at 16³" in out.output
    # re-describing with --no-speed-profile drops it (it could be from another graph or tile)
    r = convert(str(tmp_path / "with.xml"), tmp_path / "without.xml", speed_profile=False, **quick)
    stored = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "without.xml"))).extra
    assert stored.get(sp.KEY) is None and stored.get(sp.NOTE_KEY) is None and sp.stored(stored) is None
    assert not any(n.startswith("speed") for n in r.notes)


def test_a_failing_profile_never_fails_the_conversion(tmp_path, monkeypatch):
    from converters import convert

    def broken(*a, **k):
        raise RuntimeError("no timer today")

    monkeypatch.setattr(sp, "profile_model", broken)
    ov.save_model(tiny_unet(levels=2), str(tmp_path / "src.xml"))
    r = convert(str(tmp_path / "src.xml"), tmp_path / "o.xml", check=False, measure_rf=False, tile=16)
    stored = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "o.xml"))).extra
    assert sp.KEY not in stored and "no timer today" in stored[sp.NOTE_KEY]
    assert any("speed profile not measured" in n for n in r.notes)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_candidate_times_come_from_the_profile_when_a_stream_is_chosen():
    """With a stream chosen and no tiling measured (``--engine tiles`` would be refused): every candidate (the stream
    too) shows the speed profile's time."""
    from types import MethodType, SimpleNamespace

    from volinfer.run.fidelity import Tiling
    from volinfer.run.plan import Plan, _candidate_times, _candidates

    weighed = [Tiling((64, 64, 64), (0, 0, 0), (2, 1, 1), 2 * 64**3, 900.0, 0, voxel_s=2e-6, cost=2 * 64**3 * 2e-6)]
    stream = SimpleNamespace(padded=(128, 64, 64), band=64, out_planes=16, peak_mb=300.0, skew=None, spill={},
                             bands=lambda size, m: SimpleNamespace(count=1, tile=64))
    stream.evaluated_voxels = MethodType(StreamPlan.evaluated_voxels, stream)
    choice = SimpleNamespace(candidates=weighed, planned=None, stream=stream, voxel_cost=lambda v: 2e-6,
                             stream_option=(stream, 0.7), stream_alternatives=[])
    plan = Plan((0, 0, 0), 0, 0.0, time_s=0.0, inferences_per_tile=1, speed_source="measured",
                tiles_unavailable="refused (--max-memory 10 MB is too small)")
    plan.candidates = _candidates(choice, (128, 64, 64), 4)
    _candidate_times(plan, choice)
    assert {c["engine"]: c["time_s"] for c in plan.candidates} == {"tiles": pytest.approx(2 * 64**3 * 2e-6, abs=0.051),
                                                                    "stream": pytest.approx(0.7, abs=0.051)}
    assert "predicted 0.7 s" in "\n".join(plan.summary().splitlines()[-2:])
