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


def test_a_weight_flattened_in_memory_order_is_a_view_and_unflattens_to_the_same_strides():
    w = torch.randn(8, 3, 5, 5)
    last = w.to(memory_format=torch.channels_last)
    assert mq.layout.memory_order(w) == (0, 1, 2, 3) and mq.layout.memory_order(last) == (0, 2, 3, 1)
    order = mq.layout.memory_order(last)
    flat = mq.layout.flatten_in_memory_order(last, order)
    assert flat.data_ptr() == last.data_ptr() and flat.shape == (w.numel(),)  # no copy
    assert torch.equal(flat, last.permute(0, 2, 3, 1).reshape(-1))  # the oracle: an explicit permutation
    back = mq.layout.unflatten_like(flat, last.shape, order)
    assert torch.equal(back, last) and back.stride() == last.stride() and back.data_ptr() == last.data_ptr()


def test_only_image_batches_change_layout_and_contiguous_can_be_chosen_for_a_cnn():
    x = torch.randn(2, 3, 4, 4)
    y = mq.layout.format_batch(x, torch.channels_last)
    assert torch.equal(x, y) and y.is_contiguous(memory_format=torch.channels_last)
    assert mq.layout.format_batch(x, torch.contiguous_format) is x
    flat = torch.randn(2, 3)
    assert mq.layout.format_batch(flat, torch.channels_last) is flat
    assert mq.layout.preferred_memory_format(small_cnn(), "contiguous") == torch.contiguous_format
    assert mq.layout.preferred_memory_format(nn.Linear(2, 2), "channels-last") == torch.channels_last


@pytest.mark.parametrize("meta", [None, "multifc"], ids=["ste", "multifc"])
def test_the_fast_layout_trains_to_the_same_losses_as_the_layout_pytorch_makes(meta):
    """``use_fast_layout`` (the README's quick start) against the model left contiguous: the same batches, the
    same losses within 1e-4 relative over 8 steps (the convolutions sum in another order), channels-last
    weights and activations, and contiguous batches accepted as they are."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]

    def train(fast):
        torch.manual_seed(0)
        model = mq.quantize_(mq.models.resnet8(num_classes=10, in_channels=1), mq.QuantConfig("dorefa", 1))
        if fast:
            assert mq.layout.use_fast_layout(model) is model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        trainer = mq.Trainer(model, opt) if meta is None else mq.MetaQuant(model, opt, mq.MultiFC(hidden=8))
        losses = [trainer.step(lambda x=x, y=y: F.cross_entropy(model(x), y)).item() for x, y in batches]
        return model, losses

    fast, fast_losses = train(True)
    plain, plain_losses = train(False)
    conv = fast.layer1[0].conv1.weight  # 16 input channels: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.layer1[0].conv1.weight.is_contiguous()
    assert fast.layer1[0].conv1(torch.randn(2, 16, 28, 28)).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=0)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_the_fast_layout_leaves_a_model_without_2d_convolutions_as_it_is():
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))
    before = [p.stride() for p in model.parameters()]
    assert [p.stride() for p in mq.layout.use_fast_layout(model).parameters()] == before
