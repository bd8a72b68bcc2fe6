"""What options mean, said and checked where the user meets them (the red-team findings F3-F8): memory sizes and
their units, options a run cannot use, notes that name the real output format, messages that name values as typed."""

from __future__ import annotations

import pytest

from click.testing import CliRunner

from volinfer import portable
from volinfer.cli import main
from volinfer.errors import VolinferError
from volinfer.options import check_budget_mb, format_mb, parse_size_mb


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="volinfer")


@pytest.mark.parametrize("text, mb", [("600", 600.0), ("600M", 600.0), ("600MB", 600.0), ("600MiB", 600.0),
                                      ("600mib", 600.0), ("1.5G", 1536.0), ("1.5GiB", 1536.0), ("2 GB", 2048.0),
                                      ("1K", 1 / 1024), ("512KiB", 0.5), ("1T", 1024.0**2), ("1e3", 1000.0)])
def test_memory_sizes_take_binary_units_with_or_without_b_or_ib(text, mb):
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("text", ["600B", "600iB", "lots", "1.5X", "", "inf", "-5M"])
def test_memory_sizes_refuse_what_is_not_a_size(text):
    with pytest.raises(VolinferError, match=r"^memory size must look like 600M or 1\.5G \(K, M, G, T, also as KB or "
                                            r"KiB; a bare number is MB\); got "):
        parse_size_mb(text)


def test_a_budget_above_the_machine_is_refused_naming_the_value_as_given(monkeypatch):
    monkeypatch.setattr(portable, "stated_machine_mb", lambda: 16000.0)
    with pytest.raises(VolinferError) as e:
        check_budget_mb("--max-memory", parse_size_mb("1e9"), "1e9")
    assert str(e.value) == ("--max-memory 1e9 (1000000000 MB) is more than this machine's 16000 MB (its RAM, or its "
                            "cgroup limit if lower); a bare number is MB")
    with pytest.raises(VolinferError) as e:
        check_budget_mb("--max-memory", parse_size_mb("20G"), "20G")
    assert str(e.value) == ("--max-memory 20G (20480 MB) is more than this machine's 16000 MB (its RAM, or its "
                            "cgroup limit if lower)")
    assert check_budget_mb("--max-memory", 16000.0, "16000") == 16000.0


def test_small_budgets_are_shown_in_kb_not_as_0_mb():
    assert format_mb(parse_size_mb("1K")) == "1 KB" and format_mb(0.5) == "512 KB" and format_mb(600.4) == "600 MB"


def test_cli_refuses_a_budget_above_the_machine_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(portable, "stated_machine_mb", lambda: 16000.0)
    r = invoke("plan", tmp_path / "v.nii", "-m", tmp_path / "m.xml", "--max-memory", "1e9")
    machine = "16000 MB"
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: --max-memory 1e9 (1000000000 MB) is more than this machine's {machine} (its RAM, or its cgroup "
        f"limit if lower); a bare number is MB (see 'volinfer plan --help')"], r.output


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """A small int16 volume and the two-channel (softmax) tiny U-Net."""
    import nibabel as nib
    import numpy as np
    from models import save_unet2

    tmp = tmp_path_factory.mktemp("meanings")
    data = np.random.default_rng(3).integers(0, 300, (21, 19, 17)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp / "v.nii.gz"))
    return tmp, tmp / "v.nii.gz", save_unet2(tmp / "m.xml", tile=32)


@pytest.mark.parametrize("args, message", [
    (["--chunks", "8"], "--chunks applies to Zarr outputs (-o out.zarr); {out} is not one"),
    (["--no-compression"], "--no-compression applies to Zarr outputs (-o out.zarr); {out} is not one"),
    (["--pyramid", "1"], "--pyramid applies to Zarr outputs (-o out.zarr); {out} is not one"),
    (["--block", "8"], "--block applies to Zarr inputs, which run block by block (a .zarr input)"),
    (["--channels", "1"], "--channels selects the channels of probabilities or raw outputs (or of sigmoid labels); "
                          "labels of this model's 2 channels (softmax) are the argmax over all of them: drop --channels, "
                          "or pass --kind probabilities"),
    (["--threshold", "0.3"], "--threshold applies to one-channel or sigmoid labels; labels of this model's 2 channels "
                             "(softmax) are their argmax: drop --threshold"),
    (["--threshold", "0.3", "--kind", "probabilities"], "--threshold applies to one-channel or sigmoid labels; --kind "
                                                        "probabilities is not thresholded: drop --threshold"),
    (["--sigma", "0.3"], "--sigma shapes gaussian stitching's weights; this run stitches by crop (the default): drop "
                         "--sigma, or pass --stitch gaussian"),
    (["--sigma", "0.3", "--stitch", "mean"], "--sigma shapes gaussian stitching's weights; this run stitches by mean: "
                                             "drop --sigma, or pass --stitch gaussian"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_options_a_run_cannot_use_are_refused_in_one_line(run_env, args, message):
    """They were accepted and silently ignored (F6), while --pyramid and --workers were refused."""
    tmp, vol, xml = run_env
    out = tmp / "out.nii.gz"
    r = invoke("run", vol, "-m", xml, "-o", out, *args)
    assert r.exit_code == 2 and r.output.strip().splitlines() == ["error: " + message.format(out=out)], r.output
    assert not out.exists()


@pytest.mark.parametrize("args", [["--stitch", "gaussian", "--sigma", "0.3"], ["--kind", "probabilities",
                                                                                "--channels", "1"],
                                  ["--kind", "raw", "--channels", "0,1"]])
def test_the_same_options_still_run_where_they_apply(run_env, args):
    tmp, vol, xml = run_env
    r = invoke("run", vol, "-m", xml, "-o", tmp / "ok.nii.gz", "--overwrite", "-q", *args)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("command", ["run", "convert"])
def test_help_says_what_percentile_normalisation_does(command):
    """``percentile:LO:HI`` clips and then z-scores (F3); the help said only ``percentile:LO:HI``."""
    r = invoke(command, "--help")
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and ("percentile:LO:HI (clip to the volume's LO and HI percentiles, then z-score the "
                                 "clipped values with their mean and std, as nnU-Net does for CT; not a rescale to "
                                 "[0, 1]; 0 <= LO < HI <= 100, default 0.5:99.5)") in text, text


def test_percentile_normalisation_is_clip_then_zscore():
    """What the help says, checked against the normaliser itself."""
    import numpy as np

    from volinfer.run.normalize import Normalizer

    x = np.random.default_rng(0).gamma(2.0, 50.0, 4096).astype(np.float32)
    norm = Normalizer({"kind": "percentile", "lower": 5, "upper": 95}, channels=1)
    norm._set(0, x.size, float(x.sum()), float((x.astype(np.float64) ** 2).sum()), float(x.min()), float(x.max()), [x])
    lo, hi = np.percentile(x, [5, 95])
    clipped = np.clip(x, lo, hi)
    assert norm.clip[0] == (float(lo), float(hi))
    np.testing.assert_allclose([norm.a[0], norm.b[0]], [1 / clipped.std(), -clipped.mean() / clipped.std()], rtol=1e-6)


@pytest.mark.parametrize("output, expected", [
    ("p.tif", ("float32", "--float16 applies to .zarr outputs: this TIFF's probabilities are written as float32")),
    ("p.tiff", ("float32", "--float16 applies to .zarr outputs: this TIFF's probabilities are written as float32")),
    ("p.nii.gz", ("float32", "NIfTI has no float16 type: probabilities written as float32 (a .zarr output stores "
                             "float16)")),
    ("p.zarr", ("float16", None)),
])
def test_float16_note_names_the_output_format(output, expected):
    """A .tif output was told "NIfTI has no float16 type" (F5)."""
    from volinfer.run.settings import output_float_dtype

    assert output_float_dtype(True, "probabilities", output) == expected
    assert output_float_dtype(False, "probabilities", output) == ("float32", None)


@pytest.mark.parametrize("overlap, shown", [("0.999", "0.999 (8 voxels)"), ("8", "8")])
def test_overlap_error_names_the_overlap_as_given(run_env, overlap, shown):
    """``--overlap 0.999`` was reported as ``--overlap 8`` (F7)."""
    tmp, vol, xml = run_env
    r = invoke("run", vol, "-m", xml, "-o", tmp / "ov.nii.gz", "--tile", "8", "--overlap", overlap)
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: --overlap {shown} leaves no room in a tile of 8 along x: need tile - overlap >= 4; give a smaller "
        f"overlap"], r.output


def test_info_shows_the_stored_receptive_field_run_uses_and_labels_the_graph_bound():
    """``info`` printed ``radius 4x4x4 voxels (measured, f32)`` (the graph's bound) for a model storing 3, which
    run and plan use (F8)."""
    import json
    from pathlib import Path

    import volinfer

    demo = Path(volinfer.__file__).parent / "data" / "demo_blobs.xml"
    r = CliRunner().invoke(main, ["info", str(demo)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "radius" in line]
    assert lines == ["receptive    radius 3x3x3 voxels (stored in the model; what run and plan use)",
                     "             radius 4x4x4 voxels (from the graph: an upper bound by kernel arithmetic)"]
    data = json.loads(CliRunner().invoke(main, ["info", str(demo), "--json", "--no-measure"]).stdout)
    assert data["receptive_field"] == {"radius": [3, 3, 3], "bounded": True, "text": "3x3x3", "source": "stored"}
    assert "found_receptive_field" not in data


def test_info_of_a_model_storing_none_says_where_the_run_gets_it(run_env, tmp_path):
    import openvino as ov
    from models import tiny_unet

    ov.save_model(tiny_unet(), str(tmp_path / "bare.xml"))
    r = CliRunner().invoke(main, ["info", str(tmp_path / "bare.xml")])
    assert r.exit_code == 0 and [line for line in r.output.splitlines() if "radius" in line] == [
        "receptive    radius 4x4x4 voxels (probed by perturbation, f32; what run and plan "
        "use)"], r.output


def test_an_exponent_too_large_is_refused_in_one_line_and_no_machine_figure_holds_no_budget(monkeypatch):
    """``1e400`` was an OverflowError (a traceback); where the OS says nothing of its memory (its stand-in is 4 GB)
    a larger budget is the user's to give."""
    with pytest.raises(VolinferError, match="finite"):
        check_budget_mb("--max-memory", parse_size_mb("1e400"), "1e400")
    monkeypatch.setattr(portable, "total_mb", lambda: None)
    monkeypatch.setattr(portable, "cgroup_limit_mb", lambda: None)
    assert check_budget_mb("--max-memory", parse_size_mb("64G"), "64G") == 65536.0


def test_a_batch_record_says_options_not_given_as_their_defaults():
    """Batches finished before --sigma and --threshold could be left unset recorded 0.125 and 0.5: `--resume` took
    every finished volume for one made with other settings, ran it again and failed on its existing output."""
    from volinfer.io.batch_record import settings_view
    from volinfer.run.settings import RunSettings

    assert settings_view(RunSettings()) == settings_view(RunSettings.from_kwargs(sigma=0.125, threshold=0.5))
    assert settings_view(RunSettings()) != settings_view(RunSettings.from_kwargs(threshold=0.4))
