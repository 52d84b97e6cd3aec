"""The training API refuses wrong arguments at the call, with one clear error, not deep inside a later step."""

import re

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


def _trainers(model, **options):
    """Both trainers over ``model``, built with ``options`` (a function each, so that a refusal is raised inside)."""
    return {
        "Trainer": lambda: mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **options),
        "MetaQuant": lambda: mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(4), **options),
    }


@pytest.mark.parametrize("kind", ["Trainer", "MetaQuant"])
@pytest.mark.parametrize(
    "options, message",
    [
        ({"grad_scaler": "yes"}, r"grad_scaler must be None or a torch\.amp\.GradScaler .*got 'yes'"),
        ({"grad_scaler": True}, r"grad_scaler must be None or a torch\.amp\.GradScaler .*got True"),
    ],
)
def test_trainers_refuse_a_grad_scaler_that_is_not_one_when_given(kind, options, message):
    with pytest.raises(TypeError, match=message):
        _trainers(_model(), **options)[kind]()


def test_trainers_refuse_a_model_that_is_not_a_module_and_callables_that_are_not_callable():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str 'model'"):
        mq.Trainer("model", optimizer)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str 'model'"):
        mq.MetaQuant("model", optimizer, mq.MultiFC(4))
    with pytest.raises(TypeError, match="meta_optimizer must be None or a callable, got 'adam'"):
        mq.MetaQuant(model, optimizer, mq.MultiFC(4), meta_optimizer="adam")
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    for trainer in (mq.Trainer(model, optimizer), mq.MetaQuant(model, optimizer, mq.MultiFC(4))):
        trainer.step(lambda: F.cross_entropy(model(x), y))  # past MetaQuant's first step, which keeps the weights
        w = model[1].weight.detach().clone()
        with pytest.raises(TypeError, match="before_update must be None or a callable, got 'clip'"):
            trainer.step(lambda: F.cross_entropy(model(x), y), before_update="clip")
        assert torch.equal(model[1].weight, w)  # refused before anything ran


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_infinite_or_nan_rates_and_scales_are_refused_at_construction(value):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"meta_lr must be a finite number > 0, got (inf|nan)"):
        mq.MetaQuant(model, optimizer, mq.MultiFC(4), meta_lr=value)
    with pytest.raises(ValueError, match=r"meta_weight_decay must be a finite number >= 0, got (inf|nan)"):
        mq.MetaQuant(model, optimizer, mq.MultiFC(4), meta_weight_decay=value)
    with pytest.raises(ValueError, match=r"EWGS delta must be a finite number >= 0, got (inf|nan)"):
        mq.EWGS(delta=value)


@pytest.mark.parametrize("include", [None, [["recurrent"]], 3])
def test_quantize_refuses_an_include_that_is_not_kind_names(include):
    with pytest.raises(TypeError, match=r"include must be layer kind names \(recurrent, embedding\), got"):
        mq.quantize_(nn.Sequential(nn.Linear(3, 2)), include=include)


def _prune(layer):
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    return "torch.nn.utils.prune.remove(module, 'weight')"


def _weight_norm(layer):
    with pytest.warns(FutureWarning):  # the older form, deprecated but still used
        torch.nn.utils.weight_norm(layer)
    return "torch.nn.utils.remove_weight_norm(module, 'weight')"


def _spectral_norm(layer):
    torch.nn.utils.spectral_norm(layer)
    return "torch.nn.utils.remove_spectral_norm(module, 'weight')"


@pytest.mark.parametrize("hook", [_prune, _weight_norm, _spectral_norm])
def test_a_weight_recomputed_by_a_forward_pre_hook_is_refused_before_and_after_quantization(hook):
    # the quantized forward would read the tensor the hook made before the last update: stale weights
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    remove = hook(model[0])
    with pytest.raises(
        TypeError, match=r"cannot quantize 0 \(Linear\): its weight is recomputed .*" + re.escape(remove)
    ):
        mq.quantize_(model)
    assert type(model[0]) is nn.Linear  # nothing converted
    quantized = mq.quantize_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    hook(quantized[0])
    for make in _trainers(quantized).values():
        with pytest.raises(TypeError, match=r"quantized layer 0 \(QuantLinear\): its weight is recomputed"):
            make()


def test_a_hook_on_a_recurrent_weight_is_refused_where_it_sits_and_ignored_where_nothing_is_quantized():
    # the hook sits on the LSTM, not on the QuantWeight view of one of its matrices
    lstm = mq.quantize_(nn.Sequential(nn.LSTM(3, 4)), include=("recurrent",))
    torch.nn.utils.prune.l1_unstructured(lstm[0], "weight_hh_l0", amount=0.5)
    for make in _trainers(lstm).values():
        with pytest.raises(
            TypeError, match=r"its weight_hh_l0 is recomputed .*prune\.remove\(module, 'weight_hh_l0'\)"
        ):
            make()
    # an LSTM that quantize_ leaves in full precision (recurrent layers are quantized on request) may keep its hook
    model = nn.Sequential(nn.LSTM(3, 4), nn.Linear(4, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight_ih_l0", amount=0.5)
    mq.quantize_(model)
    assert type(model[0]) is nn.LSTM and type(model[1]).__name__ == "QuantLinear"
    with pytest.raises(TypeError, match=r"cannot quantize 0 \(LSTM\): its weight_ih_l0 is recomputed"):
        mq.quantize_(model, include=("recurrent",))
