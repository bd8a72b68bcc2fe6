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
