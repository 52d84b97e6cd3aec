"""The ONNX export stores every quantized weight of the zoo's user-style models (attention projections, Linear on
3-D inputs, recurrent weights, tied and shared weights, a ViT) as integers followed by ``DequantizeLinear``, and
says which weights the file does not hold, and why."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import metaquant as mq
from metaquant.export import export_onnx, levels
from metaquant.layers import quantized_weight_keys
from tests.models.zoo import ZOO

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

INTEGERS = {onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT16}
CASES = [case for case in ZOO if case.onnx]
KEY = {case.name: f"net{i}" for i, case in enumerate(CASES)}


class Zoo(nn.Module):
    """Every zoo model in one module: one export (seconds) covers them all."""

    def __init__(self):
        super().__init__()
        self.models = nn.ModuleDict(
            {
                KEY[case.name]: mq.quantize_(case.build(), mq.QuantConfig(*case.quantizer), include=case.include)
                for case in CASES
            }
        )

    def forward(self, inputs):
        return torch.cat([model(*inputs[name]).float() for name, model in self.models.items()], 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    zoo = Zoo().eval()
    path = tmp_path_factory.mktemp("zoo") / "zoo.onnx"
    handler = _Records()
    logging.getLogger("metaquant.export").addHandler(handler)
    try:
        export_onnx(zoo, path, ({KEY[case.name]: case.batch(2, seed=5) for case in CASES},))
    finally:
        logging.getLogger("metaquant.export").removeHandler(handler)
    return zoo, onnx.load(str(path)), handler.messages


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _unused(case):
    return {f"models.{KEY[case.name]}.{name}.weight" for name in case.unused}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_quantized_weight_is_stored_as_integers_and_dequantize_linear(exported, case):
    zoo, proto, _ = exported
    initializers = {t.name: t for t in proto.graph.initializer}
    dequantize = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    integers = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type in INTEGERS]
    prefix = f"models.{KEY[case.name]}."
    for key, layer in quantized_weight_keys(zoo).items():
        if not key.startswith(prefix) or key in _unused(case):
            continue
        with torch.no_grad():
            q = levels(layer.quantizer.encode(layer.weight), layer.quantizer.bits).numpy()
        # the weight's levels are an integer initializer of the file (under the weight's name, or, for a weight
        # equal to another one, the exporter keeps one of the two)
        assert any(a.shape == q.shape and np.array_equal(a, q) for a in integers), key
        if key in dequantize:
            node = dequantize[key]
            assert initializers[node.input[0]].data_type in INTEGERS and key not in initializers


def test_the_file_holds_no_float_copy_of_a_quantized_weight(exported):
    """The float initializers (scales aside) hold fewer numbers than the model's tensors that are not quantized
    weights: a quantized weight stored in float would add its own."""
    zoo, proto, _ = exported
    keys = quantized_weight_keys(zoo)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    stored = sum(numpy_helper.to_array(t).size for t in floats if not t.name.endswith("_scale"))
    not_quantized = sum(v.numel() for k, v in zoo.state_dict().items() if k not in keys and v.is_floating_point())
    assert stored <= not_quantized, (stored, not_quantized)
    names = {t.name for t in floats}
    assert not names & set(keys)


def test_the_file_says_which_weights_it_does_not_hold_and_why(exported):
    _, proto, messages = exported
    (message,) = messages
    unused = sorted(key for case in CASES for key in _unused(case))
    assert unused == ["models.net18.right.weight"]
    assert message == (
        "ONNX export: not in the file, as the forward pass did not use them for the example input: "
        "models.net18.right.weight"
    )
    assert "float" not in message
    assert not any("net18.right" in t.name for t in proto.graph.initializer)


def test_a_weight_that_is_not_levels_times_scales_is_stored_in_float_with_a_warning(tmp_path, caplog):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Shifted(mq.quantizers.DoReFa):
        def decode(self, encoded):
            return super().decode(encoded) + 0.5

        def quantize(self, w_tilde):
            return super().quantize(w_tilde) + 0.5

    model = mq.quantize_(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).eval()
    model[0].quantizer = Shifted(bits=1)
    with caplog.at_level(logging.WARNING, logger="metaquant.export"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 4))
    assert "ONNX export: stored in float: 0.weight (their quantized weight is not integer levels" in caplog.text
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"] == ["2.weight"]


def test_batchnorm_is_folded_into_the_scales_along_each_layer_kinds_output_channels(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 3, 2, stride=2, bias=False),
        nn.BatchNorm2d(3),
        nn.Flatten(),
        nn.Linear(3 * 10 * 10, 5),
        nn.BatchNorm1d(5),
    )
    model = mq.quantize_(model, mq.QuantConfig("bwn-channel", 1))
    model.train()
    model(torch.randn(16, 2, 5, 5))
    model.eval()
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 2, 5, 5))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    axes = {
        n.output[0]: [(a.name, a.i) for a in n.attribute] for n in proto.graph.node if n.op_type == "DequantizeLinear"
    }
    assert axes == {"0.weight": [("axis", 0)], "2.weight": [("axis", 1)], "5.weight": [("axis", 0)]}
    x = torch.randn(3, 2, 5, 5)
    (logits,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_batch_size_the_forward_pass_fixes_is_said(tmp_path, caplog):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x + self.token.expand(len(x), -1))  # len(x): torch.export makes it a constant

    with caplog.at_level(logging.WARNING, logger="metaquant.export"):
        export_onnx(mq.quantize_(Tokens()), tmp_path / "m.onnx", torch.zeros(2, 4))
    assert "the batch size of images is fixed to the example's" in caplog.text
    shape = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [2, 4]
