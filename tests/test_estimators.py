"""Classical estimators: the fake-quantize backward against gradients written out by hand and autograd."""

import pytest
import torch

import metaquant as mq
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
    with pytest.raises(ValueError, match=f"delta must be a finite number >= 0, got {delta!r}"):
        EWGS(delta)


# --- several weights at once ------------------------------------------------------------------------------
def _weights(seed=0):
    """Weights of the kinds a model holds: a channels-last convolution, a plain one, a matrix, a vector."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(8, 3, 3, 3, generator=g).to(memory_format=torch.channels_last),
        torch.randn(4, 8, 1, 1, generator=g) * 3,
        torch.randn(5, 7, generator=g) * 0.1,
        torch.randn(6, generator=g),
        torch.zeros(3, 2),  # DoReFa's all-zero weight: max|tanh W| is guarded
    ]


@pytest.mark.parametrize("estimator", [mq.STE(), mq.Identity(), mq.EWGS(delta=0.3)], ids=lambda e: e.name)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fake_quantize_many_equals_one_weight_at_a_time_to_the_bit(estimator, bits):
    q = mq.quantizers.DoReFa(bits)
    many = [w.clone().requires_grad_() for w in _weights()]
    one = [w.clone().requires_grad_() for w in _weights()]
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(w.shape, generator=g) for w in many]
    used = [True, True, False, True, True]  # the third Ŵ is not used by the loss

    out_many = mq.estimators.fake_quantize_many(many, [q] * len(many), estimator)
    out_one = [mq.estimators.fake_quantize_preprocessed(w, q, estimator) for w in one]
    for (h_many, t_many), (h_one, t_one), w in zip(out_many, out_one, many):
        assert torch.equal(h_many, h_one) and torch.equal(t_many, t_one)
        assert h_many.stride() == w.stride()  # Ŵ keeps W's layout (channels-last stays channels-last)
        assert not t_many.requires_grad
    sum(((h * u).sum() for (h, _), u, k in zip(out_many, upstream, used) if k), torch.zeros(())).backward()
    sum(((h * u).sum() for (h, _), u, k in zip(out_one, upstream, used) if k), torch.zeros(())).backward()
    for a, b, k in zip(many, one, used):
        assert (a.grad is None) == (not k) == (b.grad is None)
        if k:
            assert torch.equal(a.grad, b.grad)


def test_fake_quantize_many_groups_by_quantizer_and_leaves_the_others_weight_by_weight():
    """A mix: DoReFa at two bit widths (two groups), BWN per channel (not segmentable), a custom estimator."""

    class Halved(mq.estimators.ClassicalEstimator):  # not declared element-wise: weight by weight
        def __call__(self, grad_w_hat, w_relaxed, w_hat):
            return grad_w_hat / 2

    quantizers = [
        mq.quantizers.DoReFa(1),
        mq.quantizers.DoReFa(2),
        mq.quantizers.BWNPerChannel(),
        mq.quantizers.DoReFa(1),
        mq.quantizers.DoReFa(2),
    ]
    for estimator in (mq.STE(), Halved()):
        many = [w.clone().requires_grad_() for w in _weights(3)]
        one = [w.clone().requires_grad_() for w in _weights(3)]
        out_many = mq.estimators.fake_quantize_many(many, quantizers, estimator)
        out_one = [mq.estimators.fake_quantize_preprocessed(w, q, estimator) for w, q in zip(one, quantizers)]
        sum((h.sin().sum() for h, _ in out_many), torch.zeros(())).backward()
        sum((h.sin().sum() for h, _ in out_one), torch.zeros(())).backward()
        for (h_many, _), (h_one, _), a, b in zip(out_many, out_one, many, one):
            assert torch.equal(h_many, h_one) and torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="2 weight.*1 quantizer"):
        mq.estimators.fake_quantize_many(many[:2], quantizers[:1])


def test_segments_of_a_flat_vector_equal_each_weight_alone():
    q, ws = mq.quantizers.DoReFa(3), _weights(5)
    numels = [w.numel() for w in ws]
    flat = torch.cat([w.reshape(-1) for w in ws])
    pre = q.preprocess_segments(flat, numels)
    relaxed, scale, calibration = q.backward_terms_segments(flat, numels)
    for w, p, r, c in zip(ws, pre.split(numels), relaxed.split(numels), calibration.split(numels)):
        r1, s1, c1 = q.backward_terms(w.reshape(-1), q.preprocess(w.reshape(-1)))
        assert torch.equal(p, q.preprocess(w.reshape(-1))) and torch.equal(r, r1) and torch.equal(c, c1)
        assert s1.item() == 1.0
    assert scale is None
    with pytest.raises(NotImplementedError, match="bwn"):
        mq.quantizers.BWN().preprocess_segments(flat, numels)
