"""One convention for every command: -o/--output where it writes, --json alone on stdout, human text and progress on
stderr, the same runtime options and size/overlap forms everywhere; plus the interface bugs of issue 13."""

import json

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main
from volinfer.io.zarr_io import open_zarr_array

SHAPE = (23, 19, 17)  # odd, smaller than one tile
WRITERS = ["run", "demo", "convert", "to-zarr", "to-nifti", "bench"]
READERS = ["plan", "info"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    vol = tmp / "vol.nii.gz"
    data = np.random.default_rng(13).integers(0, 300, SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 1.2, 1.0])), str(vol))
    xml = save_unet2(tmp / "m.xml", tile=32)
    zarr = tmp / "vol.zarr"
    assert invoke("to-zarr", vol, "-o", zarr, "-q").exit_code == 0
    return tmp, vol, xml, zarr


def command_args(name, tmp, vol, xml, zarr, tag):
    """Arguments that make ``name`` do a small, real piece of work (``tag`` keeps outputs apart)."""
    return {
        "run": ["run", vol, "-m", xml, "-o", tmp / f"seg_{tag}.nii.gz"],
        "plan": ["plan", vol, "-m", xml, "--tile", "32"],
        "info": ["info", xml, "--no-measure"],
        "demo": ["demo", "-o", tmp / f"demo_{tag}", "--size", "24x20x18"],
        "convert": ["convert", xml, "-o", tmp / f"conv_{tag}.xml", "--no-check", "--no-receptive-field"],
        "to-zarr": ["to-zarr", vol, "-o", tmp / f"z_{tag}.zarr", "--chunks", "8"],
        "to-nifti": ["to-nifti", zarr, "-o", tmp / f"n_{tag}.nii.gz"],
        "bench": ["bench", "-m", xml, "-s", "20", "--tile", "32", "--methods", "crop", "-o", tmp / f"bench_{tag}"],
    }[name]


def command(name):
    return main.commands[name]


@pytest.mark.parametrize("name", WRITERS + READERS)
def test_help_style_is_the_same_everywhere(name):
    r = invoke(name, "--help")
    assert r.exit_code == 0
    assert ("-o, --output" in r.stdout) == (name in WRITERS or name == "plan")  # plan: the output it plans for
    for p in command(name).params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.help, f"{name} {p.opts} has no help"
    names = {o for p in command(name).params for o in getattr(p, "opts", [])}
    assert {"-q", "--quiet", "--json"} <= names
    if name in ("run", "plan", "bench"):
        assert "-m" in names and "--model" in names


@pytest.mark.parametrize("name", ["plan", "demo", "bench", "convert"])
def test_runtime_options_read_as_runs_do(name):
    def opts(cmd):
        return {p.name: p for p in command(cmd).params if p.name in ("device", "precision", "threads")}

    ref, got = opts("run"), opts(name)
    assert set(got) == {"device", "precision", "threads"}
    for key, p in got.items():
        assert type(p.type) is type(ref[key].type) and p.help.startswith(ref[key].help)
        if key == "precision":
            assert p.type.choices == ref[key].type.choices
        if not (name == "bench" and key == "precision"):  # bench keeps f32 and says why in its help
            assert p.default == ref[key].default


@pytest.mark.parametrize("name", WRITERS + READERS)
def test_json_alone_on_stdout_and_human_text_on_stderr(env, name):
    tmp, vol, xml, zarr = env
    r = invoke(*command_args(name, tmp, vol, xml, zarr, "json"), "--json")
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert r.stderr == ""  # no progress bar, no summary, no notes
    r = invoke(*command_args(name, tmp, vol, xml, zarr, "human"))
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr.strip()
    r = invoke(*command_args(name, tmp, vol, xml, zarr, "quiet"), "-q")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


@pytest.mark.parametrize("name,stage", [("convert", "convert: parity check"), ("plan", "measuring"),
                                        ("to-zarr", "to-zarr"), ("to-nifti", "to-nifti")])
def test_long_commands_show_progress_on_stderr(env, name, stage):
    tmp, vol, xml, zarr = env
    args = command_args(name, tmp, vol, xml, zarr, "progress")
    if name == "convert":
        args = args[:-2]  # with the parity check
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert stage in r.stderr and stage not in r.stdout


def test_float16_probabilities_nifti_note_and_zarr_float16(env):
    tmp, vol, xml, _ = env
    args = [vol, "-m", xml, "--kind", "probabilities", "--json"]
    ref = invoke("run", *args, "-o", tmp / "p32.nii")
    assert ref.exit_code == 0, ref.output
    r = invoke("run", *args, "--float16", "-o", tmp / "p16.nii.gz")
    assert r.exit_code == 0, r.output
    assert any("NIfTI has no float16" in n for n in json.loads(r.stdout)["notes"])
    assert nib.load(str(tmp / "p16.nii.gz")).get_data_dtype() == np.float32
    r = invoke("run", *args, "--float16", "-o", tmp / "p16.zarr")
    assert r.exit_code == 0, r.output
    arr = open_zarr_array(tmp / "p16.zarr")
    assert arr.dtype == np.float16
    p32 = np.asarray(nib.load(str(tmp / "p32.nii")).dataobj)  # (x, y, z, c)
    zarr_xyzc = np.moveaxis(np.asarray(arr), 0, -1).transpose(2, 1, 0, 3)  # (c, z, y, x) -> (x, y, z, c)
    np.testing.assert_allclose(zarr_xyzc.astype(np.float32), p32, atol=1e-3)


def test_redescribing_an_ir_keeps_its_stored_tile(env, tmp_path):
    _, _, _, _ = env
    src = save_unet2(tmp_path / "t48.xml", tile=48)
    quick = ["--no-check", "--no-receptive-field", "--json"]
    r = invoke("convert", src, "-o", tmp_path / "same.xml", *quick)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["tile"] == [48, 48, 48] and settings["size_multiple"] == 4
    r = invoke("convert", src, "-o", tmp_path / "new.xml", "--tile", "32x32x16", *quick)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["tile"] == [32, 32, 16]


def test_convert_overlap_forms(env, tmp_path):
    from converters.cli import stored_overlap

    _, _, xml, _ = env
    assert stored_overlap("0.25") == 0.25 and stored_overlap("16") == 16 and stored_overlap("16x16x8") == [16, 16, 8]
    assert isinstance(stored_overlap("16"), int) and stored_overlap(None) is None
    r = invoke("convert", xml, "-o", tmp_path / "o.xml", "--overlap", "16,16,8", "--no-check",
               "--no-receptive-field", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["overlap"] == [16, 16, 8]
    r = invoke("convert", xml, "-o", tmp_path / "o2.xml", "--overlap", "1.5")
    assert r.exit_code == 2 and "ambiguous" in r.stderr and not (tmp_path / "o2.xml").exists()


def test_to_zarr_and_to_nifti_outputs(env, tmp_path):
    tmp, vol, _, zarr = env
    assert invoke("to-zarr", vol, "-o", tmp_path / "a.zarr", "-q").exit_code == 0
    r = invoke("to-zarr", vol, "-o", tmp_path / "a.zarr")
    assert r.exit_code == 2 and "--overwrite" in r.stderr and "--resume" not in r.output
    r = invoke("to-zarr", vol, tmp_path / "old.zarr")  # the old positional form still works, with a note
    assert r.exit_code == 0 and "deprecated; use -o" in r.stderr
    r = invoke("to-zarr", vol, tmp_path / "b.zarr", "-o", tmp_path / "c.zarr")
    assert r.exit_code == 2 and "give only -o/--output" in r.stderr
    r = invoke("to-nifti", zarr, "-o", tmp_path / "back.nii", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shape"] == list(SHAPE)
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "back.nii")).dataobj),
                                  np.asarray(nib.load(str(vol)).dataobj))
    assert invoke("to-nifti", zarr).exit_code == 2


def test_plan_accepts_zarr_input(env):
    _, vol, xml, zarr = env
    r = invoke("plan", zarr, "-m", xml, "--tile", "16", "--json")
    assert r.exit_code == 0, r.output
    z = json.loads(r.stdout)[0]
    n = json.loads(invoke("plan", vol, "-m", xml, "--tile", "16", "--json").stdout)[0]
    assert z["tiles"] == n["tiles"] > 1 and z["tile"] == [16, 16, 16]


def test_batch_failure_names_the_path_once(env, tmp_path):
    _, vol, xml, _ = env
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "a.nii.gz").write_bytes(vol.read_bytes())
    (batch / "c.nii").write_bytes(b"broken")
    r = invoke("run", batch, "-m", xml, "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == ""
    bad = str(batch / "c.nii")
    lines = [ln for ln in r.stderr.splitlines() if "c.nii" in ln or "failed" in ln]
    assert any(ln.startswith("failed: ") for ln in lines)
    assert all(ln.count(bad) <= 1 for ln in r.stderr.splitlines()), r.stderr
    r = invoke("run", batch, "-m", xml, "-o", tmp_path / "out2", "--json")
    failed = json.loads(r.stdout)["failed"]
    assert [f["input"] for f in failed] == [bad] and bad not in failed[0]["error"]


@pytest.mark.parametrize("text,expected", [("24", [24, 24, 24]), ("24x20x18", [24, 20, 18]),
                                           ("24,20,18", [24, 20, 18])])
def test_sizes_n_or_xyz(text, expected):
    ctx = command("demo").make_context("demo", ["--size", text])
    assert ctx.params["size"] == expected
    ctx = command("bench").make_context("bench", ["--tile", text if len(set(expected)) == 1 else "32x32x32"])
    assert ctx.params["tile"] == (expected[0] if len(set(expected)) == 1 else 32)
    for bad in ("0", "24x20", "a", "24x20x0"):
        r = invoke("demo", "--size", bad)
        assert r.exit_code == 2 and "--size must be N or XxYxZ" in r.stderr and r.stderr.count("\n") == 1
    r = invoke("bench", "--tile", "32x32x16")
    assert r.exit_code == 2 and "cubic" in r.stderr


def test_run_tile_n_or_xyz(env, tmp_path):
    _, vol, xml, _ = env
    for text, tile in (("16", [16, 16, 16]), ("16x12x8", [16, 12, 8])):
        r = invoke("run", vol, "-m", xml, "-o", tmp_path / f"t{text}.nii", "--tile", text, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["tile"] == tile


def test_demo_old_out_dir_still_works(tmp_path):
    r = invoke("demo", "--out-dir", tmp_path / "d", "--size", "16")
    assert r.exit_code == 0, r.output
    assert "now -o/--output" in r.stderr and (tmp_path / "d" / "demo_labels.nii.gz").exists()
