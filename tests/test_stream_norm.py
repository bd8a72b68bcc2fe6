"""InstanceNorm/GroupNorm networks in the layer-streaming engine (volinfer.run.stream_stats): whole-volume statistics
from streamed passes, then the frozen network streams.

Networks are MONAI UNets with residual units (MONAI's default InstanceNorm, and GroupNorm), converted by OpenVINO.
References are computed independently: PyTorch on the whole volume padded to the size multiple, and OpenVINO f32 on
the whole padded volume from the IR file read back.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from volinfer import predict  # noqa: E402
from volinfer.errors import VolinferError  # noqa: E402

MULTIPLE = 4  # strides (2, 2)


def _unet(norm: str, out: int = 3, seed: int = 0) -> torch.nn.Module:
    """MONAI UNet 8-16-32, strides 2, two residual units; non-trivial norm affine parameters (a wrong statistic
    shows)."""
    torch.manual_seed(seed)
    spec = ("group", {"num_groups": 2}) if norm == "group" else "instance"
    net = monai_nets.UNet(3, 1, out, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm=spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return net


def _save(net: torch.nn.Module, path, compress: bool = False):
    m = ov.convert_model(net, example_input=torch.zeros(1, 1, 16, 16, 16), input=[ov.PartialShape([1, 1, -1, -1, -1])])
    m.set_rt_info(str(MULTIPLE), ["volinfer", "size_multiple"])
    ov.save_model(m, str(path), compress_to_fp16=compress)
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_norm")
    out = {}
    for norm, classes in (("instance", 3), ("group", 4)):
        net = _unet(norm, classes)
        out[norm] = (net, _save(net, d / f"{norm}.xml"))
    return out


def _volume(shape, seed=0) -> np.ndarray:
    """Smooth blobs on an offset, plus noise: image-like, and a mean far from zero (so the mean matters)."""
    rng = np.random.default_rng(seed)
    v = 3.0 + rng.standard_normal(shape).astype(np.float32) * 0.3
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for _ in range(5):
        c, r = rng.uniform(0, shape), rng.uniform(3, 8)
        v += 2.5 * np.exp(-((grid - c) ** 2).sum(-1) / (2 * r * r)).astype(np.float32)
    return v


def _padded(vol: np.ndarray) -> np.ndarray:
    return np.pad(vol, [(0, (-n) % MULTIPLE) for n in vol.shape])[None, None]


def _torch_whole(net, vol: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = net(torch.from_numpy(np.ascontiguousarray(_padded(vol)))).numpy()[0]
    return y[:, : vol.shape[0], : vol.shape[1], : vol.shape[2]]


def _ov_whole(model, vol: np.ndarray, f32: bool = True) -> np.ndarray:
    m = ov.Core().read_model(str(model)) if not isinstance(model, ov.Model) else model.clone()
    x = _padded(vol)
    m.reshape([1, 1, *x.shape[2:]])
    cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"} if f32 else {})
    return np.asarray(cm(x)[0])[0][:, : vol.shape[0], : vol.shape[1], : vol.shape[2]]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(0))
    return e / e.sum(0)


def _stream(vol, xml, **kw):
    out, rep = predict(vol, xml, engine="stream", kind="raw", progress=False, report=True, **kw)
    assert rep.engine == "stream" and rep.exact, rep.notes
    assert any("frozen to whole-volume statistics" in n for n in rep.notes), rep.notes
    return np.moveaxis(out, -1, 0), rep


@pytest.mark.parametrize("norm,shape", [("instance", (37, 29, 23)), ("instance", (21, 17, 1)),
                                        ("instance", (13, 18, 70)), ("group", (37, 29, 23)),
                                        ("group", (15, 11, 3))])
def test_norm_unet_streams_whole_volume_inference_f32(nets, norm, shape):
    """Odd shapes, z from one plane (padded to 4) to far beyond the receptive field (23 voxels): the streamed
    output is PyTorch's whole-volume inference to float32 rounding."""
    net, xml = nets[norm]
    vol = _volume(shape, seed=len(shape) + shape[2])
    got, rep = _stream(vol, xml, precision="f32")
    ref = _torch_whole(net, vol)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(_softmax(got) - _softmax(ref)).max() <= 1e-3
    assert (got.argmax(0) == ref.argmax(0)).mean() >= 0.9999
    assert rep.input_passes >= 1 + 9  # the pre-pass, then one streamed pass per layer (a chain: one per wave)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_norm_unet_streams_at_the_default_precision(nets, norm):
    """bf16 on this CPU (the default): probabilities within 0.05 of PyTorch's f32 whole-volume inference, and
    within what OpenVINO's own whole-volume run at the default precision deviates by."""
    net, xml = nets[norm]
    vol = _volume((37, 29, 23), seed=5)
    got, rep = _stream(vol, xml)
    ref = _softmax(_torch_whole(net, vol))
    dp = np.abs(_softmax(got) - ref).max()
    whole_dp = np.abs(_softmax(_ov_whole(xml, vol, f32=False)) - ref).max()
    assert dp <= 0.05 and dp <= 3 * max(whole_dp, 0.005), (dp, whole_dp, rep.precision)
    assert (_softmax(got).argmax(0) == ref.argmax(0)).mean() >= 0.995


def test_compressed_ir_streams_like_the_file(tmp_path):
    """An IR saved with OpenVINO's default f16 weight compression: the stream equals OpenVINO f32 on the whole
    volume from the same file (statistics and frozen constants follow the file's weights)."""
    xml = _save(_unet("instance", seed=3), tmp_path / "f16.xml", compress=True)
    vol = _volume((26, 19, 31), seed=7)
    got, _ = _stream(vol, xml, precision="f32")
    ref = _ov_whole(xml, vol)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_statistics_over_bands_of_rows_are_the_whole_volume_statistics(nets):
    """Streamed in bands of y rows whose margins cover the receptive field (23 voxels), each band contributes only
    its aligned core rows: the model frozen with those statistics, run whole by OpenVINO, equals PyTorch's
    whole-volume inference."""
    from volinfer.io.reader import VolumeSource
    from volinfer.model.spatial_norm import frozen_like
    from volinfer.model.tile_model import CompileOptions, TileModel
    from volinfer.run.normalize import Normalizer
    from volinfer.run.setup import model_norm_layers
    from volinfer.run.stream import band_reader, plan_stream
    from volinfer.run.stream_stats import fit_stream_statistics

    net, xml = nets["instance"]
    vol = _volume((13, 117, 10), seed=9)
    tm = TileModel(xml, tile=16, compile=False, options=CompileOptions(precision="f32"))
    layers, _ = model_norm_layers(tm)
    planning = tm.at(tm.tile, model=frozen_like(tm.model, layers), compile=False)
    plan = plan_stream(planning, vol.shape, "f32", fits=lambda p: p.band <= 72, margin_y=24)
    bands = plan.bands(vol.shape[1], tm.multiple)
    assert bands.count >= 3
    run_tm = tm.at((plan.padded[0], plan.band, plan.out_planes), compile=False)
    source = VolumeSource.from_array(vol)
    frozen, passes = fit_stream_statistics(run_tm, plan, layers, bands,
                                           lambda p: band_reader(source, run_tm, p, Normalizer(None, 1)))
    assert passes == len(layers) == 9
    assert not [op for op in frozen.get_ordered_ops() if op.get_type_name() == "MVN"]
    ref = _torch_whole(net, vol)
    assert np.abs(_ov_whole(frozen, vol) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _auto_run_at_large_net_memory(monkeypatch, net, xml, vol, bytes_per_voxel, budget_mb):
    """``predict`` with no engine given, the planner told tiles cost ``bytes_per_voxel`` (as a large network's do):
    it must stream, exactly, equal to PyTorch on the whole volume; returns the report."""
    import volinfer.run.setup as setup

    monkeypatch.setattr(setup, "activation_bytes_per_voxel", lambda *a, **k: bytes_per_voxel)
    monkeypatch.setattr(setup, "STREAM_CALL_S", 0.0)  # (the stream's calls would dwarf volumes this small)
    out, rep = predict(vol, xml, kind="raw", precision="f32", max_memory_mb=budget_mb, progress=False, report=True)
    assert rep.engine == "stream" and rep.exact, rep.notes
    ref = _torch_whole(net, vol)
    assert np.abs(np.moveaxis(out, -1, 0) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    return rep


def test_auto_streams_a_norm_model_when_no_exact_tiling_fits(nets, monkeypatch):
    """Tiles that cost far more memory per voxel than this small network's (as a large network's do): no exact
    tiling fits the budget, the stream does; auto streams, exactly, instead of running tiles that are not."""
    net, xml = nets["instance"]
    rep = _auto_run_at_large_net_memory(monkeypatch, net, xml, _volume((24, 20, 96), seed=2), 4000.0, 190)
    assert any("no exact tiling fits" in n for n in rep.notes), rep.notes


def test_auto_streams_when_tiles_would_need_statistics_passes(nets, monkeypatch):
    """A budget (at a large network's memory per voxel) that holds exact tiles along z but not the whole volume:
    tiles would recompute wide margins and gather statistics in passes over them; auto streams instead (one pass
    per layer wave) and says so."""
    net, xml = nets["group"]
    rep = _auto_run_at_large_net_memory(monkeypatch, net, xml, _volume((20, 16, 150), seed=4), 800.0, 170)
    assert any("streamed pass(es) of the network" in n for n in rep.notes), rep.notes


def test_what_cannot_stream_says_so(nets):
    """Per-tile statistics cannot stream: ``--engine stream`` says why in one line."""
    _, xml = nets["instance"]
    with pytest.raises(VolinferError, match="--norm-stats tile"):
        predict(_volume((12, 12, 12)), xml, engine="stream", norm_stats="tile", progress=False)


def test_groupnorm_exported_through_onnx(tmp_path):
    """PyTorch's GroupNorm exported to ONNX before opset 18 is a Reshape to (1, groups, -1), an InstanceNormalization
    (MVN plus a per-group scale and shift) and a Reshape back, with the convolutions' biases broadcast through
    shape computations: found as one group normalisation, it streams (and tiles, several per axis) with whole-volume
    statistics, equal to PyTorch's whole-volume inference."""
    net = _unet("group", 4, seed=2)
    onnx = tmp_path / "g.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16, 16), str(onnx), input_names=["x"], opset_version=17,
                      dynamic_axes={"x": {2: "a", 3: "b", 4: "c"}}, dynamo=False)
    vol = _volume((37, 29, 23), seed=3)
    ref = _torch_whole(net, vol)
    got, rep = _stream(vol, onnx, precision="f32")
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    raw, rep = predict(vol, onnx, kind="raw", precision="f32", tile=(32, 24, 16), engine="tiles", overlap=0,
                       progress=False, report=True)
    assert rep.tiles > 4 and rep.input_passes == 1 + 9  # multi-tile: the statistics come from the streamed passes
    frozen_stats = np.moveaxis(raw, -1, 0)
    per_tile = predict(vol, onnx, kind="raw", precision="f32", tile=(32, 24, 16), engine="tiles", overlap=0,
                       norm_stats="tile", progress=False)
    assert np.abs(frozen_stats - ref).mean() < 0.5 * np.abs(np.moveaxis(per_tile, -1, 0) - ref).mean()

def test_planner_does_not_buy_statistics_passes():
    """The planner's one objective must not choose 8 tiles and their statistics passes over one tile that fits the
    memory budget and needs none (a MONAI UNet at 256³: 8 tiles plus 13 passes ran 10x longer than one tile); a
    budget below that one tile still gets a multi-tile plan within it."""
    from volinfer.model.receptive_field import ReceptiveField
    from volinfer.run.fidelity import TilingProblem, plan_exact

    args = ((256, 256, 256), 8, ReceptiveField((47, 47, 47), True), (64, 64, 64), 60.0, 1.0)
    one = plan_exact(TilingProblem(*args, budget_mb=4000, norm_layers=13, global_ops=False, whole_stats=True))
    assert one.counts == (1, 1, 1) and one.norm_passes == 0
    plain = plan_exact(TilingProblem(*args, budget_mb=700, norm_layers=0, global_ops=False, whole_stats=True))
    assert plain.memory_mb <= 700 and plain.counts != (1, 1, 1)


def test_no_exact_plan_fits_runs_the_most_faithful_tiling(nets, monkeypatch):
    """No exact tiling fits the budget and tiles are asked for: the largest tile the budget holds, crop margins as
    wide as a quarter tile allows on the axes it cuts, whole-volume statistics, reported not exact; closer to
    whole-volume inference than that tile with the default quarter-tile overlap."""
    import volinfer.run.setup as setup

    monkeypatch.setattr(setup, "activation_bytes_per_voxel", lambda *a, **k: 2000.0)
    net, xml = nets["instance"]
    vol = _volume((30, 26, 70), seed=6)
    ref = _torch_whole(net, vol)
    out, rep = predict(vol, xml, kind="raw", precision="f32", max_memory_mb=200, engine="tiles", progress=False,
                       report=True)
    assert not rep.exact and any("most faithful tiling" in n and "whole-volume statistics" in n for n in rep.notes)
    # from the whole padded volume (32x28x72) down one multiple on one axis at a time: x stays whole (one tile, no
    # margin along it); shortening x with z once their lengths tied gave 28³ with margins on x too
    assert rep.tile == (32, 28, 28) and rep.overlap == (0, 0, 14) and rep.input_passes > 1, (rep.tile, rep.overlap)
    err = np.abs(np.moveaxis(out, -1, 0) - ref).mean()
    default = predict(vol, xml, kind="raw", precision="f32", tile=28, engine="tiles", progress=False)
    assert err < 0.85 * np.abs(np.moveaxis(default, -1, 0) - ref).mean()


class _InputNorm(torch.nn.Module):
    """InstanceNorm of the input itself, a one-group GroupNorm, a strided branch added back after a transposed
    convolution."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.n, self.c, self.g = nn.InstanceNorm3d(1, affine=True), nn.Conv3d(1, 2, 3, padding=1), nn.GroupNorm(1, 2)
        self.down, self.up = nn.Conv3d(2, 2, 3, padding=1, stride=2), nn.ConvTranspose3d(2, 2, 2, 2)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.5)

    def forward(self, x):
        a = self.g(self.c(self.n(x)))
        return self.up(self.down(a)) + a


def test_cli_streams_a_model_normalising_its_input(tmp_path):
    """`volinfer run --engine stream --json` on a model whose first layer normalises the input itself (statistics
    of the volume, no network pass needed to reach it): PyTorch's whole-volume output, and the summary says how."""
    import json
    import subprocess
    import sys

    import nibabel as nib

    net = _InputNorm().eval()
    m = ov.convert_model(net, example_input=torch.zeros(1, 1, 8, 8, 8), input=[ov.PartialShape([1, 1, -1, -1, -1])])
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    xml = tmp_path / "inorm.xml"
    ov.save_model(m, str(xml), compress_to_fp16=False)
    vol = _volume((11, 9, 13), seed=8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "in.nii"))
    dst = tmp_path / "out.nii"
    r = subprocess.run([sys.executable, "-m", "volinfer", "run", str(tmp_path / "in.nii"), "-m", str(xml), "-o",
                        str(dst), "--engine", "stream", "--precision", "f32", "--kind", "raw", "--json", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["engine"] == "stream" and rep["exact"] and rep["input_passes"] == 1 + 2, rep
    with torch.no_grad():
        ref = net(torch.from_numpy(np.pad(vol, [(0, (-n) % 2) for n in vol.shape])[None, None])).numpy()[0]
    got = np.moveaxis(np.asarray(nib.load(str(dst)).dataobj), -1, 0)
    assert np.abs(got - ref[:, :11, :9, :13]).max() <= 1e-4
