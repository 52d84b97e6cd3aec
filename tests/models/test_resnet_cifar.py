"""Tests for metaquant.models.resnet_cifar: architecture, sizes, wiring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaquant.models import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from metaquant.models.checkpoints import load_weights


def expected_cifar_params(depth: int, num_classes: int, in_channels: int) -> int:
    """Parameter count written out from the architecture (He et al. 2016, Sec. 4.2).

    conv k x k: k*k*cin*cout (no bias); BatchNorm: 2*c (weight, bias); fc: 64*K + K.
    """
    n = (depth - 2) // 6
    stem = 9 * in_channels * 16 + 2 * 16
    stage1 = n * (9 * 16 * 16 + 2 * 16 + 9 * 16 * 16 + 2 * 16)
    # First block: 3x3 16->32 stride 2, 3x3 32->32, two BNs, 1x1 projection + BN.
    stage2 = (9 * 16 * 32 + 9 * 32 * 32 + 4 * 32 + 16 * 32 + 2 * 32) + (n - 1) * (2 * 9 * 32 * 32 + 4 * 32)
    stage3 = (9 * 32 * 64 + 9 * 64 * 64 + 4 * 64 + 32 * 64 + 2 * 64) + (n - 1) * (2 * 9 * 64 * 64 + 4 * 64)
    fc = 64 * num_classes + num_classes
    return stem + stage1 + stage2 + stage3 + fc


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


FACTORIES = {20: resnet20, 32: resnet32, 44: resnet44, 56: resnet56, 110: resnet110}


@pytest.mark.parametrize("depth", sorted(FACTORIES))
def test_parameter_count_matches_architecture_formula(depth: int) -> None:
    assert n_params(FACTORIES[depth]()) == expected_cifar_params(depth, 10, 3)
    assert n_params(FACTORIES[depth](num_classes=100, in_channels=1)) == expected_cifar_params(depth, 100, 1)


def test_resnet20_has_the_known_0_27m_parameters() -> None:
    count = n_params(resnet20())
    assert count == 272_474
    assert 0.265e6 < count < 0.275e6


@pytest.mark.parametrize("depth", sorted(FACTORIES))
def test_depth_gives_blocks_and_weighted_layers(depth: int) -> None:
    model = FACTORIES[depth]()
    n = (depth - 2) // 6
    assert model.depth == depth and model.blocks_per_stage == n
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    # depth counts the 3x3 convs on the main path plus fc, not the 1x1 projections.
    main_convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in name]
    assert len(main_convs) + 1 == depth


def test_downsample_only_where_shape_changes() -> None:
    model = resnet20()
    with_proj = [name for name, m in model.named_modules() if name.endswith("downsample")]
    assert with_proj == ["layer2.0.downsample", "layer3.0.downsample"]
    conv, bn = model.layer2[0].downsample
    assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 32
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3) and model.conv1.bias is None
    assert model.fc.bias is not None and model.fc.in_features == 64


@pytest.mark.parametrize(
    ("in_channels", "size", "num_classes"),
    [(1, 28, 10), (3, 32, 10), (3, 32, 100), (1, 28, 7), (3, 17, 2)],
)
def test_output_shape(in_channels: int, size: int, num_classes: int) -> None:
    model = resnet20(num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 25, -4])
def test_rejects_depth_not_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"6n\+2.*got {depth}"):
        CifarResNet(depth)


@pytest.mark.parametrize("depth", [20.0, "20", True])
def test_rejects_non_int_depth(depth: object) -> None:
    with pytest.raises(TypeError, match="depth"):
        CifarResNet(depth)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"num_classes": 0}, "num_classes"), ({"in_channels": -1}, "in_channels")]
)
def test_rejects_bad_sizes(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        resnet20(**kwargs)


def test_kaiming_init_of_convs() -> None:
    torch.manual_seed(0)
    model = resnet56()
    w = model.layer3[1].conv1.weight  # 64 out channels, 3x3: fan_out = 576
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert w.std().item() == pytest.approx(expected_std, rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)


def test_forward_matches_functional_oracle_on_original_weights(original_resnet20_path, functional_resnet) -> None:
    model = resnet20()
    load_weights(model, original_resnet20_path)
    model.eval()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = model(x)
        oracle = functional_resnet(model.state_dict(), x, imagenet_stem=False)
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-4)


def test_forward_matches_functional_oracle_on_odd_input_size(functional_resnet) -> None:
    # 1x28x28 -> 28, 14, 7: the odd side exercises the stride-2 padding
    # of both the main path and the projection.
    torch.manual_seed(1)
    model = resnet32(num_classes=5, in_channels=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial BN statistics
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), functional_resnet(model.state_dict(), x, imagenet_stem=False), rtol=1e-4, atol=1e-4
        )
