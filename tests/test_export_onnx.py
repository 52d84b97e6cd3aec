"""The ONNX export stores every quantized weight of the zoo's user-style models (attention projections, Linear on
3-D inputs, recurrent weights, tied and shared weights, a ViT) as integers followed by ``DequantizeLinear``, and
says which weights the file does not hold, and why."""

import functools
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.export import export_onnx, levels, onnx_session_options, read_onnx
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


# --- quantized activations ------------------------------------------------------------------------------------------
W4A4 = mq.QuantConfig("lsq", 4, activations=mq.ActQuantConfig("lsq", 4))


def _trained_w4a4_cnn():
    """4-bit LSQ weights and activations, a few training steps in; biases from the folded BatchNorms and a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 10),
    )
    mq.quantize_(model, W4A4)
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    data = [(torch.randn(16, 1, 14, 14), torch.randint(0, 10, (16,))) for _ in range(3)]
    for x, y in data:
        trainer.step(functools.partial(lambda x, y: F.cross_entropy(model(x), y), x, y))
    return model.eval()


def test_with_quantized_activations_and_biases_the_session_options_give_the_models_logits(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _trained_w4a4_cnn()
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 1, 14, 14))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert "BatchNormalization" not in [n.op_type for n in graph.node]
    assert [len(n.input) for n in graph.node if n.op_type in ("Conv", "Gemm")] == [3, 3, 3]  # each with a bias
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 3
    session = ort.InferenceSession(read_onnx(tmp_path / "m.onnx"), onnx_session_options())
    x = torch.randn(64, 1, 14, 14)
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    # docs/guide.md: within 1e-5·max|logit|, but for the rare input where a float rounding of the other summation
    # order moves an activation across a rounding threshold (none here: at most a few on other CPUs)
    within = (torch.from_numpy(logits) - expected).abs().amax(1) <= 1e-5 * expected.abs().max()
    assert within.float().mean() >= 0.9 and torch.equal(torch.from_numpy(logits).argmax(1), expected.argmax(1))


def test_sign_activations_keep_nan_and_the_sign_of_infinities_in_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    # the first layer (float input) passes its input on, the second one's output is the sign of it
    model = nn.Sequential(nn.Conv1d(7, 7, 1, groups=7, bias=False), nn.Conv1d(7, 7, 1, groups=7, bias=False))
    for conv in model:
        nn.init.ones_(conv.weight)
    config = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1, first_layer_bits=None))
    mq.quantize_(model, config).eval()
    x = torch.tensor([math.nan, -math.inf, -1.0, -0.0, 0.0, 1.0, math.inf]).reshape(1, 7, 1)
    expected = np.array([math.nan, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).flatten().numpy(), expected)
    export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 7, 1))
    data = read_onnx(tmp_path / "m.onnx")
    for options in (onnx_session_options(), ort.SessionOptions()):
        (out,) = ort.InferenceSession(data, options).run(None, {"images": x.numpy()})
        np.testing.assert_array_equal(out.flatten(), expected)


def test_an_lsq_input_quantizer_no_training_batch_initialised_is_refused(tmp_path):
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), W4A4).eval()
    with pytest.raises(ValueError, match=r"^export_onnx: the input quantizer of 0 \(LSQActivation\) was never"):
        export_onnx(model, tmp_path / "m.onnx", torch.zeros(2, 4))
    assert not list(tmp_path.iterdir())
    model.train()(torch.randn(8, 4))  # one training-mode batch initialises the steps
    export_onnx(model.eval(), tmp_path / "m.onnx", torch.zeros(2, 4))
