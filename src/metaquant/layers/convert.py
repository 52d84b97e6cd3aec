"""The model surgery: ``quantize_`` gives the supported layers of a model their quantized classes in place,
``dequantize_`` gives them back their own, and ``quantized_layers``/``quantized_weight_keys`` find them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..guards import check_input_requantization, check_requantization
from ..quantizers import ForwardQuantizer
from .attention import QuantMultiheadAttention
from .base import INPUT_QUANTIZER, LEARNED_PREFIX, QuantConfig, QuantLayer, _convert
from .conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from .embedding import QuantEmbedding, QuantEmbeddingBag, _embedding_problem
from .inputs import TAKES_INPUT_QUANTIZER, input_quantizers, install_input_quantizers, remove_input_quantizer
from .linear import QuantLinear
from .recurrent import QuantGRU, QuantLSTM, QuantRNN
from .views import _VIEWS, QuantWeight, _MultiWeight, _views

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]

#: The layer kinds ``quantize_`` converts only when asked, with ``include=``.
INCLUDE = ("recurrent", "embedding")
# What quantize_ turned off in a module whose fused inference path reads its children's weights: {attr: old}.
_FUSED_OFF = "_quantized_fused_path_off"

# The torch.nn classes quantize_ converts: float class -> (quantized class, kind). "default" kinds are converted
# unless a filter_fn says otherwise; the others on request (include=...).
_KINDS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.Conv1d: (QuantConv1d, "default"),
    nn.Conv2d: (QuantConv2d, "default"),
    nn.Conv3d: (QuantConv3d, "default"),
    nn.ConvTranspose1d: (QuantConvTranspose1d, "default"),
    nn.ConvTranspose2d: (QuantConvTranspose2d, "default"),
    nn.ConvTranspose3d: (QuantConvTranspose3d, "default"),
    nn.Linear: (QuantLinear, "default"),
    nn.MultiheadAttention: (QuantMultiheadAttention, "default"),
    nn.RNN: (QuantRNN, "recurrent"),
    nn.LSTM: (QuantLSTM, "recurrent"),
    nn.GRU: (QuantGRU, "recurrent"),
    nn.Embedding: (QuantEmbedding, "embedding"),
    nn.EmbeddingBag: (QuantEmbeddingBag, "embedding"),
}
#: ``{torch.nn class: (quantized class, kind)}``: what ``quantize_`` converts; ``kind`` is ``"default"`` or one
#: of ``INCLUDE``. Subclasses of these classes are converted too when they keep the class's forward.
SUPPORTED: dict[type[nn.Module], tuple[type[nn.Module], str]] = dict(_KINDS)
# Modules whose own Parameters are not weights to quantize, even when they have two dimensions.
_NOT_WEIGHTS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.PReLU,
)


def _restore(module: nn.Module) -> None:
    """Undo ``_convert``: the module's own class again, without the quantized layer's attributes."""
    # a module saved whole by an earlier metaquant has no float_type: its class's torch.nn class then
    module.__class__ = module.__dict__.get("float_type", type(module).float_base)  # type: ignore[attr-defined,assignment]
    spec = module.__dict__.get("_quantizer")
    for name in spec.learned if spec is not None else ():
        module._parameters.pop(LEARNED_PREFIX + name, None)
    for attr in ("_quantizer", "quantizer", "float_type", "param_fn", "param_override"):
        module.__dict__.pop(attr, None)
    module._modules.pop(_VIEWS, None)
    remove_input_quantizer(module)


def _share_learned_tensors(model: nn.Module) -> None:
    """Layers that compute with one tied weight and one quantizer configuration share its learned tensors (the
    first layer's): one ``Ŵ`` per weight, as a weight tied in the float model is one weight."""
    first: dict[tuple[int, ForwardQuantizer], QuantLayer] = {}
    for layer in quantized_layers(model).values():
        spec = layer.configured_quantizer
        if not spec.learned:
            continue
        owner = first.setdefault((id(layer.weight), spec), layer)
        for name in spec.learned:
            layer._parameters[LEARNED_PREFIX + name] = owner._parameters[LEARNED_PREFIX + name]


def _float_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported ``torch.nn`` class ``module`` is an instance of (its nearest), or None."""
    return next((base for base in type(module).__mro__ if base in _KINDS), None)


def _holds_weights(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds a Parameter of two or more dimensions to speak of."""
    if isinstance(module, _NOT_WEIGHTS):
        return False
    return any(p is not None and p.dim() >= 2 for p in module._parameters.values())


def _unsupported(module: nn.Module) -> str:
    """Why a module holding weights of its own is left in full precision: a ``torch.nn`` layer type quantize_ does
    not support, or a module of the user's whose own Parameters (a class token, a positional embedding, a weight
    it multiplies with itself) no supported layer computes with; the rest of that module is not concerned."""
    if type(module).__module__.startswith("torch."):
        return "not a layer type quantize_ supports"
    own = [f"{n} {list(p.shape)}" for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    return (
        f"its own Parameter{'s' if len(own) > 1 else ''} {', '.join(own)}, which its forward uses directly "
        "(quantize_ converts layers: those inside it are converted)"
    )


def _problem(module: nn.Module, base: type[nn.Module]) -> tuple[str | None, bool]:
    """Why ``module`` (an instance of the supported ``base``) cannot be converted, and whether that is an error
    even when ``quantize_`` chose it by default (rather than a reason to leave it in full precision)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        names = list(cast(nn.ModuleDict, module.parametrizations))
        removals = ", ".join(f"torch.nn.utils.parametrize.remove_parametrizations(module, {n!r})" for n in names)
        return (
            f"its {', '.join(names)} {'is' if len(names) == 1 else 'are'} parametrized (e.g. by weight_norm), which "
            f"a quantized layer cannot follow; call {removals} first, or leave the layer out with filter_fn"
        ), True
    hook = _weight_hook(module)
    if hook:
        return hook, True
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "it is a lazy layer not initialized yet; run one forward pass before quantize_", False
    empty = [n for n, p in module.named_parameters(recurse=False) if n.endswith("weight") and p.numel() == 0]
    if empty:
        # a scale statistic (max, mean) of no values is undefined, and there is nothing to gain
        return f"its {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: nothing to quantize", False
    if type(module).forward is not base.forward and not isinstance(module, _MultiWeight):
        return f"its class overrides {base.__name__}.forward, which may not compute with the quantized weight", False
    if base in (nn.Embedding, nn.EmbeddingBag):
        problem = _embedding_problem(module)
        if problem:
            return problem, True
    return None, False


def _weight_hook(module: nn.Module, names: tuple[str, ...] | None = None) -> str | None:
    """Why a weight of ``module`` (any, or those in ``names``) cannot be quantized if a forward pre-hook recomputes
    it from other Parameters (``torch.nn.utils.prune``, the older ``weight_norm`` and ``spectral_norm``), else None:
    the quantized forward would read the tensor the hook made before the last update, and the optimizer would
    train the hook's inputs."""

    removals = (
        (prune.BasePruningMethod, "torch.nn.utils.prune", "torch.nn.utils.prune.remove(module, {!r})"),
        (WeightNorm, "torch.nn.utils.weight_norm", "torch.nn.utils.remove_weight_norm(module, {!r})"),
        (SpectralNorm, "torch.nn.utils.spectral_norm", "torch.nn.utils.remove_spectral_norm(module, {!r})"),
    )
    for hook in module._forward_pre_hooks.values():
        for kind, made_by, remove in removals:
            name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", "weight")
            if isinstance(hook, kind) and (names is None or name in names):
                return (
                    f"its {name} is recomputed before each forward pass by {made_by}, which a quantized layer "
                    f"cannot follow; call {remove.format(name)} first, or leave the layer out of quantize_ with "
                    "filter_fn"
                )
    return None


def check_weight_hooks(model: nn.Module) -> None:
    """Refuse a model whose quantized layer has its weight recomputed by a forward pre-hook (pruning, the older
    ``weight_norm``/``spectral_norm``, applied after ``quantize_``): its training would use stale weights.

    Raises:
        TypeError: such a layer; the message names it and how to remove the hook.
    """
    for name, layer in quantized_layers(model).items():
        owner, weight_name = layer.weight_location  # an attention or recurrent weight's hook sits on its owner
        problem = _weight_hook(owner, (weight_name,))
        if problem:
            raise TypeError(f"quantized layer {name or '<root>'} ({type(layer).__name__}): {problem}")


def _check_include(include: Iterable[str]) -> set[str]:
    if isinstance(include, str):
        include = (include,)
    kinds = tuple(include) if isinstance(include, Iterable) else None
    if kinds is None or not all(isinstance(k, str) for k in kinds):
        raise TypeError(f"include must be layer kind names ({', '.join(INCLUDE)}), got {include!r:.80}")
    chosen = set(kinds)
    unknown = sorted(k for k in chosen if k not in INCLUDE)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"include: unknown layer kind(s) {names}; allowed: {', '.join(INCLUDE)}")
    return chosen


def _refuse_wrapped(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} ({model!r:.80})")
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError("quantize_/dequantize_ work on the bare model: apply them before wrapping it in DDP")


def _check_arguments(config: object, filter_fn: object) -> None:
    """``quantize_``'s arguments of the wrong type, named (typed ``object``: untyped callers pass anything)."""
    if config is not None and not isinstance(config, QuantConfig):
        hint = f", e.g. QuantConfig({config!r})" if isinstance(config, str) else ""
        raise TypeError(f"config must be a QuantConfig or None, got {type(config).__name__} {config!r:.80}{hint}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            f"filter_fn must be callable as filter_fn(module, qualified_name) -> bool, got {filter_fn!r:.80}"
        )


def _describe(entries: list[tuple[str, nn.Module, str]]) -> str:
    return "; ".join(f"{name or '<root>'} ({type(module).__name__}): {why}" for name, module, why in entries)


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    include: Iterable[str] = (),
) -> nn.Module:
    """Convert, in place, the weight layers of ``model`` into quantized layers.

    Without ``filter_fn``: every supported layer of a default kind (convolutions, transposed convolutions,
    linear layers, multi-head attention), plus the kinds named in ``include``. A module holding a weight that
    stays in full precision (an unsupported type, a layer of a kind not included, a subclass with its own
    forward, a lazy layer not initialized yet) is named in one warning, with the reason; an INFO log line
    summarizes what was converted. With ``filter_fn``, exactly the modules it chooses are converted, and
    choosing one that cannot be is an error.

    Attention modules and ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` that contain quantized
    layers never take their fused inference paths afterwards (see the module's description).

    With ``config.activations``, every convolution and linear layer converted by this call gets an
    ``input_quantizer`` applied to its input; the first of them in module order gets ``build_first()`` (float
    when ``first_layer_bits`` is None). Attention's ``out_proj``, recurrent layers and embeddings get none.
    Their step or ``α`` are Parameters of the model: build the optimizer after ``quantize_``.

    Args:
        model: any module; its submodules are converted where they sit (same objects, same Parameters).
        config: which quantizer and bit width (default: 1-bit DoReFa). Layers that are already quantized are
            left as they are (asking for another quantizer or other activations for them is an error); a
            per-channel quantizer is set to each layer's output-channel axis.
        filter_fn: ``filter_fn(module, qualified_name) -> bool`` chooses the layers among every module of
            ``model``, whatever its kind, first and last layer included. Attention's ``out_proj`` is a module of
            its own: choosing it alone quantizes that projection (its attention module then computes with it).
        include: kinds converted besides the default ones when there is no ``filter_fn``: ``"recurrent"``
            (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) and ``"embedding"`` (``nn.Embedding``, ``nn.EmbeddingBag``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, ``config`` not a ``QuantConfig``, ``filter_fn`` not callable or
            ``include`` not kind names; a chosen module cannot be converted (unsupported type, parametrizations,
            a weight that a forward pre-hook recomputes, a subclass with its own forward, an embedding with
            ``max_norm`` or ``sparse``), the model is wrapped in DDP/DataParallel,
            or the root module itself would need converting. Nothing is changed then.
        ValueError: ``include`` names an unknown kind or comes with a ``filter_fn``; or nothing to quantize (no
            layer chosen and no quantized layer in ``model`` already; the message says what was left and why);
            activations asked for and no layer to take them; a quantized layer asked for another quantizer or
            input quantizer (``check_requantization``).

    Example:
        >>> import torch.nn as nn, metaquant as mq
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> w = net[0].weight
        >>> _ = mq.quantize_(net, mq.QuantConfig("bwn"))
        >>> type(net[0]).__name__, type(net[2]).__name__, net[0].weight is w
        ('QuantConv1d', 'QuantLinear', True)
        >>> rnn = nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 4))
        >>> list(mq.quantized_layers(mq.quantize_(rnn, include=("recurrent", "embedding"))))
        ['0', '1.quantized_weights.weight_ih_l0', '1.quantized_weights.weight_hh_l0']
        >>> mq.quantize_(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: cannot swap the root module itself (Linear); wrap it in a container first
    """
    _check_arguments(config, filter_fn)
    kinds = _check_include(include)
    if kinds and filter_fn is not None:
        raise ValueError("pass include= or filter_fn=, not both: filter_fn alone chooses among every layer kind")
    _refuse_wrapped(model)
    plan = _plan(model, config, filter_fn, kinds)
    takes_input = [m for _, m, base in plan.chosen if _takes_input(plan, m, base)]
    if config is not None and config.activations is not None and not takes_input and not input_quantizers(model):
        raise ValueError(
            "quantize_: config.activations needs a convolution or linear layer to convert (attention's out_proj, "
            "recurrent layers and embeddings take no input quantizer); for a model quantized already without "
            "activations, call dequantize_(model) first"
        )
    quantizer = (config or QuantConfig()).forward_quantizer
    for _, module, base in plan.chosen:
        if isinstance(module, _MultiWeight):
            module._quant_init(quantizer, module.float_type)
        else:
            _convert(module, _KINDS[base][0], quantizer)
    # An attention module whose out_proj alone was chosen must compute with it: its forward becomes the quantized
    # one, its input projection staying in full precision.
    for _, module in plan.modules:
        if isinstance(module, QuantLayer) and id(module) in plan.attention_of:
            attention = plan.attention_of[id(module)]
            if not isinstance(attention, QuantMultiheadAttention):
                _convert(attention, QuantMultiheadAttention, None)
    _share_learned_tensors(model)
    if config is not None and config.activations is not None:
        install_input_quantizers(takes_input, config.activations)
    _turn_off_fused_paths(model)
    _report(model, plan)
    return model


def _takes_input(plan: _Plan, module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether a chosen module's quantized class applies an input quantizer (attention's out_proj does not run
    its own forward)."""
    return issubclass(_KINDS[base][0], TAKES_INPUT_QUANTIZER) and id(module) not in plan.attention_of


@dataclass
class _Plan:
    """What ``quantize_`` does with the modules of a model."""

    modules: list[tuple[str, nn.Module]]
    # attention's out_proj is computed by its attention module's forward: it can be quantized only if that
    # forward is nn.MultiheadAttention's (which quantize_ replaces) or already the quantized one
    attention_of: dict[int, nn.Module]  # id(out_proj) -> its attention module
    chosen: list[tuple[str, nn.Module, type[nn.Module]]] = field(default_factory=list)
    unasked: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # left in full precision untold
    declined: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # left in full precision by filter_fn


def _plan(model: nn.Module, asked: QuantConfig | None, filter_fn: FilterFn | None, kinds: set[str]) -> _Plan:
    """The modules ``quantize_`` converts and those it leaves in full precision, with the reason; an error for a
    chosen module that cannot be converted, or a quantized one that ``asked`` for another quantizer."""
    modules = list(model.named_modules())
    plan = _Plan(modules, {id(m.out_proj): m for _, m in modules if isinstance(m, nn.MultiheadAttention)})
    activations = asked.activations if asked is not None else None
    first, others = (None, None) if activations is None else (activations.build_first(), activations.build())
    seen = 0  # quantized layers that take an input quantizer, chosen by filter_fn, before this one
    for name, module in modules:
        if isinstance(module, QuantLayer):
            if asked is not None and (filter_fn is None or filter_fn(module, name)):
                # quantized already: asking for another quantizer must not silently keep the first one
                # (compared as the layer would hold it: a per-channel quantizer on the layer's channel axis)
                requested = asked.forward_quantizer.with_channel_axis(module.channel_axis)
                check_requantization(name or "<root>", module.configured_quantizer, requested)
                if isinstance(module, TAKES_INPUT_QUANTIZER) and id(module) not in plan.attention_of:
                    # the first layer's quantizer is accepted anywhere (quantize_ in passes with filter_fn gives
                    # each pass a first layer), but its absence (first_layer_bits=None) only in first place
                    allowed = [others] if first is None and seen else [first, others]
                    check_input_requantization(name or "<root>", module._modules.get(INPUT_QUANTIZER), allowed)
                    seen += 1
        elif isinstance(module, _MultiWeight) and _views(module):
            pass  # quantized already (an attention module with a quantized out_proj only may gain views)
        else:
            _plan_module(plan, name, module, filter_fn, kinds)
    return plan


def _plan_module(plan: _Plan, name: str, module: nn.Module, filter_fn: FilterFn | None, kinds: set[str]) -> None:
    """Add one module that is not quantized yet to ``plan``: chosen, left in full precision, or an error."""
    base = _float_base(module)
    label = name or "<root>"
    if filter_fn is not None and not filter_fn(module, name):
        if base is not None or _holds_weights(module):
            plan.declined.append((name, module, "not chosen by filter_fn"))
        return
    if base is None:
        if filter_fn is not None:
            supported = ", ".join(cls.__name__ for cls in _KINDS)
            raise TypeError(
                f"cannot quantize {label} of type {type(module).__name__}: quantize_ supports {supported} "
                "(and their subclasses that keep their forward)"
            )
        if _holds_weights(module):
            plan.unasked.append((name, module, _unsupported(module)))
        return
    kind = _KINDS[base][1]
    if filter_fn is None and kind != "default" and kind not in kinds:
        # not asked for: left in full precision whatever would stop its conversion
        plan.unasked.append((name, module, f"{kind} layers are quantized on request: include=({kind!r},)"))
        return
    problem, fatal = _problem(module, base)
    attention = plan.attention_of.get(id(module))
    if problem is None and attention is not None and not isinstance(attention, QuantMultiheadAttention):
        if type(attention).forward is not nn.MultiheadAttention.forward:
            problem = f"its attention module's class ({type(attention).__name__}) has its own forward"
    if problem is not None:
        if fatal or filter_fn is not None:
            raise TypeError(f"cannot quantize {label} ({type(module).__name__}): {problem}")
        plan.unasked.append((name, module, problem))
        return
    if not name:
        raise TypeError(f"cannot swap the root module itself ({type(module).__name__}); wrap it in a container first")
    plan.chosen.append((name, module, base))


def _report(model: nn.Module, plan: _Plan) -> None:
    """Warn about the layers left in full precision untold, log a summary; an error if nothing is quantized."""
    quantized = quantized_layers(model)
    left = plan.unasked + plan.declined
    if plan.unasked:
        logger.warning("quantize_: left in full precision: %s", _describe(plan.unasked))
    if not plan.chosen and not quantized:
        why = f" (left in full precision: {_describe(left)})" if left else ""
        raise ValueError(f"quantize_ found no layer to quantize in {type(model).__name__}{why}")
    counts: dict[str, int] = {}
    for _, module, _ in plan.chosen:
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    logger.info(
        "quantize_: %d module(s) converted (%s), %d quantized weight(s) in the model%s",
        len(plan.chosen),
        ", ".join(f"{n} {t}" for t, n in counts.items()) or "none",
        len(quantized),
        f"; left in full precision: {_describe(left)}" if left else "",
    )


def _turn_off_fused_paths(model: nn.Module) -> None:
    """In every TransformerEncoderLayer/TransformerEncoder holding quantized layers, turn off the fused path that
    would read the latent weights (the fused encoder layer; the nested-tensor encoder), remembering the values."""
    for module in model.modules():
        fused = isinstance(module, nn.TransformerEncoderLayer | nn.TransformerEncoder)
        if not fused or _FUSED_OFF in module.__dict__ or not any(isinstance(m, QuantLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            # read only by the fused path's conditions: 0 sends every call through the layer's modules
            saved = {"activation_relu_or_gelu": module.activation_relu_or_gelu}
            module.activation_relu_or_gelu = 0
        else:
            saved = {"use_nested_tensor": getattr(module, "use_nested_tensor", False)}
            module.use_nested_tensor = False  # type: ignore[assignment]
        module.__dict__[_FUSED_OFF] = saved


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: quantized layers get their own ``torch.nn`` class back (e.g. ``nn.Conv2d``,
    or attention's ``NonDynamicallyQuantizableLinear``) with the same Parameters and without input quantizers, so
    ``model.state_dict()`` is the float model's (the latent weights ``W``, not ``Ŵ``), and the fused inference
    paths are allowed again.

    A model without quantized layers is left as it is.

    Args:
        model: a module, usually one given to ``quantize_``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, is wrapped in DDP/DataParallel, or is itself a quantized layer.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> before = {k: v.clone() for k, v in net.state_dict().items()}
        >>> net = mq.dequantize_(mq.quantize_(net))
        >>> type(net[0]).__name__, all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        ('Conv2d', True)
    """
    _refuse_wrapped(model)
    if isinstance(model, QuantLayer | _MultiWeight):
        raise TypeError(f"cannot swap the root module itself ({type(model).__name__}); wrap it in a container first")
    for module in list(model.modules()):
        saved = module.__dict__.pop(_FUSED_OFF, None)
        if saved:
            for attr, value in saved.items():
                setattr(module, attr, value)
        if isinstance(module, _MultiWeight) or isinstance(module, QuantLayer) and not isinstance(module, QuantWeight):
            _restore(module)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of ``model`` (one per quantized weight) by qualified name, in module order, each once.

    Args:
        model: any module.

    Returns:
        A new dict ``{qualified name: QuantLayer}``; a layer shared under several names appears once, under
        its first name. A weight of an attention or recurrent module appears as its ``QuantWeight``, named
        ``<module>.quantized_weights.<parameter name>``. Empty if there is none.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> list(mq.quantized_layers(mq.quantize_(net)))
        ['0', '2']
        >>> attn = torch.nn.Sequential(torch.nn.MultiheadAttention(4, 2))
        >>> list(mq.quantized_layers(mq.quantize_(attn)))
        ['0.out_proj', '0.quantized_weights.in_proj_weight']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantized_weight_keys(model: nn.Module) -> dict[str, QuantLayer]:
    """The ``state_dict`` keys of ``model`` that hold a quantized layer's latent weight, with the layer.

    A module reached under several names (shared) has a key under each, as in ``state_dict``; a Parameter tied
    between a quantized layer and a layer left in full precision has only the quantized layer's key here.

    Args:
        model: any module.

    Returns:
        A new dict ``{state_dict key: QuantLayer}``, in ``state_dict`` order.

    Example:
        >>> net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GRU(3, 3)), include=("recurrent",))
        >>> list(mq.layers.quantized_weight_keys(net))
        ['0.weight', '1.weight_ih_l0', '1.weight_hh_l0']
    """
    found: dict[str, QuantLayer] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantWeight):
            owner = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
            found[f"{owner}.{module.weight_name}" if owner else module.weight_name] = module
        elif isinstance(module, QuantLayer):
            found[f"{name}.weight" if name else "weight"] = module
    order = {key: i for i, key in enumerate(model.state_dict(keep_vars=True))}
    return dict(sorted(((k, v) for k, v in found.items() if k in order), key=lambda kv: order[kv[0]]))


def learned_weight_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{qualified name: Parameter}`` of the tensors the weight quantizers of ``model`` learn (``LSQ``'s
    ``weight_step``), in module order."""
    found = {}
    for name, layer in quantized_layers(model).items():
        for learned in layer.configured_quantizer.learned:
            found[f"{name}.{LEARNED_PREFIX}{learned}"] = layer._parameters[LEARNED_PREFIX + learned]
    return found  # type: ignore[return-value]


def learned_quantizer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{qualified name: Parameter}`` of what the quantizers of ``model`` learn: the weight quantizers' tensors
    (``learned_weight_parameters``) and the input quantizers' (an LSQ step, PACT's ``α``), in module order."""
    found = learned_weight_parameters(model)
    for name, quantizer in input_quantizers(model).items():
        for param_name, param in quantizer.named_parameters():
            found[f"{name}.{INPUT_QUANTIZER}.{param_name}"] = param
    return found


def check_optimizer_trains_quantizers(model: nn.Module, optimizer: Any) -> None:
    """Refuse an optimizer that lacks a trainable Parameter of a quantizer of ``model`` (one built before
    ``quantize_`` added them would leave a learned step or ``α`` at its first value).

    Raises:
        ValueError: the message names the Parameter.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in learned_quantizer_parameters(model).items():
        if param.requires_grad and id(param) not in held:
            raise ValueError(
                f"the optimizer does not hold {name}: when a quantizer learns a step or a clipping level, build "
                "the optimizer after quantize_ (e.g. torch.optim.SGD(model.parameters(), ...)) and after giving a "
                "layer a quantizer whose learned tensors are new"
            )
