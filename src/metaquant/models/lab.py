"""The "LAB" VGG-style network of the MetaQuant paper (Table 4).

(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-10FC, the CIFAR-10 network of Hou, Yao, Kwok,
"Loss-aware Binarization of Deep Networks", ICLR 2017 (from BinaryConnect, with a linear classifier instead
of the SVM). Every convolution and hidden FC layer is followed by BatchNorm and ReLU and has no bias (the
BatchNorm shift makes it redundant). Three floor 2x2 poolings turn 32x32 into 4x4 and 28x28 into 3x3, which
sizes the first FC layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_positive_int
from ._init import kaiming_init_

__all__ = ["LabNet", "lab"]

CONV_CHANNELS: tuple[int, int, int] = (128, 256, 512)
HIDDEN_FEATURES: int = 1024
NUM_POOLINGS: int = 3
# Smallest image side that survives three floor 2x2 poolings with >= 1 pixel.
MIN_IMAGE_SIZE: int = 2**NUM_POOLINGS


def pooled_size(image_size: int) -> int:
    """Side of the feature map after the three 2x2 max-poolings (floor)."""
    side = image_size
    for _ in range(NUM_POOLINGS):
        side //= 2
    return side


class LabNet(nn.Module):
    """(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-FC for ``(B, in_channels, image_size, image_size)``
    inputs; the first FC layer takes ``512·s·s`` inputs with ``s = image_size // 8``.

    Raises:
        TypeError: an argument is not an int.
        ValueError: an argument is < 1, or ``image_size < 8``; in the forward pass, an input of another size.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LAB net needs image_size >= {MIN_IMAGE_SIZE} to survive {NUM_POOLINGS} "
                f"2x2 max-poolings, got image_size={image_size}"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size

        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in CONV_CHANNELS:
            # Two 3x3 "same" convolutions, then halve the side:
            # (B, c, s, s) -> (B, out, s, s) -> (B, out, s // 2, s // 2).
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)

        side = pooled_size(image_size)
        flat = CONV_CHANNELS[-1] * side * side  # 512*4*4 = 8192 for 32x32
        self.classifier = nn.Sequential(
            nn.Linear(flat, HIDDEN_FEATURES, bias=False),
            nn.BatchNorm1d(HIDDEN_FEATURES),
            nn.ReLU(inplace=True),
            nn.Linear(HIDDEN_FEATURES, HIDDEN_FEATURES, bias=False),
            nn.BatchNorm1d(HIDDEN_FEATURES),
            nn.ReLU(inplace=True),
            nn.Linear(HIDDEN_FEATURES, num_classes),
        )
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            # Without this the first Linear fails with an opaque matmul
            # shape error; the FC size is tied to the image size.
            raise ValueError(
                f"LAB net was built for (B, {self.in_channels}, {self.image_size}, {self.image_size}) "
                f"inputs, got {tuple(x.shape)}; build it with image_size matching the data"
            )
        x = self.features(x).flatten(1)  # (B, 512 * s * s)
        return self.classifier(x)  # (B, num_classes)


def lab(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> LabNet:
    """The LAB network for ``image_size`` x ``image_size`` inputs (at least 8)."""
    return LabNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
