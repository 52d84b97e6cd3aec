"""Exports of models with tied weights, several or dict inputs (the zoo's export tests run every model; these
check the details against values computed here)."""

import pytest
import torch
from torch import nn

import metaquant as mq
from metaquant.export import export_onnx, export_packed, load_packed, materialize


def tied_model(quantizer=("ternary", 2)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 5, bias=False))
    model[2].weight = model[1].weight  # tied between two quantized layers
    model[3].weight = model[0].weight  # tied between a quantized layer and the embedding, left in full precision
    return mq.quantize_(model, mq.QuantConfig(*quantizer))


def test_materialize_quantizes_a_tied_weight_once_and_keeps_a_full_precision_use_in_full_precision():
    model = tied_model()
    q = model[1].quantizer
    plain = materialize(model)
    # W shared by two quantized layers: one Parameter holding Ŵ = Q(W)
    assert plain[1].weight is plain[2].weight and torch.equal(plain[1].weight, q(model[1].weight))
    # W shared by the quantized output layer and the embedding: Ŵ in the first, W in the second
    assert plain[3].weight is not plain[0].weight
    assert torch.equal(plain[3].weight, q(model[0].weight)) and torch.equal(plain[0].weight, model[0].weight)
    assert model[3].weight is model[0].weight  # the model itself is not changed


def test_load_packed_unties_what_the_file_holds_in_two_forms(tmp_path):
    model = tied_model(("dorefa", 1))
    export_packed(model, tmp_path / "m.safetensors")
    architecture = nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 5, bias=False))
    architecture[2].weight = architecture[1].weight
    architecture[3].weight = architecture[0].weight
    loaded = load_packed(tmp_path / "m.safetensors", architecture)
    q = model[1].quantizer
    assert loaded[1].weight is loaded[2].weight and torch.equal(loaded[1].weight, q(model[1].weight))
    assert torch.equal(loaded[0].weight, model[0].weight) and torch.equal(loaded[3].weight, q(model[0].weight))
    tokens = torch.tensor([[1, 2], [4, 0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model.eval()(tokens), rtol=0, atol=0)


def test_export_onnx_names_why_it_cannot_pass_a_dict_input_by_name(tmp_path):
    pytest.importorskip("onnx")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, *inputs):
            return self.fc(inputs[-1]["x"])

    model = mq.quantize_(Model())
    with pytest.raises(ValueError, match=r"last input is a dict .* Model.forward has 0 such arguments for 1 inputs"):
        export_onnx(model, tmp_path / "m.onnx", ({"x": torch.randn(2, 3)},))
