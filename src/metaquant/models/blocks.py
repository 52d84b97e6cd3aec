"""The residual BasicBlock shared by the CIFAR and ImageNet ResNets (He et al., CVPR 2016, arXiv:1512.03385).

Two 3x3 convolutions with BatchNorm, added to a shortcut: a 1x1 convolution + BatchNorm where the block changes
the size or the channels (the paper's "option B"), else the identity. The submodule names (``conv1``, ``bn1``,
``conv2``, ``bn2``, ``downsample.0``, ``downsample.1``) are those of the original MetaQuant checkpoints and of
torchvision, so their state_dicts load with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the following BatchNorm has one)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias: the projection of a downsampling shortcut."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: ``(B, in, H, W)`` to
    ``(B, out, ceil(H / stride), ceil(W / stride))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        # The first conv carries the stride, so the block downsamples once.
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # ReLU holds no parameters, so it does not appear in the state_dict.
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut: the identity cannot be added when the
            # shape changes.  Index 0 / 1 give the checkpoint names
            # "downsample.0.weight" and "downsample.1.*".
            self.downsample = nn.Sequential(
                conv1x1(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # In-place ReLU is safe here: the sum is a fresh tensor.
        return self.relu(out + identity)
