"""Networks the layer-streaming tests stream: each a small model made the way published networks are (PyTorch
exported by OpenVINO's converter, or OpenVINO's opset), with its size multiple stored. No files, no downloads."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def updown(k: int = 3, s: int = 2, pb: int = 1, pe: int = 1, op: int = 1, cout: int = 2, seed: int = 0,
           groups: int = 1, tail: bool = False) -> ov.Model:
    """A strided convolution down, a transposed convolution (kernel ``k``, stride ``s``, pads, output padding,
    ``groups`` > 1: a grouped one) up; ``tail``: a per-channel bias, PReLU and scale after it (as a decoder's
    batch norm and activation), else a ReLU."""
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, 1, -1, -1, -1], np.float32)
    down = ops.convolution(param, ops.constant(rng.standard_normal((4, 1, s, s, s)).astype(np.float32)),
                           [s] * 3, [0] * 3, [0] * 3, [1] * 3)
    if groups == 1:
        w = ops.constant(rng.standard_normal((4, cout, k, k, k)).astype(np.float32))
        up = ops.convolution_backprop_data(down, w, [s] * 3, None, [pb] * 3, [pe] * 3, [1] * 3,
                                           output_padding=[op] * 3)
    else:
        w = ops.constant(rng.standard_normal((groups, 4 // groups, cout // groups, k, k, k)).astype(np.float32))
        up = ops.group_convolution_backprop_data(down, w, [s] * 3, None, [pb] * 3, [pe] * 3, [1] * 3,
                                                 output_padding=[op] * 3)
    if tail:
        bias = ops.constant(rng.standard_normal((1, cout, 1, 1, 1)).astype(np.float32))
        slope = ops.constant(rng.uniform(0.1, 0.5, cout).astype(np.float32))
        act = ops.multiply(ops.prelu(ops.add(up, bias), slope), ops.constant(np.float32(1.5)))
    else:
        act = ops.relu(up)
    m = ov.Model([act], [param], "updown")
    m.set_rt_info(str(s), ["volinfer", "size_multiple"])
    return m


def from_torch(net, multiple: int, in_channels: int = 1) -> ov.Model:
    """A PyTorch module as OpenVINO's converter makes it (dynamic spatial input), its size multiple stored."""
    import torch

    net = net.eval()
    with torch.no_grad():
        m = ov.convert_model(net, example_input=torch.zeros(1, in_channels, *[2 * multiple] * 3),
                             input=[1, in_channels, -1, -1, -1])
    m.set_rt_info(str(multiple), ["volinfer", "size_multiple"])
    return m


def monai_basic_unet(seed: int = 0, **kw) -> ov.Model:
    """MONAI's BasicUNet as issue 20 ran it: batch norm, transposed convolutions, features 8-8-16-32-64-8 (batch
    norm statistics randomised: fresh ones are the identity)."""
    import torch
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8), **kw)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return from_torch(net, 16)


def torch_upsample_unet(align_corners: bool = True, mode: str = "trilinear", seed: int = 0):
    """A small PyTorch U-Net (size multiple 4) whose decoder upsamples with ``nn.Upsample(scale_factor=2)`` (as
    MONAI's ``upsample="nontrainable"`` and several published brain models do), not transposed convolutions:
    conv-BN-LeakyReLU blocks, max pooling, a strided convolution, channel concatenation, a softmax head."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.LeakyReLU(0.1))

    class UpsampleUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            kw = {"align_corners": align_corners} if mode != "nearest" else {}
            self.e0, self.e1, self.e2 = block(1, 4), block(4, 6), block(6, 8)
            self.down = nn.Conv3d(6, 6, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode=mode, **kw)
            self.d1, self.d0 = block(14, 6), block(10, 4)
            self.head = nn.Conv3d(4, 3, 1)

        def forward(self, x):
            s0 = self.e0(x)
            s1 = self.e1(nn.functional.max_pool3d(s0, 2))
            b = self.e2(self.down(s1))
            d1 = self.d1(torch.cat([self.up(b), s1], 1))
            return torch.softmax(self.head(self.d0(torch.cat([self.up(d1), s0], 1))), 1)

    torch.manual_seed(seed)
    net = UpsampleUNet().eval()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm3d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return net


def torch_vocabulary(tk: int = 3, ts: int = 2, tp: int = 1, top: int = 1, tg: int = 1, td: int = 1,
                     ceil: bool = False, include_pad: bool = True, seed: int = 0):
    """A PyTorch network (size multiple 2) of the rest of a U-Net's vocabulary: dilated convolutions (2 and 3),
    PReLU per channel, a depthwise and a grouped strided convolution, LeakyReLU, max and average pooling (ceil
    mode and count_include_pad as given), a transposed convolution (kernel ``tk``, stride ``ts``, padding ``tp``,
    output padding ``top``, groups ``tg``, dilation ``td``), a sigmoid head."""
    import torch
    from torch import nn

    class Vocabulary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.a0 = nn.Conv3d(1, 8, 3, padding=2, dilation=2), nn.PReLU(8)
            self.dw = nn.Conv3d(8, 8, 3, padding=1, groups=8)
            self.g, self.a1 = nn.Conv3d(8, 8, 3, stride=2, padding=1, groups=4), nn.LeakyReLU(0.05)
            self.d3 = nn.Conv3d(16, 8, 3, padding=3, dilation=3)
            self.up = nn.ConvTranspose3d(8, 8, tk, stride=ts, padding=tp, output_padding=top, groups=tg, dilation=td)
            self.head = nn.Conv3d(16, 2, 1)

        def forward(self, x):
            e = self.a0(self.c0(x))
            e = e + self.dw(e)
            k, p = (2, 0) if ceil else (3, 1)  # ceil mode: windows that stay inside (overhanging ones are refused)
            pooled = torch.cat([nn.functional.max_pool3d(e, 2, ceil_mode=ceil),
                                nn.functional.avg_pool3d(e, k, 2, p, ceil_mode=ceil, count_include_pad=include_pad)], 1)
            b = self.a1(self.d3(torch.cat([self.a1(self.g(e)), pooled[:, ::2]], 1)))
            return torch.sigmoid(self.head(torch.cat([self.up(b), e], 1)))

    torch.manual_seed(seed)
    return Vocabulary().eval()


def torch_deep_supervision(seed: int = 0):
    """A PyTorch U-Net (size multiple 2) with three outputs, as deep-supervision networks export: full-resolution
    logits, half-resolution logits, and a full-resolution softmax head from the encoder."""
    import torch
    from torch import nn

    class DeepSupervision(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e0, self.e1 = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
            self.h0, self.h1, self.h2 = nn.Conv3d(8, 2, 1), nn.Conv3d(8, 2, 1), nn.Conv3d(4, 3, 1)

        def forward(self, x):
            e0 = torch.relu(self.e0(x))
            e1 = torch.relu(self.e1(e0))
            return self.h0(torch.cat([self.up(e1), e0], 1)), self.h1(e1), torch.softmax(self.h2(e0), 1)

    torch.manual_seed(seed)
    return DeepSupervision().eval()
