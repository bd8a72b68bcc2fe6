"""Bitwise equality between the ways of running one volume: an uninterrupted NIfTI run, the same run killed and
resumed (file bytes compared, .nii and .nii.gz), and the chunked Zarr-block path (arrays compared exactly), for crop
and Gaussian stitching, on volumes with constant regions (cached constant tiles must be stitched in grid order)."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2
from test_resume import KILLER

from volinfer.cli import main

SHAPE = (40, 36, 70)


def _volume(seed: int = 11) -> np.ndarray:
    """Noise with constant regions large enough to hold whole tiles (background at 0, a plateau at 300)."""
    vol = np.random.default_rng(seed).integers(0, 400, SHAPE).astype(np.int16)
    vol[:, :, :34] = 0
    vol[:, 20:, 50:] = 300
    return vol


@pytest.fixture
def setup(tmp_path):
    xml = save_unet2(tmp_path / "m.xml")
    return tmp_path, xml


def _args(vol, xml, stitch):
    return [str(vol), "-m", str(xml), "--tile", "32", "--overlap", "24", "--stitch", stitch, "--kind", "raw", "-q"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("stitch,kill_at", [("crop", 9), ("gaussian", 40)])
def test_resumed_output_is_byte_identical(setup, suffix, stitch, kill_at):
    tmp, xml = setup
    vol = tmp / f"vol{suffix}"
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), str(vol))
    args = _args(vol, xml, stitch)
    ref, out = tmp / f"ref{suffix}", tmp / f"out{suffix}"
    assert CliRunner().invoke(main, ["run", *args, "-o", str(ref)]).exit_code == 0
    p = subprocess.run([sys.executable, "-c", KILLER, "run", *args, "-o", str(out)], capture_output=True,
                       env={**os.environ, "KILL_AT": str(kill_at)}, timeout=300)
    assert p.returncode == -9 and not out.exists()
    r = CliRunner().invoke(main, ["run", *args, "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()


zarr = pytest.importorskip("zarr")


ZSHAPE = (70, 61, 53)  # not a multiple of the 16-voxel chunks nor of the 32-voxel blocks


def _zarr_volume() -> np.ndarray:
    """Float noise, zero over half the volume (many whole constant tiles) and a small plateau at 3."""
    vol = np.random.default_rng(0).standard_normal(ZSHAPE).astype(np.float32)
    vol[:, :, :40] = 0
    vol[:, 30:, :] = 0
    vol[:20, :20, :20] = 3.0
    return vol


def _read_zarr(path) -> np.ndarray:
    """The full-resolution array of a Zarr output (an OME-Zarr group's level 0, or a plain array)."""
    node = zarr.open(str(path), mode="r")
    return (node["0"] if isinstance(node, zarr.Group) else node)[:]


def _nifti_vs_zarr(tmp, xml, stitch, block, reuse=True):
    from volinfer.run.distributed import run_zarr

    vol = _zarr_volume()
    z = zarr.create_array(store=str(tmp / "in.zarr"), shape=ZSHAPE[::-1], chunks=(16, 16, 16), dtype="float32",
                          overwrite=True)
    z[:] = vol.transpose(2, 1, 0)  # a plain array without axis names is (z, y, x)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "in.nii"))
    extra = [] if reuse else ["--no-constant-reuse"]
    r = CliRunner().invoke(main, ["run", *_args(tmp / "in.nii", xml, stitch), *extra, "-o", str(tmp / "o.nii")])
    assert r.exit_code == 0, r.output
    ref = np.asarray(nib.load(str(tmp / "o.nii")).dataobj)  # (x, y, z, c)
    run_zarr(tmp / "in.zarr", xml, tmp / "o.zarr", stitch=stitch, block=block, overwrite=True, tile=32, overlap=24,
             kind="raw", reuse_constant=reuse)
    return np.moveaxis(_read_zarr(tmp / "o.zarr").transpose(0, 3, 2, 1), 0, -1), ref  # store: (c, z, y, x)


def test_zarr_blocks_equal_nifti_run_crop(setup):
    out, ref = _nifti_vs_zarr(*setup, "crop", 32)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)


def test_zarr_blocks_equal_nifti_run_gaussian_without_constant_reuse(setup):
    out, ref = _nifti_vs_zarr(*setup, "gaussian", 32, reuse=False)
    np.testing.assert_array_equal(out, ref)


def test_zarr_blocks_equal_nifti_run_gaussian(setup):
    out, ref = _nifti_vs_zarr(*setup, "gaussian", 32)
    np.testing.assert_array_equal(out, ref)


def test_constant_reuse_does_not_change_gaussian_output(setup):
    tmp, xml = setup
    nib.save(nib.Nifti1Image(_zarr_volume(), np.eye(4)), str(tmp / "in.nii"))
    for name, extra in (("a", []), ("b", ["--no-constant-reuse"])):
        r = CliRunner().invoke(main, ["run", *_args(tmp / "in.nii", xml, "gaussian"), *extra, "-o",
                                      str(tmp / f"{name}.nii")])
        assert r.exit_code == 0, r.output
    assert (tmp / "a.nii").read_bytes() == (tmp / "b.nii").read_bytes()
