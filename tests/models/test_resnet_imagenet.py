"""Tests for metaquant.models.resnet_imagenet: ResNet18 size, names, wiring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaquant.models import ImageNetResNet, resnet18

# torchvision.models.resnet18() has 11,689,512 parameters (1000 classes).
TORCHVISION_RESNET18_PARAMS = 11_689_512


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_equals_torchvision_resnet18() -> None:
    assert n_params(resnet18()) == TORCHVISION_RESNET18_PARAMS


def test_parameter_count_follows_classes_and_channels() -> None:
    # Only the stem conv (64 x C x 7 x 7) and the fc (512K + K) depend on them.
    expected = TORCHVISION_RESNET18_PARAMS - (64 * 3 * 49) + (64 * 1 * 49) - (512 * 1000 + 1000) + (512 * 10 + 10)
    assert n_params(resnet18(num_classes=10, in_channels=1)) == expected


def test_torchvision_state_dict_names() -> None:
    keys = set(resnet18().state_dict())
    # A sample of torchvision's resnet18 keys, including both projections.
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer3.0.downsample.1.num_batches_tracked",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)
    assert len(keys) == 122  # torchvision resnet18().state_dict() has 122 entries
    model = resnet18()
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert type(model.maxpool) is nn.MaxPool2d and model.maxpool.stride == 2


@pytest.mark.parametrize(("in_channels", "size", "num_classes"), [(1, 28, 10), (3, 32, 10), (3, 64, 1000), (3, 40, 3)])
def test_output_shape(in_channels: int, size: int, num_classes: int) -> None:
    model = resnet18(num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_forward_matches_functional_oracle(functional_resnet) -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        oracle = functional_resnet(model.state_dict(), x, imagenet_stem=True)
        torch.testing.assert_close(model(x), oracle, rtol=1e-4, atol=1e-4)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(num_classes=0)
    with pytest.raises(ValueError, match="4 entries"):
        ImageNetResNet((2, 2, 2))
    with pytest.raises(ValueError, match=r"blocks_per_stage\[1\]"):
        ImageNetResNet((2, 0, 2, 2))
