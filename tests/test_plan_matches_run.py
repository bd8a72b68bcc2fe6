"""``volinfer plan`` makes the plan ``volinfer run`` would make, and refuses what it would refuse: a volume with
NaN/Inf voxels (one line, the run's words, the run's exit code; ``--nan-value`` accepted as by the run), and, with
``-o``, the output the run writes (a Zarr store takes no bands of y rows)."""

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main

SHAPE = (23, 19, 29)  # odd on every axis


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def nan_inputs(tmp_path_factory):
    """A float volume with two NaN voxels, as NIfTI and as a Zarr store; a model."""
    tmp = tmp_path_factory.mktemp("plannan")
    vol = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    vol[3, 4, 5] = np.nan
    vol[20, 1, 27] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "nan.nii.gz"))
    assert invoke("to-zarr", tmp / "nan.nii.gz", "-o", tmp / "nan.zarr", "--chunks", "8").exit_code == 0
    return tmp, save_unet2(tmp / "m.xml")


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.zarr"])
def test_plan_refuses_nan_like_run(nan_inputs, name):
    """Before: plan exited 0 with a plan for a volume run refuses. Now the same one line and exit code; with
    --nan-value both go ahead."""
    tmp, xml = nan_inputs
    run = invoke("run", tmp / name, "-m", xml, "-o", tmp / "o.nii", "--tile", "16")
    plan = invoke("plan", tmp / name, "-m", xml, "--tile", "16")
    assert run.exit_code == plan.exit_code == 2, (run.output, plan.output)
    assert plan.output.strip() == run.output.strip() == \
        "error: the volume holds 2 NaN/Inf voxel(s); pass --nan-value V to replace them with V"
    r = invoke("plan", tmp / name, "-m", xml, "--tile", "16", "--nan-value", "0", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["tiles"] >= 1, r.output


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A volume whose whole cross-section a 200 MB budget cannot stream (bands of y rows can), as NIfTI and Zarr."""
    tmp = tmp_path_factory.mktemp("planwide")
    vol = np.random.default_rng(0).integers(0, 1000, (509, 477, 7)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "w.nii"))
    assert invoke("to-zarr", tmp / "w.nii", "-o", tmp / "w.zarr", "--chunks", "16").exit_code == 0
    return tmp, save_unet2(tmp / "m.xml")


def _plan(*args):
    r = invoke("plan", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)[0]


def _run(*args):
    r = invoke("run", *args, "--json", "-q")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", ["w.zarr", "w.nii"])
def test_plan_with_a_zarr_output_is_the_run_s_plan(wide, name):
    """Before, plan had no -o and planned every input as for a NIfTI output: layer streaming in bands of y rows,
    which a Zarr output cannot take (the run tiles instead: a Zarr input block by block). With -o out.zarr the plan
    is the tiling the run makes; -o out.nii.gz is the default."""
    tmp, xml = wide
    opts = ["-m", xml, "--max-memory", "200M", "--kind", "probabilities"]
    default = _plan(tmp / name, *opts)
    assert default["engine"] == "stream" and "bands" in default["stream"]
    assert _plan(tmp / name, *opts, "-o", tmp / "x.nii.gz")["stream"] == default["stream"]
    planned = _plan(tmp / name, *opts, "-o", tmp / "x.zarr")
    ran = _run(tmp / name, *opts, "-o", tmp / f"out_{name}.zarr")
    assert planned["engine"] == ran["engine"] == "tiles"
    assert (planned["tile"], planned["tiles"]) == (ran["tile"], ran["tiles"])
    assert not (tmp / "x.zarr").exists() and not (tmp / "x.nii.gz").exists()  # plan writes nothing
    if name == "w.zarr":  # labels: the run streams the store in bands into a NIfTI file first, and the plan says so
        labels = _plan(tmp / name, "-m", xml, "--max-memory", "200M", "-o", tmp / "x.zarr")
        assert labels["engine"] == "stream" and "temporary NIfTI file" in labels["stream"]


def test_plan_output_is_checked_like_run_s(wide):
    """-o takes what run writes; any other name is refused in run's words."""
    tmp, xml = wide
    r = invoke("plan", tmp / "w.nii", "-m", xml, "-o", tmp / "x.mha")
    assert r.exit_code == 2 and r.output.strip() == f"error: {tmp / 'x.mha'}: output must end in .nii or .nii.gz " \
                                                     f"(or .tif/.tiff, or .zarr)"


@pytest.fixture(scope="module")
def small_zarr(tmp_path_factory):
    """A small Zarr store and the two-level U-Net."""
    tmp = tmp_path_factory.mktemp("planroute")
    vol = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "s.nii"))
    assert invoke("to-zarr", tmp / "s.nii", "-o", tmp / "s.zarr", "--chunks", "8").exit_code == 0
    return tmp, save_unet2(tmp / "m.xml")


TILES = ["--engine", "tiles", "--tile", "16"]


@pytest.mark.parametrize("out, opts, way", [
    ("o.zarr", [], "blocks"), ("o.zarr", TILES, "blocks"),
    ("o.zarr", ["--engine", "stream"], "process"), ("o.nii.gz", TILES, "blocks"), ("o.tif", TILES, "process")])
def test_plan_and_run_take_a_zarr_store_the_same_way(small_zarr, monkeypatch, tmp_path, out, opts, way):
    """One decision (volinfer.run.zarr_route.decide) says where a run takes a Zarr store; plan -o asks it the
    same question with the same settings and output, and gets the route the run takes."""
    from volinfer.run import zarr_route

    tmp, xml = small_zarr
    real, ways = zarr_route.decide, []
    monkeypatch.setattr(zarr_route, "decide", lambda *a, **k: ways.append(real(*a, **k)) or ways[-1])
    args = [tmp / "s.zarr", "-m", xml, "--kind", "probabilities", *opts]
    _plan(*args, "-o", tmp_path / out)
    _run(*args, "-o", tmp_path / out)
    assert [w.way for w in ways] == [way, way], ways


def test_a_dask_run_is_refused_where_the_store_runs_in_this_process(small_zarr):
    """--engine stream with --scheduler/--workers: one line, before any work (the same decision refuses it)."""
    tmp, xml = small_zarr
    r = invoke("run", tmp / "s.zarr", "-m", xml, "-o", tmp / "d.zarr", "--engine", "stream", "--workers", "1")
    assert r.exit_code == 2 and "--engine stream runs in this process" in r.output, r.output
    assert not (tmp / "d.zarr").exists()
