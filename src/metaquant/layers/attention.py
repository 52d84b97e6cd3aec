"""The quantized ``nn.MultiheadAttention``, whose projections compute with ``Q(A(W))``."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import ForwardQuantizer
from .base import QuantConfig, QuantLayer, _convert
from .linear import QuantLinear
from .views import _MultiWeight


class QuantMultiheadAttention(_MultiWeight, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computing with quantized projections, always through
    ``F.multi_head_attention_forward`` (never the fused fast path, which reads the latent weights).

    The input projection (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the
    key and value sizes differ) is quantized through ``QuantWeight`` views, the bias ``in_proj_bias`` going with
    the first; ``out_proj`` is a ``QuantLinear`` of its own. ``quantize_`` also gives this class to an attention
    module whose ``out_proj`` alone was chosen, so that its forward computes with the quantized ``out_proj``.

    Args:
        *args: ``nn.MultiheadAttention``'s arguments.
        quantizer: the forward quantizer of the projections (default: 1-bit DoReFa).
        **kwargs: ``nn.MultiheadAttention``'s keyword arguments.

    Example:
        The plain attention module holding ``Ŵ`` is the reference; under ``no_grad`` it takes its fused path, the
        quantized one cannot:

        >>> attn = mq.layers.QuantMultiheadAttention(4, 2, batch_first=True).eval()
        >>> list(attn.quantized_weights), type(attn.out_proj).__name__, attn.quantizer_of("in_proj_weight")
        (['in_proj_weight'], 'QuantLinear', DoReFa(bits=1))
        >>> plain = torch.nn.MultiheadAttention(4, 2, batch_first=True).eval()
        >>> q = mq.quantizers.DoReFa()
        >>> _ = plain.load_state_dict({k: q(v) if k.endswith("weight") else v for k, v in attn.state_dict().items()})
        >>> x = torch.randn(3, 5, 4)
        >>> with torch.no_grad():
        ...     torch.allclose(attn(x, x, x)[0], plain(x, x, x)[0], atol=1e-6)
        True
    """

    float_base = nn.MultiheadAttention

    def __init__(self, *args: Any, quantizer: ForwardQuantizer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        quantizer = quantizer if quantizer is not None else QuantConfig().forward_quantizer
        self._quant_init(quantizer, self.float_base)
        _convert(self.out_proj, QuantLinear, quantizer)

    def _weight_names(self) -> list[tuple[str, str | None]]:
        if self._qkv_same_embed_dim:
            return [("in_proj_weight", "in_proj_bias")]
        return [("q_proj_weight", "in_proj_bias"), ("k_proj_weight", None), ("v_proj_weight", None)]

    def forward(  # the slow path of nn.MultiheadAttention.forward, with the quantized projections
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(query, key_padding_mask, attn_mask)
        if self.batch_first and is_batched:
            query, key, value = _sequence_first(query, key, value)
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            bias_k=self.bias_k,
            bias_v=self.bias_v,
            add_zero_attn=self.add_zero_attn,
            dropout_p=self.dropout,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **self._projections(),
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights

    def _projections(self) -> dict[str, Any]:
        """The projections' ``(Ŵ, bias)`` as ``F.multi_head_attention_forward``'s keyword arguments."""
        out_proj = self.out_proj
        if isinstance(out_proj, QuantLayer):
            out_weight, out_bias = out_proj.forward_params()
        else:
            out_weight, out_bias = out_proj.weight, out_proj.bias
        weights: dict[str, Any] = dict(out_proj_weight=out_weight, out_proj_bias=out_bias)
        if self._qkv_same_embed_dim:
            weights["in_proj_weight"], weights["in_proj_bias"] = self._params("in_proj_weight", "in_proj_bias")
            return weights
        q_weight, in_bias = self._params("q_proj_weight", "in_proj_bias")
        return dict(
            weights,
            in_proj_weight=None,
            in_proj_bias=in_bias,
            use_separate_proj_weight=True,
            q_proj_weight=q_weight,
            k_proj_weight=self._params("k_proj_weight", None)[0],
            v_proj_weight=self._params("v_proj_weight", None)[0],
        )


def _canonical_masks(
    query: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The masks in the form ``F.multi_head_attention_forward`` takes, as ``nn.MultiheadAttention`` makes them."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    return key_padding_mask, attn_mask


def _sequence_first(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-first inputs transposed to sequence-first, keeping the "is" relations between them as
    ``nn.MultiheadAttention`` does (the functional form takes a faster path for self-attention)."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
    else:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    return query, key, value
