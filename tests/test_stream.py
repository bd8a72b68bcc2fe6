"""The layer-streaming engine (volinfer.run.stream): whole-volume inference computed slab by slab along z.

References are computed independently: OpenVINO runs the whole padded volume through the unmodified model in one
call (f32), and the test pads and crops with numpy.
"""

from __future__ import annotations

import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from models import stream_unet
from stream_models import updown
from test_resume import KILLER
from volinfer import predict
from volinfer.errors import VolinferError
from volinfer.model.stream_graph import NotStreamable, ZWindow, analyse


def whole_volume(path, vol: np.ndarray, multiple: int = 4, pad_mode: str = "constant") -> np.ndarray:
    """The IR at ``path`` (read back: ``ov.save_model`` stores f16 weights, so the file, not the in-memory model, is
    what volinfer runs) on the whole volume padded on the high side to the size multiple, cropped back:
    (C, x, y, z)."""
    chans = vol if vol.ndim == 4 else vol[None]  # (C, x, y, z)
    padded = [-(-n // multiple) * multiple for n in chans.shape[1:]]
    x = np.pad(chans, [(0, 0)] + [(0, p - n) for p, n in zip(padded, chans.shape[1:])], mode=pad_mode)
    m = ov.Core().read_model(str(path))
    m.reshape([1, len(chans), *padded])
    out = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x[None].astype(np.float32))[0][0]
    return out[:, : chans.shape[1], : chans.shape[2], : chans.shape[3]]


def _volume(shape, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.standard_normal(shape), axis=2).astype(np.float32) * 0.3


@pytest.fixture(scope="module")
def unet_xml(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "stream_unet.xml"
    ov.save_model(stream_unet(), str(path))
    return path


@pytest.mark.parametrize("shape,pad_mode", [((37, 29, 45), "constant"), ((24, 41, 70), "edge"),
                                            ((20, 16, 9), "reflect")])
def test_stream_equals_whole_volume_inference(unet_xml, shape, pad_mode):
    """Odd shapes (padding on every axis), each pad mode, more z-planes than one call computes: the streamed output
    is the whole-volume output to float32 rounding."""
    vol = _volume(shape)
    out, rep = predict(vol, unet_xml, engine="stream", precision="f32", kind="raw", pad_mode=pad_mode,
                       progress=False, report=True)
    ref = whole_volume(unet_xml, vol, pad_mode=pad_mode)
    assert out.shape == (*shape, 3)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5, rtol=0)
    assert rep.engine == "stream" and rep.exact
    assert "whole-volume inference" in rep.exact_meaning


def test_stream_output_planes_change_nothing(unet_xml, monkeypatch):
    """How many planes each call computes and each row writes is bookkeeping: other chunkings, same values."""
    import volinfer.run.stream as stream

    vol = _volume((16, 20, 52), seed=3)
    ref = predict(vol, unet_xml, engine="stream", precision="f32", kind="raw", progress=False)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1)  # one plane per call everywhere
    monkeypatch.setattr(stream, "OUT_PLANES", 4)
    small = predict(vol, unet_xml, engine="stream", precision="f32", kind="raw", progress=False)
    np.testing.assert_allclose(small, ref, atol=2e-6, rtol=0)
    # input read and output taken in steps that divide neither a row nor the volume (the last ones past its end)
    monkeypatch.setattr(stream, "OUT_PLANES", 16)
    for read, take in ((5, 3), (1, 16), (7, 1)):
        monkeypatch.setattr(stream, "READ_PLANES", read)
        monkeypatch.setattr(stream, "TAKE_PLANES", take)
        odd = predict(vol, unet_xml, engine="stream", precision="f32", kind="raw", progress=False)
        np.testing.assert_allclose(odd, ref, atol=2e-6, rtol=0)


def test_stream_calls_ask_for_no_output_copies(unet_xml, monkeypatch):
    """Every OpenVINO call a stream run makes writes into planes the run handed it and asks for no copies of its
    outputs back (share_outputs): by default OpenVINO's Python infer() copies each output into a new array, which
    with volinfer's allocator is a fresh mapping faulted in page by page (2048³: 36-65 M page faults, 250 s of system
    time, before this was set)."""
    seen = []
    real = ov.InferRequest.infer

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("share_outputs", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ov.InferRequest, "infer", spy)
    vol = _volume((19, 23, 30), seed=2)
    out, rep = predict(vol, unet_xml, engine="stream", precision="f32", kind="raw", progress=False, report=True)
    assert rep.engine == "stream" and len(seen) >= rep.tiles > 0
    assert all(seen), f"{seen.count(False)} of {len(seen)} calls returned copies of their outputs"
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), whole_volume(unet_xml, vol), atol=2e-5, rtol=0)


def test_buffers_hold_a_few_planes_of_input_and_output_not_a_row(monkeypatch):
    """The input and output buffers hold a read step and a take step (plus the windows reading them), not the row
    the journal writes: rows 4x longer, same buffers; read and take steps 4x longer, larger ones."""
    import volinfer.run.stream as stream
    from volinfer.model.tile_model import TileModel

    tm = TileModel(stream_unet(seed=1), compile=False)

    def io_caps():
        plan = stream.plan_stream(tm, (32, 32, 200), "f32")
        g = plan.graph
        return sum(plan.capacities[g.input_key]), sum(plan.capacities[g.output_key]), plan.rows

    base_in, base_out, rows = io_caps()
    assert rows[0] == (0, stream.OUT_PLANES)
    monkeypatch.setattr(stream, "OUT_PLANES", 4 * stream.OUT_PLANES)
    long_in, long_out, long_rows = io_caps()
    assert (long_in, long_out) == (base_in, base_out) and len(long_rows) < len(rows)
    monkeypatch.setattr(stream, "READ_PLANES", 4 * stream.READ_PLANES)
    monkeypatch.setattr(stream, "TAKE_PLANES", 4 * stream.TAKE_PLANES)
    big_in, big_out, _ = io_caps()
    assert big_in > base_in and big_out > base_out
    assert stream.takes([(0, 16), (16, 30)], 4) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24),
                                                   (24, 28), (28, 30)]


def test_more_bands_where_the_objective_prefers_them():
    """Bands are weighed like any plan: a predicted time that barely grows with the band count (within 10%) buys
    more, narrower bands (leaner); a time that grows steeply keeps the fewest that fit."""
    import volinfer.run.stream as stream
    from volinfer.model.tile_model import TileModel

    tm = TileModel(stream_unet(seed=10), compile=False)
    shape, margin = (28, 300, 44), 24
    whole = stream.plan_stream(tm, shape, "f32")
    limit = 0.6 * whole.memory_mb
    fits = lambda p: p.memory_mb <= limit  # noqa: E731
    flat = stream.plan_stream(tm, shape, "f32", fits=fits, margin_y=margin, cost=lambda p: 100.0 + p.bands_count)
    steep = stream.plan_stream(tm, shape, "f32", fits=fits, margin_y=margin, cost=lambda p: 100.0 * p.bands_count)
    plain = stream.plan_stream(tm, shape, "f32", fits=fits, margin_y=margin)
    assert steep.bands_count == plain.bands_count > 1
    assert flat.bands_count > steep.bands_count and flat.memory_mb < steep.memory_mb <= limit


def test_bands_are_as_narrow_as_their_count_allows():
    """Of the bands that fit, the planner keeps the count of the widest but the narrowest band giving that count:
    as many bands, fewer recomputed rows (a wider band of the same count only recomputes more margin)."""
    import volinfer.run.stream as stream
    from volinfer.model.tile_model import TileModel
    from volinfer.tiling.geometry import plan_axis_crop

    tm = TileModel(stream_unet(seed=10), compile=False)
    shape, margin = (28, 150, 44), 24
    whole = stream.plan_stream(tm, shape, "f32")
    limit = (whole.memory_mb + stream.plan_stream(tm, shape, "f32", fits=lambda p: False, margin_y=margin).memory_mb) / 2
    plan = stream.plan_stream(tm, shape, "f32", fits=lambda p: p.memory_mb <= limit, margin_y=margin)
    m = tm.multiple
    count = plan_axis_crop(shape[1], plan.band, m, plan.margin).count
    assert count > 1 and plan.memory_mb <= limit
    narrower = plan.band - m
    assert narrower < 2 * plan.margin + m or plan_axis_crop(shape[1], narrower, m, plan.margin).count > count


def test_auto_streams_a_model_that_sees_far(tmp_path):
    """A stored receptive field that would make tiling recompute wide margins within the budget (exact tiling:
    1.7x the volume evaluated): auto streams, and labels match whole-volume inference."""
    m = stream_unet(seed=2)
    m.set_rt_info("[18, 18, 18]", ["volinfer", "receptive_field"])
    path = tmp_path / "far.xml"
    ov.save_model(m, str(path))
    vol = _volume((64, 64, 160), seed=4)
    labels, rep = predict(vol, path, engine="auto", precision="f32", max_memory_mb=200, progress=False,
                          report=True)
    assert rep.engine == "stream", rep.notes
    assert any("layer streaming along z" in n for n in rep.notes)
    ref = whole_volume(path, vol).argmax(0)
    assert (labels == ref).mean() > 0.9999


def test_unstreamable_model_runs_tiles_or_says_why(tmp_path):
    """Cubic interpolation is not streamed (its window is four planes): auto runs tiles; --engine stream is a
    one-line error naming the operation."""
    param = ops.parameter([1, 1, -1, -1, -1], np.float32)
    down = ops.avg_pool(param, [2] * 3, [0] * 3, [0] * 3, [2] * 3, exclude_pad=True)
    up = ops.interpolate(down, ops.constant(np.array([2.0] * 3, np.float32)), "cubic", "scales",
                         axes=ops.constant(np.array([2, 3, 4], np.int64)))
    m = ov.Model([ops.add(up, param)], [param])
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    m.set_rt_info("[12, 12, 12]", ["volinfer", "receptive_field"])  # stored: the tiled run measures nothing
    path = tmp_path / "cubic.xml"
    ov.save_model(m, str(path))
    vol = _volume((20, 18, 22))
    _, rep = predict(vol, path, engine="auto", precision="f32", progress=False, report=True)
    assert rep.engine == "tiles"
    with pytest.raises(VolinferError, match="cannot be streamed.*Interpolate.*cubic"):
        predict(vol, path, engine="stream", progress=False)


def test_engine_stream_refuses_tile_options(unet_xml):
    vol = _volume((16, 16, 16))
    with pytest.raises(VolinferError, match="does not combine with --tile"):
        predict(vol, unet_xml, engine="stream", tile=16, progress=False)
    with pytest.raises(VolinferError, match="--stitch gaussian"):
        predict(vol, unet_xml, engine="stream", stitch="gaussian", progress=False)


def test_analysis_rejects_what_it_cannot_stream():
    """Operations across z are refused at analysis, not computed wrongly."""
    import openvino.opset13 as ops

    p = ops.parameter([1, 2, -1, -1, -1], np.float32)
    m = ov.Model([ops.softmax(p, 4)], [p])
    with pytest.raises(NotStreamable, match="Softmax"):
        analyse(m, [1, 2, 8, 8, 8], 4)
    mvn = ov.Model([ops.mvn(p, ops.constant(np.array([2, 3, 4])), True, 1e-5, "inside_sqrt")], [p])
    with pytest.raises(NotStreamable, match="MVN"):
        analyse(mvn, [1, 2, 8, 8, 8], 4)


@pytest.mark.parametrize("win,a,t,want", [
    (ZWindow("conv", 3, 1, 1), 0, 4, (-1, 5)),
    (ZWindow("conv", 3, 2, 1), 2, 3, (3, 10)),
    (ZWindow("conv", 3, 1, 2, 2), 5, 1, (3, 8)),
    (ZWindow("transposed", 3, 2, 1), 4, 4, (2, 5)),  # outputs 4..7 read inputs 2..4
    (ZWindow("transposed", 2, 2, 0), 6, 2, (3, 4)),
])
def test_window_ranges(win, a, t, want):
    """Input planes per output chunk, checked against the definition: output j reads i where j = i*s - p + m*d."""
    assert win.input_range(a, t) == want
    lo, hi = want
    if win.kind == "transposed":
        reads = {i for j in range(a, a + t) for i in range(-10, 40) for m in range(win.k)
                 if i * win.s - win.p + m * win.d == j}
    else:
        reads = {j * win.s - win.p + m * win.d for j in range(a, a + t) for m in range(win.k)}
    assert min(reads) == lo and max(reads) == hi - 1


def test_cli_stream_matches_one_whole_tile(unet_xml, tmp_path):
    """`volinfer run --engine stream` writes the labels that one tile over the whole padded volume writes."""
    vol = _volume((33, 27, 41), seed=5)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(src))
    outs = {}
    for engine, extra in (("stream", []), ("tiles", ["--tile", "36x28x44"])):
        dst = tmp_path / f"{engine}.nii.gz"
        r = subprocess.run([sys.executable, "-m", "volinfer", "run", str(src), "-m", str(unet_xml), "-o", str(dst),
                            "--engine", engine, "--precision", "f32", "-q", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs[engine] = np.asarray(nib.load(str(dst)).dataobj)
    assert outs["stream"].shape == vol.shape
    assert (outs["stream"] == outs["tiles"]).mean() > 0.9999


def test_careless_inputs_stream_like_the_whole_volume(tmp_path):
    """Two input channels, NaN voxels replaced by --nan-value and a whole-volume z-score: the streamed output equals
    whole-volume inference on the volume prepared with numpy."""
    path = tmp_path / "two.xml"
    m = stream_unet(seed=6, in_channels=2)
    ov.save_model(m, str(path))
    vol = np.stack([_volume((21, 26, 35), seed=7), _volume((21, 26, 35), seed=8) * 40 + 300], axis=-1)
    vol[3, 4, 5, 0] = np.nan
    out = predict(vol, path, engine="stream", precision="f32", kind="raw", normalize="zscore", nan_value=0.0,
                  channel_axis=3, progress=False)
    prepared = np.moveaxis(vol.astype(np.float64), -1, 0)  # (C, x, y, z)
    for c in prepared:
        finite = np.isfinite(c)
        mean, std = c[finite].mean(), c[finite].std()
        c[~finite] = 0.0  # --nan-value replaces before normalisation
        c -= mean
        c /= std
    ref = whole_volume(path, prepared.astype(np.float32))
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5, rtol=0)


def test_sigkill_then_resume_stream_is_identical(unet_xml, tmp_path):
    """A streamed run killed part-way resumes (the journal counts rows of output planes) to the same bytes."""
    import json
    import os

    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(_volume((20, 24, 70), seed=9), np.eye(4)), str(vol))
    args = [str(vol), "-m", str(unet_xml), "--engine", "stream", "--precision", "f32", "--kind", "raw", "-q"]
    ref, out = tmp_path / "ref.nii.gz", tmp_path / "out.nii.gz"
    assert subprocess.run([sys.executable, "-m", "volinfer", "run", *args, "-o", str(ref)]).returncode == 0
    p = subprocess.run([sys.executable, "-c", KILLER, "run", *args, "-o", str(out)], capture_output=True,
                       env={**os.environ, "KILL_AT": "3"}, timeout=300)
    assert p.returncode == -9 and not out.exists()
    journal = json.loads((tmp_path / ".out.nii.gz.partial.json").read_text())
    assert 0 < journal["rows_done"] < journal["rows_total"]
    loud = [a for a in args if a != "-q"]  # the progress line: every row counted once (it said 20/12)
    r = subprocess.run([sys.executable, "-m", "volinfer", "run", *loud, "-o", str(out), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(ref)).dataobj))
    assert not list(tmp_path.glob(".out*"))
    done, total = map(int, re.search(r"volinfer: (\d+)/(\d+) slab", r.stdout + r.stderr).groups())
    assert done == total == journal["rows_total"]


def test_bands_along_y_when_the_cross_section_does_not_fit(tmp_path):
    """A --max-memory below the whole cross-section's need: the stream runs in bands of y rows whose margins cover
    the (measured) receptive field, and the output matches whole-volume inference to the tiling deviation."""
    from volinfer.model.tile_model import CompileOptions, TileModel
    from volinfer.model.memory import weights_mb
    from volinfer.run.stream import fixed_mb
    from volinfer.run.stream import plan_stream

    path = tmp_path / "wide.xml"
    ov.save_model(stream_unet(seed=10), str(path))
    shape = (28, 150, 44)
    vol = _volume(shape, seed=11)
    tm = TileModel(path, compile=False, options=CompileOptions(precision="f32"))
    fixed = fixed_mb(weights_mb(tm.model))
    whole = plan_stream(tm, shape, "f32")
    narrow = plan_stream(tm, shape, "f32", fits=lambda p: False, margin_y=24)  # the narrowest band
    budget = fixed + (whole.memory_mb + narrow.memory_mb) / 2
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", max_memory_mb=budget,
                       progress=False, report=True)
    assert rep.engine == "stream" and rep.grid[1] > 1, rep.notes
    assert rep.exact and "bands along y" in rep.exact_meaning
    assert any("bands of" in n for n in rep.notes)
    assert f"{rep.grid[1]} bands of" in rep.summary()
    ref = whole_volume(path, vol)
    assert np.abs(np.moveaxis(out, -1, 0) - ref).max() < 1e-3
    # a compressed file output takes bands too: planes become final only after the last band
    dst = tmp_path / "bands.nii.gz"
    rep = predict(vol, path, dst, engine="stream", precision="f32", kind="raw", max_memory_mb=budget, progress=False)
    assert rep.grid[1] > 1
    np.testing.assert_array_equal(np.asarray(nib.load(str(dst)).dataobj), out)


def _streamed_updown(tmp_path, monkeypatch, m: ov.Model, s: int, depth: int, seed: int) -> list[ov.Model]:
    """Stream an :func:`updown` model over an odd volume ``depth * s + 1`` planes deep, check it against OpenVINO's
    whole-volume inference to float32 rounding, and return the segment models the stream built."""
    import volinfer.model.stream_graph as sg

    path = tmp_path / "updown.xml"
    ov.save_model(m, str(path), compress_to_fp16=False)
    built: list[ov.Model] = []
    real_build = sg.build_segment_model
    monkeypatch.setattr("volinfer.run.segment_compile.build_segment_model",
                        lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1])
    vol = _volume((depth * s + 1, 4 * s - 1, 9 * s + 2), seed=seed)
    out = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False)
    out = out if out.ndim == 4 else out[..., None]
    ref = whole_volume(path, vol, multiple=s)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    return built


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k,s,pb,pe,op,cout", [(3, 2, 1, 1, 1, 2), (2, 2, 0, 0, 0, 3), (4, 2, 1, 1, 0, 1),
                                               (3, 3, 0, 0, 0, 2), (5, 3, 1, 1, 0, 2), (4, 2, 2, 0, 0, 2)])
def test_transposed_convolution_as_stride_phases(tmp_path, monkeypatch, k, s, pb, pe, op, cout, tail):
    """Transposed convolutions with few output channels run as one convolution over their stride phases, the
    per-channel operations after them (ReLU; bias, PReLU and scale) on the phases, interleaved once: every
    kernel/stride/padding shape gives OpenVINO's own transposed convolution, on the whole volume, to float32
    rounding — and the phase path really ran, the activation reading the phase convolution."""
    m = updown(k, s, pb, pe, op, cout, seed=k * 10 + s, tail=tail)
    built = _streamed_updown(tmp_path, monkeypatch, m, s, 5, k)
    kinds = {op.get_type_name() for b in built for op in b.get_ops()}
    assert "ConvolutionBackpropData" not in kinds and "DepthToSpace" not in kinds
    act = [op for b in built for op in b.get_ops() if op.get_type_name() in ("Relu", "Add")]
    assert act and all(op.input_value(0).get_node().get_type_name() == "Convolution" for op in act)


@pytest.mark.parametrize("k,s,pb,pe,op", [(3, 2, 1, 1, 1), (2, 2, 0, 0, 0), (4, 2, 1, 1, 0), (3, 3, 0, 0, 0),
                                          (5, 3, 1, 1, 0), (4, 2, 2, 0, 0)])
@pytest.mark.parametrize("groups,chunk_bytes", [(1, None), (1, 1), (2, 1)])
def test_transposed_convolution_as_z_phases(tmp_path, monkeypatch, k, s, pb, pe, op, groups, chunk_bytes):
    """Transposed convolutions with many output channels compute exactly the planes a call keeps: one transposed
    convolution of stride 1 along z per z phase, interleaved (chunks of one stride and of several; grouped too).
    Each gives OpenVINO's own transposed convolution on the whole volume, to float32 rounding; the phases ran
    wherever the node's own kernel would compute planes outside the chunk (kernel wider than the stride), and
    not elsewhere."""
    from volinfer.run import stream

    if chunk_bytes is not None:
        monkeypatch.setattr(stream, "CHUNK_BYTES", chunk_bytes)
    m = updown(k, s, pb, pe, op, cout=12, seed=k * 10 + s + groups, groups=groups)
    built = _streamed_updown(tmp_path, monkeypatch, m, s, 7, k + groups)
    kind = "GroupConvolutionBackpropData" if groups > 1 else "ConvolutionBackpropData"
    depths = {int(o.get_input_partial_shape(1)[3 if groups > 1 else 2].get_length())
              for b in built for o in b.get_ops() if o.get_type_name() == kind}
    assert depths and (max(depths) < k if k > s else depths == {k}), depths
