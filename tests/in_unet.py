"""A U-Net in the style of a published brain-extraction checkpoint (state_dict + module code, used through
``volinfer convert in_unet.py:build --weights w.pth``): stride 16 (four max-pools), 27 InstanceNorm3d layers with
affine parameters and running-stat buffers that inference never uses, LeakyReLU, Dropout3d, trilinear upsampling
with ``align_corners=True``, softmax over the classes. ``build(base=28)`` has ~16 M parameters (the published size);
tests use a narrow ``base``."""

import torch
import torch.nn.functional as F
from torch import nn


def _norm(c: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(c, affine=True, track_running_stats=False)


class Block(nn.Module):
    """``n`` × (conv 3³ → InstanceNorm → LeakyReLU), Dropout3d after the first."""

    def __init__(self, cin: int, cout: int, n: int = 2, p: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            conv = nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1)
            layers += [conv, _norm(cout), nn.LeakyReLU(0.01)]
            if i == 0:
                layers.append(nn.Dropout3d(p))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Up(nn.Module):
    """Trilinear ×2 (align_corners=True) → conv 1³ → InstanceNorm → LeakyReLU, concatenated with the skip, then
    a two-conv block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv3d(cin, cout, 1), _norm(cout), nn.LeakyReLU(0.01))
        self.block = Block(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class INUNet(nn.Module):
    def __init__(self, base: int = 28, classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        c = [base * 2 ** i for i in range(5)]
        self.down = nn.ModuleList([Block(in_channels, c[0], 3)] + [Block(c[i - 1], c[i], 3) for i in range(1, 5)])
        self.up = nn.ModuleList([Up(c[i], c[i - 1]) for i in range(4, 0, -1)])
        self.head = nn.Conv3d(c[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)
        return torch.softmax(self.head(x), dim=1)


def build(base: int = 28, classes: int = 2) -> INUNet:
    return INUNet(base, classes)
