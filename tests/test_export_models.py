"""Exports of models with tied weights, several or dict inputs (the zoo's export tests run every model; these
check the details against values computed here)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.export import export_onnx, export_packed, load_packed, materialize
from tests.models.zoo import ZOO


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


class TiedAutoencoder(nn.Module):
    """A convolution and its transpose sharing one weight [6, 3, 3, 3]: output channels along axis 0 for the
    first, axis 1 for the second, so a per-channel quantizer gives each layer another Ŵ."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Conv2d(3, 6, 3, bias=False)
        self.decode = nn.ConvTranspose2d(6, 3, 3, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.relu(self.encode(x)))


@pytest.mark.parametrize("quantizer", [("dorefa", 1), ("bwn-channel", 1)])
def test_load_packed_gives_each_use_of_a_tied_weight_the_w_hat_its_layer_computes_with(tmp_path, quantizer):
    torch.manual_seed(0)
    model = mq.quantize_(TiedAutoencoder(), mq.QuantConfig(*quantizer)).eval()
    w = model.encode.weight
    w_hats = model.encode.quantizer(w), model.decode.quantizer(w)  # by hand, each layer's own Ŵ
    export_packed(model, tmp_path / "m.safetensors")
    loaded = load_packed(tmp_path / "m.safetensors", TiedAutoencoder())
    assert torch.equal(loaded.encode.weight, w_hats[0]) and torch.equal(loaded.decode.weight, w_hats[1])
    # tied in the file's model only where the two Ŵ are one
    assert (loaded.encode.weight is loaded.decode.weight) == torch.equal(*w_hats)
    assert torch.equal(*w_hats) == (quantizer[0] == "dorefa")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = F.conv_transpose2d(torch.relu(F.conv2d(x, w_hats[0])), w_hats[1])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(materialize(model)(x), expected, rtol=0, atol=0)


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


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


def _fused(model):
    """Whether PyTorch may run part of ``model`` through its fused inference kernels under no_grad."""
    return any(isinstance(m, nn.MultiheadAttention | nn.TransformerEncoderLayer) for m in model.modules())


LOGIT_CASES = [
    *((case.name, case.build, case.batch(3), case.include, case.quantizer) for case in ZOO),
    (
        "self-attention",
        SelfAttention,
        (torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(1)),),
        (),
        ("dorefa", 1),
    ),
    (
        "4-layer-encoder",
        Encoder,
        (torch.randn(8, 20, 64, generator=torch.Generator().manual_seed(1)),),
        (),
        ("dorefa", 1),
    ),
]


@pytest.mark.parametrize("name,build,x,include,quantizer", LOGIT_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_load_packed_gives_the_quantized_models_logits_as_its_docstring_says(
    tmp_path, name, build, x, include, quantizer
):
    """Bit for bit with gradients enabled; under no_grad too, except where PyTorch's fused attention kernels
    run the loaded model: there within the docstring's bounds (1e-6 of the largest logit for one attention
    layer, 2e-4 for a 4-layer 1-bit encoder)."""
    torch.manual_seed(0)
    model = mq.quantize_(build(), mq.QuantConfig(*quantizer), include=include).eval()
    export_packed(model, tmp_path / "m.safetensors")
    torch.manual_seed(0)
    loaded = load_packed(tmp_path / "m.safetensors", build())
    with torch.enable_grad():
        assert torch.equal(loaded(*x), model(*x))
    with torch.no_grad():
        expected, got = model(*x), loaded(*x)
    if not _fused(model):
        assert torch.equal(got, expected)
    else:
        bound = 2e-4 if name == "4-layer-encoder" else 1e-6
        assert float((got - expected).abs().max()) <= bound * float(expected.abs().max())


def test_the_docs_say_where_load_packed_is_exact():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Export and evaluation") : readme.index("## Speed")]
    assert "whose logits equal the quantized model's exactly" not in section
    for text in (" ".join(section.split()), " ".join(load_packed.__doc__.split())):
        assert "bit for bit, except under `torch.no_grad()`" in text or "bit for bit, with one exception" in text
        assert "TransformerEncoderLayer" in text and "1e-6" in text and "2e-4" in text
