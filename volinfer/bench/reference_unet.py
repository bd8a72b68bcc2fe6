"""The benchmark's reference network: MONAI's ``UNet`` architecture, written out in plain PyTorch.

Same layer structure as ``monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")``: residual units of two
3×3×3 convolutions (strided in the encoder), PReLU, batch norm, transposed-convolution decoder with one residual unit
per level, skip connections by concatenation. Seeded random weights (memory and time do not depend on their values).
Needs input sizes divisible by 16. No MONAI needed; ``build_unet`` is a factory ``volinfer convert`` accepts:

    volinfer convert volinfer.bench.reference_unet:build_unet -o unet.xml --tile 128
"""

from __future__ import annotations

import torch
from torch import nn


def _adn(ch: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(ch), nn.PReLU()]


class ResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, subunits: int = 2, last_conv_only: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i in range(subunits):
            s = stride if i == 0 else 1
            conv_only = last_conv_only and i == subunits - 1
            layers.append(nn.Sequential(nn.Conv3d(c, cout, 3, s, 1), *([] if conv_only else _adn(cout))))
            c = cout
        self.conv = nn.Sequential(*layers)
        if stride != 1 or cin != cout:
            k, p = (3, 1) if stride != 1 else (1, 0)
            self.residual: nn.Module = nn.Conv3d(cin, cout, k, stride, p)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, channels: tuple[int, ...], top: bool):
        super().__init__()
        c = channels[0]
        if len(channels) == 2:
            self.sub: nn.Module = ResidualUnit(c, channels[1], 1, 2)
            upc = c + channels[1]
        else:
            self.sub = _Level(c, c, channels[1:], top=False)
            upc = c * 2
        self.down = ResidualUnit(cin, c, 2, 2)
        self.up_conv = nn.Sequential(nn.ConvTranspose3d(upc, cout, 3, 2, 1, output_padding=1), *_adn(cout))
        self.up_res = ResidualUnit(cout, cout, 1, 1, last_conv_only=top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        return self.up_res(self.up_conv(torch.cat([d, self.sub(d)], dim=1)))


class UNet3D(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128, 256)):
        super().__init__()
        self.body = _Level(in_channels, out_channels, channels, top=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_unet(in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> nn.Module:
    """The reference U-Net in eval mode with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    net = UNet3D(in_channels, out_channels)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def build_small_unet(in_channels: int = 1, out_channels: int = 2, seed: int = 0) -> nn.Module:
    """A two-level version of the reference U-Net (channels 4-8, size multiple 2), small enough for tests."""
    torch.manual_seed(seed)
    net = UNet3D(in_channels, out_channels, channels=(4, 8))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()
