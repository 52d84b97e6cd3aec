"""CIFAR ResNets (ResNet8/20/32/44/56/110), the MetaQuant paper's main networks.

The depth-(6n+2) residual networks of He et al., CVPR 2016 (arXiv:1512.03385), §4.2: a 3x3 stem with 16
channels, three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (stages 2 and 3 halve the size),
global average pooling and a linear classifier; MetaQuant (Chen, Wang, Pan, NeurIPS 2019) binarizes
ResNet20/32/44/56. Two choices follow the original MetaQuant code rather than the paper, so its pretrained
checkpoints load with ``strict=True``: downsampling shortcuts are a strided 1x1 convolution + BatchNorm
(``downsample.0``/``.1``), not zero-padding; the parameter names are ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.*``,
``fc``. Pooling is adaptive, so any input size works (e.g. 1x28x28 Fashion-MNIST).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..validation import is_int
from ._checks import check_positive_int
from ._init import kaiming_init_
from .blocks import BasicBlock, conv3x3

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

# Channels of the three stages; the stem outputs the first.
STAGE_CHANNELS: tuple[int, int, int] = (16, 32, 64)


class CifarResNet(nn.Module):
    """ResNet of ``depth = 6n + 2`` weighted layers (1 stem conv + 3 stages × n blocks × 2 convs + 1 fc):
    ``(B, in_channels, H, W)`` to ``(B, num_classes)``.

    Raises:
        TypeError: ``depth``, ``num_classes`` or ``in_channels`` is not an int.
        ValueError: ``depth`` is not ``6n + 2`` with ``n >= 1``, or ``num_classes``/``in_channels`` < 1.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not is_int(depth):
            raise TypeError(f"depth must be an int of the form 6n+2, got {depth!r} ({type(depth).__name__})")
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.depth = depth
        self.blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_channels = in_channels

        c1, c2, c3 = STAGE_CHANNELS
        # Stem: (B, in_channels, H, W) -> (B, 16, H, W); stride 1 because
        # 32x32 inputs are already small.
        self.conv1 = conv3x3(in_channels, c1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        # Stages: (B, 16, H, W) -> (B, 32, H/2, W/2) -> (B, 64, H/4, W/4).
        self.layer1 = self._make_stage(c1, c1, stride=1)
        self.layer2 = self._make_stage(c1, c2, stride=2)
        self.layer3 = self._make_stage(c2, c3, stride=2)
        # (B, 64, h, w) -> (B, 64, 1, 1) whatever h, w are.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        kaiming_init_(self)

    def _make_stage(self, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        # Only the first block changes the shape; the others keep it.
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(self.blocks_per_stage - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)  # (B, 64)
        return self.fc(x)  # (B, num_classes)


def resnet8(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet8 (n=1, 78,042 parameters for 10 classes): not in the paper; the smallest, for quick checks."""
    return CifarResNet(8, num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet20 (n=3, 272,474 parameters for 10 classes)."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet32 (n=5)."""
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet44 (n=7)."""
    return CifarResNet(44, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet56 (n=9)."""
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet110 (n=18)."""
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels)
