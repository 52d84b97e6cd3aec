"""The training API refuses wrong arguments at the call, with one clear error, not deep inside a later step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.guards import (
    check_closure,
    check_loss,
    check_optimizer,
    check_requantization,
    check_state_shapes,
)


def _model(inputs=4):
    return mq.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, 3)))


def test_trainer_step_refuses_a_missing_closure_and_a_loss_that_is_not_a_scalar_tensor():
    model = _model()
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    w = model[1].weight.detach().clone()
    with pytest.raises(TypeError, match=r"step\(closure\) needs a function .*; got None"):
        trainer.step(None)
    with pytest.raises(TypeError, match="the closure must return the loss as a tensor, got float"):
        trainer.step(lambda: F.cross_entropy(model(x), y).item())
    with pytest.raises(ValueError, match=r"must return a scalar loss, got a tensor of shape \(5,\)"):
        trainer.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="does not require grad"):
        trainer.step(lambda: F.cross_entropy(model(x), y).detach())
    assert torch.equal(model[1].weight, w)  # nothing was updated
    trainer.step(lambda: F.cross_entropy(model(x), y))  # and the trainer still works
    assert not torch.equal(model[1].weight, w)


def test_an_optimizer_given_by_name_is_refused():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer .* got 'sgd'"):
        check_optimizer("sgd")
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert check_optimizer(opt) is opt


def test_check_closure_and_check_loss_pass_good_values_through():
    closure = lambda: torch.ones((), requires_grad=True)  # noqa: E731
    assert check_closure(closure) is closure
    loss = torch.ones(1, requires_grad=True)  # one element: back-propagates like a scalar
    assert check_loss(loss) is loss
    with pytest.raises(TypeError, match="floating-point"):
        check_loss(torch.ones((), dtype=torch.int64))


def test_a_metaquant_state_for_layers_of_other_shapes_is_refused():
    def trained(inputs):
        torch.manual_seed(0)
        model = _model(inputs)
        trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
        x, y = torch.randn(5, inputs), torch.tensor([0, 1, 2, 0, 1])
        for _ in range(2):
            trainer.step(lambda: F.cross_entropy(model(x), y))
        return trainer

    saved, other = trained(4).state_dict(), trained(6)
    weights = {name: layer.weight for name, layer in other.layers.items()}
    with pytest.raises(
        ValueError,
        match=r"does not fit layer 1: its grad_w_hat has shape \(3, 4\), the layer's "
        r"weight \(3, 6\)",
    ):
        check_state_shapes(saved["records"], weights)
    check_state_shapes(trained(6).state_dict()["records"], weights)  # the same shapes pass
    with pytest.raises(ValueError, match=r"do not match|does not match the model's quantized layers"):
        check_state_shapes({"other": {}}, weights)


def test_quantizing_again_with_another_quantizer_is_refused():
    model = _model()
    layer = model[1]
    check_requantization("1", layer.quantizer, mq.get_quantizer("dorefa", 1))  # the same: fine
    with pytest.raises(ValueError, match=r"layer 1 is already quantized with DoReFa\(bits=1\), not BWN\(bits=1\)"):
        check_requantization("1", layer.quantizer, mq.get_quantizer("bwn", 1))


def test_quantizing_again_with_the_same_per_channel_config_keeps_every_layer_on_its_own_axis():
    # a transposed convolution holds its per-channel quantizer on axis 1: asking again for the same config is the
    # same request, and quantizing in two passes (filter_fn) gives what one pass gives
    config = mq.QuantConfig("bwn-channel")
    model = mq.quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2)), config)
    axes = [layer.quantizer.axis for layer in (model[0], model[1])]
    assert mq.quantize_(model, config) is model and [model[0].quantizer.axis, model[1].quantizer.axis] == axes == [0, 1]
    two_passes = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2))
    mq.quantize_(two_passes, config, lambda m, name: name == "1")
    mq.quantize_(two_passes, config)
    assert [two_passes[0].quantizer, two_passes[1].quantizer] == [model[0].quantizer, model[1].quantizer]
    with pytest.raises(
        ValueError, match=r"layer 0 is already quantized with BWNPerChannel\(bits=1\), not BWN\(bits=1\)"
    ):
        mq.quantize_(model, mq.QuantConfig("bwn"))
