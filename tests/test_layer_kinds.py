"""Each quantized layer kind against the plain torch.nn module holding ``Ŵ`` (forward) and against autograd
through that module (the STE gradient), with every option that changes how the weight is used."""

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import metaquant as mq
from metaquant.layers import QuantWeight, quantized_weight_keys
from metaquant.quantizers import BWNPerChannel, DoReFa


def plain_with_quantized_weights(model):
    """A deep copy of ``model`` in full precision whose quantized weights are replaced by ``Ŵ`` (leaf tensors
    that require grad), with the map ``{state_dict key: Ŵ leaf}``. Independent of the quantized forward passes."""
    keys = quantized_weight_keys(model)
    plain = mq.dequantize_(copy.deepcopy(model))
    leaves = {}
    for key, layer in keys.items():
        owner, _, attr = key.rpartition(".")
        w_hat = nn.Parameter(layer.quantizer(layer.weight.detach()))
        setattr(plain.get_submodule(owner), attr, w_hat)
        leaves[key] = w_hat
    return plain, leaves


def check_forward_and_ste_gradient(model, *inputs, output=lambda out: out):
    """``model`` (quantized, DoReFa) computes what the plain model holding Ŵ computes, and its latent weights get
    ``g_W = g_Ŵ ⊙ c(W)``, the clipped STE of 1-bit DoReFa (its gate is always open)."""
    plain, leaves = plain_with_quantized_weights(model)
    got, expected = output(model(*inputs)), output(plain(*inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(got)
    got.backward(g)
    expected.backward(g)
    for key, layer in quantized_weight_keys(model).items():
        assert isinstance(layer.quantizer, DoReFa)
        calibration = layer.quantizer.calibration(layer.weight.detach())
        torch.testing.assert_close(layer.weight.grad, leaves[key].grad * calibration, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 11)),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 2, 7)),
        (nn.Conv3d(2, 4, 2, stride=(1, 2, 1), groups=2), (2, 2, 3, 4, 3)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2), (2, 4, 5)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False), (2, 3, 4, 4)),
        (nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 2, 2)),
    ],
)
def test_convolutions(layer, shape):
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(layer))
    check_forward_and_ste_gradient(model, torch.randn(*shape))


def test_conv_transpose_keeps_output_size():
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)))
    x = torch.randn(1, 2, 4, 4)
    out = model[0](x, output_size=[8, 8])
    plain, _ = plain_with_quantized_weights(model)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, plain[0](x, output_size=[8, 8]))


def test_per_channel_scales_follow_the_output_channels_of_a_transposed_convolution():
    torch.manual_seed(0)
    model = mq.quantize_(
        nn.Sequential(nn.ConvTranspose2d(6, 4, 3, groups=2), nn.Conv2d(4, 6, 3)), mq.QuantConfig("bwn-channel")
    )
    up, down = model[0], model[1]
    assert up.quantizer == BWNPerChannel(axis=1) and down.quantizer == BWNPerChannel(axis=0)
    w = up.weight.detach()  # [C_in, C_out / groups, k, k]
    a = w.abs().mean(dim=(0, 2, 3), keepdim=True)  # by hand: one scale per column of the weight
    torch.testing.assert_close(up.quantizer(w), a * torch.where(w >= 0, 1.0, -1.0))
    assert up.quantizer.encode(w).scale.shape == (1, 2, 1, 1)
    with pytest.raises(ValueError, match=r"axis=5\) cannot quantize a weight of shape \(6, 4, 3, 3\)"):
        BWNPerChannel(axis=5)(down.weight)
    with pytest.raises(ValueError, match="axis must be an int >= 0, got -1"):
        BWNPerChannel().with_channel_axis(-1)


def test_embeddings():
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.Embedding(10, 4, padding_idx=0)), include=("embedding",))
    tokens = torch.tensor([[0, 3, 3], [9, 1, 0]])
    check_forward_and_ste_gradient(model, tokens)
    assert torch.equal(model[0].weight.grad[0], torch.zeros(4))  # padding_idx: no gradient, as nn.Embedding

    bag = mq.quantize_(nn.Sequential(nn.EmbeddingBag(10, 4, mode="sum")), include=("embedding",))[0]
    tokens, offsets, weights = torch.tensor([1, 2, 4, 5, 4]), torch.tensor([0, 2]), torch.rand(5)
    plain, _ = plain_with_quantized_weights(nn.Sequential(bag))
    torch.testing.assert_close(bag(tokens, offsets, weights), plain[0](tokens, offsets, weights))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_layers(cls):
    torch.manual_seed(0)
    model = mq.quantize_(
        nn.Sequential(cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)), include=("recurrent",)
    )
    expected = {f"weight_{k}_l{i}{d}" for k in ("ih", "hh") for i in range(2) for d in ("", "_reverse")}
    assert set(model[0].quantized_weights) == expected
    check_forward_and_ste_gradient(model, torch.randn(2, 5, 3), output=lambda out: out[0])


def test_lstm_with_projections_and_packed_sequences():
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.LSTM(3, 4, proj_size=2)), include=("recurrent",))
    assert set(model[0].quantized_weights) == {"weight_ih_l0", "weight_hh_l0", "weight_hr_l0"}
    assert model[0].quantized_weights["weight_hr_l0"].bias is None
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    check_forward_and_ste_gradient(model, packed, output=lambda out: out[0].data)


class Attention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)

    def forward(self, query, key, value):
        mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
        return self.attn(query, key, value, key_padding_mask=mask)[0]


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 3, "vdim": 5, "add_bias_kv": True}, {"add_zero_attn": True}])
def test_attention(kwargs):
    torch.manual_seed(0)
    model = mq.quantize_(Attention(**kwargs)).eval()
    names = ["in_proj_weight"] if not kwargs.get("kdim") else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    assert list(model.attn.quantized_weights) == names
    query = torch.randn(2, 4, 8)
    key, value = torch.randn(2, 6, kwargs.get("kdim", 8)), torch.randn(2, 6, kwargs.get("vdim", 8))
    plain, _ = plain_with_quantized_weights(model)
    for grad in (False, True):  # without gradients, the plain module takes PyTorch's fused path
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model(query, key, value), plain(query, key, value), rtol=1e-5, atol=1e-5)
    check_forward_and_ste_gradient(model.train(), query, key, value)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_with_a_padding_mask_takes_no_nested_tensor_path():
    """TransformerEncoder turns a padded batch into nested tensors in eval mode without gradients, with the
    latent weights; the quantized encoder computes as with gradients (padded positions included)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = nn.Sequential(nn.TransformerEncoder(layer, 2))
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        float_padded = encoder[0].eval()(x, src_key_padding_mask=mask)
    assert torch.equal(float_padded[1, 3:], torch.zeros(2, 8))  # the float model took the nested-tensor path
    model = mq.quantize_(encoder).eval()
    expected = model[0](x, src_key_padding_mask=mask)
    with torch.no_grad():
        got = model[0](x, src_key_padding_mask=mask)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[1, 3:], torch.zeros(2, 8))
    mq.dequantize_(model)
    assert model[0].use_nested_tensor and model[0].layers[0].activation_relu_or_gelu == 1


def test_a_quantized_recurrent_layer_copies_and_pickles_with_its_views():
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.GRU(3, 4)), include=("recurrent",))
    x = torch.randn(5, 2, 3)
    for clone in (copy.deepcopy(model), _round_trip(model)):
        view = clone[0].quantized_weights["weight_ih_l0"]
        assert isinstance(view, QuantWeight) and view.weight is clone[0].weight_ih_l0
        assert view.weight is not model[0].weight_ih_l0
        torch.testing.assert_close(clone(x)[0], model(x)[0], rtol=0, atol=0)


def _round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_quantized_weight_keys_name_every_state_dict_entry_of_a_quantized_weight():
    shared = nn.Linear(3, 3)
    net = mq.quantize_(nn.Sequential(shared, nn.LSTM(3, 3, proj_size=2), shared), include=("recurrent",))
    keys = quantized_weight_keys(net)
    assert list(keys) == ["0.weight", "1.weight_ih_l0", "1.weight_hh_l0", "1.weight_hr_l0", "2.weight"]
    state = net.state_dict(keep_vars=True)
    assert all(state[key] is layer.weight for key, layer in keys.items())


def test_quantize_logs_a_summary_and_warns_once_for_what_it_leaves(caplog):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)
            self.rnn = nn.LSTM(2, 2)
            self.bilinear = nn.Bilinear(2, 2, 2)
            self.cell = nn.GRUCell(2, 2)
            self.norm = nn.LayerNorm([2, 2])
            self.lazy = nn.LazyLinear(2)

    model = Model()
    with caplog.at_level(logging.INFO, logger="metaquant.layers"):
        mq.quantize_(model)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "rnn (LSTM): recurrent layers are quantized on request: include=('recurrent',)" in warning
    assert "bilinear (Bilinear): not a layer type quantize_ supports" in warning
    assert "cell (GRUCell): not a layer type quantize_ supports" in warning
    assert "lazy (LazyLinear): it is a lazy layer not initialized yet" in warning
    assert "norm" not in warning  # normalization layers stay in full precision by design
    (info,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info.startswith("quantize_: 1 module(s) converted (1 QuantConv1d), 1 quantized weight(s) in the model")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaquant.layers"):
        mq.quantize_(Model(), filter_fn=lambda m, name: name == "conv")  # told which: no warning
    assert caplog.records == []


def test_choosing_out_proj_of_an_attention_subclass_with_its_own_forward_is_refused():
    class Attention(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    net = nn.Sequential(Attention(4, 2))
    with pytest.raises(TypeError, match=r"0.out_proj .*attention module's class \(Attention\) has its own forward"):
        mq.quantize_(net, filter_fn=lambda m, n: n == "0.out_proj")


def test_new_layer_kinds_train_under_torch_compile_as_one_graph():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = nn.Conv1d(8, 4, 3, padding=1)
            self.up = nn.ConvTranspose1d(4, 4, 2, stride=2)
            self.fc = nn.Linear(4, 3)

        def forward(self, tokens):
            x = self.embed(tokens)
            x, _ = self.attn(x, x, x, need_weights=False)
            return self.fc(self.up(self.conv(x.transpose(1, 2))).mean(2))

    torch.manual_seed(0)
    model = mq.quantize_(Model(), include=("embedding",))
    compiled = torch.compile(model, backend="aot_eager")
    trainer = mq.MetaQuant(compiled, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    tokens, y = torch.randint(0, 10, (4, 6)), torch.tensor([0, 1, 2, 0])
    losses = [trainer.step(lambda: F.cross_entropy(compiled(tokens), y)) for _ in range(4)]
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert torch.isfinite(torch.stack(losses)).all()
