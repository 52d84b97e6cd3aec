"""Forward quantizers against independent computations: autograd for c(W), formulas for the value sets."""

import math
import re

import pytest
import torch

import metaquant as mq
from metaquant.quantizers import (
    BWN,
    LSQ,
    QUANTIZERS,
    BWNPerChannel,
    DoReFa,
    DoReFaPerChannel,
    Encoded,
    LSQPerChannel,
    Ternary,
    UniformPerChannel,
    UniformPerGroup,
    UniformSymmetric,
    expand_groups,
    get_quantizer,
    quantizer_names,
)

ALL = [(name, bits) for name, cls in QUANTIZERS.items() for bits in range(cls.min_bits, cls.max_bits + 1)]


def _weight(seed: int = 0, shape=(6, 3, 3, 3), dtype=torch.float64, q=None) -> torch.Tensor:
    """A random weight; for a per-group quantizer ``q`` (2-D weights only) its rows flattened: ``[6, 27]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype) * 0.7
    return w.flatten(1) if isinstance(q, UniformPerGroup) else w


def _relaxed_with_stats_detached(q, w):
    """The differentiable path written out independently of ``q.relaxed``: scale statistics detached."""
    if isinstance(q, DoReFaPerChannel):  # the max of each output channel (axis 0)
        t = torch.tanh(w)
        return 2 * (t / (2 * t.abs().flatten(1).max(1).values.detach().reshape(-1, 1, 1, 1)) + 0.5) - 1
    if isinstance(q, DoReFa):
        t = torch.tanh(w)
        return 2 * (t / (2 * t.abs().max().detach()) + 0.5) - 1
    if isinstance(q, LSQ):  # unbound: LSQ's first step s = 2·mean|W|/√Q_P; r maps [−Q_N, Q_P] onto [−1, 1]
        q_p = 2 ** (q.bits - 1) - 1
        per_channel = isinstance(q, LSQPerChannel)
        mean = w.abs().mean(dim=(1, 2, 3), keepdim=True) if per_channel else w.abs().mean()
        return (w / (2 * mean.detach() / math.sqrt(q_p)) + 0.5) / (q_p + 0.5)
    return w  # BWN, ternary, uniform: A is the identity and the scale is a constant


@pytest.mark.parametrize("name,bits", ALL)
def test_calibration_equals_autograd_derivative_of_the_differentiable_path(name, bits):
    q = get_quantizer(name, bits)
    w = _weight(q=q).requires_grad_()
    (grad,) = torch.autograd.grad(_relaxed_with_stats_detached(q, w).sum(), w)
    torch.testing.assert_close(q.calibration(w.detach()), grad, rtol=1e-12, atol=1e-12)
    # and the library's own relaxed path has the same derivative
    (grad_lib,) = torch.autograd.grad(q.relaxed(w).sum(), w)
    torch.testing.assert_close(grad_lib, grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,bits", ALL)
def test_decode_of_encode_equals_quantize_of_preprocess_exactly(name, bits):
    q = get_quantizer(name, bits)
    w = _weight(1, dtype=torch.float32, q=q)
    enc = q.encode(w)
    assert not enc.codes.is_floating_point()
    assert enc.codes.shape == w.shape
    assert torch.equal(q.decode(enc), q.quantize(q.preprocess(w)))
    # the codes survive a round trip through plain Python ints (what an exporter stores)
    rebuilt = Encoded(torch.tensor(enc.codes.tolist(), dtype=enc.codes.dtype), enc.scale.clone())
    assert torch.equal(q.decode(rebuilt), q(w))


@pytest.mark.parametrize("name,bits", ALL)
def test_values_lie_in_the_value_set(name, bits):
    q = get_quantizer(name, bits)
    w = _weight(2, shape=(8, 4, 3, 3), dtype=torch.float32, q=q)
    w_hat = q(w)
    # one scale per row (per channel, or per group of 128 >= the 36 inputs of a row), else one per layer
    per_row = BWNPerChannel | UniformPerChannel | UniformPerGroup | LSQPerChannel | DoReFaPerChannel
    groups = w_hat if isinstance(q, per_row) else w_hat.reshape(1, -1)
    for group in groups:
        assert group.unique().numel() <= q.num_levels
    if bits == 1:
        for group in groups:
            assert group.unique().numel() == 2


def test_dorefa_values_match_the_formula():
    w = _weight(3, dtype=torch.float64)
    for k in range(1, 9):
        t = torch.tanh(w)
        w_tilde = t / (2 * t.abs().max()) + 0.5
        expected = 2 * torch.round((2**k - 1) * w_tilde) / (2**k - 1) - 1
        torch.testing.assert_close(DoReFa(k)(w), expected, rtol=0, atol=1e-12)
    assert set(DoReFa(1)(w).unique().tolist()) == {-1.0, 1.0}


def test_bwn_values_match_the_formula():
    w = _weight(4, dtype=torch.float64)
    a = w.abs().mean()
    expected = torch.where(w >= 0, a, -a)
    assert torch.equal(BWN()(w), expected)
    a_c = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(BWNPerChannel()(w), torch.where(w >= 0, a_c, -a_c))


def test_ternary_values_match_the_formula():
    w = _weight(5, dtype=torch.float64)
    delta = 0.7 * w.abs().mean()
    mask = w.abs() > delta
    a = w.abs()[mask].mean()
    expected = torch.where(mask, torch.sign(w) * a, torch.zeros_like(w))
    torch.testing.assert_close(Ternary(2)(w), expected, rtol=1e-12, atol=0)


def test_uniform_values_match_the_formula():
    w = _weight(6, dtype=torch.float64)
    for k in range(2, 9):
        half = 2 ** (k - 1) - 1
        s = w.abs().max() / half
        expected = torch.round(w / s) * s
        torch.testing.assert_close(UniformSymmetric(k)(w), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name,bits,allowed",
    [
        ("dorefa", 0, "1..8"),
        ("dorefa", 9, "1..8"),
        ("bwn", 2, "1"),
        ("bwn-channel", 3, "1"),
        ("ternary", 1, "2"),
        ("uniform", 1, "2..8"),
        ("uniform-channel", 1, "2..8"),
        ("uniform-group", 9, "2..8"),
    ],
)
def test_unsupported_bit_width_names_the_allowed_range(name, bits, allowed):
    with pytest.raises(ValueError, match=rf"bits={bits}; allowed: {allowed}$"):
        get_quantizer(name, bits)


def test_unknown_quantizer_lists_the_registered_ones():
    with pytest.raises(
        ValueError,
        match="unknown quantizer 'xnor'; allowed: dorefa, bwn, bwn-channel, ternary, uniform, uniform-channel, "
        "uniform-group, lsq, lsq-channel, dorefa-channel$",
    ):
        get_quantizer("xnor", 1)


def test_original_spellings_are_accepted():
    assert isinstance(get_quantizer("BWN-F", 1), BWNPerChannel)
    assert isinstance(get_quantizer("DoReFa", 2), DoReFa)


def test_all_zero_weight_is_finite():
    for name, bits in ALL:
        w = torch.zeros(3, 3)
        q = get_quantizer(name, bits)
        assert torch.isfinite(q(w)).all() and torch.isfinite(q.calibration(w)).all()


# --- a weight whose statistic is 0 ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bits",
    [
        ("dorefa", 1),
        ("dorefa", 2),
        ("bwn", 1),
        ("ternary", 2),
        ("uniform", 3),
        ("uniform-channel", 3),
        ("uniform-group", 3),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_all_zero_weight_takes_the_ste_step_g_times_one(name, bits, dtype):
    """docs/design.md §3: the statistic counts as 1 where it divides or scales a gradient. Oracle: one SGD step of
    two all-zero layers (quantized in one pass where the quantizer allows it) moves each by ``−lr·g_Ŵ``."""
    import torch.nn.functional as F
    from torch import nn

    import metaquant as mq

    torch.manual_seed(0)
    model = mq.quantize_(nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}), mq.QuantConfig(name, bits))
    model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x, y = torch.randn(5, 4, dtype=dtype), torch.tensor([0, 1, 2, 0, 1])
    layers = (model["a"], model["b"])
    w_hats = [layer.quantizer(layer.weight).detach().requires_grad_() for layer in layers]
    loss = F.cross_entropy(sum(F.linear(x, w_hat) for w_hat in w_hats), y)  # the biases are zero
    grads = torch.autograd.grad(loss, w_hats)
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5))
    trainer.step(lambda: F.cross_entropy(model["a"](x) + model["b"](x), y))
    for layer, g in zip(layers, grads):
        torch.testing.assert_close(layer.weight.detach(), -0.5 * g, rtol=1e-6, atol=1e-7)
        assert layer.weight.abs().max() > 0


def test_an_all_zero_channel_takes_the_ste_step_and_the_others_their_scale():
    q = BWNPerChannel()
    w = _weight(1, shape=(3, 4))
    w[1] = 0
    w.requires_grad_()
    g = torch.randn(3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((__import__("metaquant").fake_quantize(w, q) * g).sum(), w)
    a = w.detach().abs().mean(1, keepdim=True)
    expected = g * torch.where(a == 0, torch.ones_like(a), a) * (w.detach().abs() <= 1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert grad[1].abs().sum() > 0


@pytest.mark.parametrize("name,bits", ALL)
def test_an_all_zero_weight_quantizes_to_q_of_zero_with_a_scale_of_its_own(name, bits):
    q = get_quantizer(name, bits)
    w = torch.zeros(3, 3)
    assert torch.equal(q.calibration(w), torch.ones(3, 3))
    codes, scale = q.encode(w)
    assert torch.equal(q.decode(Encoded(codes, scale)), q(w))
    if name.startswith("uniform"):  # s = max|W| / L with max|W| = 1, in every scale group
        assert torch.equal(scale, torch.full_like(scale, 1 / (2 ** (bits - 1) - 1)))
    if name in ("bwn", "bwn-channel", "ternary", "uniform", "uniform-channel", "uniform-group", "lsq", "lsq-channel"):
        assert torch.equal(q(w), torch.zeros(3, 3))


@pytest.mark.parametrize(
    "name,bits,shape",
    [
        (name, bits, shape)
        for name, bits in ALL
        for shape in [(0, 5), (4, 0), (0,), (4, 0, 3, 3), (0, 3, 3, 3)]
        if name != "uniform-group" or len(shape) == 2  # which refuses other weights with its own message
    ],
)
def test_an_empty_weight_quantizes_encodes_and_differentiates_to_empty_tensors(name, bits, shape):
    q = get_quantizer(name, bits)
    w = torch.empty(shape, dtype=torch.float64, requires_grad=True)
    codes, scale = q.encode(w)
    assert codes.shape == w.shape and torch.isfinite(scale).all()
    assert torch.equal(q.decode(Encoded(codes, scale)), q(w))
    r, _, c = q.backward_terms(w, q.preprocess(w))
    assert r.shape == c.shape == w.shape
    q.preprocess(w).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_the_registry_lists_the_names_in_registration_order():
    assert quantizer_names() == [
        "dorefa",
        "bwn",
        "bwn-channel",
        "ternary",
        "uniform",
        "uniform-channel",
        "uniform-group",
        "lsq",
        "lsq-channel",
        "dorefa-channel",
    ]


@pytest.mark.parametrize("name,bits", ALL)
def test_backward_terms_equal_the_three_methods_to_the_bit(name, bits):
    q = get_quantizer(name, bits)
    w = _weight(7, dtype=torch.float32, q=q)
    r, s, c = q.backward_terms(w, q.preprocess(w))
    assert torch.equal(r, q.relaxed(w)) and torch.equal(c, q.calibration(w))
    assert torch.equal(s, q.ste_scale(q.preprocess(w)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_relaxed_is_two_w_tilde_minus_one_and_within_half_a_step_of_w_hat(bits):
    q = DoReFa(bits)
    w = _weight(8)
    torch.testing.assert_close(q.relaxed(w), 2 * q.preprocess(w) - 1, rtol=0, atol=1e-12)
    assert (q(w) - q.relaxed(w)).abs().max() <= 1 / (2**bits - 1) + 1e-12  # half of the step 2 / (2^k − 1)


def test_bwn_ste_scale_is_the_mean_absolute_weight_and_dorefa_s_is_one():
    w = _weight(9)
    assert torch.equal(BWN().ste_scale(w), w.abs().mean().reshape(1))
    assert torch.equal(BWNPerChannel().ste_scale(w), w.abs().mean(dim=(1, 2, 3), keepdim=True))
    assert DoReFa(2).ste_scale(w).item() == 1.0


def test_codes_dtypes_and_scale_shapes():
    w = _weight(10, shape=(8, 3, 3, 3), dtype=torch.float32)
    assert DoReFa(2).encode(w).codes.dtype == torch.uint8 and DoReFa(2).encode(w).scale.shape == (1,)
    assert BWN().encode(w).codes.dtype == torch.uint8
    assert Ternary(2).encode(w).codes.dtype == torch.int8 and UniformSymmetric(3).encode(w).codes.dtype == torch.int8
    assert BWNPerChannel().encode(w).scale.shape == (8, 1, 1, 1)
    assert BWNPerChannel().with_channel_axis(1).encode(w).scale.shape == (1, 3, 1, 1)  # a ConvTranspose2d(8, 3, 3)
    # BWN's code 1 is +a and 0 is −a
    codes = torch.tensor([1, 0, 1], dtype=torch.uint8)
    assert BWN().decode(Encoded(codes, torch.tensor([0.5]))).tolist() == [0.5, -0.5, 0.5]


def test_a_per_layer_quantizer_ignores_the_channel_axis_and_the_per_channel_one_shows_it():
    assert DoReFa(2).with_channel_axis(1) == DoReFa(2)
    assert repr(BWNPerChannel().with_channel_axis(1)) == "BWNPerChannel(bits=1, axis=1)"
    assert repr(BWNPerChannel()) == "BWNPerChannel(bits=1)"
    assert (DoReFa(2).num_levels, Ternary(2).num_levels, UniformSymmetric(3).num_levels) == (4, 3, 7)


# --- uniform per channel and per group: oracles written element by element ---------------------------------------
def _uniform_by_hand(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``s·clamp(round(W/s), −L, L)`` with ``s = max|W| / L`` (``1 / L`` for all zeros) over one scale group."""
    half = 2 ** (bits - 1) - 1
    peak = values.abs().max().item()
    s = (peak if peak else 1.0) / half
    return torch.tensor([min(max(round(v / s), -half), half) * s for v in values.tolist()], dtype=values.dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,shape", [(0, (5, 3, 2, 2)), (1, (3, 5, 2, 2)), (0, (7, 4)), (0, (6,))])
def test_uniform_per_channel_quantizes_each_output_channel_with_its_own_max(bits, axis, shape):
    q = UniformPerChannel(bits).with_channel_axis(axis)
    w = _weight(11, shape=shape)
    w.select(axis, 1).zero_() if w.dim() > 1 else None  # an all-zero channel: uniform's rule, 0 at s = 1 / L
    expected = torch.empty_like(w)
    if w.dim() == 1:  # a 1-D weight: one scale
        expected = _uniform_by_hand(w, bits)
    for o in range(w.shape[axis] if w.dim() > 1 else 0):
        channel = w.select(axis, o)
        expected.select(axis, o).copy_(_uniform_by_hand(channel.reshape(-1), bits).reshape(channel.shape))
    assert torch.equal(q(w), expected)
    scale = q.encode(w).scale
    assert scale.shape == (tuple(n if d == axis else 1 for d, n in enumerate(shape)) if len(shape) > 1 else (1,))
    if w.dim() > 1:
        assert scale.select(axis, 1).item() == 1 / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((4, 12), 4), ((3, 10), 4), ((2, 5), 8), ((3, 7), 1)])
def test_uniform_per_group_quantizes_each_group_of_a_row_with_its_own_max(bits, shape, group_size):
    q = UniformPerGroup(bits, group_size=group_size)
    w = _weight(12, shape=shape)
    w[1, :group_size] = 0  # an all-zero group
    expected = torch.empty_like(w)
    for row in range(shape[0]):
        for start in range(0, shape[1], group_size):  # the last group may be shorter
            stop = min(start + group_size, shape[1])
            expected[row, start:stop] = _uniform_by_hand(w[row, start:stop], bits)
    assert torch.equal(q(w), expected)
    codes, scale = q.encode(w)
    assert scale.shape == (shape[0], -(-shape[1] // group_size)) and codes.dtype == torch.int8
    assert scale[1, 0].item() == 1 / (2 ** (bits - 1) - 1) and not codes[1, :group_size].any()


def test_expand_groups_repeats_each_scale_over_its_group_and_cuts_the_last():
    scale = torch.tensor([[1.0, 2.0, 3.0]])
    assert expand_groups(scale, 2, 5).tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0]]


@pytest.mark.parametrize("q", [UniformPerChannel(3), UniformPerChannel(4, axis=1), UniformPerGroup(3, group_size=4)])
def test_grouped_scales_decode_their_codes_exactly_and_take_the_uniform_ste_gradient(q):
    import metaquant as mq

    w = _weight(13, shape=(6, 10), dtype=torch.float32) * 2  # some |W| > 1: the STE's gate closes there
    enc = q.encode(w)
    rebuilt = Encoded(torch.tensor(enc.codes.tolist(), dtype=torch.int8), torch.tensor(enc.scale.tolist()))
    assert torch.equal(q.decode(rebuilt), q(w))
    # the STE: g_W = g_Ŵ · 1{|relaxed| <= 1} · d relaxed / dW, relaxed the identity (scales held constant)
    w.requires_grad_()
    g = torch.randn(6, 10)
    (grad,) = torch.autograd.grad((mq.fake_quantize(w, q) * g).sum(), w)
    (d_relaxed,) = torch.autograd.grad((q.relaxed(w) * g).sum(), w)
    assert torch.equal(grad, d_relaxed * (q.relaxed(w).detach().abs() <= 1))


@pytest.mark.parametrize("group_size", [0, -4, True, 2.5, "8", None])
def test_uniform_per_group_refuses_a_group_size_that_is_not_a_positive_int(group_size):
    with pytest.raises(ValueError, match=rf"group_size must be an integer >= 1, got {group_size!r}$"):
        UniformPerGroup(4, group_size=group_size)


def test_get_quantizer_passes_group_size_to_the_grouped_quantizer_only():
    assert get_quantizer("Uniform-Group", 4, group_size=64) == UniformPerGroup(4, group_size=64)
    assert get_quantizer("uniform-group", 4) == UniformPerGroup(4, group_size=128)
    with pytest.raises(ValueError, match=r"group_size=64 applies to quantizer uniform-group, not to 'uniform'$"):
        get_quantizer("uniform", 4, group_size=64)
    with pytest.raises(ValueError, match=r"group_size must be an integer >= 1, got 0$"):
        get_quantizer("uniform-group", 4, group_size=0)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (8,), (2, 3, 4)])
def test_uniform_per_group_refuses_a_weight_that_is_not_2d_and_says_how_to_leave_it_out(shape):
    with pytest.raises(ValueError, match=rf"not a weight of shape {re.escape(str(shape))}: .*filter_fn"):
        UniformPerGroup(4, group_size=4)(torch.randn(shape))


def test_uniform_per_channel_refuses_an_axis_beyond_the_weight_and_shows_a_nonzero_axis():
    with pytest.raises(ValueError, match=r"UniformPerChannel\(axis=2\) cannot quantize a weight of shape \(3, 4\)"):
        UniformPerChannel(3, axis=2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"axis must be an int >= 0, got -1"):
        UniformPerChannel(3).with_channel_axis(-1)
    assert repr(UniformPerChannel(3).with_channel_axis(1)) == "UniformPerChannel(bits=3, axis=1)"
    assert UniformPerGroup(3).with_channel_axis(1) == UniformPerGroup(3)
    assert (UniformPerChannel(3).num_levels, UniformPerGroup(4).num_levels) == (7, 15)


@pytest.mark.parametrize("name", ["uniform-channel", "uniform-group"])
@pytest.mark.parametrize("method", ["ste", "ewgs", "meta"])
def test_a_model_with_grouped_scales_trains(name, method):
    import torch.nn.functional as F
    from torch import nn

    import metaquant as mq

    torch.manual_seed(0)
    config = mq.QuantConfig(name, 4, group_size=4) if name == "uniform-group" else mq.QuantConfig(name, 4)
    model = mq.quantize_(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)), config)
    assert model[0].quantizer == config.forward_quantizer
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "meta":
        trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=8))
    else:
        trainer = mq.Trainer(model, opt, estimator=mq.EWGS(1e-3) if method == "ewgs" else mq.STE())
    before = [p.detach().clone() for p in model.parameters()]
    losses = [trainer.step(lambda: F.cross_entropy(model(x), y)).item() for _ in range(4)]
    assert all(map(math.isfinite, losses))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- LSQ: a learned step ----------------------------------------------------------------------------------------
def _lsq_layer(bits, step_factor, seed=0, name="lsq"):
    """A linear layer quantized by LSQ, its step set to ``step_factor`` times LSQ's first value (small: clipping)."""
    torch.manual_seed(seed)
    layer = torch.nn.Sequential(torch.nn.Linear(24, 10)).double()
    mq.quantize_(layer, mq.QuantConfig(name, bits))
    with torch.no_grad():
        layer[0].weight_step.mul_(step_factor)
    return layer[0]


def _lsq_reference(w, step, bits):
    """LSQ as Esser et al. write it: ``ŵ = round_ste(clamp(w/s', −Q_N, Q_P))·s'`` with ``s' = gradscale(s,
    1/√(N·Q_P))``, ``Q_N = 2^(b−1)``, ``Q_P = 2^(b−1) − 1``, differentiated by autograd."""
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    g = 1 / math.sqrt(w.numel() // step.numel() * q_p)  # N: the weights of one step (a layer's, or a channel's)
    scaled = (step - step * g).detach() + step * g  # value s, gradient times g
    x = torch.clamp(w / scaled, -q_n, q_p)
    return (x + (x.round() - x).detach()) * scaled  # round with the straight-through gradient


@pytest.mark.parametrize("name", ["lsq", "lsq-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("step_factor", [1.0, 0.05])
def test_lsq_value_and_gradients_of_weight_and_step_equal_autograd_of_the_papers_expression(bits, step_factor, name):
    layer = _lsq_layer(bits, step_factor, name=name)
    assert layer.weight_step.shape == ((10, 1) if name == "lsq-channel" else (1,))
    upstream = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_hat, _ = layer.forward_params()
    (w_hat * upstream).sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    s = layer.weight_step.detach().clone().requires_grad_()
    expected = _lsq_reference(w, s, bits)
    (expected * upstream).sum().backward()
    # (the reference's s' = (s − s·g) + s·g is s to an ulp, not always to the bit)
    torch.testing.assert_close(w_hat.detach(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-12, atol=0)  # g_Ŵ ⊙ 1{−Q_N ≤ W/s ≤ Q_P}
    torch.testing.assert_close(layer.weight_step.grad, s.grad, rtol=1e-12, atol=1e-15)
    if step_factor < 1:  # the case covers both ends of the range and its inside
        x = w / s
        assert bool((x < -(2 ** (bits - 1))).any()) and bool((x > 2 ** (bits - 1) - 1).any())
        assert bool((x.abs() < 2 ** (bits - 1) - 1).any())


def test_lsq_first_step_is_the_papers_and_the_codes_use_the_learned_step():
    layer = _lsq_layer(4, 1.0)
    w = layer.weight.detach()
    torch.testing.assert_close(layer.weight_step, (2 * w.abs().mean() / math.sqrt(7)).reshape(1))
    with torch.no_grad():
        layer.weight_step.fill_(0.01)
    encoded = layer.quantizer.encode(w)
    assert torch.equal(encoded.scale, torch.tensor([0.01], dtype=w.dtype))
    assert torch.equal(encoded.codes, torch.clamp(torch.round(w / 0.01), -8, 7).to(torch.int8))
    assert int(encoded.codes.min()) == -8 and int(encoded.codes.max()) == 7  # LSQ's 16 levels, both ends used
    assert torch.equal(layer.quantizer(w), encoded.codes.double() * 0.01)


def test_lsq_with_ewgs_scales_the_gradient_by_the_distance_to_the_level_in_steps():
    layer, delta = _lsq_layer(3, 0.5), 0.2
    upstream = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (mq.fake_quantize(layer.weight, layer.quantizer, mq.EWGS(delta)) * upstream).sum().backward()
    s = layer.weight_step.detach()
    x = layer.weight.detach() / s
    # EWGS (Lee et al., Eq. 5) with r and the level in one unit, the range [−4, 3] mapped onto [−1, 1] (half width
    # 3.5): (x − clamp(round x)) / 3.5; no clipping gate
    expected = upstream * (1 + delta * torch.sign(upstream) * (x - x.round().clamp(-4, 3)) / 3.5)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-12, atol=1e-15)


def test_lsq_steps_belong_to_their_layers_and_go_with_the_quantizer():
    net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), mq.QuantConfig("lsq", 4))
    first, second = net[0].quantizer, net[1].quantizer
    assert first.step is net[0].weight_step and second.step is net[1].weight_step and first != second
    assert first == net[0].quantizer and hash(first) == hash(net[0].quantizer)  # bound to the same Parameter
    assert list(mq.layers.learned_weight_parameters(net)) == ["0.weight_step", "1.weight_step"]
    mq.quantize_(net, mq.QuantConfig("lsq", 4))  # quantized already, with the same configuration: kept
    assert net[0].quantizer.step is first.step
    with pytest.raises(ValueError, match=r"already quantized with LSQ\(bits=4\), not LSQ\(bits=3\)"):
        mq.quantize_(net, mq.QuantConfig("lsq", 3))
    net[1].quantizer = mq.get_quantizer("dorefa", 1)  # the step goes with the quantizer that needed it
    assert "weight_step" not in dict(net[1].named_parameters())
    mq.dequantize_(net)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_lsq_in_float16_keeps_a_positive_step_when_training_takes_it_past_zero():
    w = torch.tensor([0.0, 0.02, -0.3, 5.0], dtype=torch.half, requires_grad=True)
    for value in (-0.01, 3e-8, 0.0):
        step = torch.nn.Parameter(torch.tensor([value], dtype=torch.half))
        w_hat = mq.fake_quantize(w, LSQ(3, step=step))
        w_hat.sum().backward()
        assert torch.isfinite(w_hat).all() and torch.isfinite(step.grad).all() and torch.isfinite(w.grad).all()
        tiny = torch.finfo(torch.half).tiny  # the floor: float16's smallest normal number
        assert torch.equal(w_hat.detach(), (w.detach() / tiny).round().clamp(-4, 3) * tiny)
        w.grad = None


def test_lsq_step_has_no_gradient_path_without_autograd():
    layer = _lsq_layer(4, 1.0)
    with torch.no_grad():
        w_hat, _ = layer.forward_params()
    assert w_hat.grad_fn is None


def test_layers_tied_to_one_weight_share_its_step_and_metaquant_trains_them():
    emb, out = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False)
    out.weight = emb.weight  # tied input and output embeddings
    net = mq.quantize_(torch.nn.ModuleDict({"emb": emb, "out": out}), mq.QuantConfig("lsq", 4), include=("embedding",))
    assert net["emb"].weight_step is net["out"].weight_step and net["emb"].quantizer == net["out"].quantizer
    trainer = mq.MetaQuant(net, torch.optim.SGD(net.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    first = net["emb"].weight_step.detach().clone()
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    for _ in range(3):
        trainer.step(
            lambda: torch.nn.functional.cross_entropy(net["out"](net["emb"](tokens)).flatten(0, 1), tokens.flatten())
        )
    assert not torch.equal(first, net["emb"].weight_step)


def test_a_new_bit_width_restarts_the_step_in_the_same_parameter():
    layer = _lsq_layer(4, 0.3)
    step = layer.weight_step
    layer.quantizer = mq.get_quantizer("lsq", 4)  # the same configuration: the learned value stays
    assert layer.weight_step is step and torch.equal(step, _lsq_layer(4, 0.3).weight_step)
    layer.quantizer = mq.get_quantizer("lsq", 2)  # another: LSQ's first value for 2 bits, in place (optimizers keep it)
    assert layer.weight_step is step
    torch.testing.assert_close(step.detach(), (2 * layer.weight.detach().abs().mean() / 1.0).reshape(1))


def test_a_layer_saved_whole_by_an_earlier_version_trains_requantizes_and_exports(tmp_path):
    from metaquant.export import export_packed

    net = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3)), mq.QuantConfig("uniform", 4))
    layer = net[0]
    layer.__dict__["quantizer"] = layer.__dict__.pop("_quantizer")  # as earlier versions held it
    assert layer.quantizer == UniformSymmetric(4)
    mq.quantize_(net, mq.QuantConfig("uniform", 4))  # the same configuration: accepted
    assert mq.layers.learned_weight_parameters(net) == {}
    mq.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1)).step(lambda: net(torch.randn(2, 4)).sum())
    export_packed(net, tmp_path / "m.safetensors")
    layer.quantizer = mq.get_quantizer("lsq", 4)  # set again: held as today's layers hold it
    assert "quantizer" not in layer.__dict__ and layer.configured_quantizer == LSQ(4)


def test_lsq_step_gradient_at_the_ends_of_the_range_is_the_papers_outside_value():
    # LSQ Eq. 3: round(v/s) − v/s for −Q_N < v/s < Q_P, −Q_N for v/s ≤ −Q_N, Q_P for v/s ≥ Q_P; 3 bits: [−4, 3]
    step = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    w = torch.tensor([-2.5, -2.0, -1.2, 0.0, 0.7, 1.5, 2.0], dtype=torch.float64)  # v/s: −5, −4, −2.4, 0, 1.4, 3, 4
    mq.fake_quantize(w, LSQ(3, step=step)).backward(torch.ones_like(w))
    slopes = torch.tensor([-4.0, -4.0, -2.0 + 2.4, 0.0, 1.0 - 1.4, 3.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(step.grad, slopes.sum().reshape(1) / math.sqrt(7 * 3), rtol=1e-12, atol=1e-15)
    # and the layer the activations use, LSQActivation, agrees on the same values
    act = mq.activations.LSQActivation(3, signed=True).double()
    with torch.no_grad():
        act.step.fill_(0.5)
        act.initialized.fill_(True)
    act.train()(w.unsqueeze(0)).sum().backward()  # N: the 7 features of one example
    torch.testing.assert_close(act.step.grad, slopes.sum() / math.sqrt(7 * 3), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_per_channel_normalises_each_output_channel_by_its_own_max(bits):
    w = _weight(7)
    w[2] *= 0.01  # a channel much smaller than the others: per layer it would use the middle levels only
    t = torch.tanh(w)
    w_tilde = t / (2 * t.abs().amax(dim=(1, 2, 3), keepdim=True)) + 0.5
    levels = 2**bits - 1
    expected = 2 * torch.round(w_tilde * levels) / levels - 1
    q = get_quantizer("dorefa-channel", bits)
    torch.testing.assert_close(q(w), expected, rtol=0, atol=1e-15)
    if bits == 1:  # the signs do not depend on the scale: DoReFa's Ŵ
        assert torch.equal(q(w), DoReFa(1)(w))
    else:
        assert q(w)[2].unique().numel() > DoReFa(bits)(w)[2].unique().numel()
    # a transposed convolution's output channels lie along axis 1
    up = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 2)).double()
    mq.quantize_(up, mq.QuantConfig("dorefa-channel", bits))
    wt = up[0].weight.detach()
    tt = torch.tanh(wt)
    expected_t = 2 * torch.round((tt / (2 * tt.abs().amax(dim=(0, 2, 3), keepdim=True)) + 0.5) * levels) / levels - 1
    torch.testing.assert_close(up[0].quantizer(wt), expected_t, rtol=0, atol=1e-15)


def test_the_quantizer_setter_keeps_replaces_or_restarts_the_step_as_its_shape_and_configuration_say():
    net = mq.quantize_(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), mq.QuantConfig("lsq", 4))
    layer = net[0]
    with torch.no_grad():
        layer.weight_step.mul_(0.5)  # as training leaves it
    trained, step = layer.weight_step.detach().clone(), layer.weight_step
    layer.quantizer = layer.quantizer  # the same configuration, bound: nothing changes
    assert layer.weight_step is step and torch.equal(step, trained) and layer.configured_quantizer.step is None
    layer.quantizer = get_quantizer("lsq-channel", 4)  # another shape: a new Parameter, per channel
    assert layer.weight_step is not step and layer.weight_step.shape == (4, 1, 1, 1)
    torch.testing.assert_close(
        layer.weight_step.detach(), 2 * layer.weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True) / math.sqrt(7)
    )
    layer.quantizer = get_quantizer("lsq", 4)
    assert layer.weight_step.shape == (1,)
    x = torch.randn(2, 2, 5, 5)
    assert torch.isfinite(net(x)).all()
    assert LSQPerChannel(4, 1).axis == 1  # positional arguments: bits, axis, as the other per-channel quantizers
