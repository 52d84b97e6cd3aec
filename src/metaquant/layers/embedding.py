"""Quantized embeddings: ``nn.Embedding`` and ``nn.EmbeddingBag`` looking up rows of ``Q(A(W))``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import ForwardQuantizer
from .base import QuantLayer


def _embedding_problem(module: nn.Module) -> str | None:
    if getattr(module, "max_norm", None) is not None:
        return "max_norm renormalizes the weight in place, which a quantized weight cannot follow; use max_norm=None"
    if getattr(module, "sparse", False):
        return "sparse gradients are not supported for quantized weights; use sparse=False"
    return None


class QuantEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` looking up rows of ``Q(A(W))`` (quantized on request: ``include=("embedding",)``).

    A per-channel quantizer gives one scale per row (per embedding vector). The ``padding_idx`` row is
    quantized like the others, so it is no longer zero; its gradient stays zero as in ``nn.Embedding``.
    ``max_norm`` and ``sparse=True`` are refused: both need the latent weight itself.

    Raises:
        TypeError: ``max_norm`` is set or ``sparse=True``.

    Example:
        >>> emb = mq.layers.QuantEmbedding(10, 4)
        >>> tokens = torch.tensor([[1, 2], [3, 1]])
        >>> torch.equal(emb(tokens), emb.quantizer(emb.weight)[tokens]), emb.bias
        (True, None)
    """

    float_base = nn.Embedding
    bias = None  # an embedding has no bias; QuantLayer's interface reads one

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        problem = _embedding_problem(self)
        if problem:
            raise TypeError(f"cannot quantize an embedding: {problem}")
        super()._quant_init(quantizer, float_type)

    def forward(self, input: Tensor) -> Tensor:
        weight, _ = self.forward_params()
        return F.embedding(
            input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class QuantEmbeddingBag(QuantLayer, nn.EmbeddingBag):
    """``nn.EmbeddingBag`` reducing rows of ``Q(A(W))`` (quantized on request: ``include=("embedding",)``).

    As ``QuantEmbedding``: one scale per row for a per-channel quantizer; ``max_norm`` and ``sparse`` refused.

    Raises:
        TypeError: ``max_norm`` is set or ``sparse=True``.

    Example:
        >>> bag = mq.layers.QuantEmbeddingBag(10, 4, mode="sum")
        >>> tokens, offsets = torch.tensor([1, 2, 3, 1]), torch.tensor([0, 3])
        >>> expected = torch.stack([bag.quantizer(bag.weight)[[1, 2, 3]].sum(0), bag.quantizer(bag.weight)[1]])
        >>> torch.allclose(bag(tokens, offsets), expected)
        True
    """

    float_base = nn.EmbeddingBag
    bias = None

    def _quant_init(self, quantizer: ForwardQuantizer | None, float_type: type[nn.Module]) -> None:
        problem = _embedding_problem(self)
        if problem:
            raise TypeError(f"cannot quantize an embedding bag: {problem}")
        super()._quant_init(quantizer, float_type)

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        weight, _ = self.forward_params()
        return F.embedding_bag(
            input,
            weight,
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self.padding_idx,
        )
