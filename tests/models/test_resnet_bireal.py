"""The Bi-Real ResNet20: shapes, a real-valued shortcut around every convolution, its registry name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.models import BiRealResNet, get_model, resnet20
from metaquant.models.resnet_bireal import BiRealBlock


def _zero_convolutions(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)


def test_shapes_and_registry_name() -> None:
    model = get_model("resnet20-bireal", num_classes=7, in_channels=1)
    assert type(model) is BiRealResNet and model.depth == 20 and get_model("ResNet20_BiReal").depth == 20
    assert "resnet20-bireal" in mq.models.model_names()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert sum(isinstance(m, BiRealBlock) for m in model.modules()) == 9
    # stem and head named as in resnet20; the blocks are Bi-Real's, so resnet20's checkpoint does not fit
    names = set(model.state_dict())
    assert {k for k in resnet20().state_dict() if k.startswith(("conv1", "bn1", "fc"))} <= names
    assert not any("downsample" in k for k in names)


@pytest.mark.parametrize("in_channels,out_channels,stride", [(16, 16, 1), (16, 32, 2)])
def test_with_its_convolutions_zeroed_a_block_is_its_identity_path(in_channels, out_channels, stride) -> None:
    block = BiRealBlock(in_channels, out_channels, stride).eval()  # BatchNorm: identity statistics, β = 0
    _zero_convolutions(block)
    x = torch.randn(2, in_channels, 7, 7)
    if stride == 1:
        expected = x
    else:  # 2x2 average pooling, the new channels zero
        expected = F.pad(F.avg_pool2d(x, 2, ceil_mode=True), (0, 0, 0, 0, 0, out_channels - in_channels))
    assert torch.equal(block(x), expected)


def test_every_block_convolution_has_its_own_shortcut() -> None:
    """Zeroing one convolution leaves the block's output the other convolution's path plus the identity."""
    torch.manual_seed(0)
    block = BiRealBlock(8, 8).eval()
    x = torch.randn(2, 8, 5, 5)
    nn.init.zeros_(block.conv1.weight)
    y = x  # the first convolution contributes nothing: y = x + BN(0) = x
    assert torch.equal(block(x), y + block.bn2(block.conv2(torch.nn.functional.hardtanh(y))))


def test_with_binary_activations_every_block_convolution_gets_a_sign_input_quantizer() -> None:
    model = mq.quantize_(
        get_model("resnet20-bireal"), mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1))
    )
    quantizers = mq.layers.input_quantizers(model)
    assert quantizers["conv1"].name == "lsq"
    assert [n for n, q in quantizers.items() if q.name == "sign"] == [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"
    ] + ["fc"]
