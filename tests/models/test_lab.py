"""Tests for metaquant.models.lab: the LAB net of the MetaQuant paper, Table 4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaquant.models import LabNet, lab


def expected_lab_params(num_classes: int, in_channels: int, pooled_side: int) -> int:
    """(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-FC, BN after each hidden layer.

    Convs and hidden FCs have no bias (BatchNorm follows); BN has 2 params per channel.
    """
    convs = 9 * (in_channels * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    conv_bns = 2 * (2 * 128 + 2 * 256 + 2 * 512)
    fcs = 512 * pooled_side**2 * 1024 + 1024 * 1024 + 1024 * num_classes + num_classes
    fc_bns = 2 * (2 * 1024)
    return convs + conv_bns + fcs + fc_bns


@pytest.mark.parametrize(
    ("image_size", "in_channels", "num_classes", "flat"),
    [(32, 3, 10, 4 * 4 * 512), (28, 1, 10, 3 * 3 * 512), (32, 1, 100, 4 * 4 * 512), (8, 3, 2, 512), (15, 1, 10, 512)],
)
def test_shapes_and_first_fc_size(image_size: int, in_channels: int, num_classes: int, flat: int) -> None:
    model = lab(num_classes=num_classes, in_channels=in_channels, image_size=image_size).eval()
    assert model.classifier[0].in_features == flat
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize(("image_size", "side"), [(32, 4), (28, 3)])
def test_parameter_count_matches_architecture(image_size: int, side: int) -> None:
    model = lab(num_classes=10, in_channels=3, image_size=image_size)
    assert sum(p.numel() for p in model.parameters()) == expected_lab_params(10, 3, side)


def test_layer_sequence() -> None:
    model = lab()
    kinds = [type(m).__name__ for m in model.modules() if not isinstance(m, (nn.Sequential, LabNet))]
    block = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    head = ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert kinds == block * 3 + head
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [1024, 1024, 10]


@pytest.mark.parametrize("image_size", [7, 4, 1])
def test_rejects_image_too_small_for_three_poolings(image_size: int) -> None:
    with pytest.raises(ValueError, match=rf"image_size >= 8.*image_size={image_size}"):
        lab(image_size=image_size)


def test_rejects_input_of_other_size_clearly() -> None:
    model = lab(image_size=32).eval()
    with pytest.raises(ValueError, match=r"built for \(B, 3, 32, 32\).*\(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
