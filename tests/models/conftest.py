"""Fixtures for the model tests.

* an independent, functional ResNet forward pass used as a test oracle: it
  reads the weights straight from a state_dict and applies F.conv2d /
  F.batch_norm in the order of the ResNet paper, so comparing it with the
  nn.Module output checks the modules' wiring (strides, shortcut, ReLU after
  the addition, pooling) rather than just their shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor


@pytest.fixture(autouse=True)
def _single_thread():
    """Run these small-batch tests on one intra-op thread, then restore.

    On a 2-core machine that is also running other work, splitting tiny
    convolutions over 2 threads made each forward ~50x slower (0.9 s vs
    0.01 s); one thread keeps the suite fast and its timing stable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EPS = 1e-5  # nn.BatchNorm2d's default


def _bn(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=EPS,
    )


def resnet_forward(sd: dict[str, Tensor], x: Tensor, *, imagenet_stem: bool) -> Tensor:
    """Eval-mode logits of a BasicBlock ResNet given its state_dict."""
    if imagenet_stem:
        x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    else:
        x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=1, padding=1)))
    stage = 1
    while f"layer{stage}.0.conv1.weight" in sd:
        block = 0
        while (p := f"layer{stage}.{block}") + ".conv1.weight" in sd:
            # In these networks a block has a projection shortcut exactly
            # when it halves the resolution.
            has_proj = f"{p}.downsample.0.weight" in sd
            stride = 2 if has_proj else 1
            out = F.relu(_bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            out = _bn(sd, f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=1, padding=1))
            short = x
            if has_proj:
                short = _bn(sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2))
            x = F.relu(out + short)
            block += 1
        stage += 1
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.fixture
def functional_resnet():
    """The functional oracle ``resnet_forward(sd, x, imagenet_stem=...)``."""
    return resnet_forward
