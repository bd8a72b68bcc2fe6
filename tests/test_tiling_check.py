"""The tiling check stored at convert time: tiled (crop margins = the measured receptive field) against whole on a
probe, checked against independent numpy stitching of OpenVINO outputs; and what exact runs say about it."""

from __future__ import annotations

import itertools
import json

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from click.testing import CliRunner
from models import _conv, save_unet2

import volinfer
from volinfer.cli import main
from volinfer.model.receptive_field import ReceptiveField, measure_receptive_field
from volinfer.model.tile_model import TileModel
from volinfer.model.tiling_check import check_tiling, percent, stored

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def two_convs() -> ov.Model:
    """Two 3x3x3 convolutions (ReLU between): receptive-field radius exactly 2, nothing beyond it."""
    rng = np.random.default_rng(1)
    param = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    y = _conv(ops.relu(_conv(param, 1, 4, 3, rng, "NCDHW")), 4, 2, 3, rng, "NCDHW")
    return ov.Model([y], [param], "two_convs")


def long_tail_unet(multiple: bool = True, align_corners: bool = False) -> ov.Model:
    """conv3-relu, avgpool 8, a 3x3x3 convolution whose outer taps are 1e-3 of its centre, nearest upsample x8,
    concat skip, conv1 -> 2. One voxel's influence through the outer taps (1e-3 / 512) stays under the receptive
    field's 1e-5 tolerance, so the measured radius misses them; a whole tile border of such voxels does not."""
    rng = np.random.default_rng(0)
    param = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = ops.relu(_conv(param, 1, 3, 3, rng, "NCDHW"))
    skip = x
    x = ops.avg_pool(x, [8] * 3, [0, 0, 0], [0, 0, 0], [8] * 3, exclude_pad=True)
    k = np.full((3, 3, 3), 1e-3, np.float32)
    k[1, 1, 1] = 1.0
    w = np.zeros((3, 3, 3, 3, 3), np.float32)
    for c in range(3):
        w[c, c] = k
    x = ops.convolution(x, ops.constant(w), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    x = ops.interpolate(x, ops.constant(np.array([8.0] * 3, np.float32)), "linear" if align_corners else "nearest",
                        "scales", axes=ops.constant(np.array([2, 3, 4], np.int64)),
                        coordinate_transformation_mode="align_corners" if align_corners else "asymmetric",
                        nearest_mode="floor")
    y = _conv(ops.concat([x, skip], 1), 6, 2, 1, rng, "NCDHW")
    m = ov.Model([y], [param], "long_tail_unet")
    if multiple:
        m.set_rt_info("8", ["volinfer", "size_multiple"])
    return m


def instance_norm_net() -> ov.Model:
    """conv3 -> InstanceNorm (MVN over space) -> conv3: every output depends on the whole input unless frozen."""
    rng = np.random.default_rng(2)
    param = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = _conv(param, 1, 3, 3, rng, "NCDHW")
    x = ops.mvn(x, ops.constant(np.array([2, 3, 4], np.int64)), True, 1e-5, "inside_sqrt")
    return ov.Model([_conv(ops.relu(x), 3, 2, 3, rng, "NCDHW")], [param], "in_net")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _independent(model: ov.Model, radius, m: int, seed: int = 0):
    """Probe and tiles from the definition (tile = smallest multiple of m >= 2r + m, probe = tile + stride), two
    tiles per axis starting at 0 and probe - tile, split half-way (probe // 2); OpenVINO f32 outputs stitched in
    numpy; softmax; (max |diff|, relative to the whole range, label agreement)."""
    tile = [-(-(2 * r + m) // m) * m for r in radius]
    probe = [t + (t - 2 * r) // m * m for t, r in zip(tile, radius)]
    x = np.random.default_rng(seed).standard_normal([1, 1, *probe]).astype(np.float32)
    core = ov.Core()
    whole_m, tile_m = model.clone(), model.clone()
    whole_m.reshape({0: [1, 1, *probe]})
    tile_m.reshape({0: [1, 1, *tile]})
    whole = np.asarray(core.compile_model(whole_m, "CPU", F32)(x)[0])[0]
    run_tile = core.compile_model(tile_m, "CPU", F32)
    tiled = np.zeros_like(whole)
    for side in itertools.product((0, 1), repeat=3):
        start = [0 if s == 0 else p - t for s, p, t in zip(side, probe, tile)]
        keep = [(0, p // 2) if s == 0 else (p // 2, p) for s, p in zip(side, probe)]
        part = x[:, :, start[0]:start[0] + tile[0], start[1]:start[1] + tile[1], start[2]:start[2] + tile[2]]
        out = np.asarray(run_tile(np.ascontiguousarray(part))[0])[0]
        tiled[:, keep[0][0]:keep[0][1], keep[1][0]:keep[1][1], keep[2][0]:keep[2][1]] = \
            out[:, keep[0][0] - start[0]:keep[0][1] - start[0], keep[1][0] - start[1]:keep[1][1] - start[1],
                keep[2][0] - start[2]:keep[2][1] - start[2]]
    a, b = _softmax(tiled), _softmax(whole)
    diff = float(np.abs(a - b).max())
    return diff, diff / float(b.max() - b.min()), float((a.argmax(0) == b.argmax(0)).mean()), probe, tile


def test_known_receptive_field_is_exact():
    tm = TileModel(two_convs(), tile=16, compile=False)
    rf = measure_receptive_field(tm)
    assert rf.radius == (2, 2, 2) and rf.bounded
    rec = check_tiling(tm, rf, "softmax")
    assert rec["measured"] is True and rec["margin"] == [2, 2, 2]
    assert rec["tile"] == [5, 5, 5] and rec["probe"] == [6, 6, 6]  # multiple 1: 2r + 1, plus a stride of 1
    assert rec["max_abs"] <= 1e-5 and rec["label_agreement"] == 1.0


def test_long_tail_deviation_matches_independent_stitching():
    model = long_tail_unet()
    tm = TileModel(model, tile=32, compile=False)
    assert measure_receptive_field(tm).radius == (17, 17, 17)  # the graph's arithmetic sees the whole tail (16 + 1)
    rf = measure_receptive_field(tm, graph=False)  # the perturbation probe does not:
    assert rf.bounded and max(rf.radius) <= 12  # the 1e-3 taps (reach 8 + 8 more) are below the tolerance
    rec = check_tiling(tm, rf, "softmax")
    diff, rel, agree, probe, tile = _independent(model, rf.radius, 8)
    assert rec["measured"] is True and rec["probe"] == probe and rec["tile"] == tile
    assert rec["max_abs"] > 1e-6  # margins cover the measured field, yet tiling moves the outputs
    assert rec["max_abs"] == pytest.approx(diff, rel=1e-6, abs=1e-9)
    assert rec["max_rel"] == pytest.approx(rel, rel=1e-6, abs=1e-9)
    assert rec["label_agreement"] == pytest.approx(agree, abs=1e-9)
    # with a margin that covers the whole tail (8 + 8 voxels), the same check finds nothing
    wide = check_tiling(tm, ReceptiveField((20, 20, 20), True), "softmax")
    assert wide["measured"] is True and wide["max_abs"] <= 1e-6


def test_normalisation_frozen_to_whole_probe_statistics():
    tm = TileModel(instance_norm_net(), tile=16, compile=False)
    rf = measure_receptive_field(tm)  # bounded only because the layer is frozen for the measurement
    assert rf.radius == (2, 2, 2)
    rec = check_tiling(tm, rf, "softmax")
    assert rec["measured"] is True and rec["max_abs"] <= 1e-5


def test_skipped_with_a_reason_never_raised():
    tm = TileModel(two_convs(), tile=16, compile=False)
    assert "not measured" in check_tiling(tm, None)["reason"]
    assert "not bounded" in check_tiling(tm, ReceptiveField((3, 3, 3), False))["reason"]
    assert "largest probe edge" in check_tiling(tm, ReceptiveField((200, 2, 2), True))["reason"]
    static = two_convs()
    static.reshape({0: [1, 1, 16, 16, 16]})
    assert "fixed" in check_tiling(TileModel(static, compile=False), ReceptiveField((2, 2, 2), True))["reason"]

    def broken(probe):
        raise RuntimeError("no memory")
    rec = check_tiling(tm, ReceptiveField((2, 2, 2), True), probe_input=broken)
    assert rec["measured"] is False and "no memory" in rec["reason"]


def test_stored_record_must_match_the_radius_and_be_well_formed():
    rec = {"measured": True, "max_abs": 0.01, "max_rel": 0.02, "margin": [4, 4, 4]}
    assert stored({"tiling_check": rec}, (4, 4, 4)) == rec
    assert stored({"tiling_check": rec}, (4, 4, 5)) is None
    assert stored({"tiling_check": "garbage"}, (4, 4, 4)) is None
    assert stored({"tiling_check": {"measured": True, "margin": [4, 4, 4]}}, (4, 4, 4)) is None
    assert stored({}, (4, 4, 4)) is None
    assert percent(0.9999994) == "99.9999%" and percent(0.9999996) == "99.99996%"
    assert percent(1.0) == "100%" and percent(0.5) == "50.0000%"


def _ir_with(tmp_path, name, **extra):
    m = long_tail_unet()
    m.set_rt_info(json.dumps([8, 8, 8]), ["volinfer", "receptive_field"])
    for k, v in extra.items():
        m.set_rt_info(json.dumps(v), ["volinfer", k])
    path = tmp_path / f"{name}.xml"
    ov.save_model(m, str(path), compress_to_fp16=False)
    return path


CHECK = {"measured": True, "max_abs": 0.026, "max_rel": 0.026, "output_range": 1.0, "label_agreement": 0.999999,
         "margin": [8, 8, 8], "tile": [24, 24, 24], "probe": [32, 32, 32], "activation": "softmax",
         "input": "random normal (seed 0)", "precision": "f32"}


def test_exact_run_says_what_exact_means(tmp_path):
    vol = np.random.default_rng(0).standard_normal((70, 61, 50)).astype(np.float32)
    with_check = _ir_with(tmp_path, "a", tiling_check=CHECK)
    _, rep = volinfer.predict(vol, with_check, tile=32, overlap=16, report=True)
    line = rep.summary().splitlines()
    fid = next(ln for ln in line if ln.startswith("fidelity"))
    assert rep.exact is True and rep.tiles > 8
    assert ("crop margins cover the receptive field (8x8x8); tiled vs whole measured at convert (random "
            "normal (seed 0) input): max |diff| 0.026 (2.6% of the output range), labels 99.9999% equal") in fid
    assert "exact for the volume padded to 72x64x56" in fid  # (size multiple 8) what it is exact against
    assert "equals whole-volume inference" not in rep.summary()
    assert rep.as_dict()["tiling_deviation"] == CHECK and rep.as_dict()["exact"] is True
    assert "this run feeds intensities un-normalised" in fid  # random-input check, raw intensities: said so
    _, rep = volinfer.predict(vol, with_check, tile=32, overlap=16, normalize={"kind": "zscore"}, report=True)
    assert rep.exact_meaning.endswith("labels 99.9999% equal")  # normalised run: no such caveat
    # an IR without the check (or with a corrupt one) loads, runs, and says the deviation was not measured
    for name, extra in (("b", {}), ("c", {"tiling_check": "garbage"})):
        _, rep = volinfer.predict(vol, _ir_with(tmp_path, name, **extra), tile=32, overlap=16, report=True)
        assert rep.exact is True and rep.as_dict()["tiling_deviation"] is None
        assert "crop margins cover the receptive field (8x8x8; tiling deviation not measured)" in \
            rep.summary()
    # one tile over the whole padded volume IS whole-volume inference
    _, rep = volinfer.predict(vol[:40, :40, :40], with_check, tile=40, report=True)
    assert rep.grid == (1, 1, 1) and rep.as_dict()["tiling_deviation"] is None
    assert "exact: one tile covers the whole (padded) volume, so the output equals whole-volume inference" in \
        rep.summary()
    # not exact: no deviation quoted
    _, rep = volinfer.predict(vol, with_check, tile=32, overlap=4, report=True)
    assert rep.exact is False and rep.as_dict()["tiling_deviation"] is None and "not exact" in rep.summary()


def test_convert_stores_it_info_shows_it_run_json_quotes_it(tmp_path):
    import nibabel as nib

    from converters.convert import convert

    src = tmp_path / "src.xml"  # align_corners upsampling: position-dependent, so tiles deviate at any margin
    ov.save_model(long_tail_unet(multiple=False, align_corners=True), str(src), compress_to_fp16=False)
    out = tmp_path / "m.xml"
    res = convert(str(src), out, tile=32, activation="softmax", fp16=False, precision="f32")
    rec = res.settings.extra["tiling_check"]
    assert rec["measured"] is True and rec["margin"] == res.settings.receptive_field and rec["max_abs"] > 1e-6
    assert any(n.startswith("tiling check: crop tiles with margins") for n in res.notes)
    stored_rec = TileModel(out, compile=False).settings.extra["tiling_check"]
    assert stored_rec == rec
    r = CliRunner().invoke(main, ["info", str(out), "--no-measure"])
    assert r.exit_code == 0 and "tiling       crop tiles with margins" in r.output
    vol = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).standard_normal((70, 61, 50)).astype(np.float32), np.eye(4)),
             str(vol))
    margin = max(res.settings.receptive_field)
    r = CliRunner().invoke(main, ["run", str(vol), "-m", str(out), "-o", str(tmp_path / "o.nii"), "--tile",
                                  str(-(-(2 * margin + 8) // 8) * 8), "--overlap", str(2 * margin), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # margins cover the reach, but align_corners reads positions: never exact tiled
    assert data["exact"] is False and any("positions in the tile" in n for n in data["not_exact"])
    # measured on a crop of a real volume instead, when one is given (offset from zero: the border shows more)
    nib.save(nib.Nifti1Image((np.random.default_rng(1).standard_normal((70, 61, 50)) + 5).astype(np.float32),
                             np.eye(4)), str(vol))
    res = convert(str(src), tmp_path / "cal.xml", tile=32, activation="softmax", fp16=False, precision="f32",
                  calibration_volume=str(vol))
    cal = res.settings.extra["tiling_check"]
    assert cal["measured"] is True and cal["input"] == "the centre crop of v.nii" and cal["max_abs"] > rec["max_abs"]


def test_plan_says_the_same(tmp_path):
    vol = tmp_path / "v.nii"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((70, 61, 50), np.int16), np.eye(4)), str(vol))
    r = CliRunner().invoke(main, ["plan", str(vol), "-m", str(_ir_with(tmp_path, "p", tiling_check=CHECK)),
                                  "--tile", "32", "--overlap", "16", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)[0]
    assert plan["exact"] is True and plan["tiling_deviation"] == CHECK
    assert "tiled vs whole measured at convert" in plan["exact_meaning"]


def test_old_ir_without_any_check_still_runs(tmp_path):
    xml = save_unet2(tmp_path / "u.xml")
    labels, rep = volinfer.predict(np.zeros((30, 20, 20), np.float32), xml, report=True)
    assert labels.shape == (30, 20, 20) and rep.exact is True and rep.as_dict()["tiling_deviation"] is None
