"""What quantize_ says about what it leaves or refuses: the way out it names works."""

import logging
import re

import pytest
import torch
from torch import nn

import metaquant as mq
from tests.models.zoo import ViT


def test_a_parametrized_weight_is_refused_with_the_two_ways_out_and_both_work():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 2))

    remove = "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
    with pytest.raises(TypeError, match=re.escape(remove) + " first, or leave the layer out with filter_fn"):
        mq.quantize_(model())
    left_out = mq.quantize_(model(), filter_fn=lambda m, name: name == "2")  # the second way out
    assert list(mq.quantized_layers(left_out)) == ["2"]
    net = model()
    torch.nn.utils.parametrize.remove_parametrizations(net[0], "weight")  # the first, as the message writes it
    assert list(mq.quantized_layers(mq.quantize_(net))) == ["0", "2"]


def test_a_weight_a_hook_recomputes_is_refused_with_filter_fn_as_the_other_way_out():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(
        TypeError, match=r"prune\.remove\(module, 'weight'\) first, or leave the layer out of quantize_"
    ):
        mq.quantize_(model)
    assert list(mq.quantized_layers(mq.quantize_(model, filter_fn=lambda m, name: name == "2"))) == ["2"]


def test_a_models_own_parameters_are_named_and_the_model_is_not_called_unsupported(caplog):
    with caplog.at_level(logging.WARNING, logger="metaquant.layers"):
        model = mq.quantize_(ViT())
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        "quantize_: left in full precision: <root> (ViT): its own Parameters cls_token [1, 1, 8], pos_embed "
        "[1, 5, 8], which its forward uses directly (quantize_ converts layers: those inside it are converted)"
    )
    assert "not a layer type" not in message
    assert len(mq.quantized_layers(model)) == 6


@pytest.mark.parametrize("quantizer, bits", [("dorefa", 1), ("bwn-channel", 1), ("uniform-channel", 4), ("lsq", 4)])
def test_an_empty_weight_is_left_in_float_with_the_reason_and_the_model_still_runs(caplog, quantizer, bits):
    model = nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="metaquant.layers"):
        mq.quantize_(model, mq.QuantConfig(quantizer, bits))
    assert [r.getMessage() for r in caplog.records] == [
        "quantize_: left in full precision: 0 (Linear): its weight is empty: nothing to quantize"
    ]
    assert type(model[0]) is nn.Linear and isinstance(model[2], mq.layers.QuantLinear)
    x = torch.randn(3, 0)
    expected = nn.functional.linear(torch.relu(model[0](x)), model[2].quantizer(model[2].weight), model[2].bias)
    assert torch.equal(model(x), expected)


def test_a_model_whose_only_layer_has_an_empty_weight_has_nothing_to_quantize():
    with pytest.raises(ValueError, match=re.escape("its weight is empty: nothing to quantize")):
        mq.quantize_(nn.Sequential(nn.Linear(0, 4)))
    with pytest.raises(TypeError, match=re.escape("cannot quantize 0 (Linear): its weight is empty")):
        mq.quantize_(nn.Sequential(nn.Linear(4, 0)), filter_fn=lambda module, name: isinstance(module, nn.Linear))
