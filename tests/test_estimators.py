"""Classical estimators: the fake-quantize backward against gradients written out by hand and autograd."""

import pytest
import torch

import metaquant as mq
from metaquant.estimators import EWGS, STE, Identity, fake_quantize
from metaquant.quantizers import BWN, QUANTIZERS, DoReFa, get_quantizer


def _shape(name):
    """A convolution's weight, or a linear layer's for ``uniform-group`` (2-D weights only)."""
    return (5, 36) if name == "uniform-group" else (5, 4, 3, 3)


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
    w = _w(4, shape=_shape(name)).float()
    assert torch.equal(fake_quantize(w, q), q(w.detach()))


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_fake_quantize_preprocessed_also_returns_the_detached_preprocessed_weight(name):
    q = get_quantizer(name, QUANTIZERS[name].min_bits)
    w = _w(6, shape=_shape(name)).float()
    w_hat, w_tilde = mq.estimators.fake_quantize_preprocessed(w, q)
    assert torch.equal(w_hat, q(w.detach())) and torch.equal(w_tilde, q.preprocess(w.detach()))
    assert w_hat.requires_grad and w_tilde.grad_fn is None  # no graph from W̃ back to W


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
        torch.empty(0, 4),  # an empty weight: no max at all
    ]


@pytest.mark.parametrize("estimator", [mq.STE(), mq.Identity(), mq.EWGS(delta=0.3)], ids=lambda e: e.name)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fake_quantize_many_equals_one_weight_at_a_time_to_the_bit(estimator, bits):
    q = mq.quantizers.DoReFa(bits)
    many = [w.clone().requires_grad_() for w in _weights()]
    one = [w.clone().requires_grad_() for w in _weights()]
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(w.shape, generator=g) for w in many]
    used = [True, True, False, True, True, True]  # the third Ŵ is not used by the loss

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
        mq.quantizers.DoReFa(1),
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


# --- subclasses: the one pass only for the formulas it replaces -----------------------------------------------
class _LayerNormalised(mq.STE):
    """Not element-wise: each weight's gradient divided by its own norm. The flag is not inherited."""

    def __call__(self, grad_w_hat, w_relaxed, w_hat):
        return super().__call__(grad_w_hat, w_relaxed, w_hat) / grad_w_hat.norm()


def test_the_one_pass_flags_hold_only_for_the_class_that_declares_them():
    class Quiet(DoReFa):
        pass

    class Declared(DoReFa):
        segmentable = True

    assert DoReFa.segmentable and Declared.segmentable and not Quiet.segmentable
    assert STE.elementwise and Identity.elementwise and EWGS.elementwise and not _LayerNormalised.elementwise


def test_an_estimator_subclass_that_is_not_element_wise_is_applied_weight_by_weight():
    # Oracle: fake_quantize_preprocessed of each weight alone, where the subclass's rule sees that weight only.
    q = DoReFa(1)
    many = [w.clone().requires_grad_() for w in _weights(2)[:4]]
    one = [w.clone().requires_grad_() for w in _weights(2)[:4]]
    out_many = mq.estimators.fake_quantize_many(many, [q] * 4, _LayerNormalised())
    out_one = [mq.estimators.fake_quantize_preprocessed(w, q, _LayerNormalised()) for w in one]
    sum((h.sin().sum() for h, _ in out_many), torch.zeros(())).backward()
    sum((h.sin().sum() for h, _ in out_one), torch.zeros(())).backward()
    for a, b in zip(many, one):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


class _Shifted(DoReFa):
    """DoReFa of ``W − 0.3``: preprocess, relaxed and calibration changed, backward_terms inherited."""

    def preprocess(self, w):
        return super().preprocess(w - 0.3)

    def relaxed(self, w):
        return super().relaxed(w - 0.3)

    def calibration(self, w):
        return super().calibration(w - 0.3)


def test_a_quantizer_subclass_keeps_its_formulas_in_the_one_pass_and_in_the_backward_pass():
    # Oracle: the subclass's own Q(A(W)) and, for the STE (whose gate is open for DoReFa), g_W = g_Ŵ ⊙ c(W) with
    # c written out from the shifted formula.
    q = _Shifted(1)
    ws = [w.clone().requires_grad_() for w in _weights(4)[1:4]]
    out = mq.estimators.fake_quantize_many(ws, [q] * len(ws))
    upstream = [torch.randn(w.shape, dtype=w.dtype) for w in ws]
    sum(((h * u).sum() for (h, _), u in zip(out, upstream)), torch.zeros(())).backward()
    for w, (w_hat, w_tilde), u in zip(ws, out, upstream):
        t = torch.tanh(w.detach() - 0.3)
        assert torch.equal(w_hat, q.quantize(q.preprocess(w.detach()))) and torch.equal(w_tilde, q.preprocess(w))
        torch.testing.assert_close(w.grad, u * (1 - t * t) / t.abs().max(), rtol=1e-6, atol=1e-7)
    single = _w(5)
    (grad,) = torch.autograd.grad(fake_quantize(single, q).sum(), single)
    torch.testing.assert_close(grad, q.calibration(single.detach()), rtol=1e-12, atol=1e-12)


def test_trainer_loss_is_the_models_own_with_a_quantizer_subclass_shared_by_layers():
    from torch import nn

    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
    for layer in mq.quantized_layers(model).values():
        layer.quantizer = _Shifted(1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    expected = torch.nn.functional.cross_entropy(model(x), y)  # the model's own forward pass, layer by layer
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert trainer.step(lambda: torch.nn.functional.cross_entropy(model(x), y)).item() == expected.item()


def test_trainer_applies_a_non_element_wise_estimator_subclass_weight_by_weight():
    # Oracle: the same network written with fake_quantize_preprocessed per weight, and torch.optim.SGD's step.
    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)))
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]  # w1, b1, w2, b2
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), estimator=_LayerNormalised())
    trainer.step(lambda: torch.nn.functional.cross_entropy(model(x), y))

    w1, b1, w2, b2 = params
    q = mq.quantizers.DoReFa(1)
    w1_hat = mq.estimators.fake_quantize_preprocessed(w1, q, _LayerNormalised())[0]
    w2_hat = mq.estimators.fake_quantize_preprocessed(w2, q, _LayerNormalised())[0]
    logits = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w1_hat, b1)), w2_hat, b2)
    torch.nn.functional.cross_entropy(logits, y).backward()
    reference = torch.optim.SGD(params, lr=0.1)
    reference.step()
    for got, want in zip(model.parameters(), params):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# --- torch.func.vmap: per-sample gradients --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bits",
    [
        ("dorefa", 1),
        ("dorefa", 2),
        ("bwn", 1),
        ("bwn-channel", 1),
        ("uniform", 3),
        ("uniform-channel", 3),
        ("uniform-group", 3),
    ],
)
def test_per_sample_gradients_by_vmap_equal_a_loop_over_samples(name, bits):
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(1)
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), mq.QuantConfig(name, bits))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):  # the oracle: autograd on each sample alone
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i], y[i]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-5, atol=1e-6)
    # the several-weights-at-once form has a rule too
    a, b = torch.randn(3, 4), torch.randn(5)
    q = DoReFa(1)

    def many(a, b, xi):
        (ha, _), (hb, _) = mq.estimators.fake_quantize_many([a, b], [q, q])
        return (ha @ xi).square().sum() + (hb * xi[0]).sum()

    batched = vmap(grad(many, argnums=(0, 1)), in_dims=(None, None, 0))(a, b, x)
    for i in range(len(x)):
        ga, gb = grad(many, argnums=(0, 1))(a, b, x[i])
        torch.testing.assert_close(batched[0][i], ga)
        torch.testing.assert_close(batched[1][i], gb)


def test_trainer_refuses_a_step_once_a_changed_quantizer_learns_a_step_the_optimizer_lacks():
    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(6, 3)), mq.QuantConfig("lsq", 4))
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(5, 6)
    trainer.step(lambda: model(x).sum())
    model[0].quantizer = mq.get_quantizer("lsq", 2)  # the same step Parameter, restarted: still trained
    step = model[0].weight_step.detach().clone()
    trainer.step(lambda: model(x).sum())
    assert not torch.equal(step, model[0].weight_step)
    model[0].quantizer = mq.get_quantizer("lsq-channel", 2)  # a new Parameter: the optimizer does not hold it
    with pytest.raises(ValueError, match=r"the optimizer does not hold 0\.weight_step"):
        trainer.step(lambda: model(x).sum())
