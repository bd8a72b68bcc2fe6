"""Converters on small but real-shaped networks (issue 11): normalisation U-Nets checked against PyTorch with label
agreement, a broken conversion rejected, a Softmax head detected, old state_dicts accepted as torch accepts them,
ONNX parity in onnxruntime."""

import textwrap

import numpy as np
import openvino as ov
import pytest

torch = pytest.importorskip("torch")

import sys  # noqa: E402

import converters.convert  # noqa: E402, F401
from converters import convert  # noqa: E402
from converters.parity import judge  # noqa: E402
from volinfer import ModelSettings, VolinferError  # noqa: E402

convert_mod = sys.modules["converters.convert"]

NETS = textwrap.dedent('''
    import torch
    from torch import nn

    def block(cin, cout, norm):
        n = nn.InstanceNorm3d(cout, affine=True) if norm == "instance" else nn.GroupNorm(2, cout)
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), n, nn.LeakyReLU(0.01),
                             nn.Conv3d(cout, cout, 3, padding=1),
                             nn.InstanceNorm3d(cout, affine=True) if norm == "instance" else nn.GroupNorm(2, cout),
                             nn.LeakyReLU(0.01))

    class UNet(nn.Module):
        """nnU-Net-shaped: three levels, two conv-norm-act per level, strided down, transposed up, skips."""
        def __init__(self, norm="instance", c=(4, 8, 16), out=3, softmax=False):
            super().__init__()
            self.e0, self.e1 = block(1, c[0], norm), block(c[0], c[1], norm)
            self.down0, self.down1 = nn.Conv3d(c[0], c[0], 2, 2), nn.Conv3d(c[1], c[1], 2, 2)
            self.mid = block(c[1], c[2], norm)
            self.up1, self.d1 = nn.ConvTranspose3d(c[2], c[1], 2, 2), block(2 * c[1], c[1], norm)
            self.up0, self.d0 = nn.ConvTranspose3d(c[1], c[0], 2, 2), block(2 * c[0], c[0], norm)
            self.head = nn.Conv3d(c[0], out, 1)
            self.softmax = softmax
        def forward(self, x):
            s0 = self.e0(x)
            s1 = self.e1(self.down0(s0))
            m = self.mid(self.down1(s1))
            y = self.d1(torch.cat([self.up1(m), s1], 1))
            y = self.head(self.d0(torch.cat([self.up0(y), s0], 1)))
            return torch.softmax(y, 1) if self.softmax else y

    def instance_unet():
        torch.manual_seed(0)
        return UNet("instance").eval()

    def group_unet():
        torch.manual_seed(1)
        return UNet("group").eval()

    def softmax_unet():
        torch.manual_seed(2)
        return UNet("instance", softmax=True).eval()

    def bn_net():
        return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1),
                             nn.BatchNorm3d(2))
''')


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    p = tmp_path_factory.mktemp("nets") / "realnets.py"
    p.write_text(NETS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("realnets", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return p, mod


def _save_weights(module, path, seed):
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        p.data.normal_(1.0 if name.endswith("weight") and p.ndim == 1 else 0.0, 0.3)
    torch.save(module.state_dict(), path)
    return module


@pytest.mark.parametrize("factory", ["instance_unet", "group_unet"])
def test_normalisation_unets_match_pytorch_with_label_agreement(tmp_path, nets, factory):
    path, mod = nets
    net = _save_weights(getattr(mod, factory)(), tmp_path / "w.pth", seed=5)
    r = convert(f"{path}:{factory}", tmp_path / "n.xml", weights=str(tmp_path / "w.pth"), tile=24, fp16=False,
                measure_rf=False)
    p = r.parity
    assert p.checked and p.passed and p.reference == "PyTorch (eager)" and p.agreement >= 0.999
    assert "labels agree" in str(p) and any("normalises per input" in n for n in r.notes)
    # the IR computes what PyTorch computes on an odd-shaped input, independently of the converter's own check
    x = np.random.default_rng(7).standard_normal((1, 1, 20, 28, 24)).astype(np.float32)
    compiled = ov.Core().compile_model(str(tmp_path / "n.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x)[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999


def test_parity_criterion_accepts_rounding_and_rejects_wrong_models():
    # deep normalisation networks: a few 1e-3 relative, labels 99.99 % equal -> accepted on labels
    assert judge(4e-3, 0.9999, 1e-4) == (True, judge(4e-3, 0.9999, 1e-4)[1]) and judge(4e-3, 0.9999, 1e-4)[1]
    assert judge(5e-5, None, 1e-4) == (True, None)
    assert judge(4e-3, 0.995, 1e-4)[0] is False  # labels moved by 0.5 %: wrong
    assert judge(0.2, 0.9995, 1e-4)[0] is False  # labels fine but values far off: wrong
    assert judge(4e-3, None, 1e-4)[0] is False  # no labels to vouch for it (1-channel output)
    assert judge(4e-3, 0.9999, 1e-12, loose=1e-11)[0] is False  # an explicit strict tolerance stays strict


def test_deep_instance_norm_accepted_and_perturbed_conversion_rejected(tmp_path, nets, monkeypatch):
    path, mod = nets
    _save_weights(mod.instance_unet(), tmp_path / "w.pth", seed=11)
    ok = convert(f"{path}:instance_unet", tmp_path / "ok.xml", weights=str(tmp_path / "w.pth"), tile=24,
                 measure_rf=False)
    assert ok.parity.passed and ok.weights.dtype == "f16"  # FP16 weights through 10 InstanceNorms: accepted
    real = convert_mod._convert_with_examples

    def broken(*args, **kwargs):  # a conversion that gets one weight tensor slightly wrong (noise of 10 % its std)
        m = real(*args, **kwargs)
        const = next(op for op in m.get_ordered_ops() if op.get_type_name() == "Constant"
                     and len(op.get_output_shape(0)) == 5 and op.get_output_shape(0)[0] >= 8)
        data = const.get_data().astype(np.float32)
        data = data + 0.1 * data.std() * np.random.default_rng(0).standard_normal(data.shape).astype(np.float32)
        for t in list(const.output(0).get_target_inputs()):
            t.replace_source_output(ov.op.Constant(data).output(0))
        return m

    monkeypatch.setattr(convert_mod, "_convert_with_examples", broken)
    with pytest.raises(VolinferError, match=r"conversion rejected, parity FAILED: .*labels agree"):
        convert(f"{path}:instance_unet", tmp_path / "bad.xml", weights=str(tmp_path / "w.pth"), tile=24,
                measure_rf=False)
    assert not (tmp_path / "bad.xml").exists()


def test_wrong_layout_is_rejected(tmp_path, nets):
    path, mod = nets
    _save_weights(mod.group_unet(), tmp_path / "w.pth", seed=3)
    with pytest.raises(VolinferError):
        convert(f"{path}:group_unet", tmp_path / "l.xml", weights=str(tmp_path / "w.pth"), tile=24,
                layout="NDHWC", channels=1, measure_rf=False)
    assert not (tmp_path / "l.xml").exists()


def test_softmax_head_is_detected_and_not_applied_twice(tmp_path, nets):
    pytest.importorskip("volinfer.model.activation")
    path, mod = nets
    _save_weights(mod.softmax_unet(), tmp_path / "w.pth", seed=2)
    r = convert(f"{path}:softmax_unet", tmp_path / "s.xml", weights=str(tmp_path / "w.pth"), tile=16,
                measure_rf=False)
    s = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "s.xml")))
    assert s.activation == "none" and (s.extra.get("outputs") or getattr(s, "outputs", None)) == "probabilities"
    assert any("already ends in softmax" in n for n in r.notes)
    r2 = convert(f"{path}:softmax_unet", tmp_path / "s2.xml", weights=str(tmp_path / "w.pth"), tile=16,
                 measure_rf=False, activation="softmax")
    s2 = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "s2.xml")))
    assert s2.activation == "softmax" and any("applies another" in n for n in r2.notes)  # explicit wins
    _save_weights(mod.instance_unet(), tmp_path / "w2.pth", seed=2)
    convert(f"{path}:instance_unet", tmp_path / "l.xml", weights=str(tmp_path / "w2.pth"), tile=16, measure_rf=False)
    s3 = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "l.xml")))
    assert s3.activation is None and (s3.extra.get("outputs") or getattr(s3, "outputs", None)) == "logits"


def test_state_dict_without_num_batches_tracked_is_accepted_like_torch(tmp_path, nets):
    path, mod = nets
    net = mod.bn_net()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(net.state_dict())
    torch.save(state, tmp_path / "old.pth")
    fresh = mod.bn_net()
    fresh.load_state_dict(torch.load(tmp_path / "old.pth", weights_only=True), strict=True)  # torch accepts it
    r = convert(f"{path}:bn_net", tmp_path / "bn.xml", weights=str(tmp_path / "old.pth"), tile=16, fp16=False,
                measure_rf=False)
    assert r.parity.passed and r.parity.max_rel < 1e-4
    # and what torch refuses, volinfer refuses with torch's reason in one line
    bad = dict(state)
    bad["1.running_mean"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(VolinferError, match=r"size mismatch for 1\.running_mean") as e:
        convert(f"{path}:bn_net", tmp_path / "x.xml", weights=str(tmp_path / "bad.pth"), tile=16)
    assert "\n" not in str(e.value)


def _export_onnx(mod, path, extra_input=False):
    class WithFlag(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image, scale):
            return self.inner(image) * scale

    net = mod.group_unet()
    model, args, names = (WithFlag(net), (torch.zeros(1, 1, 16, 16, 16), torch.ones(1)), ["image", "scale"]) \
        if extra_input else (net, (torch.zeros(1, 1, 16, 16, 16),), ["image"])
    torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                      dynamic_axes={"image": {2: "d", 3: "h", 4: "w"}, "logits": {2: "d", 3: "h", 4: "w"}})


def test_onnx_parity_runs_in_onnxruntime_and_set_freezes_an_input(tmp_path, nets):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _, mod = nets
    _export_onnx(mod, tmp_path / "m.onnx")
    r = convert(str(tmp_path / "m.onnx"), tmp_path / "m.xml", tile=16, measure_rf=False)
    assert r.parity.checked and r.parity.passed and r.parity.reference == "onnxruntime"
    _export_onnx(mod, tmp_path / "two.onnx", extra_input=True)
    with pytest.raises(VolinferError, match=r"2 inputs \(image, scale\).*--set"):
        convert(str(tmp_path / "two.onnx"), tmp_path / "t.xml", tile=16, measure_rf=False)
    with pytest.raises(VolinferError, match=r"no input named 'img:0'; its inputs: image, scale"):
        convert(str(tmp_path / "two.onnx"), tmp_path / "t.xml", tile=16, fixed={"img:0": 1.0}, measure_rf=False)
    r2 = convert(str(tmp_path / "two.onnx"), tmp_path / "t.xml", tile=16, inputs=["image"], fixed={"scale": 2.5},
                 measure_rf=False, fp16=False)
    assert r2.parity.passed and r2.parity.reference == "onnxruntime" and r2.parity.max_rel < 1e-4
    m = ov.Core().read_model(str(tmp_path / "t.xml"))
    assert len(m.inputs) == 1
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    got = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    with torch.no_grad():
        want = mod.group_unet()(torch.from_numpy(x)).numpy() * 2.5
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_missing_framework_says_not_checked(tmp_path, nets, monkeypatch):
    pytest.importorskip("onnx")
    _, mod = nets
    _export_onnx(mod, tmp_path / "m.onnx")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    r = convert(str(tmp_path / "m.onnx"), tmp_path / "m.xml", tile=16, measure_rf=False)
    assert not r.parity.checked and r.parity.passed is None
    assert str(r.parity).startswith("parity not checked: onnxruntime is not installed") and " ok" not in str(r.parity)
