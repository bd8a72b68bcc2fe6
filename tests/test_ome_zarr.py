"""OME-Zarr outputs (issue 13 item 2): any input format to any output format, NGFF geometry read back by the
``ome-zarr`` package, pyramids equal to numpy downsampling, resumed Zarr outputs byte-identical."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_runs import invoke, level, ok, stop_nth
from models import save_unet2

zarr = pytest.importorskip("zarr")

from volinfer.io.zarr_writer import ZarrWriter  # noqa: E402
from volinfer.io.writer import NiftiWriter  # noqa: E402

SHAPE = (29, 23, 45)  # NIfTI (x, y, z), odd: no axis a multiple of the chunks, tile or size multiple
AFFINE = np.array([[0.5, 0, 0, -12.25], [0, 0.75, 0, 30.5], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
RUN = ["--tile", "16", "--overlap", "8", "-q"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ome")
    vol = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), str(tmp / "vol.nii.gz"))
    return tmp, tmp / "vol.nii.gz", save_unet2(tmp / "m.xml"), vol


def nifti(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_nifti_to_zarr_and_back_equals_direct_nifti_run(env):
    tmp, vol, xml, _ = env
    ok("run", vol, "-m", xml, "-o", tmp / "direct.nii", *RUN)
    ok("run", vol, "-m", xml, "-o", tmp / "a.zarr", "--chunks", "8", *RUN)
    ok("to-nifti", tmp / "a.zarr", tmp / "back.nii.gz")
    direct, aff_direct = nifti(tmp / "direct.nii")
    back, aff_back = nifti(tmp / "back.nii.gz")
    assert back.dtype == direct.dtype == np.uint8 and direct.shape == SHAPE
    np.testing.assert_array_equal(back, direct)  # bitwise: the Zarr output is the same labels, transposed to (z,y,x)
    np.testing.assert_array_equal(level(tmp / "a.zarr"), direct.transpose(2, 1, 0))
    np.testing.assert_allclose(aff_back, AFFINE)
    np.testing.assert_allclose(aff_direct, AFFINE)
    assert 0 < direct.mean() < 1  # both labels present: a constant output would compare equal trivially


def test_to_zarr_and_to_nifti_keep_the_images_meaning(env):
    """A format conversion is the same image: its intent and description come back (a model's output clears them)."""
    tmp = env[0]
    img = nib.Nifti1Image(np.arange(7 * 5 * 3, dtype=np.float32).reshape(7, 5, 3), AFFINE)
    img.header.set_intent("z score", name="tstat map")
    img.header["descrip"] = b"TE=30;Time=120000"
    nib.save(img, str(tmp / "meant.nii"))
    ok("to-zarr", tmp / "meant.nii", "-o", tmp / "meant.zarr")
    ok("to-nifti", tmp / "meant.zarr", tmp / "meant_back.nii")
    h = nib.load(str(tmp / "meant_back.nii")).header
    assert h.get_intent() == ("z score", (), "tstat map")
    assert h["descrip"].tobytes().rstrip(b"\0") == b"TE=30;Time=120000"


def test_ome_zarr_reader_sees_voxel_size_and_translation(env):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    tmp, vol, xml, _ = env
    out = tmp / "geo.zarr"
    ok("run", vol, "-m", xml, "-o", out, "--chunks", "8", "--pyramid", "1", "--kind", "probabilities", *RUN)
    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert image.specs and isinstance(image.specs[0], Multiscales)
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "z", "y", "x"]
    assert {a.get("unit") for a in image.metadata["axes"][1:]} == {"millimeter"}
    transforms = image.metadata["coordinateTransformations"]
    scale = next(t["scale"] for t in transforms[0] if t["type"] == "scale")
    shift = next(t["translation"] for t in transforms[0] if t["type"] == "translation")
    np.testing.assert_allclose(scale, [1.0, 2.0, 0.75, 0.5])  # (c, z, y, x): the affine's diagonal, reversed
    np.testing.assert_allclose(shift, [0.0, 7.0, 30.5, -12.25])
    scale1 = next(t["scale"] for t in transforms[1] if t["type"] == "scale")
    np.testing.assert_allclose(scale1, [1.0, 4.0, 1.5, 1.0])
    data = image.data  # dask arrays, one per level, as napari would get them
    assert tuple(data[0].shape) == (2, 45, 23, 29) and tuple(data[1].shape) == (2, 23, 12, 15)


def _mean_reference(a):
    """Mean of each 2x2x2 cell over the voxels present, by padding with NaN (independent of volinfer's code)."""
    c, *shape = a.shape
    padded = np.full((c, *[n + n % 2 for n in shape]), np.nan)
    padded[:, : shape[0], : shape[1], : shape[2]] = a
    cells = padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2, padded.shape[3] // 2, 2)
    return np.nanmean(cells, axis=(2, 4, 6))


@pytest.mark.parametrize("source", ["nifti", "zarr"])
def test_pyramid_levels_equal_numpy_downsampling(env, source):
    tmp, vol, xml, _ = env
    src = vol
    if source == "zarr":
        src = tmp / "src_pyr.zarr"
        if not src.exists():
            ok("to-zarr", vol, src, "--chunks", "8")
    labels, probs = tmp / f"pl_{source}.zarr", tmp / f"pp_{source}.zarr"
    block = ["--block", "16"] if source == "zarr" else []  # only Zarr inputs run block by block
    ok("run", src, "-m", xml, "-o", labels, "--chunks", "8", *block, "--pyramid", "2", *RUN)
    ok("run", src, "-m", xml, "-o", probs, "--chunks", "8", *block, "--pyramid", "2",
       "--kind", "probabilities", *RUN)
    l0, l1, l2 = (level(labels, n) for n in range(3))
    assert l0.shape == (45, 23, 29) and l1.shape == (23, 12, 15) and l2.shape == (12, 6, 8)
    np.testing.assert_array_equal(l1, l0[::2, ::2, ::2])
    np.testing.assert_array_equal(l2, l0[::4, ::4, ::4])
    p0, p1, p2 = (level(probs, n) for n in range(3))
    assert p0.shape == (2, 45, 23, 29) and p1.dtype == np.float32
    np.testing.assert_allclose(p1, _mean_reference(p0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p2, _mean_reference(p1), rtol=1e-6, atol=1e-7)
    assert not np.allclose(p1, p0[:, ::2, ::2, ::2])  # mean, not subsampling
    ok("run", src, "-m", xml, "-o", tmp / f"flat_{source}.zarr", "--chunks", "8", *block, *RUN)
    np.testing.assert_array_equal(level(tmp / f"flat_{source}.zarr"), l0)  # a pyramid leaves level 0 unchanged
    attrs = zarr.open_group(str(labels)).attrs.asdict()
    np.testing.assert_allclose(attrs["volinfer"]["affine"], AFFINE)  # the full affine kept, both paths


def test_zarr_to_nifti_run_equals_zarr_run_then_to_nifti(env):
    from volinfer import predict

    tmp, vol, xml, data = env
    src = tmp / "src.zarr"
    ok("to-zarr", vol, src, "--chunks", "8")
    for kind in ("labels", "probabilities"):
        ok("run", src, "-m", xml, "-o", tmp / f"z_{kind}.zarr", "--kind", kind, *RUN)
        ok("run", src, "-m", xml, "-o", tmp / f"z_{kind}.nii.gz", "--kind", kind, "--block", "16", *RUN)
        ok("to-nifti", tmp / f"z_{kind}.zarr", tmp / f"zz_{kind}.nii")
        direct, aff = nifti(tmp / f"z_{kind}.nii.gz")
        via, aff_via = nifti(tmp / f"zz_{kind}.nii")
        np.testing.assert_array_equal(direct, via)
        np.testing.assert_allclose(aff, AFFINE)
        np.testing.assert_allclose(aff_via, AFFINE)
    # independently: the model sees the same (x, y, z) array as for the NIfTI file (issue 23)
    ref = predict(data, str(xml), tile=16, overlap=8)
    np.testing.assert_array_equal(nifti(tmp / "z_labels.nii.gz")[0], ref)
    # --mirror names physical axes: x is the NIfTI x, whatever the Zarr array's axis order
    ok("run", src, "-m", xml, "-o", tmp / "z_mirror.nii", "--kind", "probabilities", "--mirror", "x", *RUN)
    ref = predict(data, str(xml), tile=16, overlap=8, kind="probabilities", mirror=[0])
    np.testing.assert_allclose(nifti(tmp / "z_mirror.nii")[0], ref, rtol=0, atol=1e-6)
    assert not np.allclose(nifti(tmp / "z_mirror.nii")[0], nifti(tmp / "z_probabilities.nii.gz")[0], atol=1e-6)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_resumed_nifti_to_zarr_pyramid_is_byte_identical(env, monkeypatch):
    tmp, vol, xml, _ = env
    args = ["--chunks", "8", "--pyramid", "2", "--kind", "probabilities", *RUN]
    ok("run", vol, "-m", xml, "-o", tmp / "whole.zarr", *args)
    out = tmp / "cut.zarr"
    stop_nth(monkeypatch, (ZarrWriter, "write"), 7)  # 5 rows of 2 strips: part-way through the fourth row
    assert invoke("run", vol, "-m", xml, "-o", out, *args).exit_code == 130
    monkeypatch.undo()
    assert not out.exists() and (tmp / ".cut.zarr.partial.zarr").is_dir()  # nothing under the output's name
    journal = json.loads((tmp / ".cut.zarr.partial.json").read_text())
    assert 2 <= journal["rows_done"] < journal["rows_total"] == 5  # resumes part-way, not from scratch
    ok("run", vol, "-m", xml, "-o", out, "--resume", *args)
    assert _files(out) == _files(tmp / "whole.zarr")
    assert not [p for p in os.listdir(tmp) if p.startswith(".cut.zarr")]  # journal and lock gone


def test_resumed_zarr_to_nifti_is_byte_identical(env, monkeypatch):
    tmp, vol, xml, _ = env
    src = tmp / "src_res.zarr"
    ok("to-zarr", vol, src, "--chunks", "8")
    ok("run", src, "-m", xml, "-o", tmp / "zn_whole.nii.gz", *RUN)
    stop_nth(monkeypatch, (NiftiWriter, "write"), 3)
    assert invoke("run", src, "-m", xml, "-o", tmp / "zn_cut.nii.gz", *RUN).exit_code == 130
    monkeypatch.undo()
    ok("run", src, "-m", xml, "-o", tmp / "zn_cut.nii.gz", "--resume", *RUN)
    assert (tmp / "zn_cut.nii.gz").read_bytes() == (tmp / "zn_whole.nii.gz").read_bytes()


def test_output_format_errors(env):
    tmp, vol, xml, _ = env
    r = invoke("run", vol, "-m", xml, "-o", tmp / "x.nii", "--pyramid", "1", *RUN)
    assert r.exit_code == 2 and "--pyramid applies to Zarr outputs" in r.output
    r = invoke("run", vol, "-m", xml, "-o", tmp / "x.zarr", "--workers", "2", *RUN)
    assert r.exit_code == 2 and "--scheduler/--workers" in r.output
    r = invoke("run", vol, "-m", xml, "-o", tmp / "odd.zarr", "--chunks", "7", "--pyramid", "1", *RUN)
    assert r.exit_code == 2 and "even chunk size" in r.output
    assert not (tmp / "odd.zarr").exists()
    # 45 voxels along the longest axis halve to one voxel after 6 levels: a 7th would declare scales beyond the image
    r = invoke("run", vol, "-m", xml, "-o", tmp / "deep.zarr", "--chunks", "64", "--pyramid", "7", *RUN)
    assert r.exit_code == 2 and "--pyramid 6 or fewer" in r.output, r.output
    assert not (tmp / "deep.zarr").exists()


def test_max_levels_matches_halving():
    from volinfer.io.ome import level_shapes, max_levels
    for shape in [(1, 1, 1), (2, 1, 1), (5, 3, 2), (45, 23, 29), (64, 64, 64), (65, 7, 7)]:
        k = max_levels(shape)
        shapes = level_shapes(shape, k)
        assert shapes[-1] == (1, 1, 1) and (k == 0 or shapes[-2] != (1, 1, 1)), (shape, shapes)


def test_a_damaged_or_sizeless_store_is_refused_in_one_line_and_leaves_nothing(env, tmp_path):
    """A chunk that does not decode is damaged input (exit 2, the store named; it was an 'internal error' that left an
    all-zero store looking finished at the output path); a scale of 0 is refused when the store is opened (it was
    an internal error writing NIfTI, and a degenerate affine in a Zarr output)."""
    tmp, vol_path, xml, vol = env
    ok("to-zarr", vol_path, "-o", tmp_path / "bad.zarr", "--chunks", "8")
    chunk = next(p for p in sorted((tmp_path / "bad.zarr" / "0").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    ok("to-zarr", vol_path, "-o", tmp_path / "flat.zarr")
    meta = json.loads((tmp_path / "flat.zarr" / "zarr.json").read_text())
    meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][1] = 0.0
    meta["attributes"].pop("volinfer", None)  # (its stored affine would stand in for the scale)
    (tmp_path / "flat.zarr" / "zarr.json").write_text(json.dumps(meta))
    for src, out, words in (("bad.zarr", "o.zarr", "cannot be read"), ("bad.zarr", "o.nii.gz", "cannot be read"),
                            ("flat.zarr", "f.nii.gz", "is not usable"), ("flat.zarr", "f.zarr", "is not usable")):
        r = invoke("run", tmp_path / src, "-m", xml, "-o", tmp_path / out, *RUN)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert str(tmp_path / src) in r.output and words in r.output and len(r.output.strip().splitlines()) == 1
        assert not [p for p in tmp_path.iterdir() if p.name.lstrip(".").startswith(out.split(".")[0] + ".")]


def test_a_pass_over_a_chunked_store_decodes_each_chunk_row_once(tmp_path, monkeypatch):
    """Whole planes read a few at a time (the pre-pass's slabs) come from one decoded chunk row, dropped with its
    last planes (each 128-deep chunk was decoded 8 times: 92 s of a 1024³ run); a row larger than the cache, or a
    read across rows, goes to the store as before. Values as stored, in (x, y, z)."""
    from volinfer.io import zarr_io
    from volinfer.run.plan import row_cache_mb

    data = np.random.default_rng(3).integers(0, 1000, (40, 20, 24)).astype(np.int16)  # (z, y, x)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=data.shape, chunks=(16, 8, 8), dtype="int16")
    z[:] = data
    source, _ = zarr_io.open_zarr_source(tmp_path / "v.zarr")
    reader = source.readers[0]
    reads = []
    real = reader.region
    monkeypatch.setattr(reader, "region", lambda r: reads.append(r) or real(r))
    got = np.concatenate([reader.planes(a, min(40, a + 4)) for a in range(0, 40, 4)], axis=2)
    np.testing.assert_array_equal(got, data.transpose(2, 1, 0))
    assert [r[2] for r in reads] == [(0, 16), (16, 32), (32, 40)] and reader._row is None
    reads.clear()
    np.testing.assert_array_equal(reader.planes(14, 18), data[14:18].transpose(2, 1, 0))  # across rows: direct
    monkeypatch.setattr(zarr_io, "ROW_CACHE_BYTES", 100)
    np.testing.assert_array_equal(reader.planes(0, 4), data[:4].transpose(2, 1, 0))  # too large to keep: direct
    assert [r[2] for r in reads] == [(14, 18), (0, 4)]
    assert row_cache_mb((24, 20, 40), 16, 2) == 24 * 20 * 16 * 2 / 2**20 and row_cache_mb((24, 20, 40), 1, 2) == 0


def _mixed_unit_store(path, units, scale):
    """An OME-Zarr 0.5 store whose z, y, x axes carry the units ``units`` (legal NGFF: EM pipelines write z in
    micrometres beside y, x in nanometres)."""
    vol = np.random.default_rng(3).standard_normal(SHAPE[::-1]).astype(np.float32)  # (z, y, x)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("0", shape=vol.shape, dtype=vol.dtype, chunks=(8, 8, 8))[:] = vol
    axes = [{"name": n, "type": "space", **({"unit": u} if u else {})} for n, u in zip("zyx", units)]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                    {"type": "translation", "translation": [1.0, 2.0, 3.0]}]}]}]}
    return path


def test_each_axis_is_read_in_its_own_unit(env):
    """z in micrometres, y and x in nanometres: every axis in x's unit (z 50 nm, not 0.05 nm); an output NIfTI says
    so in millimetres. Axes in different units, one of them no length: the unit is unknown, not x's."""
    from volinfer.io.ome import read_geometry

    tmp, _, xml, _ = env
    store = _mixed_unit_store(tmp / "mixed.zarr", ["micrometer", "nanometer", "nanometer"], [0.05, 8.0, 8.0])
    geom = read_geometry(dict(zarr.open_group(str(store), mode="r").attrs))
    assert geom.unit == "nanometer"
    np.testing.assert_allclose(np.diag(geom.affine)[:3], [8.0, 8.0, 50.0])  # (x, y, z) in nanometres
    np.testing.assert_allclose(geom.affine[:3, 3], [3.0, 2.0, 1000.0])  # z's translation, 1 µm, in nanometres
    ok("run", store, "-m", xml, "-o", tmp / "mixed.nii", *RUN)
    img = nib.load(str(tmp / "mixed.nii"))
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(np.diag(img.affine)[:3], [8e-6, 8e-6, 5e-5], rtol=1e-6)
    odd = _mixed_unit_store(tmp / "odd.zarr", ["parsec", "nanometer", "nanometer"], [0.05, 8.0, 8.0])
    assert read_geometry(dict(zarr.open_group(str(odd), mode="r").attrs)).unit is None
    unsaid = _mixed_unit_store(tmp / "unsaid.zarr", [None, "micrometer", "micrometer"], [2.0, 0.5, 0.5])
    geom = read_geometry(dict(zarr.open_group(str(unsaid), mode="r").attrs))  # z says none: the others' unit
    assert geom.unit == "micrometer" and np.allclose(np.diag(geom.affine)[:3], [0.5, 0.5, 2.0])
