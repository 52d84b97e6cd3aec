"""Tests for the metaquant.models registry: MODELS, model_names, get_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaquant.models import MODELS, CifarResNet, ImageNetResNet, LabNet, get_model, model_names

ALL_NAMES = [
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet20-bireal",
    "resnet18",
    "lab",
]


def test_registry_holds_exactly_the_documented_names() -> None:
    assert sorted(MODELS) == sorted(ALL_NAMES)
    assert model_names() == list(MODELS)
    assert all(callable(f) for f in MODELS.values())


@pytest.mark.parametrize(
    ("name", "cls", "depth"),
    [
        ("resnet20", CifarResNet, 20),
        ("ResNet32", CifarResNet, 32),
        ("RESNET44", CifarResNet, 44),
        ("ResNet56", CifarResNet, 56),
        ("resnet110", CifarResNet, 110),
        ("ResNet-20", CifarResNet, 20),
        ("ResNet18", ImageNetResNet, None),
        ("LAB", LabNet, None),
        (" lab ", LabNet, None),
    ],
)
def test_names_are_case_insensitive_and_accept_original_spellings(name: str, cls: type, depth: int | None) -> None:
    model = get_model(name)
    assert type(model) is cls
    if depth is not None:
        assert model.depth == depth


def test_arguments_reach_the_model() -> None:
    model = get_model("resnet20", num_classes=7, in_channels=1)
    assert model.fc.out_features == 7 and model.conv1.in_channels == 1
    model = get_model("resnet18", num_classes=5, in_channels=1)  # registry default is 10 classes, not 1000
    assert model.fc.out_features == 5 and model.conv1.in_channels == 1
    model = get_model("lab", num_classes=3, in_channels=1, image_size=28)
    assert model.classifier[0].in_features == 3 * 3 * 512 and model.classifier[-1].out_features == 3
    assert get_model("resnet18").fc.out_features == 10


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_runs_on_fashion_mnist_shaped_input(name: str) -> None:
    model = get_model(name, num_classes=10, in_channels=1, image_size=28).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet19", "vgg16", "", "resnet"])
def test_unknown_name_lists_allowed_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        get_model(name)
    message = str(info.value)
    assert repr(name) in message
    for allowed in ALL_NAMES:
        assert allowed in message


def test_non_string_name_is_rejected() -> None:
    with pytest.raises(TypeError, match="str"):
        get_model(20)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": -3}, "num_classes"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_sizes_below_one_are_rejected(kwargs: dict[str, int], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        get_model("resnet20", **kwargs)


def test_non_int_sizes_are_rejected() -> None:
    with pytest.raises(TypeError, match="num_classes"):
        get_model("resnet20", num_classes=10.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="in_channels"):
        get_model("lab", in_channels=True)


def test_models_are_fresh_and_full_precision() -> None:
    a, b = get_model("resnet20"), get_model("resnet20")
    assert a is not b and a.conv1.weight.data_ptr() != b.conv1.weight.data_ptr()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in a.parameters())
    assert isinstance(a, nn.Module) and a.training
