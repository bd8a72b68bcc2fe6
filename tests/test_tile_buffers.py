"""The tiles engine's buffers as the planner counts them (volinfer/run/tile_buffers.py) against what the engine
allocates: the crop stitcher's output strips, and what each reader holds between reads."""

import nibabel as nib
import numpy as np
import pytest
from models import save_unet2

import volinfer
from volinfer.io.reader import VolumeSource, read_buffer
from volinfer.io.sources import open_paths
from volinfer.run.tile_buffers import TileBuffers
from volinfer.tiling import stitch


@pytest.mark.parametrize("requests,constant,shape", [(2, False, (96, 96, 48)), (4, False, (96, 96, 48)),
                                                      (4, True, (160, 192, 48)), (8, True, (160, 192, 48)),
                                                      (4, True, (24, 96, 48))])
def test_crop_strips_counted_are_at_least_those_the_stitcher_holds(tmp_path, monkeypatch, requests, constant, shape):
    """Tiles are stitched in submission order (one strip open at a time), but constant tiles reuse a cached output
    and are stitched at once, ahead of the tiles in flight, opening strips of later rows (7 with 8 requests); a row
    of one tile opens and closes its strip in one step."""
    held = [0]
    add = stitch.CropStitcher.add

    def counting(self, tile, output, kept=False):
        add(self, tile, output, kept)
        held[0] = max(held[0], len(self._free) + len(self._open))

    monkeypatch.setattr(stitch.CropStitcher, "add", counting)
    xml = save_unet2(tmp_path / "m.xml", receptive_field="[4, 4, 4]")
    rng = np.random.default_rng(0)
    v = rng.standard_normal(shape).astype(np.float32)
    if constant:  # only the first tile of each row varies: the others reuse the constant tile's output
        v[12:] = 0.0
    _, rep = volinfer.predict(v, str(xml), tile=[24, 24, 24], overlap=8, requests=requests, report=True, kind="raw")
    counts = rep.grid
    tb = TileBuffers(shape, 1, 4, "nothing", 2, 4, 2, requests, reuse_constant=True)
    one = 2 * 16 * 16 * shape[0] * 4 / 2**20  # one strip of the widest cores (24 - 8 overlap)
    assert held[0] >= 1 and held[0] * one <= tb.crop_stitch_mb(16, 16, counts) + 1e-9, (held[0], counts)
    if counts[0] == 1 or not constant:
        assert held[0] == 1


@pytest.mark.parametrize("mode,kind", [("crop", "labels"), ("crop", "probabilities"), ("gaussian", "labels")])
def test_cached_constant_tiles_are_what_the_planner_counts(tmp_path, monkeypatch, mode, kind):
    """Constant tiles (background, here of two values) are inferred once per value and the output kept for the
    tiles after them: post-processed as written when the run crops (a byte a voxel for labels, against 4 bytes a
    model channel), the model's float32 output when it blends. The planner counts what the engine keeps, and
    reusing it changes no output voxel (against a run without reuse)."""
    from volinfer.run import engine

    kept, stitch_ = [0], engine._Requests._stitch

    def spy(self, i):
        stitch_(self, i)
        kept[0] = max(kept[0], sum(a.nbytes for a in self.cache.values()))

    monkeypatch.setattr(engine._Requests, "_stitch", spy)
    xml = save_unet2(tmp_path / "m.xml", receptive_field="[4, 4, 4]")
    shape = (77, 80, 63)
    v = np.zeros(shape, np.float32)
    v[:, 27:] = 3.0  # two constant values: two cached outputs
    v[:20, :30, :20] = np.random.default_rng(1).standard_normal((20, 30, 20))
    kw = dict(tile=[24, 24, 24], overlap=8, stitch=mode, kind=kind, precision="f32", requests=2)
    out, rep = volinfer.predict(v, str(xml), report=True, **kw)
    np.testing.assert_array_equal(out, volinfer.predict(v, str(xml), reuse_constant=False, **kw))
    assert int(rep.extra["constant"].split()[0]) > 2
    itemsize = 1 if kind == "labels" else 4
    tb = TileBuffers(shape, 1, 4, "nothing", 1 if kind == "labels" else 2, itemsize, 2, 2)
    counted = tb.constants_mb(rep.tile, int(np.prod(rep.grid)), crop=mode == "crop")
    assert kept[0] / 2**20 == pytest.approx(counted), (kept[0] / 2**20, counted)
    if kind == "labels":  # a byte a voxel cropping; blending keeps the model's two float32 channels
        assert kept[0] == 2 * 24**3 * (1 if mode == "crop" else 8)


def test_readers_say_what_they_hold(tmp_path):
    """Uncompressed NIfTI: a strip (all of x over a tile's y and z); gzip: whole planes; arrays: nothing. The
    planner's reader memory follows (a gzip window is Y / tile_y times a strip)."""
    v = np.arange(40 * 36 * 20, dtype=np.int16).reshape(40, 36, 20)
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / name))
    with open_paths([tmp_path / "v.nii"], depth=8) as src:
        assert read_buffer(src.readers) == "strip"
    with open_paths([tmp_path / "v.nii.gz"], depth=8) as src:
        assert read_buffer(src.readers) == "planes"
    assert read_buffer(VolumeSource.from_array(v).readers) == "nothing"
    mb = {k: TileBuffers((40, 36, 20), 1, 2, k, 1, 1, 2, 2).reader_mb(12, 8) for k in ("strip", "planes", "nothing")}
    assert mb["nothing"] == 0 and mb["planes"] == pytest.approx(mb["strip"] * 36 / 12)


def test_plan_and_run_choose_the_same_tiling(tmp_path):
    """`volinfer plan` and `volinfer run` count the same buffers for the same input: a gzip input's reader holds whole
    planes (Y / tile_y times a strip), so under the same --max-memory it gets another tiling than the plain file
    (here fewer planes a tile: 136x44x40 against 76x44x96)."""
    from volinfer.run.plan import plan_run

    xml = save_unet2(tmp_path / "m.xml", receptive_field="[6, 6, 6]")
    v = np.random.default_rng(0).standard_normal((256, 512, 96)).astype(np.float32)
    kw = dict(engine="tiles", kind="raw", max_memory_mb=220.0, precision="f32")
    tiles = {}
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / name))
        planned = plan_run([tmp_path / name], xml, **kw)
        _, rep = volinfer.predict(str(tmp_path / name), str(xml), report=True, **kw)
        assert tuple(rep.tile) == tuple(planned.tile) and rep.exact, (name, rep.tile, planned.tile)
        tiles[name] = tuple(rep.tile)
    assert tiles["v.nii.gz"][2] < tiles["v.nii"][2], tiles


def test_mirroring_memory_counted_is_what_it_allocates(tmp_path, monkeypatch):
    """--mirror keeps its own infer request (input buffer, output tensor) and a float32 sum of the model's outputs:
    the planner's mirror_mb is those allocations' bytes; mirrored runs stay whole-tile averages of the flips (the
    crop stitching exact), checked against the flips computed here."""
    from volinfer.run import engine

    made = []
    init = engine.Mirror.__init__

    def spy(self, model, axes):
        init(self, model, axes)
        made.append(self)

    monkeypatch.setattr(engine.Mirror, "__init__", spy)
    xml = save_unet2(tmp_path / "m.xml", receptive_field="[4, 4, 4]")
    shape = (40, 36, 28)
    v = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    kw = dict(tile=[24, 24, 24], overlap=8, kind="raw", precision="f32", requests=2)
    out = volinfer.predict(v, str(xml), mirror="xz", **kw)
    flips = [volinfer.predict(np.flip(v, axes), str(xml), **kw) for axes in ((), (0,), (2,), (0, 2))]
    ref = sum(np.flip(f, axes) for f, axes in zip(flips, ((), (0,), (2,), (0, 2)))) / 4
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    (m,) = made
    out_bytes = m.request.get_output_tensor(0).data.nbytes
    allocated = (m.buffer.nbytes + out_bytes + m.acc.nbytes) / 2**20
    tb = TileBuffers(shape, 1, 4, "nothing", 2, 4, 2, 2, mirror=True)
    assert allocated == pytest.approx(tb.mirror_mb([24, 24, 24])), (allocated, tb.mirror_mb([24, 24, 24]))
