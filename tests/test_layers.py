"""quantize_/dequantize_ and the quantized layers, against F.conv2d/F.linear computed by hand."""

import pickletools
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.layers import QuantConv2d, QuantLinear, quantized_layers
from metaquant.quantizers import DoReFa


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 1, stride=2, bias=False), nn.ReLU())

    def forward(self, x):
        return self.inner(self.bn(self.grouped(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.blocks = nn.ModuleList([Block(), Block()])
        self.blocks[1].grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.head = nn.ModuleDict({"fc": nn.Linear(8, 5)})

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head["fc"](x.mean((2, 3)))


EXPECTED = {
    "stem",
    "blocks.0.grouped",
    "blocks.0.inner.0",
    "blocks.1.grouped",
    "blocks.1.inner.0",
    "head.fc",
}


def test_quantize_swaps_exactly_the_conv_and_linear_layers_and_keeps_parameter_identity():
    torch.manual_seed(0)
    net = Net()
    params = dict(net.named_parameters())
    mq.quantize_(net, mq.QuantConfig("dorefa", bits=2))
    assert set(quantized_layers(net)) == EXPECTED
    for name, p in net.named_parameters():
        assert p is params[name]
    assert isinstance(net.blocks[0].bn, nn.BatchNorm2d)
    assert type(net.head["fc"]) is QuantLinear
    # options carried over
    g = net.blocks[0].grouped
    assert (g.groups, g.dilation, g.padding, g.bias is not None) == (2, (2, 2), (2, 2), True)
    assert net.stem.padding_mode == "reflect"
    assert net.blocks[0].grouped.quantizer == DoReFa(2)


def test_dequantize_restores_the_state_dict_exactly():
    torch.manual_seed(0)
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 9, 9)
    y_float = net(x)
    mq.quantize_(net)
    assert list(net.state_dict()) == list(before)
    mq.dequantize_(net)
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not quantized_layers(net)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    torch.testing.assert_close(net(x), y_float, rtol=0, atol=0)


@pytest.mark.parametrize(
    "quantizer,bits", [("dorefa", 1), ("bwn", 1), ("bwn-channel", 1), ("ternary", 2), ("uniform", 4)]
)
def test_quantized_conv_output_equals_conv2d_with_quantized_weight(quantizer, bits):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    holder = nn.Sequential(conv)
    mq.quantize_(holder, mq.QuantConfig(quantizer, bits))
    q = mq.QuantConfig(quantizer, bits).forward_quantizer
    x = torch.randn(3, 4, 11, 11)
    w_hat = q.quantize(q.preprocess(conv.weight.detach()))
    expected = F.conv2d(x, w_hat, conv.bias, stride=2, padding=1, groups=2)
    assert torch.equal(holder[0](x), expected)


def test_quantized_linear_output_equals_linear_with_quantized_weight():
    torch.manual_seed(2)
    holder = nn.Sequential(nn.Linear(7, 3))
    mq.quantize_(holder, mq.QuantConfig("dorefa", 1))
    lin = holder[0]
    x = torch.randn(4, 7)
    t = torch.tanh(lin.weight.detach())
    w_hat = torch.where(t / (2 * t.abs().max()) + 0.5 >= 0.5, 1.0, -1.0)  # 1-bit DoReFa by hand
    torch.testing.assert_close(lin(x), F.linear(x, w_hat, lin.bias), rtol=0, atol=0)


def test_filter_fn_keeps_chosen_layers_in_full_precision():
    net = Net()
    mq.quantize_(net, filter_fn=lambda m, name: isinstance(m, nn.Conv2d) and name != "stem")
    assert set(quantized_layers(net)) == EXPECTED - {"stem", "head.fc"}
    assert type(net.stem) is nn.Conv2d


def test_shared_module_is_swapped_once_everywhere():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    mq.quantize_(net)
    assert net[0] is net[2] and isinstance(net[0], QuantLinear)


def test_quantize_is_idempotent():
    net = Net()
    mq.quantize_(net)
    layers = quantized_layers(net)
    mq.quantize_(net)
    assert all(quantized_layers(net)[k] is v for k, v in layers.items())


def test_gradient_flows_to_latent_weight_with_ste():
    torch.manual_seed(3)
    net = Net()
    mq.quantize_(net)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    "model,filter_fn,message",
    [
        (nn.Sequential(nn.Bilinear(2, 2, 2)), lambda m, n: n == "0", "Bilinear: quantize_ supports Conv1d"),
        (nn.Sequential(nn.Linear(2, 2)), lambda m, n: True, "cannot quantize <root> of type Sequential"),
        (nn.Linear(2, 2), lambda m, n: True, "cannot swap the root module itself"),
        (nn.Linear(2, 2), None, "cannot swap the root module itself"),
        (nn.Sequential(nn.ReLU()), None, "found no layer to quantize in Sequential$"),
        (nn.Sequential(nn.LSTM(2, 2)), None, r"left in full precision: 0 \(LSTM\): recurrent layers are quantized on"),
        (nn.Sequential(nn.Embedding(5, 2, max_norm=1.0)), lambda m, n: n == "0", "max_norm renormalizes"),
        (nn.Sequential(nn.Embedding(5, 2, sparse=True)), lambda m, n: n == "0", "sparse gradients"),
        (nn.Sequential(nn.LazyLinear(2)), lambda m, n: n == "0", "lazy layer not initialized"),
        (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))), None, "parametrizations"),
    ],
)
def test_what_cannot_be_quantized_fails_clearly(model, filter_fn, message):
    with pytest.raises((TypeError, ValueError), match=message):
        mq.quantize_(model, filter_fn=filter_fn)


@pytest.mark.parametrize(
    "args,message",
    [
        ((None,), r"model must be a torch.nn.Module, got NoneType"),
        (("resnet20",), r"model must be a torch.nn.Module, got str \('resnet20'\)"),
        ((nn.Sequential(nn.Linear(2, 2)), "bwn"), r"config must be a QuantConfig or None, got str 'bwn', e.g. Quant"),
        ((nn.Sequential(nn.Linear(2, 2)), 1), r"config must be a QuantConfig or None, got int 1"),
        ((nn.Sequential(nn.Linear(2, 2)), None, "0"), r"filter_fn must be callable .* got '0'"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(args, message):
    with pytest.raises(TypeError, match=message):
        mq.quantize_(*args)
    if not isinstance(args[0], nn.Module):
        with pytest.raises(TypeError, match=message):
            mq.dequantize_(args[0])
    else:
        assert type(args[0][0]) is nn.Linear  # nothing converted


def test_what_cannot_be_quantized_changes_nothing():
    net = nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 2))
    with pytest.raises(TypeError, match="Bilinear"):
        mq.quantize_(net, filter_fn=lambda m, n: n in ("0", "1"))
    assert type(net[0]) is nn.Linear  # the first, convertible layer was not converted either


def test_include_is_checked():
    with pytest.raises(ValueError, match="unknown layer kind.*'conv'; allowed: recurrent, embedding"):
        mq.quantize_(nn.Sequential(nn.Linear(2, 2)), include=("conv",))
    with pytest.raises(ValueError, match="not both"):
        mq.quantize_(nn.Sequential(nn.LSTM(2, 2)), filter_fn=lambda m, n: True, include=("recurrent",))


def test_hooks_are_kept_the_module_is_converted_in_place():
    lin = nn.Linear(2, 2)
    seen = []
    lin.register_forward_hook(lambda module, args, out: seen.append(type(module).__name__))
    net = mq.quantize_(nn.Sequential(lin))
    net(torch.randn(1, 2))
    assert net[0] is lin and seen == ["QuantLinear"]
    mq.dequantize_(net)
    net(torch.randn(1, 2))
    assert seen == ["QuantLinear", "Linear"]


def test_weight_fn_scope_is_restored_even_on_error():
    net = nn.Sequential(nn.Linear(3, 2))
    mq.quantize_(net)
    replacement = torch.ones(2, 3)
    x = torch.randn(1, 3)
    with pytest.raises(RuntimeError):
        with mq.forward_params_fn(net, lambda layer: (replacement, layer.bias)):
            torch.testing.assert_close(net(x), F.linear(x, replacement, net[0].bias))
            raise RuntimeError("boom")
    assert net[0].param_fn is None


def test_quant_layers_can_be_built_directly():
    conv = QuantConv2d(2, 2, 3, quantizer=DoReFa(1))
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 2, 3, 3)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_subclass_with_its_own_forward_is_left_alone_with_a_warning(caplog):
    net = nn.Sequential(ScaledLinear(4, 4), nn.Linear(4, 4))
    with caplog.at_level("WARNING", logger="metaquant.layers"):
        mq.quantize_(net)
    assert set(quantized_layers(net)) == {"1"} and type(net[0]) is ScaledLinear
    assert "0 (ScaledLinear): its class overrides Linear.forward" in caplog.text
    with pytest.raises(TypeError, match="overrides Linear.forward"):
        mq.quantize_(nn.Sequential(ScaledLinear(4, 4)), filter_fn=lambda m, n: n == "0")


def test_linear_subclasses_that_keep_linears_forward_are_quantized_and_restored():
    attention = nn.MultiheadAttention(4, 2)
    net = mq.quantize_(nn.Sequential(attention), filter_fn=lambda m, n: isinstance(m, (nn.Conv2d, nn.Linear)))
    # the guide's filter chooses out_proj alone: its attention module computes with it, the input projection
    # staying in full precision
    assert set(quantized_layers(net)) == {"0.out_proj"} and type(attention).__name__ == "QuantMultiheadAttention"
    mq.dequantize_(net)
    assert type(attention) is nn.MultiheadAttention
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def _pickled_globals(data: bytes) -> set[str]:
    """The classes and functions a pickle refers to, as ``module.name``."""
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def test_a_model_saved_whole_loads_and_names_its_layer_classes_by_their_public_path(tmp_path):
    net = nn.ModuleDict(
        {"features": nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), "rnn": nn.LSTM(3, 4)}
    )
    mq.quantize_(net, mq.QuantConfig("bwn-channel"), include=("recurrent",))
    path = tmp_path / "model.pt"
    torch.save(net, path)
    loaded = torch.load(path, weights_only=False)
    x, sequence = torch.randn(2, 1, 6, 6), torch.randn(5, 2, 3)
    assert type(loaded["features"][0]) is QuantConv2d and type(loaded["rnn"]) is mq.layers.QuantLSTM
    assert torch.equal(loaded["features"](x), net["features"](x))
    assert torch.equal(loaded["rnn"](sequence)[0], net["rnn"](sequence)[0])
    with zipfile.ZipFile(path) as archive:
        names = _pickled_globals(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    layers = {n for n in names if n.startswith("metaquant.layers")}
    assert {"metaquant.layers.QuantConv2d", "metaquant.layers.QuantLinear", "metaquant.layers.QuantLSTM"} <= layers
    assert "metaquant.layers.QuantWeight" in layers and all(n.count(".") == 2 for n in layers), layers


# --- input quantizers (QuantConfig(activations=...)) -----------------------------------------------------------
W1A1 = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1))


def test_activations_install_an_input_quantizer_on_every_converted_layer_the_first_one_lsq():
    from metaquant.activations import LSQActivation, SignActivation

    net = mq.quantize_(Net(), W1A1)
    quantizers = mq.layers.input_quantizers(net)
    assert list(quantizers) == [n for n, _ in net.named_modules() if n in EXPECTED]  # module order
    assert type(quantizers["stem"]) is LSQActivation and quantizers["stem"].bits == 8  # first_layer_bits
    assert all(type(q) is SignActivation for name, q in quantizers.items() if name != "stem")
    float_first = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("sign", 1, first_layer_bits=None))
    assert "stem" not in mq.layers.input_quantizers(mq.quantize_(Net(), float_first))
    # filter_fn chooses the layers, as without activations: the first chosen one gets the first layer's quantizer
    chosen = mq.quantize_(Net(), W1A1, filter_fn=lambda m, n: n in ("blocks.1.inner.0", "head.fc"))
    assert [(n, q.name) for n, q in mq.layers.input_quantizers(chosen).items()] == [
        ("blocks.1.inner.0", "lsq"),
        ("head.fc", "sign"),
    ]


def test_a_layers_forward_applies_its_input_quantizer_before_the_quantized_weight():
    torch.manual_seed(0)
    net = mq.quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2)), W1A1).eval()
    x = torch.randn(2, 3, 5, 5)
    conv, fc = net[0], net[2]
    h = F.conv2d(conv.input_quantizer(x), conv.quantizer(conv.weight), conv.bias)
    expected = F.linear(torch.where(h.flatten(1) >= 0, 1.0, -1.0), fc.quantizer(fc.weight), fc.bias)
    assert torch.equal(net(x), expected)


def test_without_activations_nothing_changes_and_dequantize_removes_the_input_quantizers():
    torch.manual_seed(0)
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 9, 9)
    plain = mq.quantize_(Net().eval(), mq.QuantConfig("dorefa", 1))
    plain.load_state_dict(before)
    assert not mq.layers.input_quantizers(plain) and list(plain.state_dict()) == list(before)
    mq.quantize_(net, W1A1)
    assert any("input_quantizer" in k for k in net.state_dict())
    mq.dequantize_(net)
    assert not mq.layers.input_quantizers(net) and "input_quantizer" not in repr(net)
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    fresh = Net().eval()
    fresh.load_state_dict(before)
    assert torch.equal(net(x), fresh(x))


def test_quantizing_again_with_other_activations_is_refused_and_with_the_same_ones_changes_nothing():
    def mlp():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    lsq4 = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("lsq", 4))
    net = mq.quantize_(mlp(), lsq4)
    before = {name: q for name, q in mq.layers.input_quantizers(net).items()}
    assert mq.quantize_(net, lsq4) is net and mq.layers.input_quantizers(net) == before  # the same objects
    others = {
        "pact": mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("pact", 2)),
        "bits": mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("lsq", 3)),
        "first": mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("lsq", 4, first_layer_bits=None)),
        "none": mq.QuantConfig("dorefa", 1),
    }
    for config in others.values():
        with pytest.raises(ValueError, match=r"^layer \d already has the input quantizer .*call dequantize_\(model\)"):
            mq.quantize_(net, config)
    assert mq.layers.input_quantizers(net) == before
    with pytest.raises(
        ValueError, match=r"layer 2 already has the input quantizer LSQActivation\(bits=4, signed=None\), n"
    ):
        mq.quantize_(net, others["pact"])
    plain = mq.quantize_(mlp(), others["none"])
    with pytest.raises(ValueError, match=r"layer 0 already has no input quantizer, not LSQActivation\(bits=8, signed="):
        mq.quantize_(plain, others["pact"])
    # a float first layer may have none; the layers after it may not
    pact_float_first = mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("pact", 2, first_layer_bits=None))
    with pytest.raises(ValueError, match=r"^layer 2 already has no input quantizer, not PACTActivation\(bits=2"):
        mq.quantize_(plain, pact_float_first)
    mq.quantize_(plain, others["none"])  # the same: nothing changes
    two_passes = mq.quantize_(mlp(), lsq4, filter_fn=lambda m, name: name == "4")  # then the others
    mq.quantize_(two_passes, lsq4)
    mq.quantize_(two_passes, lsq4)
    assert [q.bits for q in mq.layers.input_quantizers(two_passes).values()] == [8, 4, 8]


def test_attention_recurrent_and_embedding_layers_take_no_input_quantizer():
    net = nn.Sequential(nn.Embedding(10, 8), nn.LSTM(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    mq.quantize_(net, W1A1, filter_fn=lambda m, n: n in ("0", "1", "2", "2.out_proj", "3"))
    assert list(mq.layers.input_quantizers(net)) == ["3"]
    with pytest.raises(ValueError, match="config.activations needs a convolution or linear layer"):
        mq.quantize_(nn.Sequential(nn.LSTM(4, 4)), W1A1, filter_fn=lambda m, n: n == "0")


def test_an_optimizer_without_the_input_quantizers_parameters_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    early = torch.optim.SGD(net.parameters(), lr=0.1)  # built before quantize_ added the steps
    mq.quantize_(net, mq.QuantConfig("dorefa", 1, activations=mq.ActQuantConfig("lsq", 4)))
    for make in (lambda: mq.Trainer(net, early), lambda: mq.MetaQuant(net, early, mq.MultiFC(hidden=4))):
        with pytest.raises(
            ValueError, match=r"the optimizer does not hold 0\.input_quantizer\.step: .*after quantize_"
        ):
            make()
    mq.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1))  # built after: accepted
    net[2].input_quantizer.step.requires_grad_(False)  # a frozen step need not be in it
    mq.Trainer(net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1))


def test_an_optimizer_without_the_learned_weight_steps_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    early = torch.optim.SGD(net.parameters(), lr=0.1)  # built before quantize_ added the steps
    mq.quantize_(net, mq.QuantConfig("lsq", 4))
    for make in (lambda: mq.Trainer(net, early), lambda: mq.MetaQuant(net, early, mq.MultiFC(hidden=4))):
        with pytest.raises(ValueError, match=r"the optimizer does not hold 0\.weight_step: .*after quantize_"):
            make()
    mq.MetaQuant(net, torch.optim.SGD(net.parameters(), lr=0.1), mq.MultiFC(hidden=4))  # built after: accepted
