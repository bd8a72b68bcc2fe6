"""``--precision auto`` trusts a stored reduced-precision verdict only for inputs like those it was measured on: a run
whose normalised input reaches far beyond the calibration input's magnitude runs f32 and says why."""

import json

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main
from volinfer.model import precision
from volinfer.model.tile_model import CompileOptions, TileModel
from volinfer.run.setup import guard_for

CHECK = {"precision": "bf16", "faithful": True, "label_agreement": 0.9995, "prob_max_abs": 0.004,
         "input_abs_max": 3.0}


def test_outside_checked_covers_up_to_the_factor():
    assert precision.outside_checked(CHECK, 3.0 * precision.RANGE_FACTOR) is None
    why = precision.outside_checked(CHECK, 3.0 * precision.RANGE_FACTOR + 0.5)
    assert why is not None and "±3" in why and "±12.5" in why
    old = {k: v for k, v in CHECK.items() if k != "input_abs_max"}  # stored before the range was recorded
    assert precision.outside_checked(old, precision.DEFAULT_CHECKED_ABS_MAX * precision.RANGE_FACTOR) is None
    assert precision.outside_checked(old, 1000.0) is not None
    assert precision.outside_checked(None, 1e9) is None


def test_check_model_records_the_input_magnitude(tmp_path):
    m = TileModel(save_unet2(tmp_path / "m.xml"), tile=8, compile=False).model
    x = np.full([1, 1, 8, 8, 8], -2.5, np.float32)
    x[0, 0, 1, 2, 3] = 7.25
    rec = precision.check_model(m, "NCDHW", 1, [8, 8, 8], 0, False, x=x, runtime={"precision": "bf16"})
    assert rec["input_abs_max"] == 7.25


def _auto_bf16(tmp_path, monkeypatch, check=CHECK):
    monkeypatch.setattr(precision, "native_reduced", lambda core, device: "bf16")
    xml = save_unet2(tmp_path / "m.xml", precision_check=json.dumps(check))
    return TileModel(xml, tile=8, compile=False, options=CompileOptions(precision="auto"))


def test_guard_keeps_reduced_precision_within_the_checked_range(tmp_path, monkeypatch):
    tm = _auto_bf16(tmp_path, monkeypatch)
    assert tm.precision == "bf16" and tm.auto_reduced
    assert guard_for(tm, 10.0) is tm
    assert guard_for(tm, None) is tm  # nothing scanned: nothing to judge


def test_guard_falls_back_to_f32_beyond_it_and_says_why(tmp_path, monkeypatch):
    tm = _auto_bf16(tmp_path, monkeypatch)
    out = guard_for(tm, 1876.0)
    assert out.precision == "f32" and not out.auto_reduced
    assert "bf16 not verified for this input" in out.precision_reason and "±1876" in out.precision_reason
    assert out.at((12, 12, 12)).precision_reason == out.precision_reason  # kept when recompiled at another tile
    forced = TileModel(tm.path, tile=8, compile=False, options=CompileOptions(precision="bf16"))
    assert guard_for(forced, 1876.0) is forced  # asked for: never overruled


@pytest.mark.skipif(precision.native_reduced(__import__("openvino").Core(), "CPU") is None,
                    reason="this CPU runs no reduced precision natively")
@pytest.mark.parametrize("scale, normalize, expect", [(1000.0, None, "f32"), (1000.0, "zscore", "native"),
                                                      (1.0, None, "native")])
def test_run_scans_the_normalised_range(tmp_path, scale, normalize, expect):
    native = precision.native_reduced(__import__("openvino").Core(), "CPU")
    xml = save_unet2(tmp_path / "m.xml", precision_check=json.dumps({**CHECK, "precision": native}))
    rng = np.random.default_rng(0)
    vol = (1.0 + 0.5 * rng.standard_normal((21, 18, 15))) * scale  # int16 when scaled: ~1000 +- 500
    vol = vol.astype(np.int16 if scale > 1 else np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    args = ["run", str(tmp_path / "v.nii"), "-m", str(xml), "-o", str(tmp_path / "o.nii"), "--json", "-q"]
    if normalize:
        args += ["--normalize", normalize]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["precision"] == (native if expect == "native" else "f32"), rep
    note = [n for n in rep["notes"] if n.startswith("precision ")][0]
    if expect == "f32":
        # the largest normalised magnitude, computed here from the voxels: the guard must have seen exactly that
        assert f"±{float(np.abs(vol).max()):.4g}" in note, note
    else:
        assert "faithful" in note


def test_a_reduced_precision_asked_for_against_the_stored_verdict_says_so(tmp_path):
    """--precision bf16 on a model `volinfer convert` measured unfaithful in bf16 runs bf16 (asked for) but says how
    far it moves the outputs (it said nothing); asked where the verdict is faithful, or f32, nothing is added. An odd
    volume's verdict says it is exact for the volume padded to the size multiple; one on the multiple does not."""
    from volinfer import predict

    bad = save_unet2(tmp_path / "bad.xml", precision_check=json.dumps({**CHECK, "faithful": False,
                                                                      "label_agreement": 0.9975}))
    good = save_unet2(tmp_path / "good.xml", precision_check=json.dumps(CHECK))
    odd = np.random.default_rng(1).standard_normal((21, 18, 15)).astype(np.float32)
    for xml, asked, warned in ((bad, "bf16", True), (good, "bf16", False), (bad, "f32", False)):
        _, rep = predict(odd, xml, precision=asked, report=True, progress=False)
        lines = [n for n in rep.notes if "measured bf16 unfaithful" in n]
        assert bool(lines) == warned, rep.notes
        if warned:
            assert "labels 0.9975 equal" in lines[0] and "asked for" in lines[0]
            emulated = precision.native_reduced(ov.Core(), "CPU") != "bf16"  # both said: OpenVINO computes in f32
            assert ("OpenVINO computes in f32 here" in lines[0]) == emulated, lines[0]
            assert ("outputs differ from f32 inference" in lines[0]) != emulated, lines[0]
    assert rep.exact_meaning.startswith("exact for the volume padded to 24x20x16 (zero padding to the model's size "
                                        "multiple 4; "), rep.exact_meaning
    assert "cropped back to 21x18x15: one tile covers" in rep.exact_meaning
    _, rep = predict(odd[:20, :16, :12], bad, precision="f32", report=True, progress=False)
    assert "padded" not in rep.exact_meaning.replace("(padded)", ""), rep.exact_meaning


class _Capabilities:
    """An ov.Core stand-in that reports these optimisation capabilities for every device."""

    def __init__(self, caps: list[str]) -> None:
        self.caps = caps

    def get_property(self, device: str, name: str) -> list[str]:
        return self.caps


def test_a_reduced_precision_the_device_cannot_run_says_it_computes_in_f32(tmp_path):
    """--precision bf16 on a CPU without native bf16 (AVX2): OpenVINO compiles it and computes in f32 (its compiled
    model reports f32), while the run's summary said `CPU bf16` and nothing else, and a stream kept its planes in
    bf16 (labels of a DynUNet 99.5% equal to f32, verdict "exact"). The run is now f32 throughout, and says why;
    where bf16 is native, or for f32, it stays "asked for" (no note)."""
    from volinfer import predict

    no_bf16 = _Capabilities(["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    asked, why = precision.resolve("bf16", None, no_bf16, "CPU")
    assert asked == "f32" and "asked for bf16, but CPU has no native bf16: OpenVINO computes in f32 here" in why
    assert precision.resolve("bf16", None, _Capabilities(["FP32", "BF16"]), "CPU") == ("bf16", "asked for")
    assert precision.resolve("f32", None, no_bf16, "CPU") == ("f32", "asked for")
    assert "has no native f16" in precision.resolve("f16", None, _Capabilities(["FP32", "BF16"]), "CPU")[1]
    core = ov.Core()
    xml = save_unet2(tmp_path / "m.xml")
    _, rep = predict(np.zeros((16, 16, 16), np.float32), xml, precision="bf16", report=True, progress=False)
    said = [n for n in rep.notes if "no native bf16" in n]
    if precision.native_reduced(core, "CPU") == "bf16":
        assert not said, rep.notes
    else:  # this machine: the premise (OpenVINO's own choice) and the note
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert len(said) == 1 and said[0].startswith("precision f32: asked for bf16, but CPU"), rep.notes
        vol = np.random.default_rng(2).standard_normal((19, 23, 29)).astype(np.float32)
        runs = [predict(vol, xml, precision=p, engine="stream", kind="probabilities", progress=False)
                for p in ("bf16", "f32")]
        np.testing.assert_array_equal(*runs)  # (its planes were stored in bf16: outputs off by ~1e-2)
