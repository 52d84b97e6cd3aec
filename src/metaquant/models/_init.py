"""Kaiming (He) initialisation (He, Zhang, Ren, Sun, ICCV 2015, arXiv:1502.01852), as in the ResNet paper."""

from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """Kaiming-normal convolutions (``fan_out``, ReLU gain: the activations' variance stays roughly constant
    through the stack), BatchNorm to the identity map; Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
