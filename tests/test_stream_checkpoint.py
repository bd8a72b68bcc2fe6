"""Checkpointed statistics passes (volinfer.run.stream_stats, volinfer.run.stats_checkpoint): each pass streams only
its own segment of the network from the tensors the pass before it left on disk, instead of the network's whole
prefix from the volume. Same frozen statistics (f32 rounding) and the same streamed output as the recomputing
passes; files gone after a run and after an error; a disk too small falls back to recomputation; the planner counts
each pass at its own cost plus the checkpoints' traffic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai.networks.nets")

sys.path.insert(0, str(Path(__file__).parent))
import in_unet  # noqa: E402
import test_stream_norm as sn  # noqa: E402

from volinfer import predict  # noqa: E402
from volinfer.io import plane_store  # noqa: E402
from volinfer.io.reader import VolumeSource  # noqa: E402
from volinfer.model.spatial_norm import frozen_like  # noqa: E402
from volinfer.model.tile_model import CompileOptions, TileModel  # noqa: E402
from volinfer.run import stream_stats  # noqa: E402
from volinfer.run.normalize import Normalizer  # noqa: E402
from volinfer.run.setup import model_norm_layers  # noqa: E402
from volinfer.run.stream import band_reader, plan_stream  # noqa: E402


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for norm, classes in (("instance", 3), ("group", 4)):
        net = sn._unet(norm, classes, seed=11)
        out[norm] = (net, sn._save(net, d / f"{norm}.xml"))
    torch.manual_seed(0)
    net = in_unet.build(base=4, classes=2).eval()
    m = ov.convert_model(net, example_input=torch.zeros(1, 1, 32, 32, 32),
                         input=[ov.PartialShape([1, 1, -1, -1, -1])])
    m.set_rt_info("16", ["volinfer", "size_multiple"])
    ov.save_model(m, str(d / "in_unet.xml"), compress_to_fp16=False)
    out["in_unet"] = (net, d / "in_unet.xml")
    return out


def _fit(xml, vol, mode, monkeypatch, band=None, spill_at=None, precision="f32"):
    """The frozen model, the passes, and what they did, with checkpointing ``mode``."""
    monkeypatch.setattr(stream_stats, "CHECKPOINT", mode)
    tm = TileModel(xml, tile=16, compile=False, options=CompileOptions(precision=precision))
    layers, _ = model_norm_layers(tm)
    planning = tm.at(tm.tile, model=frozen_like(tm.model, layers), compile=False)
    fits = None if band is None else (lambda p: p.band <= band)
    plan = plan_stream(planning, vol.shape, precision, fits=fits, margin_y=24 if band else None)
    plan.spill_at = spill_at
    bands = plan.bands(vol.shape[1], tm.multiple)
    run_tm = tm.at((plan.padded[0], plan.band, plan.out_planes), compile=False)
    source = VolumeSource.from_array(vol)
    info: dict = {}
    frozen, passes = stream_stats.fit_stream_statistics(
        run_tm, plan, layers, bands, lambda p: band_reader(source, run_tm, p, Normalizer(None, 1)), info=info)
    return frozen, passes, info, bands


def _frozen_constants(model: ov.Model) -> list[np.ndarray]:
    """The constants freezing put in (means and inverse deviations), in graph order."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Subtract", "Multiply") and op.input_value(1).get_node().get_type_name() == "Constant":
            out.append(np.asarray(op.input_value(1).get_node().get_data(), np.float64))
    return out


def _same_statistics(a: ov.Model, b: ov.Model) -> None:
    ca, cb = _frozen_constants(a), _frozen_constants(b)
    assert len(ca) == len(cb) > 0
    for x, y in zip(ca, cb):
        assert x.shape == y.shape
        assert np.allclose(x, y, rtol=2e-5, atol=1e-6 * max(1.0, np.abs(y).max())), np.abs(x - y).max()


@pytest.mark.parametrize("norm,shape", [("instance", (37, 29, 23)), ("group", (15, 11, 3)),
                                        ("instance", (13, 18, 70))])
def test_checkpointed_passes_freeze_the_same_statistics(nets, monkeypatch, norm, shape):
    """Odd shapes, f32: the checkpointed passes give the recomputing passes' statistics (f32 rounding), with fewer
    segment calls (each pass streams its own segment, not the whole prefix), and the frozen model run whole by
    OpenVINO is PyTorch's whole-volume inference."""
    net, xml = nets[norm]
    vol = sn._volume(shape, seed=shape[2])
    again, n0, info0, _ = _fit(xml, vol, "never", monkeypatch)
    frozen, n1, info1, _ = _fit(xml, vol, "auto", monkeypatch)
    assert n0 == n1 == 9
    assert not info0["checkpointed"] and info1["checkpointed"], info1
    assert info1["written"] > 0 and info1["read"] > 0 and info1["disk_peak"] > 0
    assert info1["calls"] < 0.6 * info0["calls"], (info1["calls"], info0["calls"])
    _same_statistics(frozen, again)
    ref = sn._torch_whole(net, vol)
    assert np.abs(sn._ov_whole(frozen, vol) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_checkpoints_in_bf16_where_the_run_computes_in_bf16(nets, monkeypatch):
    """A bf16 run keeps its checkpoints as it keeps its planes, in bf16: half the bytes of an f32 run's; the
    statistics are the recomputing passes' to bf16 rounding, and the streamed output (default precision) stays within
    what bf16 does to it against PyTorch's whole-volume inference. (On a CPU without native bf16 a bf16 request runs
    f32: taken as native here, so that what bf16 stores is tested on every CPU; OpenVINO computes f32 there.)"""
    from volinfer.model import precision

    monkeypatch.setattr(precision, "native_reduced", lambda core, device: "bf16")
    net, xml = nets["instance"]
    vol = sn._volume((37, 29, 23), seed=8)
    _, _, f32, _ = _fit(xml, vol, "auto", monkeypatch)
    frozen, _, bf16, _ = _fit(xml, vol, "auto", monkeypatch, precision="bf16")
    again, _, _, _ = _fit(xml, vol, "never", monkeypatch, precision="bf16")
    volume = 40 * 32 * 24 * 4  # the padded input, kept float32 (a residual unit reads it again)
    assert bf16["checkpointed"] and bf16["written"] == (f32["written"] - volume) // 2 + volume, (bf16, f32)
    for x, y in zip(_frozen_constants(frozen), _frozen_constants(again), strict=True):
        assert np.allclose(x, y, rtol=3e-2, atol=3e-2 * max(1.0, np.abs(y).max()))
    monkeypatch.setattr(stream_stats, "CHECKPOINT", "auto")
    got, rep = sn._stream(vol, xml, precision="bf16")
    assert rep.precision == "bf16" and any("statistics passes checkpointed" in n for n in rep.notes), rep.notes
    ref = sn._softmax(sn._torch_whole(net, vol))
    assert np.abs(sn._softmax(got) - ref).max() <= 0.05
    assert (sn._softmax(got).argmax(0) == ref.argmax(0)).mean() >= 0.995


def test_checkpoints_per_band_of_rows(nets, monkeypatch):
    """Streamed in bands of y rows: each band's checkpoints are its own; the statistics are the recomputing
    passes' (and the whole volume's)."""
    net, xml = nets["instance"]
    vol = sn._volume((13, 117, 10), seed=9)
    again, _, _, bands = _fit(xml, vol, "never", monkeypatch, band=72)
    frozen, _, info, _ = _fit(xml, vol, "auto", monkeypatch, band=72)
    assert bands.count >= 3 and info["checkpointed"]
    _same_statistics(frozen, again)
    ref = sn._torch_whole(net, vol)
    assert np.abs(sn._ov_whole(frozen, vol) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_published_style_unet_with_interpolation_and_27_layers(nets, monkeypatch):
    """Stride 16, 27 InstanceNorm layers, align_corners trilinear upsampling (scales from shape computations),
    skip connections at four resolutions crossing the cuts: the same statistics as recomputing."""
    net, xml = nets["in_unet"]
    vol = sn._volume((35, 21, 19), seed=4)
    again, n0, info0, _ = _fit(xml, vol, "never", monkeypatch)
    frozen, n1, info1, _ = _fit(xml, vol, "auto", monkeypatch)
    assert n0 == n1 == 27 and info1["checkpointed"]
    assert info1["calls"] < 0.3 * info0["calls"], (info1["calls"], info0["calls"])
    _same_statistics(frozen, again)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_streamed_run_equals_recomputing_and_pytorch(nets, monkeypatch, norm):
    """`predict --engine stream`: the checkpointed run's output is the recomputing run's, and PyTorch's
    whole-volume inference; the summary says the passes were checkpointed."""
    net, xml = nets[norm]
    vol = sn._volume((29, 22, 31), seed=2)
    monkeypatch.setattr(stream_stats, "CHECKPOINT", "never")
    again, rep0 = sn._stream(vol, xml, precision="f32")
    monkeypatch.setattr(stream_stats, "CHECKPOINT", "auto")
    got, rep = sn._stream(vol, xml, precision="f32")
    assert any("statistics passes checkpointed" in n for n in rep.notes), rep.notes
    assert not any("checkpointed" in n for n in rep0.notes)
    assert np.abs(got - again).max() <= 1e-5 * max(1.0, np.abs(again).max())
    ref = sn._torch_whole(net, vol)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if plane_store.SPILL_MARK in p.name]


def test_checkpoint_files_gone_after_a_run_and_after_an_error(nets, monkeypatch, tmp_path):
    """Files kept linked (as where the OS cannot unlink open files): they exist during the passes, and none is
    left after the passes end or fail."""
    _, xml = nets["instance"]
    vol = sn._volume((21, 17, 19), seed=3)
    monkeypatch.setattr(plane_store, "UNLINK_OPEN", False)
    seen = []
    real = stream_stats.freeze_wave

    def spy(model, wave, moments):
        seen.append(len(_leftovers(tmp_path)))
        assert all(n.startswith(".out.nii" + plane_store.SPILL_MARK + str(os.getpid()) + "-ckpt")
                   for n in _leftovers(tmp_path))  # what remove_stale deletes once this process is gone
        real(model, wave, moments)

    monkeypatch.setattr(stream_stats, "freeze_wave", spy)
    _, _, info, _ = _fit(xml, vol, "auto", monkeypatch, spill_at=(str(tmp_path), ".out.nii"))
    assert info["checkpointed"] and max(seen) > 0 and _leftovers(tmp_path) == []

    def fail(model, wave, moments):
        if len(seen) > 12:
            raise RuntimeError("boom")
        spy(model, wave, moments)

    monkeypatch.setattr(stream_stats, "freeze_wave", fail)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(xml, vol, "auto", monkeypatch, spill_at=(str(tmp_path), ".out.nii"))
    assert seen[-1] > 0 and _leftovers(tmp_path) == []


def test_short_disk_falls_back_to_recomputing(nets, monkeypatch):
    """Not enough free disk for the predicted checkpoints: the passes recompute (today's behaviour), say why, and
    freeze the same statistics."""
    _, xml = nets["group"]
    vol = sn._volume((19, 15, 13), seed=6)
    frozen, _, info, _ = _fit(xml, vol, "auto", monkeypatch)
    monkeypatch.setattr(stream_stats.portable, "disk_free", lambda path: 1 << 20)
    again, _, short, _ = _fit(xml, vol, "auto", monkeypatch)
    assert info["checkpointed"] and not short["checkpointed"]
    assert "recompute" in short["note"] and "MB free" in short["note"]
    _same_statistics(frozen, again)


def test_a_disk_filling_up_during_the_passes_falls_back_to_recomputing(nets, monkeypatch, tmp_path):
    """A checkpoint write that fails (no space left, after the check) ends checkpointing: that pass and the rest
    recompute from the volume, the note says why, the statistics are the same and no file is left."""
    _, xml = nets["instance"]
    vol = sn._volume((23, 19, 17), seed=5)
    again, _, _, _ = _fit(xml, vol, "never", monkeypatch)
    monkeypatch.setattr(plane_store, "UNLINK_OPEN", False)
    real, count = plane_store.PlaneFile.write, [0]

    def write(self, first, planes):
        count[0] += 1
        if count[0] > 10:
            raise OSError(28, "No space left on device")
        real(self, first, planes)

    monkeypatch.setattr(plane_store.PlaneFile, "write", write)
    frozen, _, info, _ = _fit(xml, vol, "auto", monkeypatch, spill_at=(str(tmp_path), ".out.nii"))
    assert count[0] > 10 and not info["checkpointed"] and "No space left" in info["note"], info
    assert _leftovers(tmp_path) == []
    _same_statistics(frozen, again)


def test_planner_counts_each_pass_at_its_own_cost(nets):
    """statistics_plan: recomputing, the passes cost the sum of the prefixes (several runs' worth for 27 layers);
    checkpointed, each pass its own segment (together at most one run) plus the checkpoints' disk and traffic."""
    _, xml = nets["in_unet"]
    tm = TileModel(xml, tile=16, compile=False)
    layers, _ = model_norm_layers(tm)
    shape = tm.input_shape_for((64, 48, 48))
    again = stream_stats.statistics_plan(tm.model, layers, shape, 2, checkpoint=False)
    ck = stream_stats.statistics_plan(tm.model, layers, shape, 2, checkpoint=True)
    assert again.passes == ck.passes == 27
    assert again.runs > 5 and ck.runs <= 1.0 < again.runs / 5, (ck.runs, again.runs)
    assert ck.checkpointed and ck.disk_bytes > 0 and ck.io_bytes > ck.disk_bytes and ck.io_s > 0
    assert stream_stats.statistics_cost(tm.model, layers, shape) == (27, ck.runs)


def test_groupnorm_through_onnx_checkpoints(tmp_path):
    """A GroupNorm exported through ONNX (Reshape, MVN, Reshape back; biases broadcast through ShapeOf): the
    checkpointed passes cut it too (shape computations folded at the static shape), PyTorch's whole-volume output."""
    net = sn._unet("group", 4, seed=2)
    onnx = tmp_path / "g.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16, 16), str(onnx), input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {2: "a", 3: "b", 4: "c"}}, dynamo=False)
    vol = sn._volume((31, 21, 19), seed=3)
    got, rep = sn._stream(vol, onnx, precision="f32")
    assert any("statistics passes checkpointed" in n for n in rep.notes), rep.notes
    ref = sn._torch_whole(net, vol)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
