"""Classical estimators: the fake-quantize backward against gradients written out by hand and autograd."""

import pytest
import torch

from metaquant.estimators import EWGS, STE, Identity, fake_quantize
from metaquant.quantizers import BWN, QUANTIZERS, DoReFa, get_quantizer


def _w(seed=0, shape=(5, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.8).requires_grad_()


def test_dorefa_ste_gradient_is_grad_times_calibration():
    for k in (1, 2, 4):
        q = DoReFa(k)
        w = _w(k)
        g = torch.randn_like(w)
        (grad,) = torch.autograd.grad((fake_quantize(w, q, STE()) * g).sum(), w)
        t = torch.tanh(w.detach())
        c = (1 - t**2) / t.abs().max()  # written out independently of the library
        torch.testing.assert_close(grad, g * c, rtol=1e-12, atol=1e-12)


def test_dorefa_ste_matches_the_detach_trick_with_rounding_straight_through():
    q = DoReFa(2)
    w = _w(7)
    g = torch.randn_like(w)
    t = torch.tanh(w)
    w_tilde = t / (2 * t.abs().max().detach()) + 0.5
    x = 3 * w_tilde
    rounded = x + (torch.round(x) - x).detach()  # round with identity gradient
    reference = 2 * rounded / 3 - 1
    (expected,) = torch.autograd.grad((reference * g).sum(), w)
    (actual,) = torch.autograd.grad((fake_quantize(w, q) * g).sum(), w)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_bwn_ste_is_scale_times_gated_gradient():
    w = _w(1) * 1.5  # some |w| > 1 so the gate matters
    w.retain_grad()
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad((fake_quantize(w, BWN()) * g).sum(), w)
    a = w.detach().abs().mean()
    expected = a * g * (w.detach().abs() <= 1)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert (grad == 0).any()


def test_identity_estimator_has_no_gate():
    w = _w(2) * 2
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad((fake_quantize(w, BWN(), Identity()) * g).sum(), w)
    torch.testing.assert_close(grad, w.detach().abs().mean() * g, rtol=1e-12, atol=1e-12)


def test_ewgs_follows_its_formula():
    delta = 0.2
    q = DoReFa(1)
    w = _w(3)
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad((fake_quantize(w, q, EWGS(delta)) * g).sum(), w)
    t = torch.tanh(w.detach())
    x_n = t / t.abs().max()  # latent value in the quantized weight's units
    x_q = q(w.detach())
    c = (1 - t**2) / t.abs().max()
    expected = g * (1 + delta * torch.sign(g) * (x_n - x_q)) * c
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    # delta = 0 is the unclipped STE
    (grad0,) = torch.autograd.grad((fake_quantize(w, q, EWGS(0.0)) * g).sum(), w)
    (grad_id,) = torch.autograd.grad((fake_quantize(w, q, Identity()) * g).sum(), w)
    torch.testing.assert_close(grad0, grad_id)


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_fake_quantize_value_is_exactly_the_quantizer_output(name):
    q = get_quantizer(name, QUANTIZERS[name].min_bits)
    w = _w(4).float()
    assert torch.equal(fake_quantize(w, q), q(w.detach()))


@pytest.mark.parametrize("delta", [-1, True, float("nan"), "0.1"])
def test_ewgs_rejects_a_delta_that_is_not_a_number_at_least_zero(delta):
    with pytest.raises(ValueError, match=f"delta must be a number >= 0, got {delta!r}"):
        EWGS(delta)
