"""A volume off the model's size multiple. A network that takes any size (its decoder resizes to the skip's size)
runs as one tile at the volume's own size and equals PyTorch's ``model(volume)``; padded anyway (a forced tile, a
small budget) it is reported not exact. A network whose IR rejects the size still pads, tiles and streams as before,
its verdict saying it is exact for the padded volume (against OpenVINO f32 on that padded volume), and not exact
where `volinfer convert` measured that the source model itself takes such sizes (it pads inside in PyTorch)."""

import textwrap

import numpy as np
import openvino as ov
import pytest

import volinfer
from volinfer.run.own_size import SOURCE_SIZES_KEY

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

ODD = (29, 22, 19)  # no size a multiple of 4


class SizeFollowing(nn.Module):
    """Two poolings; the decoder resizes to its skip's size (a common published pattern): any input size runs."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 6, 3, padding=1)
        self.e3, self.d2 = nn.Conv3d(6, 8, 3, padding=1), nn.Conv3d(14, 6, 3, padding=1)
        self.d1, self.head = nn.Conv3d(10, 4, 3, padding=1), nn.Conv3d(4, 3, 1)

    def forward(self, x):
        a = torch.relu(self.e1(x))
        b = torch.relu(self.e2(F.max_pool3d(a, 2)))
        d = torch.relu(self.e3(F.max_pool3d(b, 2)))
        u = torch.relu(self.d2(torch.cat([F.interpolate(d, size=b.shape[2:], mode="trilinear"), b], 1)))
        u = torch.relu(self.d1(torch.cat([F.interpolate(u, size=a.shape[2:], mode="trilinear"), a], 1)))
        return self.head(u)


def _size_following(tmp_path):
    """The network, and its TorchScript trace converted to an IR storing size multiple 4 (its stride period)."""
    torch.manual_seed(0)
    net = SizeFollowing().eval()
    traced = torch.jit.trace(net, torch.zeros(1, 1, 16, 16, 16))
    model = ov.convert_model(traced, input=[ov.PartialShape([1, 1, -1, -1, -1])])
    model.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(model, str(tmp_path / "sf.xml"))
    return net, tmp_path / "sf.xml"


def _volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape).astype(np.float32)
    return (v + np.roll(v, 1, 0) + np.roll(v, 1, 1)) / 2  # some spatial structure


def _torch(net, vol):
    with torch.no_grad():
        return net(torch.from_numpy(vol)[None, None])[0].numpy()  # (C, x, y, z)


def test_model_that_takes_any_size_runs_at_the_volume_size(tmp_path):
    net, xml = _size_following(tmp_path)
    vol = _volume(ODD)
    ref = _torch(net, vol)
    out, rep = volinfer.predict(vol, xml, kind="raw", normalize="none", precision="f32", report=True, progress=False)
    out = np.moveaxis(out, -1, 0)
    assert rep.tiles == 1 and tuple(rep.tile) == ODD, (rep.tile, rep.notes)
    assert rep.exact and "own size 29x22x19" in rep.exact_meaning, rep.exact_meaning
    scale = float(np.abs(ref).max())
    assert float(np.abs(out - ref).max()) < 1e-3 * scale  # OpenVINO and PyTorch rounding (measured 2.5e-4)
    assert (out.argmax(0) == ref.argmax(0)).mean() > 0.999
    # what the padded run computed instead (the volume padded to 32x24x20): far from model(volume)
    padded = np.zeros((32, 24, 20), np.float32)
    padded[:29, :22, :19] = vol
    was = _torch(net, padded)[:, :29, :22, :19]
    assert float(np.abs(was - ref).max()) > 0.05 * scale


def test_model_that_takes_any_size_padded_anyway_is_not_exact(tmp_path):
    _, xml = _size_following(tmp_path)
    vol = _volume((45, 22, 19))
    _, rep = volinfer.predict(vol, xml, tile=16, report=True, progress=False)
    assert not rep.exact and "although the model takes its own size 45x22x19" in rep.not_exact[-1]
    assert "--tile 16x16x16 was forced" in rep.not_exact[-1]
    _, rep = volinfer.predict(vol, xml, engine="tiles", max_memory_mb=152, report=True, progress=False)
    assert not rep.exact and rep.tiles > 1, rep.not_exact
    reason = rep.not_exact[-1]
    assert "one tile at the volume's size needs about" in reason, reason
    need = int(reason.rsplit("--max-memory ", 1)[1].split("M")[0])
    _, rep = volinfer.predict(vol, xml, max_memory_mb=need, report=True, progress=False)  # the hint is right
    assert rep.exact and rep.tiles == 1 and tuple(rep.tile) == (45, 22, 19), rep.notes


def _ov_f32(xml, vol):
    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape({model.input(0): ov.PartialShape([1, 1, *vol.shape])})
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(vol[None, None])[0][0]


def test_model_that_needs_the_multiple_still_tiles_padded(tmp_path):
    """The pooling U-Net (its IR rejects 29x22x19): several tiles under a small budget, exact for the padded
    volume, as OpenVINO f32 computes on it; the same model storing convert's measurement that its source takes such
    sizes is not exact."""
    from models import save_unet2

    xml = save_unet2(tmp_path / "u.xml")
    vol = _volume((61, 22, 19))
    out, rep = volinfer.predict(vol, xml, kind="raw", precision="f32", normalize="none", engine="tiles", tile=32,
                                overlap=20, report=True, progress=False)
    assert rep.tiles > 1 and rep.exact, rep.not_exact
    assert rep.exact_meaning.startswith("exact for the volume padded to 64x24x20 (zero padding to the model's size "
                                        "multiple 4; a network that takes any size"), rep.exact_meaning
    assert "cropped back to 61x22x19: crop margins cover the receptive field" in rep.exact_meaning
    padded = np.zeros((64, 24, 20), np.float32)
    padded[:61, :22, :19] = vol
    ref = _ov_f32(xml, padded)[:, :61, :22, :19]
    assert float(np.abs(np.moveaxis(out, -1, 0) - ref).max()) < 1e-4 * float(np.abs(ref).max())
    xml2 = save_unet2(tmp_path / "u2.xml", **{SOURCE_SIZES_KEY: '{"shape": [31, 27, 23], "ir": "rejects"}'})
    _, rep = volinfer.predict(vol, xml2, report=True, progress=False)
    assert not rep.exact and "the source model itself takes sizes off that multiple" in rep.not_exact[-1]
    _, rep = volinfer.predict(vol[:60, :20, :16], xml2, report=True, progress=False)  # on the multiple: exact
    assert rep.exact, rep.not_exact


NETS = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F

    class PadsInside(nn.Module):
        """Pools once; the decoder replicate-pads to the skip's size when they differ (as MONAI's BasicUNet)."""
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 6, 3, padding=1)
            self.c2 = nn.Conv3d(10, 2, 3, padding=1)
        def forward(self, x):
            a = torch.relu(self.c0(x))
            u = F.interpolate(torch.relu(self.c1(F.max_pool3d(a, 2))), scale_factor=2, mode="nearest")
            if u.shape[2:] != a.shape[2:]:
                d, h, w = (a.shape[i] - u.shape[i] for i in (2, 3, 4))
                u = F.pad(u, [0, w, 0, h, 0, d], mode="replicate")
            return self.c2(torch.cat([u, a], 1))

    def pads_inside():
        torch.manual_seed(0)
        return PadsInside().eval()
''')


def test_convert_measures_that_the_source_takes_sizes_its_ir_does_not(tmp_path):
    from converters import convert

    (tmp_path / "nets.py").write_text(NETS)
    r = convert(f"{tmp_path / 'nets.py'}:pads_inside", tmp_path / "p.xml", tile=32, random_weights=True,
                speed_profile=False)
    assert r.settings.size_multiple == 2
    assert r.settings.extra[SOURCE_SIZES_KEY]["ir"] == "rejects", r.settings.extra
    assert any("the source model runs at" in n and "divisible by 2" in n for n in r.notes), r.notes
    _, rep = volinfer.predict(_volume((21, 16, 12)), tmp_path / "p.xml", report=True, progress=False)
    assert not rep.exact and "the source model itself takes sizes off that multiple" in rep.not_exact[-1]


def test_static_onnx_with_baked_resize_sizes_converts_fixed_and_tiles_larger_volumes(tmp_path):
    """D6: the legacy exporter without dynamic axes bakes the Resize sizes; convert used to keep the dims dynamic
    with "size multiple 64" (the export size), and runs failed with margins/overlaps the user never set. Now it is
    stored as a 64^3 fixed-size model with one note, a larger odd volume runs in 64^3 tiles (verdict and values
    checked against PyTorch on the volume padded to the stride period), and a forced other tile is one clear line."""
    from converters import convert

    torch.manual_seed(0)
    net = SizeFollowingNoNorm().eval()
    onnx = tmp_path / "static.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 64, 64, 64), str(onnx), input_names=["x"], opset_version=17,
                      dynamo=False)
    r = convert(str(onnx), tmp_path / "s.xml", speed_profile=False)
    assert any("this model runs only at 64x64x64" in n and "re-export" in n for n in r.notes), r.notes
    assert r.settings.size_multiple == 4  # its stride period: tiles start where the volume's pooling windows do
    assert ov.Core().read_model(str(tmp_path / "s.xml")).input(0).get_partial_shape().is_static
    vol = _volume((75, 45, 70))
    out, rep = volinfer.predict(vol, tmp_path / "s.xml", kind="raw", normalize="none", precision="f32",
                                report=True, progress=False)
    assert tuple(rep.tile) == (64, 64, 64) and rep.tiles > 1, rep.notes
    padded = np.zeros((76, 64, 72), np.float32)
    padded[:75, :45, :70] = vol
    ref = _torch(net, padded)[:, :75, :45, :70]
    diff = float(np.abs(np.moveaxis(out, -1, 0) - ref).max()) / float(np.abs(ref).max())
    # margins cover the receptive field (no normalisation layers): exact, and the values agree (measured 2.9e-4)
    assert rep.exact and diff < 1e-3 and "padded to 76x64x72" in rep.exact_meaning, (diff, rep.not_exact)
    with pytest.raises(volinfer.VolinferError, match="runs only at 64x64x64 .a fixed input size.: drop --tile"):
        volinfer.predict(vol, tmp_path / "s.xml", tile=128, progress=False)


class SizeFollowingNoNorm(SizeFollowing):
    """:class:`SizeFollowing` (no normalisation layers either)."""
