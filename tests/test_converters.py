"""Converters: every source kind converts, matches its source, and describes itself; failures leave nothing behind."""

import json
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from converters import convert as _convert  # noqa: E402
from converters import kind_of  # noqa: E402
from volinfer import ModelSettings, TileModel, VolinferError, predict  # noqa: E402
from volinfer.bench.reference_unet import UNet3D  # noqa: E402
from volinfer.cli import main  # noqa: E402
from volinfer.tiling.geometry import padded_size  # noqa: E402

NETS = textwrap.dedent('''
    import torch
    from torch import nn
    from volinfer.bench.reference_unet import UNet3D

    def small_unet(out_channels=2):
        torch.manual_seed(1)
        return UNet3D(1, out_channels, channels=(4, 8, 16)).eval()

    class InstNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv3d(1, 4, 3, padding=1)
            self.n = nn.InstanceNorm3d(4, affine=True)
            self.c2 = nn.Conv3d(4, 2, 1)
        def forward(self, x):
            return self.c2(torch.relu(self.n(self.c1(x))))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv3d(2, 4, 3, padding=1)
            self.seg = nn.Conv3d(4, 3, 1)
            self.aux = nn.Conv3d(4, 1, 1)
        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.aux(h), self.seg(h)

    class DeepSupervision(nn.Module):  # nnU-Net's training head: a half-resolution auxiliary output listed first
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv3d(1, 4, 3, padding=1)
            self.down = nn.Conv3d(4, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
            self.aux = nn.Conv3d(8, 3, 1)
            self.seg = nn.Conv3d(8, 3, 3, padding=1)
        def forward(self, x):
            e = torch.relu(self.enc(x))
            d = torch.relu(self.down(e))
            return self.aux(d), self.seg(torch.cat([e, torch.relu(self.up(d))], 1))

    class SizeFollowing(nn.Module):  # a published pattern: the decoder interpolates to the skip connection's size
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv3d(1, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)  # exported as a Reshape that regroups space: no kernel arithmetic
            self.mid = nn.Conv3d(4, 4, 3, padding=1)
            self.out = nn.Conv3d(8, 2, 3, padding=1)
        def forward(self, x):
            e = torch.relu(self.norm(self.enc(x)))
            d = torch.relu(self.mid(nn.functional.max_pool3d(nn.functional.max_pool3d(e, 2), 2)))
            up = nn.functional.interpolate(d, size=e.shape[2:], mode="trilinear", align_corners=False)
            return self.out(torch.cat([e, up], 1))

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)
        def forward(self, x):  # (N, D, H, W, C) in and out
            return self.conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    def instnorm():
        torch.manual_seed(2)
        return InstNormNet().eval()

    def two_heads():
        torch.manual_seed(3)
        return TwoHeads().eval()

    def deep_supervision():
        torch.manual_seed(5)
        return DeepSupervision().eval()

    def size_following():
        torch.manual_seed(6)
        return SizeFollowing().eval()

    def channels_last():
        torch.manual_seed(4)
        return ChannelsLast().eval()

    def margin_net():
        """Two well-separated classes (logits +-3x of a local mean): INT8 keeps its labels."""
        net = nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0] += 3.0 / 27
            net.weight[1] -= 3.0 / 27
            net.bias.zero_()
        return net.eval()
''')


@pytest.fixture
def nets(tmp_path):
    p = tmp_path / "nets.py"
    p.write_text(NETS)
    return p


def convert(*args, **kwargs):
    """The converter with --random-weights for factories (these tests convert their seeded weights on purpose)."""
    factory = ":" in str(args[0]) and not Path(str(args[0])).exists()
    kwargs.setdefault("random_weights", factory and "weights" not in kwargs)
    return _convert(*args, **kwargs)


def _nets_module(path):
    """The factories file as a module, to run its networks in PyTorch beside the converted IR."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _settings(xml):
    return ModelSettings.from_model(ov.Core().read_model(str(xml)))


def test_factory_with_state_dict_converts_matches_and_describes_itself(tmp_path, nets):
    net = UNet3D(1, 2, channels=(4, 8, 16))
    torch.manual_seed(9)
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "unet.xml"
    r = convert(f"{nets}:small_unet", out, weights=str(weights), tile=32, activation="softmax",
                labels=["bg", "fg"], normalization={"kind": "zscore"}, spacing=[1, 1, 2])
    assert r.parity.passed and r.parity.max_rel < 1e-2 and r.parity.reference == "PyTorch (eager)"
    s = _settings(out)
    assert (s.layout, s.in_channels, s.tile, s.size_multiple) == ("NCDHW", 1, [32, 32, 32], 4)
    assert s.activation == "softmax" and s.labels == ["bg", "fg"] and s.spacing == [1, 1, 2]
    assert s.source_framework == "pytorch" and len(s.receptive_field) == 3 and s.volinfer_version
    # the IR runs in volinfer and reproduces the source network (weights loaded from the state_dict, not seed 1)
    vol = np.random.default_rng(0).standard_normal((32, 32, 32)).astype(np.float32)
    got = predict(vol, str(out), kind="raw", normalize={"kind": "none"}, precision="f32")
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(vol)[None, None])[0].numpy()
    np.testing.assert_allclose(np.moveaxis(got, -1, 0), want, atol=2e-2 * np.abs(want).max())


def test_state_dict_mismatch_lists_keys(tmp_path, nets):
    weights = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(VolinferError, match=r"missing \d+ key\(s\): body\..*unexpected 1 key\(s\): conv"):
        convert(f"{nets}:small_unet", tmp_path / "x.xml", weights=str(weights), tile=32)
    assert not list(tmp_path.glob("*.xml"))


def test_torchscript_export_and_refused_pickle(tmp_path, nets):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_mod", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.small_unet()
    x = torch.zeros(1, 1, 32, 32, 32)
    torch.jit.trace(net, x).save(str(tmp_path / "traced.pt"))
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "exported.pt2"))
    torch.save(net, tmp_path / "pickled.pth")
    r1 = convert(str(tmp_path / "traced.pt"), tmp_path / "a.xml", tile=32)
    r2 = convert(str(tmp_path / "exported.pt2"), tmp_path / "b.xml", tile=32)
    assert r1.parity.passed and r2.parity.passed
    assert _settings(tmp_path / "a.xml").source_framework == "torchscript"
    assert _settings(tmp_path / "b.xml").source_framework == "torch.export"
    with pytest.raises(VolinferError, match="--trust-pickle"):
        convert(str(tmp_path / "pickled.pth"), tmp_path / "c.xml", tile=32)
    assert not (tmp_path / "c.xml").exists()


def test_onnx_source(tmp_path, nets):
    pytest.importorskip("onnx")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_mod2", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(mod.small_unet(), torch.zeros(1, 1, 32, 32, 32), str(onnx_path), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {2: "d", 3: "h", 4: "w"}, "logits": {2: "d", 3: "h", 4: "w"}})
    r = convert(str(onnx_path), tmp_path / "m.xml", tile=48)
    assert r.parity.passed and _settings(tmp_path / "m.xml").size_multiple == 4
    # and volinfer runs ONNX directly too
    assert TileModel(onnx_path, tile=32).out_channels == 2


def test_instance_norm_is_flagged_and_info_warns(tmp_path, nets):
    r = convert(f"{nets}:instnorm", tmp_path / "inorm.xml", tile=32)
    assert r.parity.passed and any("whole-volume statistics" in n for n in r.notes)
    s = _settings(tmp_path / "inorm.xml")
    assert s.instance_norm and s.stitch is None  # crop: the run freezes the statistics, blending is not needed
    res = CliRunner().invoke(main, ["info", str(tmp_path / "inorm.xml"), "--no-measure"])
    assert res.exit_code == 0 and "InstanceNorm/GroupNorm layer(s)" in res.output


def test_two_output_network_uses_chosen_output(tmp_path, nets):
    convert(f"{nets}:two_heads", tmp_path / "two.xml", tile=16, select_output=1)
    tm = TileModel(tmp_path / "two.xml")
    assert tm.out_channels == 3 and tm.in_channels == 2
    vol = np.random.default_rng(1).standard_normal((2, 20, 18, 16)).astype(np.float32)
    labels = predict(vol, tm, channel_axis=0)
    assert labels.shape == (20, 18, 16) and labels.max() <= 2


def test_deep_supervision_converts_and_runs_its_full_size_head(tmp_path, nets):
    """A model whose first output is a down-sampled auxiliary head (deep supervision) converts with the full-size
    head chosen (it was refused: 'accepts no cubic input size', every output had to be full size), its receptive
    field measured on that head, and runs it: whole-volume PyTorch logits on an odd volume, f32 tiles and stream."""
    convert(f"{nets}:deep_supervision", tmp_path / "ds.xml", tile=16, select_output=1, fp16=False)
    st = _settings(tmp_path / "ds.xml")
    assert st.output == "1" and st.size_multiple == 2 and st.receptive_field
    vol = np.random.default_rng(2).standard_normal((21, 18, 15)).astype(np.float32)
    padded = np.pad(vol, [(0, 1), (0, 0), (0, 1)])
    mod = _nets_module(nets)
    with torch.no_grad():
        ref = mod.deep_supervision()(torch.from_numpy(padded)[None, None])[1][0].numpy()[:, :21, :18, :15]
    for engine in ("tiles", "stream"):
        out, rep = predict(vol, tmp_path / "ds.xml", kind="raw", precision="f32", engine=engine, progress=False,
                           report=True)
        assert rep.exact and rep.engine == engine
        np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=1e-4)


def test_an_interpolation_to_a_computed_size_keeps_the_pooling_period(tmp_path, nets):
    """A decoder that interpolates to its skip connection's size accepts any input size, and a GroupNorm exported as
    a Reshape that regroups space stops the graph arithmetic: the size multiple came out 1, so tiles started at odd
    voxels under two stride-2 poolings (convert's own tiling check then measured labels 91% equal, and runs still
    said exact). Shape inference finds the period: 4, and 4-aligned tiles with the receptive field's margins and
    whole-volume statistics are whole-volume inference."""
    pytest.importorskip("onnx")
    mod = _nets_module(nets)
    net = mod.size_following()
    torch.onnx.export(net, torch.zeros(1, 1, 32, 32, 32), str(tmp_path / "sf.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "d", 3: "h", 4: "w"}})
    convert(str(tmp_path / "sf.onnx"), tmp_path / "sf.xml", tile=32, fp16=False)
    st = _settings(tmp_path / "sf.xml")
    assert st.size_multiple == 4, st.size_multiple
    vol = np.random.default_rng(4).standard_normal((44, 36, 40)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(vol)[None, None])[0].numpy()
    out, rep = predict(vol, tmp_path / "sf.xml", kind="raw", precision="f32", tile=36, progress=False, report=True)
    assert rep.exact and rep.tiles > 1, rep.not_exact
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-4)


def test_channels_last_model(tmp_path, nets):
    r = convert(f"{nets}:channels_last", tmp_path / "cl.xml", tile=16, layout="NDHWC", channels=1)
    assert r.parity.passed and _settings(tmp_path / "cl.xml").layout == "NDHWC"
    vol = np.random.default_rng(2).standard_normal((21, 17, 19)).astype(np.float32)
    got = predict(vol, str(tmp_path / "cl.xml"), kind="raw", overlap=4, precision="f32")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_mod3", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.no_grad():
        want = mod.channels_last()(torch.from_numpy(vol)[None, ..., None])[0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())


def test_parity_failure_leaves_nothing(tmp_path, nets):
    # FP16 weights fail, FP32 weights are tried and fail too: the error quotes both
    with pytest.raises(VolinferError, match=r"parity FAILED: max \|diff\| .* relative .* with FP32 weights \(FP16 "
                                            r"weights failed first: relative .*\); loosen with --tolerance$"):
        convert(f"{nets}:small_unet", tmp_path / "bad.xml", tile=32, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == [nets]


def test_unknown_keys_are_kept_when_redescribing_an_ir(tmp_path, nets):
    convert(f"{nets}:small_unet", tmp_path / "a.xml", tile=32, labels=["x", "y"])
    m = ov.Core().read_model(str(tmp_path / "a.xml"))
    m.set_rt_info(json.dumps({"site": "lab 3"}), ["volinfer", "future_key"])
    ov.save_model(m, str(tmp_path / "b.xml"), compress_to_fp16=False)
    convert(str(tmp_path / "b.xml"), tmp_path / "c.xml", activation="sigmoid")
    s = _settings(tmp_path / "c.xml")
    assert s.extra["future_key"] == {"site": "lab 3"} and s.labels == ["x", "y"] and s.activation == "sigmoid"


def test_cli_errors_are_one_line(tmp_path, nets):
    run = CliRunner().invoke
    (tmp_path / "model.txt").write_text("x")
    cases = [
        ([str(tmp_path / "model.txt")], "unknown model type .txt"),
        ([f"{nets}:nope"], "no factory named 'nope'"),
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([f"{nets}:small_unet", "--tile", "30", "--random-weights"], "divisible by 4"),
    ]
    for args, msg in cases:
        r = run(main, ["convert", *args, "-o", str(tmp_path / "o.xml")])
        assert r.exit_code == 2 and msg in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o.xml").exists()


def test_calibration_volume_and_kinds(tmp_path, nets):
    vol = tmp_path / "cal.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 900, (40, 40, 40)).astype(np.int16), np.eye(4)),
             str(vol))
    r = convert(f"{nets}:small_unet", tmp_path / "c.xml", tile=32, calibration_volume=str(vol),
                normalization={"kind": "zscore"})
    assert r.parity.passed
    assert kind_of(str(tmp_path / "c.xml")) == "openvino" and kind_of("pkg.mod:f") == "torch-factory"


def test_monai_unet_converts_and_tiles_exactly(tmp_path):
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2),
                          num_res_units=2, norm="batch").eval()
    (tmp_path / "mnets.py").write_text(
        "import torch\nfrom monai.networks.nets import UNet\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2),"
        " num_res_units=2, norm='batch').eval()\n")
    r = convert(f"{tmp_path / 'mnets.py'}:build", tmp_path / "monai.xml", tile=96, fp16=False)
    assert r.parity.passed and _settings(tmp_path / "monai.xml").size_multiple == 4
    rf = _settings(tmp_path / "monai.xml").receptive_field
    # crop stitching with a margin covering the measured receptive field equals PyTorch on the whole volume
    assert not _settings(tmp_path / "monai.xml").extra.get("receptive_field_bounded") is False
    vol = np.random.default_rng(3).standard_normal((150, 101, 97)).astype(np.float32)
    margin = max(rf) + 2
    got = predict(vol, str(tmp_path / "monai.xml"), kind="raw", overlap=2 * margin, precision="f32")
    padded = [padded_size(n, 96, 4) for n in vol.shape]
    with torch.no_grad():
        full = torch.from_numpy(np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)]))[None, None]
        want = net(full)[0].numpy()[:, :150, :101, :97]
    np.testing.assert_allclose(np.moveaxis(got, -1, 0), want, atol=1e-4 * np.abs(want).max())


def test_int8_is_judged_by_labels_against_fp32(tmp_path, nets, monkeypatch):
    pytest.importorskip("nncf")
    import converters.parity as parity

    vol = tmp_path / "cal.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 900, (48, 48, 48)).astype(np.int16), np.eye(4)),
             str(vol))
    with pytest.raises(VolinferError, match="--int8 needs --calibration-volume"):
        convert(f"{nets}:margin_net", tmp_path / "q.xml", tile=32, int8=True)
    r = convert(f"{nets}:margin_net", tmp_path / "q.xml", tile=32, int8=True, calibration_volume=str(vol),
                normalization={"kind": "zscore"}, calibration_tiles=3, measure_rf=False)
    ops = {o.get_type_name() for o in ov.Core().read_model(str(tmp_path / "q.xml")).get_ops()}
    assert "FakeQuantize" in ops and "reported only" in str(r.parity)
    assert r.int8.passed and r.int8.agreement >= parity.INT8_AGREEMENT_MIN and r.int8.tiles == 3
    assert "int8" in _settings(tmp_path / "q.xml").extra["quantization"]
    # below the stated threshold the conversion fails loudly and leaves nothing
    monkeypatch.setattr(parity, "INT8_AGREEMENT_MIN", 1.01)
    with pytest.raises(VolinferError, match=r"INT8 rejected, INT8 vs FP32 FAILED: labels agree .*need >= 101%"):
        convert(f"{nets}:margin_net", tmp_path / "q2.xml", tile=32, int8=True, calibration_volume=str(vol),
                normalization={"kind": "zscore"}, calibration_tiles=3, measure_rf=False)
    assert not (tmp_path / "q2.xml").exists()
