"""Bi-Real-style CIFAR ResNet20 (Liu et al., ECCV 2018, arXiv:1808.00278): a real-valued shortcut around every
convolution, so that binary activations (``ActQuantConfig("sign")``) keep the real-valued information flowing.

Each 3x3 convolution of a block computes ``x + BN(conv(hardtanh(x)))``: ``hardtanh`` (``clip(x, −1, 1)``) is the
float network's activation, as in Bi-Real Net's real-valued pre-training, and has the sign of ``x``, so the
binary network's ``sign`` input quantizer sees what the float network saw. There is no ReLU after the stem
either (``sign`` of a ReLU output is always +1). The down-sampling shortcut is a 2x2 average pooling with the
new channels zero-padded (CIFAR option A with Bi-Real's averaging): parameter-free, so it stays real-valued
whatever ``quantize_`` converts, no layer needing a ``filter_fn``. Stem (``conv1``, ``bn1``) and head
(``avgpool``, ``fc``) are named as in ``resnet20``, but the network trains from its own float pre-training.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int
from ._init import kaiming_init_
from .blocks import conv3x3
from .resnet_cifar import STAGE_CHANNELS

__all__ = ["BiRealBlock", "BiRealResNet", "resnet20_bireal"]


class _Shortcut(nn.Module):
    """``(B, C, H, W)`` to ``(B, C_out, ceil(H/2), ceil(W/2))``: average pooling, new channels zero."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.pool = nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra_channels))


class BiRealBlock(nn.Module):
    """``y = shortcut(x) + bn1(conv1(hardtanh(x)))``, ``out = y + bn2(conv2(hardtanh(y)))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.Hardtanh()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _Shortcut(out_channels - in_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.shortcut(x) + self.bn1(self.conv1(self.act(x)))
        return y + self.bn2(self.conv2(self.act(y)))


class BiRealResNet(nn.Module):
    """Bi-Real CIFAR ResNet of ``depth = 6n + 2``: ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        ValueError: ``depth`` is not an int ``6n + 2`` with ``n >= 1``.
        TypeError, ValueError: ``num_classes`` or ``in_channels`` is not an int >= 1.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Bi-Real ResNet depth must be 6n+2 with n >= 1 (e.g. 20), got {depth!r}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.depth, self.num_classes, self.in_channels = depth, num_classes, in_channels
        n = (depth - 2) // 6
        c1, c2, c3 = STAGE_CHANNELS
        self.conv1 = conv3x3(in_channels, c1)
        self.bn1 = nn.BatchNorm2d(c1)
        stages = []
        for c_in, c_out, stride in ((c1, c1, 1), (c1, c2, 2), (c2, c3, 2)):
            stages.append(
                nn.Sequential(BiRealBlock(c_in, c_out, stride), *(BiRealBlock(c_out, c_out) for _ in range(n - 1)))
            )
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20_bireal(num_classes: int = 10, in_channels: int = 3) -> BiRealResNet:
    """Bi-Real ResNet20 (n=3): every 3x3 convolution of a block with its own real-valued shortcut."""
    return BiRealResNet(20, num_classes=num_classes, in_channels=in_channels)
