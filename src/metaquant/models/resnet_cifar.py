"""CIFAR ResNets (ResNet20/32/44/56/110), the MetaQuant paper's main networks.

The depth-(6n+2) residual networks for 32x32 images from
He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016 (arXiv:1512.03385), Section 4.2: a 3x3 stem convolution with 16
channels, three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the
first block of stages 2 and 3 halves the spatial size), global average
pooling and a linear classifier.  MetaQuant (Chen, Wang, Pan, "MetaQuant:
Learning to Quantize by Learning to Penetrate Non-differentiable
Quantization", NeurIPS 2019) binarizes ResNet20/32/44/56 of this family.

Two choices follow the original MetaQuant code rather than the 2016 paper,
so that its pretrained checkpoints load with ``strict=True``:

* the shortcut of a downsampling block is a strided 1x1 convolution +
  BatchNorm (``downsample.0`` / ``downsample.1``), not zero-padding;
* the parameter names are ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.*``, ``fc``.

Pooling is adaptive, so any input size works (e.g. 1x28x28 Fashion-MNIST).
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
    """ResNet of depth ``6n + 2`` for small images.

    Args:
        depth: total number of weighted layers, ``6n + 2`` with ``n >= 1``
            (20, 32, 44, 56, 110, ...): 1 stem conv + 3 stages x n blocks x
            2 convs + 1 fc.
        num_classes: size of the output logits.
        in_channels: channels of the input images (3 for CIFAR, 1 for
            Fashion-MNIST).

    Shapes: input ``(B, in_channels, H, W)``, output ``(B, num_classes)``.

    Raises:
        TypeError: ``depth``, ``num_classes`` or ``in_channels`` is not an int.
        ValueError: ``depth`` is not ``6n + 2`` with ``n >= 1``, or
            ``num_classes`` / ``in_channels`` < 1.

    Example:
        Any image size works, e.g. 28x28 Fashion-MNIST:

        >>> net = mq.models.CifarResNet(8, num_classes=10, in_channels=1)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> try:
        ...     mq.models.CifarResNet(18)
        ... except ValueError as err:
        ...     print(err)
        CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got 18
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
    """ResNet8 (n=1): not in the paper; the smallest of the family, for quick checks and tutorials.

    Args:
        num_classes: size of the output logits.
        in_channels: channels of the input images.

    Raises:
        TypeError, ValueError: see :class:`CifarResNet`.

    Example:
        78,042 parameters: stem 432 + 32, stages 4,672 + 14,528 + 57,728, fc 650:

        >>> net = mq.models.resnet8()
        >>> net(torch.randn(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 78042)
        >>> [sum(p.numel() for p in stage.parameters()) for stage in (net.layer1, net.layer2, net.layer3)]
        [4672, 14528, 57728]
    """
    return CifarResNet(8, num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet20 (n=3, about 0.27M parameters for 10 classes).

    Args:
        num_classes: size of the output logits.
        in_channels: channels of the input images.

    Raises:
        TypeError, ValueError: see :class:`CifarResNet`.

    Example:
        Two more blocks per stage than ResNet8, each ``2 * 9c²`` conv weights
        plus ``4c`` BatchNorm parameters for ``c`` = 16, 32, 64 channels:

        >>> n8, n20 = (sum(p.numel() for p in f().parameters()) for f in (mq.models.resnet8, mq.models.resnet20))
        >>> n20, n20 - n8 == 2 * sum(18 * c * c + 4 * c for c in (16, 32, 64))
        (272474, True)
    """
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet32 (n=5): as :func:`resnet20` with 5 blocks per stage; same arguments and errors.

    Example:
        >>> mq.models.resnet32().blocks_per_stage
        5
    """
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet44 (n=7): as :func:`resnet20` with 7 blocks per stage; same arguments and errors.

    Example:
        >>> mq.models.resnet44().blocks_per_stage
        7
    """
    return CifarResNet(44, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet56 (n=9): as :func:`resnet20` with 9 blocks per stage; same arguments and errors.

    Example:
        >>> mq.models.resnet56().blocks_per_stage
        9
    """
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet110 (n=18): as :func:`resnet20` with 18 blocks per stage; same arguments and errors.

    Example:
        >>> mq.models.resnet110().blocks_per_stage
        18
    """
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels)
