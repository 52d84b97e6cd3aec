"""Weight initialisation shared by the models of :mod:`metaquant.models`.

Kaiming (He) initialisation from He, Zhang, Ren, Sun, "Delving Deep into
Rectifiers", ICCV 2015 (arXiv:1502.01852), as used by the ResNet paper.
"""

from __future__ import annotations

from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """Kaiming-normal convolutions, BatchNorm to the identity map.

    ``fan_out`` with the ReLU gain keeps the activations' variance roughly
    constant through the stack.  Linear layers keep
    PyTorch's default initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
