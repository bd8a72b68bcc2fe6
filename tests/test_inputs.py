"""Volumes as users have them (issue 23): every reader hands the model the same (x, y, z) array for the same voxels.

The model is deliberately asymmetric (anisotropic kernels, different along every axis), so any reader that feeds it
the axes in another order, or flipped, changes its labels; the volume is int16 with an odd shape. The reference is
the direct NIfTI run, itself checked against whole-volume OpenVINO f32 inference computed here.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from click.testing import CliRunner

from volinfer.cli import main

SHAPE = (27, 21, 17)  # (x, y, z), odd, no two equal
AFFINE = np.array([[0.9, 0, 0, -11.0], [0, 1.1, 0, 7.5], [0, 0, 1.3, 3.25], [0, 0, 0, 1]])
RUN = ["-q", "--precision", "f32", "--tile", "16", "--overlap", "8"]


def asymmetric_model() -> ov.Model:
    """1 → 3 channels: a 5x3x1 convolution then a 1x3x5 one (kernels differ along every axis), no padding loss."""
    rng = np.random.default_rng(23)
    x = param = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    for cin, cout, k in ((1, 4, (5, 3, 1)), (4, 3, (1, 3, 5))):
        w = rng.standard_normal((cout, cin, *k)).astype(np.float32)
        pad = [s // 2 for s in k]
        x = ops.convolution(x, ops.constant(w), [1, 1, 1], pad, pad, [1, 1, 1])
        x = ops.add(x, ops.constant(rng.standard_normal((1, cout, 1, 1, 1)).astype(np.float32)))
        if cout == 4:
            x = ops.relu(x)
    return ov.Model([x], [param], "asymmetric")


def whole_volume_labels(model: ov.Model, vol: np.ndarray) -> np.ndarray:
    """Independent reference: the whole (x, y, z) volume through OpenVINO f32 in one inference, argmax."""
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled(vol.astype(np.float32)[None, None])[0][0]
    return out.argmax(0)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    vol = (rng.standard_normal(SHAPE) * 300).astype(np.int16)
    vol[4:15, 3:9, 2:12] += 900  # an off-centre block: structure that no flip or transpose maps onto itself
    nib.save(nib.Nifti1Image(vol, AFFINE), str(tmp / "v.nii.gz"))
    model = asymmetric_model()
    ov.save_model(model, str(tmp / "asym.xml"))
    ok("run", tmp / "v.nii.gz", "-m", tmp / "asym.xml", "-o", tmp / "direct.nii.gz", *RUN)
    direct = labels(tmp / "direct.nii.gz")
    np.testing.assert_array_equal(direct, whole_volume_labels(model, vol))
    return tmp, vol, direct


def test_model_is_asymmetric(env):
    """The test's premise: feeding the volume transposed or flipped changes the labels."""
    tmp, vol, direct = env
    model = asymmetric_model()
    moved = whole_volume_labels(model, vol.transpose(2, 1, 0)).transpose(2, 1, 0)
    flipped = whole_volume_labels(model, vol[::-1])[::-1]
    assert (moved == direct).mean() < 0.9 and (flipped == direct).mean() < 0.99
    assert len(np.unique(direct)) == 3


@pytest.mark.parametrize("out", ["o.zarr", "o.nii"])
def test_zarr_round_trip_gives_the_direct_labels(env, out):
    """to-zarr → run → (to-nifti): the model sees the same array as for the NIfTI file (it saw it transposed)."""
    tmp, _, direct = env
    store = tmp / "v.zarr"
    if not store.exists():
        ok("to-zarr", tmp / "v.nii.gz", "-o", store, "--chunks", "8")
    target = tmp / f"rt_{out}"
    ok("run", store, "-m", tmp / "asym.xml", "-o", target, *RUN, "--block", "16")
    if out.endswith(".zarr"):
        ok("to-nifti", target, "-o", tmp / "rt_back.nii")
        target = tmp / "rt_back.nii"
    np.testing.assert_array_equal(labels(target), direct)
    np.testing.assert_allclose(nib.load(str(target)).affine, AFFINE)


def test_zarr_axes_metadata_is_read(env, tmp_path):
    """A plain Zarr array that names its axes (x, y, z) is read by those names; without names, as (z, y, x)."""
    import zarr

    tmp, vol, direct = env
    named = zarr.create_array(str(tmp_path / "xyz.zarr"), shape=vol.shape, dtype=vol.dtype, chunks=(8, 8, 8),
                              dimension_names=["x", "y", "z"])
    named[:] = vol
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=vol.shape[::-1], dtype=vol.dtype, chunks=(8, 8, 8))
    plain[:] = vol.transpose(2, 1, 0)
    for store in ("xyz.zarr", "plain.zarr"):
        ok("run", tmp_path / store, "-m", tmp / "asym.xml", "-o", tmp_path / f"{store}.nii", *RUN, "--block", "16")
        np.testing.assert_array_equal(labels(tmp_path / f"{store}.nii"), direct)


def test_zarr_round_trip_keeps_the_nifti_header(env, tmp_path):
    """to-zarr → to-nifti keeps sform code 4 (MNI), the qform code and mm units (issue 25), voxels bit for bit."""
    tmp, vol, _ = env
    img = nib.Nifti1Image(vol, AFFINE)
    img.header.set_sform(AFFINE, code=4)
    img.header.set_qform(AFFINE, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp_path / "mni.nii"))
    ok("to-zarr", tmp_path / "mni.nii", "-o", tmp_path / "mni.zarr")
    ok("to-nifti", tmp_path / "mni.zarr", "-o", tmp_path / "back.nii")
    back = nib.load(str(tmp_path / "back.nii"))
    assert int(back.header["sform_code"]) == 4 and int(back.header["qform_code"]) == 2
    assert back.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(back.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(back.dataobj), vol)


def test_float16_zarr_output_to_nifti(env):
    """run --float16 -o p.zarr then to-nifti: float32 NIfTI with the same values (was HeaderDataError)."""
    tmp, _, _ = env
    ok("run", tmp / "v.nii.gz", "-m", tmp / "asym.xml", "-o", tmp / "p16.zarr", "--kind", "probabilities",
       "--float16", *RUN)
    ok("to-nifti", tmp / "p16.zarr", "-o", tmp / "p16.nii")
    import zarr

    stored = zarr.open_group(str(tmp / "p16.zarr"))["0"][:]
    back = nib.load(str(tmp / "p16.nii"))
    assert stored.dtype == np.float16 and back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.moveaxis(stored, 0, -1).transpose(2, 1, 0, 3))


def _write_formats(tmp: Path, vol: np.ndarray) -> dict[str, Path]:
    """The same voxels as a TIFF stack (pages = z, rows = y, columns = x), plain and compressed, and as .mha, .mhd,
    .nrrd written by SimpleITK, raw and compressed. ITK's LPS origin/direction here make the RAS affine AFFINE."""
    import SimpleITK as sitk
    import tifffile

    zyx = vol.transpose(2, 1, 0)
    out = {"tif": tmp / "v.tif", "tif_zlib": tmp / "v_zlib.tiff"}
    tifffile.imwrite(out["tif"], zyx, photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(out["tif_zlib"], zyx, photometric="minisblack", compression="zlib")
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing(np.diag(AFFINE)[:3].tolist())
    img.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])  # RAS axes in LPS terms
    img.SetOrigin([-AFFINE[0, 3], -AFFINE[1, 3], AFFINE[2, 3]])
    for name, compress in (("mha", False), ("mhd", False), ("nrrd", False), ("mha_gz", True), ("nrrd_gz", True)):
        out[name] = tmp / f"v_{name}.{name.split('_')[0]}"
        sitk.WriteImage(img, str(out[name]), compress)
    return out


def test_every_format_gives_the_direct_labels(env):
    """Acceptance (issue 23): TIFF stacks, .mha, .mhd and .nrrd of the same voxels give 100% the direct run's
    labels (raw files through the lazy strip reader, compressed ones through a window of planes: decoded pages, or
    zlib/gzip streams decompressed as read); the ITK files' affine is RAS."""
    from volinfer.io.sources import open_paths
    from volinfer.io.reader import StreamChannel, StripChannel

    tmp, vol, direct = env
    for name, path in _write_formats(tmp, vol).items():
        with open_paths([path], 8) as src:
            assert src.shape == SHAPE
            assert isinstance(src.readers[0], StripChannel) == (not name.endswith(("_gz", "_zlib")))
            assert isinstance(src.readers[0], StreamChannel) == name.endswith("_gz")
            if not name.startswith("tif"):
                np.testing.assert_allclose(src.affine, AFFINE, atol=1e-9)
        ok("run", path, "-m", tmp / "asym.xml", "-o", tmp / f"out_{name}.nii", *RUN)
        got = labels(tmp / f"out_{name}.nii")
        assert (got == direct).mean() == 1.0, name


def test_tiff_input_tiff_output(env):
    """A TIFF stack in, a TIFF stack out (pages = z): the direct labels, with the voxel size (OME, µm) kept."""
    import tifffile

    tmp, vol, direct = env
    src = tmp / "ome.ome.tif"
    tifffile.imwrite(src, vol.transpose(2, 1, 0), photometric="minisblack", ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 900.0, "PhysicalSizeY": 1100.0, "PhysicalSizeZ": 1300.0})
    ok("run", src, "-m", tmp / "asym.xml", "-o", tmp / "seg.tif", *RUN)
    with tifffile.TiffFile(tmp / "seg.tif") as tf:
        out = tf.asarray()
        assert tf.is_ome and "PhysicalSizeX=\"900" in tf.ome_metadata
    np.testing.assert_array_equal(out, direct.transpose(2, 1, 0))
    assert not [p for p in tmp.iterdir() if p.name.startswith(".seg.tif")]


def test_tiff_voxel_sizes_are_read_from_imagej_and_never_invented(env, tmp_path):
    """An ImageJ stack (Fiji's, most microscopy's) records its voxel size as pixels per unit and a z spacing: read
    (it was dropped, and the TIFF output claimed 1 mm voxels), in millimetres; a stack that records none gives an
    output that claims none, and a NIfTI in micrometres gives a TIFF in the same micrometres."""
    import tifffile

    tmp, vol, direct = env
    zyx = vol.transpose(2, 1, 0)
    tifffile.imwrite(tmp_path / "ij.tif", zyx, imagej=True, resolution=(1 / 0.5, 1 / 0.6),
                     metadata={"spacing": 2.0, "unit": "micron", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", zyx, photometric="minisblack")
    um = nib.Nifti1Image(vol, np.diag([900.0, 1100.0, 1300.0, 1.0]))
    um.header.set_xyzt_units("micron")
    nib.save(um, str(tmp_path / "um.nii"))
    ok("run", tmp_path / "ij.tif", "-m", tmp / "asym.xml", "-o", tmp_path / "ij.nii", *RUN)
    assert np.allclose(nib.load(str(tmp_path / "ij.nii")).affine, np.diag([0.0005, 0.0006, 0.002, 1.0]))
    assert nib.load(str(tmp_path / "ij.nii")).header.get_xyzt_units()[0] == "mm"
    np.testing.assert_array_equal(labels(tmp_path / "ij.nii"), direct)
    for src, sizes in (("ij.tif", ["0.5", "0.6", "2.0"]), ("plain.tif", None), ("um.nii", ["900.0", "1100.0", "1300.0"])):
        ok("run", tmp_path / src, "-m", tmp / "asym.xml", "-o", tmp_path / f"{src}.out.tif", *RUN)
        with tifffile.TiffFile(tmp_path / f"{src}.out.tif") as tf:
            meta = tf.ome_metadata or ""
            np.testing.assert_array_equal(tf.asarray(), direct.transpose(2, 1, 0))
        if sizes is None:
            assert "PhysicalSize" not in meta, meta
        else:
            assert all(f'PhysicalSize{ax}="{v}"' in meta for ax, v in zip("XYZ", sizes)), meta



def test_an_ome_tiff_voxel_size_is_known_only_along_every_axis(env, tmp_path):
    """OME-TIFF with PhysicalSizeX/Y but no PhysicalSizeZ (some exports write that) records no voxel size: none is
    made up for z (it was 1 mm, taken as known: a model storing 0.002 mm resampled 17 planes to 8500), the output
    claims none; sizes in Ångström are lengths like any other."""
    import tifffile

    tmp, vol, direct = env
    zyx = vol.transpose(2, 1, 0)
    tifffile.imwrite(tmp_path / "xy.ome.tif", zyx, photometric="minisblack", ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6})
    meta = {"axes": "ZYX", "PhysicalSizeX": 5000, "PhysicalSizeXUnit": "\u212b", "PhysicalSizeY": 6000,
            "PhysicalSizeYUnit": "Å", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "\u03bcm"}  # Ångström sign, Greek mu
    tifffile.imwrite(tmp_path / "a.ome.tif", zyx, photometric="minisblack", ome=True, metadata=meta)
    ok("run", tmp_path / "xy.ome.tif", "-m", tmp / "asym.xml", "-o", tmp_path / "xy.nii", *RUN)
    assert nib.load(str(tmp_path / "xy.nii")).header.get_xyzt_units()[0] == "unknown"
    ok("run", tmp_path / "xy.ome.tif", "-m", tmp / "asym.xml", "-o", tmp_path / "xy.tif", *RUN)
    with tifffile.TiffFile(tmp_path / "xy.tif") as tf:
        assert "PhysicalSize" not in (tf.ome_metadata or "")
    ok("run", tmp_path / "a.ome.tif", "-m", tmp / "asym.xml", "-o", tmp_path / "a.nii", *RUN)
    a = nib.load(str(tmp_path / "a.nii"))
    assert a.header.get_xyzt_units()[0] == "mm" and np.allclose(a.affine, np.diag([0.0005, 0.0006, 0.002, 1.0]))
    np.testing.assert_array_equal(labels(tmp_path / "a.nii"), direct)


def test_a_tiff_output_of_a_turned_volume_says_what_it_cannot_keep(env, tmp_path):
    """A TIFF stack has no orientation: from a NIfTI whose axes are rotated or flipped, the output keeps the voxels
    and the voxel size and the summary says the rest is not kept (it said nothing); from an axis-aligned one, no
    such note."""
    import json

    tmp, vol, direct = env
    turn = np.array([[0.0, -1.0, 0.0, 5.0], [1.0, 0.0, 0.0, -3.0], [0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    for name, affine, said in (("turned.nii", turn, True), ("plain.nii", np.diag([1.0, 1.0, 1.5, 1.0]), False)):
        nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / name))
        r = ok("run", tmp_path / name, "-m", tmp / "asym.xml", "-o", tmp_path / f"{name}.tif", *RUN[1:], "--json")
        notes = json.loads(r.stdout)["notes"]
        assert any("not where its axes point" in n for n in notes) == said, notes

def _refused(tmp: Path, path: Path, words: str) -> None:
    r = invoke("run", path, "-m", tmp / "asym.xml", "-o", tmp / "refused.nii", *RUN)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert words in r.output, r.output
    assert not [p for p in tmp.iterdir() if "refused" in p.name]


def test_bad_tiffs_and_lying_mha_are_refused(env, tmp_path):
    """Truncated TIFFs (raw and compressed), RGB pages, two channels, an MHA whose header claims more voxels than
    the file holds: one-line errors, before any voxel buffer of the declared size is allocated, nothing written."""
    import tifffile

    tmp, vol, _ = env
    formats = _write_formats(tmp_path, vol)
    for name in ("tif", "tif_zlib"):
        data = formats[name].read_bytes()
        cut = tmp_path / f"cut_{name}.tif"
        cut.write_bytes(data[: len(data) * 2 // 3])
        _refused(tmp, cut, "truncated")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 5, 6, 3), np.uint8), photometric="rgb")
    _refused(tmp, tmp_path / "rgb.tif", "RGB")
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((4, 2, 5, 6), np.uint16), imagej=True, metadata={"axes": "ZCYX"})
    _refused(tmp, tmp_path / "two.tif", "2 channels")
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((4, 5, 6), np.uint16), imagej=True, metadata={"axes": "TYX"})
    _refused(tmp, tmp_path / "movie.tif", "time series")
    text = formats["mha"].read_bytes()
    lying = tmp_path / "lying.mha"
    lying.write_bytes(text.replace(b"DimSize = 27 21 17", b"DimSize = 27 21 9000"))
    _refused(tmp, lying, "header describes")
    gz = formats["mha_gz"].read_bytes()
    bomb = tmp_path / "bomb.mha"
    bomb.write_bytes(gz.replace(b"DimSize = 27 21 17", b"DimSize = 27000 21000 17000"))
    _refused(tmp, bomb, "header describes")
    header = tmp_path / "h.mhd"  # a header naming the output as its data file: the output may not replace it
    header.write_bytes(formats["mhd"].read_bytes().replace(b"v_mhd.raw", b"refused.nii"))
    (tmp_path / "refused.nii").write_bytes((tmp_path / "v_mhd.raw").read_bytes())
    r = invoke("run", header, "-m", tmp / "asym.xml", "-o", tmp_path / "refused.nii", "--overwrite", *RUN)
    assert r.exit_code == 2 and "input" in r.output, r.output
    assert (tmp_path / "refused.nii").read_bytes() == (tmp_path / "v_mhd.raw").read_bytes()


def _model_with(tmp: Path, name: str, **stored: object) -> Path:
    """The asymmetric model with stored settings (as `volinfer convert` writes them into rt_info)."""
    import json

    model = asymmetric_model()
    for key, value in stored.items():
        model.set_rt_info(json.dumps(value), ["volinfer", key])
    ov.save_model(model, str(tmp / name))
    return tmp / name


def test_convert_stores_orientation(env, tmp_path):
    """`convert --orientation ras` stores RAS; a bad code is a one-line error."""
    from volinfer.model.tile_model import TileModel

    tmp, _, _ = env
    ok("convert", tmp / "asym.xml", "-o", tmp_path / "ras.xml", "--orientation", "ras", "--no-check",
       "--no-receptive-field", "--no-speed-profile", "-q")
    assert TileModel(tmp_path / "ras.xml", compile=False).settings.orientation == "RAS"
    r = invoke("convert", tmp / "asym.xml", "-o", tmp_path / "bad.xml", "--orientation", "RAR", "-q")
    assert r.exit_code == 2 and "orientation" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("codes", ["LAS", "PSL"])
def test_reoriented_volume_gives_the_ras_labels_mapped_back(env, tmp_path, codes):
    """Acceptance: the volume stored LAS (x flipped) or PSL (axes permuted and flipped), into a model that stores
    RAS, gives the RAS run's labels mapped back onto its own grid: exactly (permutations and flips only)."""
    tmp, vol, direct = env
    xml = _model_with(tmp_path, "ras.xml", orientation="RAS")
    ras = nib.Nifti1Image(vol, AFFINE)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(AFFINE),
                                           nib.orientations.axcodes2ornt(tuple(codes)))
    stored = ras.as_reoriented(ornt)
    assert "".join(nib.aff2axcodes(stored.affine)) == codes
    nib.save(stored, str(tmp_path / "v.nii.gz"))
    r = ok("run", tmp_path / "v.nii.gz", "-m", xml, "-o", tmp_path / "o.nii.gz", *RUN[1:])
    assert f"reoriented {codes} -> RAS" in r.output
    out = nib.load(str(tmp_path / "o.nii.gz"))
    expected = nib.orientations.apply_orientation(direct, ornt)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)
    np.testing.assert_allclose(out.affine, stored.affine)
    # the same through Zarr: the store's affine is the volume's, so the run reorients it the same way
    ok("to-zarr", tmp_path / "v.nii.gz", "-o", tmp_path / "v.zarr", "--chunks", "8")
    ok("run", tmp_path / "v.zarr", "-m", xml, "-o", tmp_path / "oz.nii", *RUN[1:])
    np.testing.assert_array_equal(labels(tmp_path / "oz.nii"), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".volinfer-grid")]


def _resample_reference(vol: np.ndarray, ratio: tuple[float, ...], shape: tuple[int, ...], order: int) -> np.ndarray:
    """scipy.ndimage: sample (j + 0.5) * ratio - 0.5 along each axis (voxel centres aligned), edges repeated."""
    from scipy import ndimage

    axes = [np.clip((np.arange(n) + 0.5) * r - 0.5, 0, m - 1) for n, r, m in zip(shape, ratio, vol.shape)]
    if order == 0:
        axes = [np.floor(a + 0.5) for a in axes]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(vol.astype(np.float32), coords, order=min(order, 1), mode="nearest")


def test_spacing_is_resampled_and_mapped_back(tmp_path):
    """Acceptance: a 0.8x0.8x1.5 mm volume into a model storing 1x1x1 mm: the labels of scipy's linear resampling
    to 1 mm -> whole-volume OpenVINO f32 inference -> softmax -> linear back -> argmax (nnU-Net's way: labels taken
    on the volume's grid, not nearest labels of the model's grid, which agreed with it at Dice 0.92 for class 0);
    --no-resample runs at the volume's own size and says so."""
    shape, vox = (41, 37, 19), (0.8, 0.8, 1.5)
    rng = np.random.default_rng(9)
    x, y, z = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vox)], indexing="ij")
    vol = (300 * np.sin(x / 4.0) * np.cos(y / 5.0) + 200 * np.sin(z / 3.0) + rng.normal(0, 20, shape)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([*vox, 1.0])), str(tmp_path / "v.nii"))
    xml = _model_with(tmp_path, "mm.xml", spacing=[1, 1, 1], orientation="RAS")
    r = ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "o.nii.gz", *RUN[1:])
    assert "resampled 0.8x0.8x1.5 mm -> 1x1x1 mm" in r.output
    got = np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj)
    grid = tuple(int(round(n * v)) for n, v in zip(shape, vox))
    fine = _resample_reference(vol, (1 / 0.8, 1 / 0.8, 1 / 1.5), grid, 1)
    compiled = ov.Core().compile_model(asymmetric_model(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = compiled(fine.astype(np.float32)[None, None])[0][0]
    probs = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    expected = np.argmax([_resample_reference(p, vox, shape, 1) for p in probs], axis=0)
    assert got.shape == shape and np.allclose(nib.load(str(tmp_path / "o.nii.gz")).affine, np.diag([*vox, 1.0]))
    assert "(probabilities, linear, labelled there)" in r.output and "(labels, uint8)" in r.output, r.output
    assert (got == expected).mean() >= 0.999, (got == expected).mean()  # (float32 ties: the two sides' rounding)
    refused = invoke("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "o2.nii", "--channels", "1", *RUN[1:])
    assert refused.exit_code == 2 and "--channels selects" in refused.output, refused.output
    ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "o2.nii", *RUN[1:])  # (the refusal held its lock)
    r = ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "nr.nii", "--no-resample", *RUN[1:])
    assert "--no-resample" in r.output
    ok("run", tmp_path / "v.nii", "-m", _model_with(tmp_path, "plain.xml"), "-o", tmp_path / "plain.nii", *RUN[1:])
    np.testing.assert_array_equal(labels(tmp_path / "nr.nii"), labels(tmp_path / "plain.nii"))



def test_masks_mapped_back_are_the_probabilities_mapped_back_above_the_threshold(tmp_path):
    """Sigmoid masks of kept channels through the model's grid: each the resampled probability above --threshold,
    voxel for voxel what --kind probabilities writes (the threshold is not passed to the probabilities run, which
    refuses one)."""
    vol = np.random.default_rng(4).normal(0, 300, (29, 23, 13)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.9, 1.5, 1.0])), str(tmp_path / "v.nii"))
    xml = _model_with(tmp_path, "mm.xml", spacing=[1, 1, 1])
    common = ["--activation", "sigmoid", "--channels", "0,2", *RUN[1:]]
    r = ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "m.nii", "--threshold", "0.4", *common)
    assert "(probabilities, linear, labelled there)" in r.output, r.output
    ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "p.nii", "--kind", "probabilities", *common)
    masks, probs = labels(tmp_path / "m.nii"), labels(tmp_path / "p.nii")
    assert masks.shape == probs.shape == (29, 23, 13, 2) and 0.05 < masks.mean() < 0.95
    np.testing.assert_array_equal(masks, probs > 0.4)

def _ome_store(path: Path, zyx: np.ndarray, scale_zyx: list[float], unit: str) -> None:
    """An OME-Zarr 0.5 image written by hand (as a microscope's software writes one): level 0 in (z, y, x)."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("0", shape=zyx.shape, dtype=zyx.dtype, chunks=zyx.shape)[:] = zyx
    axes = [{"name": n, "type": "space", "unit": unit} for n in "zyx"]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale_zyx}]}]}]}


def test_voxel_sizes_in_micrometres_are_resampled_as_millimetres(tmp_path):
    """The same 0.8x0.8x1.5 mm volume said in micrometres (a NIfTI header's xyzt_units, an OME-Zarr axis unit) is
    resampled to a model's stored 1 mm exactly as the millimetre file is (it was taken as 800 mm: a 1000x error,
    or a refusal for a temporary file of terabytes); the output keeps the input's own geometry and unit. A unit that
    is no length is refused in one line, unless --no-resample."""
    shape, vox = (41, 37, 19), (0.8, 0.8, 1.5)
    rng = np.random.default_rng(9)
    x, y, z = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vox)], indexing="ij")
    vol = (300 * np.sin(x / 4.0) * np.cos(y / 5.0) + 200 * np.sin(z / 3.0) + rng.normal(0, 20, shape)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([*vox, 1.0])), str(tmp_path / "mm.nii"))
    um = nib.Nifti1Image(vol, np.diag([*(1000 * v for v in vox), 1.0]))
    um.header.set_xyzt_units("micron")
    nib.save(um, str(tmp_path / "um.nii"))
    _ome_store(tmp_path / "um.zarr", vol.transpose(2, 1, 0), [1500.0, 800.0, 800.0], "micrometer")
    _ome_store(tmp_path / "odd.zarr", vol.transpose(2, 1, 0), [1.5, 0.8, 0.8], "parsec")
    xml = _model_with(tmp_path, "mm.xml", spacing=[1, 1, 1], orientation="RAS")
    ok("run", tmp_path / "mm.nii", "-m", xml, "-o", tmp_path / "mm_out.nii", *RUN[1:])
    want = labels(tmp_path / "mm_out.nii")
    for name in ("um.nii", "um.zarr"):
        r = ok("run", tmp_path / name, "-m", xml, "-o", tmp_path / f"{name}_out.nii", *RUN[1:])
        assert "resampled 0.8x0.8x1.5 mm -> 1x1x1 mm" in r.output, r.output
        assert "check both units" not in r.output  # 1.25x and 0.67x: no unit said wrongly
        np.testing.assert_array_equal(labels(tmp_path / f"{name}_out.nii"), want)
    wrong = nib.Nifti1Image(vol, np.diag([*vox, 1.0]))  # millimetres in a header that says micrometres
    wrong.header.set_xyzt_units("micron")
    nib.save(wrong, str(tmp_path / "wrong.nii"))
    r = ok("run", tmp_path / "wrong.nii", "-m", xml, "-o", tmp_path / "wrong_out.nii", *RUN[1:])
    assert "41x37x19 -> 1x1x1 voxels" in r.output, r.output  # the whole volume into one voxel: said
    assert "the model's voxels are 1250x larger than the volume's along an axis: check both units" in r.output
    for name in ("um.nii", "um.zarr"):  # the output says the input's unit (a Zarr-born one said "unknown": mm)
        out = nib.load(str(tmp_path / f"{name}_out.nii"))
        assert np.allclose(out.affine, um.affine) and out.header.get_xyzt_units()[0] == "micron"
    r = invoke("run", tmp_path / "odd.zarr", "-m", xml, "-o", tmp_path / "odd.nii", *RUN[1:])
    assert r.exit_code != 0 and "not a length volinfer knows" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "odd.nii").exists()
    ok("run", tmp_path / "odd.zarr", "-m", xml, "-o", tmp_path / "odd.nii", "--no-resample", *RUN[1:])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _full_disk_after(monkeypatch, module: str, calls: int) -> None:
    """Make the ``calls``-th chunk fsync of ``module`` fail as a full disk does."""
    import errno

    real, seen = getattr(__import__(module, fromlist=["sync_region"]), "sync_region"), [0]

    def sync_region(*a, **k):
        seen[0] += 1
        if seen[0] >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(f"{module}.sync_region", sync_region)


@pytest.mark.parametrize("source", ["nifti", "zarr"])
def test_full_disk_while_writing_ome_zarr_is_resumable(env, tmp_path, monkeypatch, source):
    """ENOSPC while writing an OME-Zarr output (stream writer for NIfTI inputs, blocks for Zarr inputs): a one-line
    error, the store and its state kept, and --resume finishes it with the bytes of an uninterrupted run. The
    store holds nothing a Zarr reader warns about (volinfer's journal and block markers lie beside it)."""
    import warnings

    import zarr

    tmp, _, _ = env
    src = tmp / "v.nii.gz"
    if source == "zarr":
        src = tmp_path / "in.zarr"
        ok("to-zarr", tmp / "v.nii.gz", "-o", src, "--chunks", "8")
    args = ["-m", tmp / "asym.xml", "--chunks", "8", *(["--block", "16"] if source == "zarr" else []), *RUN]
    ok("run", src, "-o", tmp_path / "whole.zarr", *args)
    module = "volinfer.io.zarr_writer" if source == "nifti" else "volinfer.run.distributed"
    _full_disk_after(monkeypatch, module, 2)
    r = invoke("run", src, "-o", tmp_path / "cut.zarr", *args)
    monkeypatch.undo()
    assert r.exit_code == 2 and "No space left on device" in r.output and "--resume" in r.output, r.output
    assert "internal error" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "cut.zarr").exists() and (tmp_path / ".cut.zarr.partial.zarr").is_dir()  # kept hidden
    ok("run", src, "-o", tmp_path / "cut.zarr", "--resume", *args)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cut.zarr")) == []  # no clutter left
    assert _files(tmp_path / "cut.zarr") == _files(tmp_path / "whole.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(tmp_path / "cut.zarr"), mode="r")
        assert sorted(group.keys()) == ["0"] and group["0"].shape == SHAPE[::-1]


def test_stack_without_geometry_is_not_reoriented_or_resampled(env, tmp_path):
    """A TIFF stack records no orientation (and without OME sizes no voxel size): a model storing RAS and 2 mm runs
    it as is, and the summary says why, instead of flipping or resampling it on a guess."""
    tmp, vol, direct = env
    path = _write_formats(tmp_path, vol)["tif"]
    xml = _model_with(tmp_path, "lps.xml", orientation="LPS", spacing=[2, 2, 2])
    r = ok("run", path, "-m", xml, "-o", tmp_path / "o.nii", *RUN[1:])
    assert "no anatomical orientation" in r.output and "no voxel size" in r.output
    np.testing.assert_array_equal(labels(tmp_path / "o.nii"), direct)


def test_interrupted_tiff_run_resumes_byte_identical(env, tmp_path, monkeypatch):
    """TIFF in, TIFF out, interrupted part-way: --resume continues the temporary stack (content fingerprint of the
    TIFF's voxels) and writes the bytes of an uninterrupted run; a changed input is refused."""
    import tifffile

    from volinfer.io.tiff_io import TiffWriter

    tmp, vol, _ = env
    src = _write_formats(tmp_path, vol)["tif"]
    args = ["-m", tmp / "asym.xml", "--engine", "tiles", *RUN]
    ok("run", src, "-o", tmp_path / "whole.tif", *args)
    real, calls = TiffWriter.write, [0]

    def write(self, *a):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt()
        real(self, *a)

    monkeypatch.setattr(TiffWriter, "write", write)
    assert invoke("run", src, "-o", tmp_path / "cut.tif", *args).exit_code == 130
    monkeypatch.undo()
    assert not (tmp_path / "cut.tif").exists() and (tmp_path / ".cut.tif.partial.tif").exists()
    changed = tmp_path / "changed.tif"
    tifffile.imwrite(changed, (vol + 1).transpose(2, 1, 0), photometric="minisblack")
    os_replace = __import__("os").replace
    os_replace(src, tmp_path / "orig.tif")
    os_replace(changed, src)
    r = invoke("run", src, "-o", tmp_path / "cut.tif", "--resume", *args)
    assert r.exit_code == 2 and "cannot resume" in r.output, r.output
    os_replace(tmp_path / "orig.tif", src)
    ok("run", src, "-o", tmp_path / "cut.tif", "--resume", *args)
    assert (tmp_path / "cut.tif").read_bytes() == (tmp_path / "whole.tif").read_bytes()


def test_ome_zarr_with_time_and_channel_axes(env, tmp_path):
    """An OME-Zarr image as other tools write it, (t, c, z, y, x) with t = c = 1, its scale in the NGFF metadata:
    read by its axes' names, the model sees the direct run's array; a time axis longer than 1 is refused in one
    line."""
    import zarr

    tmp, vol, direct = env
    for name, t in (("tczyx.zarr", 1), ("movie.zarr", 2)):
        group = zarr.open_group(str(tmp_path / name), mode="w")
        arr = group.create_array("0", shape=(t, 1, *vol.shape[::-1]), chunks=(1, 1, 8, 8, 8), dtype=vol.dtype)
        arr[:] = np.broadcast_to(vol.transpose(2, 1, 0), arr.shape)
        axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + \
            [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]
        scale = [1.0, 1.0, *np.diag(AFFINE)[:3][::-1]]
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}
    ok("run", tmp_path / "tczyx.zarr", "-m", tmp / "asym.xml", "-o", tmp_path / "o.nii", *RUN, "--block", "16")
    np.testing.assert_array_equal(labels(tmp_path / "o.nii"), direct)
    np.testing.assert_allclose(np.diag(nib.load(str(tmp_path / "o.nii")).affine), np.diag(AFFINE))
    r = invoke("run", tmp_path / "movie.zarr", "-m", tmp / "asym.xml", "-o", tmp_path / "m.nii", *RUN)
    assert r.exit_code == 2 and "axis 't' has length 2" in r.output and len(r.output.strip().splitlines()) == 1


def test_compressed_bombs_are_refused_before_allocation(env, tmp_path):
    """A zlib TIFF whose pages claim 50000x50000 pixels, and a bzip2 NRRD (expansion unbounded): one-line errors
    before any page window or volume of that size exists."""
    import tifffile

    tmp, vol, _ = env
    big = tmp_path / "bomb.tif"
    tifffile.imwrite(big, np.zeros((2, 64, 64), np.uint8), compression="zlib", metadata=None, rowsperstrip=64)
    data = bytearray(big.read_bytes())
    with tifffile.TiffFile(big) as tf:  # ImageWidth, ImageLength, RowsPerStrip of every page, patched in place
        for page in tf.pages:
            for code in (256, 257, 278):
                tag = page.tags[code]
                data[tag.valueoffset : tag.valueoffset + 2] = (50000).to_bytes(2, "little")
    big.write_bytes(bytes(data))
    _refused(tmp, big, "compressed bytes")
    nrrd = _write_formats(tmp_path, vol)["nrrd"]
    bz = tmp_path / "bz.nrrd"
    bz.write_bytes(nrrd.read_bytes().replace(b"encoding: raw", b"encoding: bzip2"))
    _refused(tmp, bz, "bzip2")


def test_model_grid_run_failures_leave_nothing(env, tmp_path, monkeypatch):
    """A full disk while a model-grid run writes its output: one line that does not promise --resume (such runs
    keep nothing), no output, no temporary directory; --resume itself is refused in one line."""
    import errno

    from volinfer.io.writer import NiftiWriter

    tmp, vol, _ = env
    nib.save(nib.Nifti1Image(vol[::-1], AFFINE @ np.diag([-1, 1, 1, 1])), str(tmp_path / "las.nii"))
    xml = _model_with(tmp_path, "ras.xml", orientation="RAS")
    real = NiftiWriter.write

    def write(self, block, z0, y0):  # the final output's first positioned write fails as on a full disk
        if self.target.name == "o.nii":
            monkeypatch.setattr("volinfer.portable.pwrite_all", enospc)
        real(self, block, z0, y0)

    def enospc(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NiftiWriter, "write", write)
    r = invoke("run", tmp_path / "las.nii", "-m", xml, "-o", tmp_path / "o.nii", *RUN)
    monkeypatch.undo()
    assert r.exit_code == 2 and "No space left" in r.output and "not resumable" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["las.nii", "ras.bin", "ras.xml"]
    r = invoke("run", tmp_path / "las.nii", "-m", xml, "-o", tmp_path / "o.nii", "--resume", *RUN)
    assert r.exit_code == 2 and "--resume is not available" in r.output


def test_model_grid_probabilities_into_float16_zarr(env, tmp_path):
    """Probabilities through the model grid (reoriented and resampled) into a float16 OME-Zarr: mapped back
    linearly onto the input's grid (so they still sum to 1), stored float16 with the input's affine."""
    import zarr

    from volinfer.io.zarr_io import store_geometry

    tmp, vol, _ = env
    affine = np.diag([-0.8, 0.8, 1.5, 1.0])  # LAS, anisotropic
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "v.nii"))
    xml = _model_with(tmp_path, "g.xml", orientation="RAS", spacing=[1, 1, 1])
    r = ok("run", tmp_path / "v.nii", "-m", xml, "-o", tmp_path / "p.zarr", "--kind", "probabilities", "--float16",
           *RUN[1:])
    assert "reoriented LAS -> RAS" in r.output and "(linear)" in r.output
    probs = zarr.open_group(str(tmp_path / "p.zarr"))["0"][:]
    assert probs.dtype == np.float16 and probs.shape == (3, *SHAPE[::-1])
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    np.testing.assert_allclose(store_geometry(tmp_path / "p.zarr").affine, affine)


def test_channel_files_on_different_grids_are_refused_in_one_line(tmp_path):
    """One file per channel: TIFF stacks and MHA files whose shapes differ are refused before any work, naming the
    file (both formats open their channels through volinfer.io.reader.open_channels)."""
    sitk = pytest.importorskip("SimpleITK")
    tifffile = pytest.importorskip("tifffile")
    from volinfer.errors import VolinferError
    from volinfer.io.sources import open_paths

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((5, 6, 7), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((5, 6, 8), np.uint16), photometric="minisblack")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16)), str(tmp_path / "a.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 8), np.int16)), str(tmp_path / "b.mha"))
    for kind in ("tif", "mha"):
        with pytest.raises(VolinferError, match=f"b.{kind}: its grid .* differs from .*a.{kind}'s") as e:
            open_paths([tmp_path / f"a.{kind}", tmp_path / f"b.{kind}"], 4)
        assert "\n" not in str(e.value)
        with open_paths([tmp_path / f"a.{kind}", tmp_path / f"a.{kind}"], 4) as src:
            assert src.channels == 2 and tuple(src.shape) == (7, 6, 5)


def test_compressed_tiff_window_moves_keep_every_plane(tmp_path, monkeypatch):
    """A compressed stack is decoded page by page into a window of whole planes; windows moving forward, backward,
    overlapping or not (and growing) give the stored planes, and planes two windows share are moved within the
    window, not decoded again."""
    tifffile = pytest.importorskip("tifffile")
    from volinfer.io import tiff_io

    zyx = np.random.default_rng(3).integers(0, 1000, (23, 7, 9)).astype(np.uint16)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, zyx, photometric="minisblack", compression="zlib")
    ch = tiff_io.PageChannel(path, (9, 7, 23), np.dtype(np.uint16), 4)
    decoded, page = [], ch._page
    monkeypatch.setattr(ch, "_page", lambda z: decoded.append(z) or page(z))
    for z0, z1 in ((0, 4), (1, 5), (3, 7), (6, 10), (4, 8), (2, 5), (10, 14), (12, 19), (17, 23), (16, 20)):
        decoded.clear()
        w0, w1 = ch._w0, ch._w1
        got = ch.planes(z0, z1)
        np.testing.assert_array_equal(got, zyx[z0:z1].transpose(2, 1, 0), err_msg=f"planes {z0}-{z1}")
        assert decoded == [z for z in range(z0, z1) if not w0 <= z < w1], (z0, z1, decoded)
    ch.close()


def test_compressed_mha_and_nrrd_stream_a_window_of_planes(tmp_path):
    """Compressed MetaImage (one zlib stream, attached and detached .zraw) and gzip NRRD (attached, detached .raw.gz,
    big-endian) are decompressed as read into a window of whole planes, never whole: the same voxels SimpleITK
    decodes, windows moving forward and back; a truncated or corrupted stream is a one-line error."""
    import gzip as gz
    import zlib

    import SimpleITK as sitk
    from volinfer.errors import VolinferError
    from volinfer.io.reader import StreamChannel, read_buffer
    from volinfer.io.sources import open_paths

    zyx = np.random.default_rng(4).integers(-900, 900, (19, 13, 11)).astype(np.int16)
    img = sitk.GetImageFromArray(zyx)
    files = {name: tmp_path / name for name in ("a.mha", "d.mhd", "a.nrrd", "d.nhdr")}
    for path in files.values():
        sitk.WriteImage(img, str(path), True)
    big, little = zyx.astype(">i2").tobytes(), zyx.astype("<i2").tobytes()

    def nrrd(name, body, endian="little", encoding="gzip", extra="", eol="\n"):
        head = ["NRRD0004", "type: int16", "dimension: 3", "sizes: 11 13 19", f"endian: {endian}",
                f"encoding: {encoding}", *([extra] if extra else []), "", ""]
        files[name] = tmp_path / name
        files[name].write_bytes(eol.join(head).encode() + body)

    nrrd("big.nrrd", gz.compress(big), endian="BIG")  # (field values in any case, as teem reads them)
    nrrd("members.nrrd", gz.compress(little[:999]) + gz.compress(little[999:]))  # bgzip/pigz: several members
    nrrd("crlf.nrrd", gz.compress(little), eol="\r\n")
    mha = (tmp_path / "a.mha").read_bytes()
    head = mha[: mha.index(b"LOCAL\n") + 6].replace(b"CompressedData = True", b"CompressedData = 1")
    files["msb.mha"] = tmp_path / "msb.mha"  # MetaIO's booleans: True, T, 1
    files["msb.mha"].write_bytes(head.replace(b"BinaryDataByteOrderMSB = False", b"BinaryDataByteOrderMSB = T")
                                 + zlib.compress(big))
    for name, path in files.items():
        with open_paths([path], 4) as src:
            assert isinstance(src.readers[0], StreamChannel) and read_buffer(src.readers) == "planes", name
            ch = src.readers[0]
            for z0, z1 in ((0, 4), (2, 6), (9, 13), (1, 5), (15, 19)):
                np.testing.assert_array_equal(ch.planes(z0, z1), zyx[z0:z1].transpose(2, 1, 0), err_msg=name)
    nrrd("skip.nrrd", gz.compress(bytes(10) + little), extra="byteskip: 10")  # (teem's spellings: SimpleITK reads)
    nrrd("lines.nrrd", b"line one\n" + little, encoding="raw", extra="lineskip: 1")
    for name in ("skip.nrrd", "lines.nrrd"):
        with open_paths([files[name]], 4) as src:
            np.testing.assert_array_equal(src.readers[0].planes(0, 19), zyx.transpose(2, 1, 0), err_msg=name)
    data = files["a.mha"].read_bytes()
    for bad, what in ((data[: len(data) - 200], "truncated"), (data[:-60] + bytes(60), "corrupt")):
        (tmp_path / "bad.mha").write_bytes(bad)
        with pytest.raises(VolinferError, match=what):
            with open_paths([tmp_path / "bad.mha"], 4) as src:
                src.readers[0].planes(0, 4), src.readers[0].planes(15, 19)


def test_resampling_many_channels_holds_a_slab_of_voxels_in_all(tmp_path, monkeypatch):
    """Mapping a many-channel output back held a slab per channel (32 float channels: 1.3 GB for a run planned in
    600 MB): the batch of planes is sized for all channels together."""
    from volinfer.io import regrid
    from volinfer.io.sources import open_paths

    monkeypatch.setattr(regrid, "SLAB_VOXELS", 40 * 30 * 8)  # 8 planes of one channel
    data = np.random.default_rng(1).standard_normal((20, 15, 12, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "c.nii"))

    class Blocks:
        def __init__(self):
            self.sizes, self.out = [], np.zeros((4, 24, 30, 40), np.float32)

        def write(self, block, k0, j0):
            self.sizes.append(block.size)
            self.out[:, k0:k0 + block.shape[1]] = block

    blocks = Blocks()
    with open_paths([tmp_path / "c.nii"], 4) as src:
        regrid.resample_into(src, (40, 30, 24), (0.5, 0.5, 0.5), "linear", blocks, np.dtype(np.float32))
    assert max(blocks.sizes) <= 40 * 30 * 8 and len(blocks.sizes) == 12  # 2 planes of 4 channels a batch
    one = Blocks()
    with open_paths([tmp_path / "c.nii"], 4) as src:  # the same values as before, batch by batch
        monkeypatch.setattr(regrid, "SLAB_VOXELS", 10**9)
        regrid.resample_into(src, (40, 30, 24), (0.5, 0.5, 0.5), "linear", one, np.dtype(np.float32))
    np.testing.assert_array_equal(blocks.out, one.out)
