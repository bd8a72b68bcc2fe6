"""Skewed bands (volinfer.model.band_cut, volinfer.run.skewed_bands): a stream run band after band along y, every row
of every layer computed once, the rows below each band boundary handed over through disk.

References are computed in the test: OpenVINO f32 on the whole padded volume (the unmodified model, one call); in
bf16, the same stream without bands (bands must not change a single value).
"""

from __future__ import annotations

import importlib.util
import os

import nibabel as nib
import numpy as np
import openvino as ov
import pytest

import stream_models
from models import stream_unet
from test_stream import _volume, whole_volume
from volinfer import predict
from volinfer.model.band_cut import cut_bands, y_windows
from volinfer.model.stream_graph import NotStreamable
from volinfer.model.tile_model import TileModel
from volinfer.run import setup, skewed_bands
from volinfer.model.memory import weights_mb
from volinfer.run.stream import fixed_mb, plan_stream, stream_graph_for

HAS_MONAI = all(importlib.util.find_spec(m) for m in ("torch", "monai"))

#: name -> (factory, size multiple, odd volume shape wide along y)
NETWORKS = {
    "stream_unet": (lambda: stream_unet(seed=10), 4, (23, 141, 19)),
    "transposed_k3s2": (lambda: stream_models.updown(cout=12), 2, (13, 47, 9)),
    "transposed_k4s2_asym": (lambda: stream_models.updown(k=4, pb=2, pe=0, op=0, cout=12), 2, (11, 45, 7)),
    "transposed_k3s2_grouped": (lambda: stream_models.updown(cout=12, groups=2), 2, (9, 43, 11)),
    "transposed_k3s2_phases": (lambda: stream_models.updown(cout=2), 2, (12, 40, 5)),
    "transposed_k4s2_phases_tail": (lambda: stream_models.updown(k=4, pb=2, pe=0, op=0, cout=3, tail=True), 2,
                                    (10, 38, 7)),
}


def _saved(tmp_path, model: ov.Model) -> str:
    path = str(tmp_path / "net.xml")
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def _skewed(vol, path, monkeypatch, count, **kw):
    monkeypatch.setattr(skewed_bands, "FORCE_COUNT", count)
    got = predict(vol, path, engine="stream", kind="raw", progress=False, report=True, **kw)
    out, rep = (None, got) if "output" in kw else got
    assert rep.engine == "stream" and rep.grid[1] == count, rep.notes
    assert any(f"{count} skewed bands" in n for n in rep.notes), rep.notes
    assert rep.exact and "skewed bands" in rep.exact_meaning
    return out, rep


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("count", [2, 3])
def test_skewed_bands_are_whole_volume_inference(tmp_path, monkeypatch, name, count):
    """Each network on an odd volume in 2 and 3 bands: OpenVINO's whole-volume f32 inference to float32 rounding."""
    factory, multiple, shape = NETWORKS[name]
    path = _saved(tmp_path, factory())
    vol = _volume(shape, seed=count)
    out, _ = _skewed(vol, path, monkeypatch, count, precision="f32")
    ref = whole_volume(path, vol, multiple=multiple)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_region_inputs_are_dense_tensors(tmp_path, monkeypatch):
    """A layer reading part of its input's held rows gets a dense tensor, never a region (ROI) tensor, which
    OpenVINO would copy into memory each segment's request keeps: with one plane a call (wide cross-sections) over
    the plane's own memory (rows are outermost in a plane), with several planes a call a copy in the stream's one
    scratch buffer per input position. Either way the result is still whole-volume inference."""
    from volinfer.run import stream

    real, seen, scratches = stream._region, [], []

    def spy(planes, rows, ten, dense):
        got = real(planes, rows, ten, dense)
        data = got.data  # (a region tensor keeps its parent's strides, even along axes of one)
        seen.append((planes.shape[0], rows is not None and rows[1] - rows[0] < ten.shape[stream.YAXIS],
                     data.strides == np.empty(data.shape, data.dtype).strides, np.shares_memory(data, planes)))
        return got

    class Spied(stream.Scratch):
        def __init__(self):
            super().__init__()
            scratches.append(self)

    monkeypatch.setattr(stream, "_region", spy)
    monkeypatch.setattr(stream, "Scratch", Spied)
    path = _saved(tmp_path, stream_unet(seed=10))
    vol = _volume((23, 141, 19), seed=5)
    ref = whole_volume(path, vol, multiple=4)
    for chunk_bytes in (1, 1 << 20):  # one plane a call; several
        monkeypatch.setattr(stream, "CHUNK_BYTES", chunk_bytes)
        seen.clear()
        out, _ = _skewed(vol, path, monkeypatch, 3, precision="f32")
        np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
        partial = [s for s in seen if s[1]]
        assert partial and all(dense for _, _, dense, _ in partial), "a region tensor went to OpenVINO"
        if chunk_bytes == 1:
            assert (1, True, True, True) in seen, "no one-plane call read its input's rows in place"
        else:
            assert any(n > 1 and not shared for n, _, _, shared in partial), "no several-plane call read a region"
    assert all(len(s.bufs) <= 2 for s in scratches)  # one buffer per input position (this model: at most two)


def test_many_narrow_bands_and_vocabulary(tmp_path, monkeypatch):
    """Dilated, depthwise and grouped strided convolutions, max and (padding-counting) average pooling, a grouped
    transposed convolution, concatenations: 5 bands of a few rows each, f32, against the whole volume."""
    pytest.importorskip("torch")
    path = _saved(tmp_path, stream_models.from_torch(stream_models.torch_vocabulary(tk=4, tp=1, top=0, tg=2), 2))
    vol = _volume((14, 120, 9), seed=5)
    out, _ = _skewed(vol, path, monkeypatch, 5, precision="f32")
    ref = whole_volume(path, vol, multiple=2)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.skipif(not HAS_MONAI, reason="needs torch and monai")
def test_monai_unet_in_bf16_equals_the_unbanded_stream(tmp_path, monkeypatch):
    """A MONAI BasicUNet (batch norm, transposed convolutions, skip concatenations, multiple 16) in bf16: the skewed
    bands give the unbanded stream's values bit for bit, and f32 equals whole-volume inference."""
    path = _saved(tmp_path, stream_models.monai_basic_unet(norm="batch"))
    vol = _volume((17, 250, 21), seed=7)
    whole = predict(vol, path, engine="stream", precision="bf16", kind="raw", progress=False)
    out, _ = _skewed(vol, path, monkeypatch, 2, precision="bf16")
    np.testing.assert_array_equal(out, whole)
    out, _ = _skewed(vol, path, monkeypatch, 2, precision="f32")
    ref = whole_volume(path, vol, multiple=16)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_file_output_and_strips_removed(tmp_path, monkeypatch):
    """A compressed NIfTI written band by band holds the in-memory result; the strips went through disk (bytes
    counted) and no file is left behind."""
    path = _saved(tmp_path, stream_unet(seed=3))
    vol = _volume((21, 133, 26), seed=9)
    mem, _ = _skewed(vol, path, monkeypatch, 3, precision="f32")
    dst = tmp_path / "out" / "labels.nii.gz"
    dst.parent.mkdir()
    _, rep = _skewed(vol, path, monkeypatch, 3, precision="f32", output=dst)
    np.testing.assert_array_equal(np.asarray(nib.load(str(dst)).dataobj), mem)
    assert rep.spill is not None and rep.spill["written_mb"] > 0  # the strips
    assert os.listdir(dst.parent) == ["labels.nii.gz"]


def test_windows_that_depend_on_position_refuse_skew(tmp_path, monkeypatch):
    """Averages that exclude padding (their divisor depends on where the window lies) cannot be cut: no skewed plan,
    and a run asked for bands still gets the exact result another way."""
    pytest.importorskip("torch")
    path = _saved(tmp_path, stream_models.from_torch(stream_models.torch_vocabulary(include_pad=False), 2))
    tm = TileModel(path, compile=False)
    with pytest.raises(NotStreamable):
        y_windows(stream_graph_for(tm, (8, 64, 8)))
    assert skewed_bands.skew_options(tm, (8, 64, 8), "f32") == []
    monkeypatch.setattr(skewed_bands, "FORCE_COUNT", 2)
    vol = _volume((8, 64, 8), seed=1)
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False, report=True)
    assert not any("skewed" in n for n in rep.notes)
    ref = whole_volume(path, vol, multiple=2)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_bands_narrower_than_the_halos_are_refused(tmp_path):
    """Bands too narrow for the rows each layer reads below their boundary: a ValueError naming the band (the
    planner then weighs fewer bands); a workable count cuts every segment's rows into a partition of its rows."""
    path = _saved(tmp_path, stream_unet(seed=1))
    tm = TileModel(path, compile=False)
    graph = stream_graph_for(tm, (8, 120, 8))
    with pytest.raises(ValueError, match="band"):
        cut_bands(graph, list(range(0, 120, 4)) + [120])
    cuts = cut_bands(graph, [0, 40, 80, 120])
    for seg in graph.segments:
        rows = [c.segments[seg.index].rows for c in cuts]
        assert rows[0][0] == 0 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert rows[-1][1] == graph.tensors[seg.outputs[0]].shape[3]


def test_planner_picks_skewed_bands_when_the_cross_section_does_not_fit(tmp_path, monkeypatch):
    """With a budget the whole cross-section exceeds, the planner's own choice (no forced count) is skewed bands
    within the budget, and the run is exact."""
    monkeypatch.setattr(skewed_bands, "MIN_BAND_AREA", 16 * 16)  # (calibrated for cross-sections of 512² and more)
    monkeypatch.setattr(setup, "STREAM_CALL_S", 0.0)  # (the calls bands make would dwarf a volume this small)
    path = _saved(tmp_path, stream_unet(seed=4))
    vol = _volume((30, 160, 24), seed=4)
    tm = TileModel(path, compile=False)
    whole = plan_stream(tm, vol.shape, "f32")
    fixed = fixed_mb(weights_mb(tm.model))
    budget = fixed + 0.8 * whole.memory_mb
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", max_memory_mb=budget,
                       progress=False, report=True)
    assert rep.grid[1] > 1 and any("skewed bands" in n for n in rep.notes), rep.notes
    ref = whole_volume(path, vol, multiple=4)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_the_first_band_is_narrowed_to_the_others_memory(tmp_path, monkeypatch):
    """The first band computes each layer's rows from 0 to a boundary that lies ahead of the output's by the layers'
    skew, so at equal output rows it can be the largest (the reference U-Net's shape, small): the planner narrows it
    (and widens the last) until it is no larger than the others, which lowers the plan's peak; the run with those
    unequal bands is still whole-volume inference."""
    torch = pytest.importorskip("torch")
    from volinfer.bench.reference_unet import UNet3D

    torch.manual_seed(3)
    path = _saved(tmp_path, stream_models.from_torch(UNet3D(1, 2, (2, 4, 8, 16, 32)).eval(), 16))
    vol = _volume((21, 377, 13), seed=3)
    tm = TileModel(path, compile=False)
    plan = skewed_bands.plan_skewed(tm, vol.shape, "f32", 3, None)
    betas, bands = plan.skew.betas, plan.skew.bands
    widths = [b - a for a, b in zip(betas[:-1], betas[1:])]
    assert widths[0] < widths[1] == 128 < widths[2], widths
    assert bands[0].memory_mb <= max(b.memory_mb for b in bands[1:])
    equal = skewed_bands._band_plan(plan.graph, cut_bands(plan.graph, [0, 128, 256, 384])[0],
                                    skewed_bands.stream.takes(plan.rows), None, {})
    assert equal.memory_mb > plan.memory_mb  # equal bands: the first is the largest, and larger than any now
    assert plan.band == widths[2]  # (the run's output block holds the widest band)
    assert f"in 3 skewed bands of {widths[0]}-{widths[2]} rows along y" in plan.describe(vol.shape[1], 16)
    out, rep = _skewed(vol, path, monkeypatch, 3, precision="f32")
    ref = whole_volume(path, vol, multiple=16)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_spilled_skips_write_only_the_rows_their_decoder_reads(tmp_path, monkeypatch):
    """A spilled skip connection in a band holds the previous band's strip and the rows its encoder computes ahead
    for the next band; its decoder end reads only its own band's rows: only those go to disk (less traffic, planned
    as such), read back at offset 0 by the decoder, the strip's rows among them from the strip's file (written once,
    by the band before). Still whole-volume inference."""
    torch = pytest.importorskip("torch")
    from volinfer.bench.reference_unet import UNet3D
    from volinfer.run import stream

    torch.manual_seed(4)
    path = _saved(tmp_path, stream_models.from_torch(UNet3D(1, 2, (2, 4, 8, 16, 32)).eval(), 16))
    vol = _volume((21, 377, 61), seed=4)
    monkeypatch.setattr(stream, "SPILL", "always")
    narrowed, real = [], stream.SpilledBuffer.narrow

    def spy(buf, rows):
        real(buf, rows)
        narrowed.append((buf.ten.shape[stream.YAXIS], rows, buf.disk_rows))

    monkeypatch.setattr(stream.SpilledBuffer, "narrow", spy)
    plan = skewed_bands.plan_skewed(TileModel(path, compile=False), vol.shape, "f32", 3, None)
    spilled = [o for b in plan.skew.bands for o in b.spill.values()]
    full = {o.key: plan.graph.tensors[o.key].n * (1 + len(o.far)) for o in spilled}  # planes written and read
    assert any(o.traffic_bytes < full[o.key] * b.graph.tensors[o.key].plane_bytes
               for b in plan.skew.bands for o in b.spill.values()), "no spill planned narrowed"
    out, rep = _skewed(vol, path, monkeypatch, 3, precision="f32")
    assert narrowed and all(hi - lo < held for held, (lo, hi), _ in narrowed), narrowed
    assert any(d0 > lo for _, (lo, _), (d0, _) in narrowed), "no strip rows read from the strip's file"
    ref = whole_volume(path, vol, multiple=16)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("count", [2, 3])
def test_a_skewed_plan_counts_the_calls_its_bands_make(tmp_path, monkeypatch, count):
    """The planner charges a stream for its segment calls (setup.STREAM_CALL_S each, every band's): the calls it
    counts are the calls the run makes."""
    path = _saved(tmp_path, stream_unet(seed=3))
    vol = _volume((21, 90, 26), seed=count)
    plan = skewed_bands.plan_skewed(TileModel(path, compile=False), vol.shape, "f32", count, None)
    _, rep = _skewed(vol, path, monkeypatch, count, precision="f32")
    assert plan.bands_count == count
    assert rep.tiles == plan.calls_per_band * plan.bands_count


def test_a_skewed_plan_follows_a_precision_change(tmp_path):
    """The precision guard may move a run from bf16 to f32 after planning: every band is re-sized for f32 planes
    (twice the bytes), and the plan's memory is its most demanding band's again."""
    path = _saved(tmp_path, stream_unet(seed=2))
    tm = TileModel(path, compile=False)
    plan = skewed_bands.plan_skewed(tm, (20, 200, 16), "bf16", 3, 0)
    before = plan.memory_mb
    plan.peak_mb = 100.0 + before
    plan.store_in("f32")
    assert all(t.storage == "f32" for b in plan.skew.bands for t in b.graph.tensors.values())
    assert plan.memory_mb > before and plan.peak_mb == pytest.approx(100.0 + plan.memory_mb)
    assert plan.memory_mb == pytest.approx(max(b.memory_mb for b in plan.skew.bands))


def _unpadded_strided(seed: int = 0) -> ov.Model:
    """A k3 stride-2 convolution without padding (it never reads its input's last plane) between a convolution and
    a k4 s2 transposed convolution: size multiple 2, output the input's size."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)

    def w(*shape):
        return ops.constant((rng.standard_normal(shape) * 0.3).astype(np.float32))

    x = ops.parameter([1, 1, -1, -1, -1], np.float32)
    e = ops.relu(ops.convolution(x, w(8, 1, 3, 3, 3), [1] * 3, [1] * 3, [1] * 3, [1] * 3))
    h = ops.relu(ops.convolution(e, w(6, 8, 3, 3, 3), [2] * 3, [0] * 3, [0] * 3, [1] * 3))
    u = ops.convolution_backprop_data(h, w(6, 4, 4, 4, 4), [2] * 3, None, [0] * 3, [0] * 3, [1] * 3)
    m = ov.Model([ops.convolution(u, w(2, 4, 1, 1, 1), [1] * 3, [0] * 3, [0] * 3, [1] * 3)], [x], "unpadded")
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    return m


def test_planes_no_layer_reads_are_not_read_from_the_strips(tmp_path, monkeypatch):
    """A layer that never reads its input's last plane leaves that plane uncomputed in every band; the next band's
    strip reads stop at the planes the previous band wrote (one-plane calls, as at wide cross-sections)."""
    from volinfer.run import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)
    path = _saved(tmp_path, _unpadded_strided())
    vol = _volume((12, 90, 14), seed=3)
    out, _ = _skewed(vol, path, monkeypatch, 2, precision="f32")
    ref = whole_volume(path, vol, multiple=2)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def _padded_pooling(rounding: str = "floor") -> ov.Model:
    """Max pooling with padding (3x3x3, stride 1 and 2) over values that are negative near the volume's ends, and an
    average that counts its padding: at a band's edge the pooling pads the rows itself (-inf for the max, zeros for
    the average), as the whole volume does (with ``rounding`` "ceil" the strided max is given padding rows instead:
    ceil modes differ on a window that starts in the padding)."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(11)

    def w(*shape):
        return ops.constant((rng.standard_normal(shape) * 0.3).astype(np.float32))

    def pool(x, stride):
        if rounding == "ceil" and stride == 2:  # k4 from one padding row: ceil keeps n/2 windows, floor n/2 - 1
            return ops.max_pool(x, [2] * 3, [1] * 3, [1] * 3, [0] * 3, [4] * 3, rounding).output(0)
        return ops.max_pool(x, [stride] * 3, [1] * 3, [1] * 3, [1] * 3, [3] * 3).output(0)

    x = ops.parameter([1, 1, -1, -1, -1], np.float32)
    e = ops.convolution(x, w(4, 1, 3, 3, 3), [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    e = ops.add(e, ops.constant(np.full((1, 4, 1, 1, 1), -3.0, np.float32)))  # mostly negative
    p = pool(ops.convolution(pool(e, 1), w(4, 4, 3, 3, 3), [1] * 3, [1] * 3, [1] * 3, [1] * 3), 2)
    a = ops.avg_pool(p, [1] * 3, [1] * 3, [1] * 3, [3] * 3, exclude_pad=False)
    u = ops.convolution_backprop_data(a, w(4, 2, 2, 2, 2), [2] * 3, None, [0] * 3, [0] * 3, [1] * 3)
    m = ov.Model([u], [x], "pooling")
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    return m


@pytest.mark.parametrize("count, rounding", [(2, "floor"), (3, "floor"), (3, "ceil")])
def test_padded_pooling_at_band_edges(tmp_path, monkeypatch, count, rounding):
    """Padded max and average pooling in bands whose edges are the volume's: whole-volume inference (a max that
    padded with zeros, or rows of zeros counted by the max, would differ where values are negative)."""
    path = _saved(tmp_path, _padded_pooling(rounding))
    vol = _volume((10, 37, 12), seed=count)
    out, _ = _skewed(vol, path, monkeypatch, count, precision="f32")
    ref = whole_volume(path, vol, multiple=2)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_bands_release_the_input_rows_they_read(tmp_path, monkeypatch):
    """Skewed bands read each input row once, but for the few rows the next band's first layer reads again: from a
    .nii, what a band reads leaves the page cache right after, except what a later read needs again (nothing the
    pre-pass reads is released); the output is unchanged."""
    from volinfer import portable
    from volinfer.io import reader

    path = _saved(tmp_path, stream_unet(seed=3))
    vol = _volume((21, 133, 26), seed=4)
    src = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(src))
    events = []  # ("read", offset, bytes, read_once) and ("forget", offset, bytes), in order
    read_exact = reader.StripChannel._read_exact

    def spy_read(self, buf, offset):
        read_exact(self, buf, offset)
        events.append(("read", offset, buf.nbytes, self.read_once))

    monkeypatch.setattr(reader.StripChannel, "_read_exact", spy_read)
    monkeypatch.setattr(portable, "forget", lambda fd, offset, nbytes: events.append(("forget", offset, nbytes)))
    mem, _ = _skewed(vol, path, monkeypatch, 3, precision="f32")
    assert not events  # an array source has no pages to release
    got, _ = _skewed(str(src), path, monkeypatch, 3, precision="f32")
    np.testing.assert_array_equal(got, mem)
    banded = [e for e in events if e[0] == "read" and e[3] is not None]
    forgets = [(i, e) for i, e in enumerate(events) if e[0] == "forget"]
    assert banded and len(forgets) == len(banded)
    assert any(e[0] == "read" and e[3] is None for e in events)  # the pre-pass reads are kept
    for i, (_, o, n) in forgets:
        read = events[i - 1]
        assert read[0] == "read" and read[1] == o and 0 < n < read[2]  # from the rows read, less the kept ones
        again = [e for e in events[i + 1:] if e[0] == "read" and e[1] < o + n and o < e[1] + e[2]]
        assert not again, f"bytes [{o}, {o + n}) released, then read again"
    assert sum(n for _, (_, _, n) in forgets) > 0.8 * sum(e[2] for e in banded)
