"""A zoo of small models of the kinds users bring, for the tests of quantize_, the trainers and the exports.

Each ``Case`` builds a full-precision model (the same weights every time), makes inputs for a batch, and says
which quantized layers ``quantize_`` must produce and which weight-bearing modules it must leave in full
precision with a warning. Every model returns logits ``[B, 4]``. The models are tiny so that the whole zoo
trains and exports in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

CLASSES = 4


@dataclass(frozen=True)
class Case:
    """One zoo model.

    Attributes:
        name: the test id.
        model: builds the full-precision model, its weights drawn from a fixed seed.
        inputs: ``inputs(batch, generator)``: the positional arguments of one forward call.
        quantized: the names ``quantized_layers`` must list after ``quantize_``.
        warned: the modules ``quantize_`` must name in its warning (left in full precision).
        quantizer: the ``QuantConfig`` arguments.
        include: ``quantize_``'s ``include``.
        metaquant_refuses: the ``ValueError`` message ``MetaQuant`` gives for this model, if it refuses it.
        dtype: the model's dtype.
        unused: quantized layers the forward pass does not use (in the model's current mode).
        onnx: whether the ONNX test exports it (an export takes seconds: one model per architecture).
    """

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple[Any, ...]]
    quantized: frozenset[str]
    warned: frozenset[str] = frozenset()
    quantizer: tuple[str, int] = ("dorefa", 1)
    include: tuple[str, ...] = ()
    metaquant_refuses: str | None = None
    dtype: torch.dtype = torch.float32
    unused: frozenset[str] = field(default_factory=frozenset)
    onnx: bool = True

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.model().to(self.dtype)

    def batch(self, n: int, seed: int = 1) -> tuple[Any, ...]:
        g = torch.Generator().manual_seed(seed)
        return _cast(self.inputs(n, g), self.dtype)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def images(c: int, h: int, w: int) -> Callable[[int, torch.Generator], tuple[Tensor]]:
    return lambda n, g: (torch.randn(n, c, h, w, generator=g),)


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


# --- the models ---------------------------------------------------------------------------------------------
class DepthwiseGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.grouped(self.depthwise(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
                nn.ModuleDict({"inner": nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh()))}),
            ]
        )
        self.head = nn.ModuleDict({"fc": nn.Linear(6, CLASSES)})

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks[1]["inner"](self.blocks[0](x))
        return self.head["fc"](x)


class SharedModule(nn.Module):
    """One Linear module reached under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.body = nn.Sequential(self.shared, nn.Tanh(), self.shared)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class TiedQuantized(nn.Module):
    """Two Linear layers with one weight Parameter (both quantized) and biases of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.b(torch.tanh(self.a(x))))


class TiedEmbedding(nn.Module):
    """An embedding (left in full precision) whose weight is also the quantized output layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, CLASSES, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))


class Transformer(nn.Module):
    """A batch-first encoder with an even number of heads: in eval mode without gradients, PyTorch's fused
    paths apply to it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.encoder(self.proj(x)).mean(1))


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 4, 5, stride=2),
            nn.BatchNorm1d(4),
            nn.ReLU(),
            nn.Conv1d(4, 4, 3, groups=2, padding=1),
        )
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, wave: Tensor) -> Tensor:
        return self.fc(self.features(wave).mean(2))


class Decoder(nn.Module):
    """Transposed convolutions (2-D, grouped, 1-D): their weights' output channels are along axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Linear(4, 8 * 2 * 2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.grouped = nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2)
        self.line = nn.ConvTranspose1d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 32, CLASSES)

    def forward(self, z: Tensor) -> Tensor:
        x = torch.relu(self.up(self.expand(z).reshape(-1, 8, 2, 2)))
        x = self.grouped(x).flatten(2)  # [B, 4, 16]
        return self.fc(self.line(x).flatten(1))


class Volume(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose3d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.up(torch.relu(self.conv(x))).mean((2, 3, 4)))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 3, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.conv(x).transpose(1, 2))
        return self.fc(out[:, -1])


class GRUText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.fc = nn.Linear(5, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.fc(out[:, -1])


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode="mean")
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.bag(tokens))


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.side = nn.Linear(5, 3)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        image = self.conv(batch["image"]).mean((2, 3))
        return self.fc(torch.cat([image, torch.relu(self.side(batch["features"]))], 1))


class TwoInputs(DictInput):
    def forward(self, image: Tensor, features: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward({"image": image, "features": features})


class CrossAttention(nn.Module):
    """Attention whose keys and values have their own size: separate q/k/v projection weights, bias_k/bias_v."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, add_bias_kv=True, batch_first=True)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        out, _ = self.attn(query, memory, memory, need_weights=False)
        return self.fc(out.mean(1))


class Frozen(nn.Module):
    """A frozen backbone (its Parameters have requires_grad False) under a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6))
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.backbone(x)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Conditional(nn.Module):
    """Two branches; ``self.branch`` chooses the one the forward pass uses (the other is left unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.left = nn.Linear(6, CLASSES)
        self.right = nn.Linear(6, CLASSES)
        self.branch = "left"

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.branch)(torch.relu(self.stem(x)))


class CustomWeight(nn.Module):
    """A module computing with a weight matrix of its own: quantize_ leaves it in full precision and says so."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(6, 6) / 3)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(x @ self.mix))


class ViT(nn.Module):
    """A vision transformer: patches from a strided convolution, a class token and positional embeddings of its own
    (Parameters no layer holds: quantize_ names them and converts the layers), the head on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) / 4)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) / 4)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, 8]
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + self.pos_embed
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def _vectors(n: int, g: torch.Generator) -> tuple[Tensor]:
    return (torch.randn(n, 6, generator=g),)


def _tokens(vocabulary: int, length: int) -> Callable[[int, torch.Generator], tuple[Tensor]]:
    return lambda n, g: (torch.randint(0, vocabulary, (n, length), generator=g),)


ZOO: list[Case] = [
    Case("depthwise-grouped", DepthwiseGrouped, images(3, 6, 6), _names("stem", "depthwise", "grouped", "fc")),
    Case("nested", Nested, _vectors, _names("blocks.0.0", "blocks.1.inner.0.0", "head.fc")),
    Case("shared-module", SharedModule, _vectors, _names("shared", "fc")),
    Case("tied-quantized", TiedQuantized, _vectors, _names("a", "b", "fc")),
    Case(
        "tied-float-quantized",
        TiedEmbedding,
        _tokens(CLASSES, 3),
        _names("mix", "out"),
        warned=_names("embed"),
        metaquant_refuses="also used by a layer that is not quantized",
    ),
    Case(
        "transformer",
        Transformer,
        lambda n, g: (torch.randn(n, 5, 4, generator=g),),
        _names(
            "proj",
            "fc",
            *(
                f"encoder.layers.{i}.{m}"
                for i in range(2)
                for m in ("self_attn.quantized_weights.in_proj_weight", "self_attn.out_proj", "linear1", "linear2")
            ),
        ),
    ),
    Case(
        "audio-conv1d",
        Audio,
        lambda n, g: (torch.randn(n, 1, 24, generator=g),),
        _names("features.0", "features.3", "fc"),
    ),
    Case(
        "decoder-convtranspose",
        Decoder,
        lambda n, g: (torch.randn(n, 4, generator=g),),
        _names("expand", "up", "grouped", "line", "fc"),
        quantizer=("bwn-channel", 1),
    ),
    Case(
        "volume-conv3d",
        Volume,
        lambda n, g: (torch.randn(n, 1, 3, 3, 3, generator=g),),
        _names("conv", "up", "fc"),
        quantizer=("bwn", 1),
    ),
    Case(
        "lstm-head",
        LSTMHead,
        lambda n, g: (torch.randn(n, 2, 5, generator=g),),
        _names(
            "conv",
            "fc",
            *(f"lstm.quantized_weights.weight_{k}_l0{d}" for k in ("ih", "hh") for d in ("", "_reverse")),
        ),
        include=("recurrent",),
    ),
    Case(
        "lstm-head-float",
        LSTMHead,
        lambda n, g: (torch.randn(n, 2, 5, generator=g),),
        _names("conv", "fc"),
        warned=_names("lstm"),
        onnx=False,
    ),
    Case(
        "gru-embedding",
        GRUText,
        _tokens(12, 4),
        _names("embed", "gru.quantized_weights.weight_ih_l0", "gru.quantized_weights.weight_hh_l0", "fc"),
        include=("recurrent", "embedding"),
    ),
    Case(
        "embedding-bag", Bag, _tokens(20, 3), _names("bag", "fc"), include=("embedding",), quantizer=("bwn-channel", 1)
    ),
    Case(
        "dict-input",
        DictInput,
        lambda n, g: ({"image": torch.randn(n, 1, 5, 5, generator=g), "features": torch.randn(n, 5, generator=g)},),
        _names("conv", "side", "fc"),
    ),
    Case(
        "two-inputs",
        TwoInputs,
        lambda n, g: (torch.randn(n, 1, 5, 5, generator=g), torch.randn(n, 5, generator=g)),
        _names("conv", "side", "fc"),
    ),
    Case(
        "cross-attention",
        CrossAttention,
        lambda n, g: (torch.randn(n, 3, 8, generator=g), torch.randn(n, 5, 4, generator=g)),
        _names(
            "attn.quantized_weights.q_proj_weight",
            "attn.quantized_weights.k_proj_weight",
            "attn.quantized_weights.v_proj_weight",
            "attn.out_proj",
            "fc",
        ),
    ),
    Case("frozen-backbone", Frozen, images(1, 5, 5), _names("backbone.0", "backbone.4", "head")),
    Case("float64", MLP, _vectors, _names("net.0", "net.2"), dtype=torch.float64),
    Case("bfloat16", MLP, _vectors, _names("net.0", "net.2"), dtype=torch.bfloat16, quantizer=("bwn", 1)),
    Case("conditional-branch", Conditional, _vectors, _names("stem", "left", "right"), unused=_names("right")),
    Case("custom-weight", CustomWeight, _vectors, _names("fc"), warned=_names("")),
    Case(
        "vit",
        ViT,
        images(3, 4, 4),
        _names(
            "patch",
            "head",
            *(f"encoder.layers.0.{m}" for m in ("self_attn.quantized_weights.in_proj_weight", "self_attn.out_proj")),
            "encoder.layers.0.linear1",
            "encoder.layers.0.linear2",
        ),
        warned=_names(""),
    ),
]
