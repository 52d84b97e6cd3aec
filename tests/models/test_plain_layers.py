"""The models are plain full-precision networks that a later quantizer can swap.

Quantization replaces every nn.Conv2d / nn.Linear module in place (setattr on
the parent), so the models must use exactly those classes, reach them only
through the module tree, and hold no other weighted layer types.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaquant.models import get_model, model_names

ALLOWED_TYPES = {
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.Hardtanh,
    nn.AvgPool2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Sequential,
}


def build(name: str) -> nn.Module:
    return get_model(name, num_classes=10, in_channels=1, image_size=28)


@pytest.mark.parametrize("name", model_names())
def test_weighted_layers_are_plain_torch_classes(name: str) -> None:
    model = build(name)
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs and linears
    assert all(type(m) is nn.Conv2d for m in convs)
    assert all(type(m) is nn.Linear for m in linears)
    # Every parameter lives in a Conv2d, Linear or BatchNorm.
    for module in model.modules():
        if type(module).__module__.startswith("torch."):
            assert type(module) in ALLOWED_TYPES, type(module)
        for _ in module.parameters(recurse=False):
            assert type(module) in {nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d}


class _CountingConv(nn.Conv2d):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


class _CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _swap(module: nn.Module) -> int:
    """Replace each Conv2d / Linear by a counting copy with the same weights, like a quantizer would."""
    swapped = 0
    for child_name, child in module.named_children():
        if type(child) is nn.Conv2d:
            new = _CountingConv(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                child.padding,
                child.dilation,
                child.groups,
                child.bias is not None,
            )
        elif type(child) is nn.Linear:
            new = _CountingLinear(child.in_features, child.out_features, child.bias is not None)
        else:
            swapped += _swap(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(module, child_name, new)
        swapped += 1
    return swapped


@pytest.mark.parametrize("name", model_names())
def test_in_place_swap_is_used_by_forward(name: str) -> None:
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    n_layers = sum(1 for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear))
    _CountingConv.calls = _CountingLinear.calls = 0
    assert _swap(model) == n_layers
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    with torch.no_grad():
        after = model(x)
    # Each swapped layer ran exactly once, and the function is unchanged.
    assert _CountingConv.calls + _CountingLinear.calls == n_layers
    torch.testing.assert_close(after, before)
    assert set(model.state_dict()) == set(build(name).state_dict())


@pytest.mark.parametrize("name", model_names())
def test_every_parameter_gets_a_gradient_and_nothing_is_printed(name: str, capsys) -> None:
    model = build(name).train()
    out = model(torch.randn(2, 1, 28, 28))
    nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
