"""Networks the layer-streaming tests stream: each a small model made the way published networks are (PyTorch
exported by OpenVINO's converter, or OpenVINO's opset), with its size multiple stored. No files, no downloads."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def updown(k: int = 3, s: int = 2, pb: int = 1, pe: int = 1, op: int = 1, cout: int = 2, seed: int = 0) -> ov.Model:
    """A strided convolution down, a transposed convolution (kernel ``k``, stride ``s``, pads, output padding) up."""
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, 1, -1, -1, -1], np.float32)
    down = ops.convolution(param, ops.constant(rng.standard_normal((4, 1, s, s, s)).astype(np.float32)),
                           [s] * 3, [0] * 3, [0] * 3, [1] * 3)
    up = ops.convolution_backprop_data(down, ops.constant(rng.standard_normal((4, cout, k, k, k)).astype(np.float32)),
                                       [s] * 3, None, [pb] * 3, [pe] * 3, [1] * 3, output_padding=[op] * 3)
    m = ov.Model([ops.relu(up)], [param], "updown")
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
