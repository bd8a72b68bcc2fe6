"""2-D inputs get one rule whatever the format (rtB D9): a 2-D image is refused in one line, exit 2, as NIfTI,
MHA/NRRD and Zarr already refused it; a TIFF used to run its one page as a one-slice volume. A stack that declares
a z axis of 1 (shaped, OME or ImageJ metadata), like a NIfTI volume of shape (x, y, 1), still runs."""

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.cli import main

tifffile = pytest.importorskip("tifffile")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twod")
    page = np.random.default_rng(2).integers(0, 100, (17, 23)).astype(np.uint16)  # (y, x)
    tifffile.imwrite(tmp / "page.tif", page, photometric="minisblack", metadata=None)
    tifffile.imwrite(tmp / "slice.tif", page[None], photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp / "slice.ome.tif", page[None], ome=True, metadata={"axes": "ZYX"})
    nib.save(nib.Nifti1Image(page.T.copy(), np.eye(4)), str(tmp / "page.nii.gz"))
    return tmp, save_unet2(tmp / "m.xml")


@pytest.mark.parametrize("name", ["page.tif", "page.nii.gz"])
def test_a_2d_image_is_refused_in_one_line(env, name):
    tmp, xml = env
    r = invoke("run", tmp / name, "-m", xml, "-o", tmp / f"o_{name}.nii", "--kind", "raw")
    assert r.exit_code == 2 and "expected a 3-D" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp / f"o_{name}.nii").exists()


@pytest.mark.parametrize("name", ["slice.tif", "slice.ome.tif"])
def test_a_one_slice_stack_runs(env, name):
    tmp, xml = env
    out = tmp / f"o_{name}.nii"
    r = invoke("run", tmp / name, "-m", xml, "-o", out, "--kind", "raw", "-q")
    assert r.exit_code == 0, r.output
    assert nib.load(str(out)).shape[:3] == (23, 17, 1)
