"""ResNet18 for ImageNet, the MetaQuant paper's large-scale network.

The 18-layer network of He et al., CVPR 2016 (arXiv:1512.03385), Table 1: a 7x7/2 stem convolution,
BatchNorm, ReLU and 3x3/2 max pooling, four stages of two BasicBlocks with 64, 128, 256 and 512 channels
(stages 2-4 start with a stride-2 block with a 1x1 convolution + BatchNorm shortcut), global average pooling
and a linear classifier. The parameter names are torchvision's, so its ResNet18 state_dicts load with
``strict=True`` (torchvision is not needed); 11,689,512 parameters for 1000 classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._checks import check_positive_int
from ._init import kaiming_init_
from .blocks import BasicBlock

__all__ = ["ImageNetResNet", "resnet18"]

STAGE_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)


class ImageNetResNet(nn.Module):
    """BasicBlock ResNet with the ImageNet stem and ``blocks_per_stage`` blocks in each of its four stages:
    ``(B, in_channels, H, W)`` to ``(B, num_classes)``; 224x224 inputs give stages of 56, 28, 14 and 7 pixels.

    Raises:
        TypeError: a block count, ``num_classes`` or ``in_channels`` is not an int.
        ValueError: ``blocks_per_stage`` does not have 4 entries, or a value < 1.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        blocks_per_stage = tuple(blocks_per_stage)
        if len(blocks_per_stage) != 4:
            raise ValueError(f"blocks_per_stage must have 4 entries (one per stage), got {blocks_per_stage}")
        for i, n in enumerate(blocks_per_stage):
            check_positive_int(f"blocks_per_stage[{i}]", n)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.blocks_per_stage = blocks_per_stage
        self.num_classes = num_classes
        self.in_channels = in_channels

        c1, c2, c3, c4 = STAGE_CHANNELS
        # Stem: (B, C, 224, 224) -> conv 7x7/2 -> (B, 64, 112, 112)
        #       -> maxpool 3x3/2 -> (B, 64, 56, 56).
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(c1, c1, blocks_per_stage[0], stride=1)  # (B, 64, 56, 56)
        self.layer2 = self._make_stage(c1, c2, blocks_per_stage[1], stride=2)  # (B, 128, 28, 28)
        self.layer3 = self._make_stage(c2, c3, blocks_per_stage[2], stride=2)  # (B, 256, 14, 14)
        self.layer4 = self._make_stage(c3, c4, blocks_per_stage[3], stride=2)  # (B, 512, 7, 7)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # (B, 512, 1, 1)
        self.fc = nn.Linear(c4, num_classes)
        kaiming_init_(self)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)  # (B, 512)
        return self.fc(x)  # (B, num_classes)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet18: two BasicBlocks per stage."""
    return ImageNetResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
