"""Channels-last layout: same training as NCHW up to the order of floating-point sums."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )


@pytest.mark.parametrize("method", ["fp", "ste", "multifc", "lstmfc"])
def test_channels_last_trains_like_nchw(method):
    # Tolerance: convolutions sum in another order in each layout (float32, ~1e-6 relative per step); over
    # 5 steps at lr 0.05 the losses agree to 1e-4.
    base = small_cnn() if method == "fp" else mq.quantize_(small_cnn())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(5)]
    losses = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = mq.layout.apply_memory_format(copy.deepcopy(base), fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if method in ("fp", "ste"):
            trainer = mq.Trainer(model, opt)
        else:
            torch.manual_seed(2)
            trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=4) if method == "multifc" else mq.LSTMFC(hidden=4))

        def closure(x, y, model=model, fmt=fmt):
            return lambda: F.cross_entropy(model(mq.layout.format_batch(x, fmt)), y)

        losses[fmt] = torch.stack([trainer.step(closure(x, y)) for x, y in data])
        if fmt == torch.channels_last:
            assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # training kept the layout
    torch.testing.assert_close(losses[torch.channels_last], losses[torch.contiguous_format], rtol=1e-4, atol=1e-4)


def test_preferred_format_and_refusal():
    assert mq.layout.preferred_memory_format(small_cnn()) == torch.channels_last
    assert mq.layout.preferred_memory_format(nn.Sequential(nn.Linear(2, 2))) == torch.contiguous_format
    allowed = "allowed: auto, channels-last, contiguous"
    with pytest.raises(ValueError, match=f"memory format 'nhwc' is not supported; {allowed}"):
        mq.layout.preferred_memory_format(small_cnn(), "nhwc")


def test_apply_memory_format_keeps_parameters_and_values():
    model = small_cnn()
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mq.layout.apply_memory_format(model, torch.channels_last)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[3].weight.is_contiguous(memory_format=torch.channels_last)
