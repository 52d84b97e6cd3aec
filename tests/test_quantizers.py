"""Forward quantizers against independent computations: autograd for c(W), formulas for the value sets."""

import pytest
import torch

from metaquant.quantizers import (
    BWN,
    QUANTIZERS,
    BWNPerChannel,
    DoReFa,
    Encoded,
    Ternary,
    UniformSymmetric,
    get_quantizer,
)

ALL = [(name, bits) for name, cls in QUANTIZERS.items() for bits in range(cls.min_bits, cls.max_bits + 1)]


def _weight(seed: int = 0, shape=(6, 3, 3, 3), dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 0.7


def _relaxed_with_stats_detached(q, w):
    """The differentiable path written out independently of ``q.relaxed``: scale statistics detached."""
    if isinstance(q, DoReFa):
        t = torch.tanh(w)
        return 2 * (t / (2 * t.abs().max().detach()) + 0.5) - 1
    return w  # BWN, ternary, uniform: A is the identity and the scale is a constant


@pytest.mark.parametrize("name,bits", ALL)
def test_calibration_equals_autograd_derivative_of_the_differentiable_path(name, bits):
    q = get_quantizer(name, bits)
    w = _weight().requires_grad_()
    (grad,) = torch.autograd.grad(_relaxed_with_stats_detached(q, w).sum(), w)
    torch.testing.assert_close(q.calibration(w.detach()), grad, rtol=1e-12, atol=1e-12)
    # and the library's own relaxed path has the same derivative
    (grad_lib,) = torch.autograd.grad(q.relaxed(w).sum(), w)
    torch.testing.assert_close(grad_lib, grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,bits", ALL)
def test_decode_of_encode_equals_quantize_of_preprocess_exactly(name, bits):
    q = get_quantizer(name, bits)
    w = _weight(1, dtype=torch.float32)
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
    w = _weight(2, shape=(8, 4, 3, 3), dtype=torch.float32)
    w_hat = q(w)
    groups = w_hat if isinstance(q, BWNPerChannel) else w_hat.reshape(1, -1)
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
    ],
)
def test_unsupported_bit_width_names_the_allowed_range(name, bits, allowed):
    with pytest.raises(ValueError, match=rf"bits={bits}; allowed: {allowed}$"):
        get_quantizer(name, bits)


def test_unknown_quantizer_lists_the_registered_ones():
    with pytest.raises(
        ValueError, match="unknown quantizer 'xnor'; allowed: dorefa, bwn, bwn-channel, ternary, uniform"
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
