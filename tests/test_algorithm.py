"""MetaQuant's training step (Algorithm 1) against independent computations written out in the tests."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.quantizers import BWN, DoReFa


@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64, so equalities can be checked to 1e-12."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def batches(n, seed=0, in_shape=(1, 6, 6), classes=4, size=8):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *in_shape, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)
    ]


def conv_net(seed=0, bias=False, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4, bias=bias)]
    return nn.Sequential(*layers)


def closure(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_identity_meta_with_dorefa_and_sgd_is_ste_one_step_late(dtype):
    torch.set_default_dtype(dtype)
    k = 5
    data = batches(k + 1)
    ste_model = mq.quantize_(conv_net(), mq.QuantConfig("dorefa", 1))
    mq_model = copy.deepcopy(ste_model)
    ste = mq.Trainer(ste_model, torch.optim.SGD(ste_model.parameters(), lr=0.05))
    meta = mq.MetaQuant(mq_model, torch.optim.SGD(mq_model.parameters(), lr=0.05), mq.IdentityMeta())
    for x, y in data[:k]:
        ste.step(closure(ste_model, x, y))
    for x, y in data[: k + 1]:
        meta.step(closure(mq_model, x, y))
    for a, b in zip(ste_model.parameters(), mq_model.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)  # to the bit
    assert not torch.equal(ste_model[0].weight, conv_net()[0].weight)  # it did train


OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=5e-4)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


@pytest.mark.parametrize("through", ["residual", "exact"])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_committed_weight_is_the_look_ahead_used_in_the_forward_pass(cls, kwargs, through):
    model = mq.quantize_(conv_net(bias=True, bn=True), mq.QuantConfig("bwn", 1))  # BWN: W̃ = A(W) = W
    opt = cls(model.parameters(), **kwargs)
    trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=5, nonlinearity="tanh"), through=through)
    layers = mq.quantized_layers(model)
    from_torch = {}
    opt.register_step_post_hook(
        lambda o, a, kw: from_torch.update({n: lyr.weight.detach().clone() for n, lyr in layers.items()})
    )
    for t, (x, y) in enumerate(batches(5, seed=1)):
        trainer.step(closure(model, x, y))
        records = trainer.state_dict()["records"]
        if t == 0:
            continue
        for name, layer in layers.items():
            # W̃^t recorded from the forward pass is W^t itself (BWN); the committed weight equals it exactly
            assert torch.equal(layer.weight.detach(), records[name]["w_tilde"])
            # and the user's torch.optim step computed the same value (up to rounding)
            torch.testing.assert_close(from_torch[name], layer.weight.detach(), rtol=1e-10, atol=1e-12)


def _quantities_of_step_zero(w0, x0, y0, q):
    w_hat0 = q(w0).requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(x0 @ w_hat0.T, y0), w_hat0)
    return g0, q.preprocess(w0)


START_AT_STE = [
    lambda: mq.FCGrad(hidden=6, init_scheme="ste"),
    lambda: mq.FCGrad(hidden=6, num_layers=3, nonlinearity="tanh", init_scheme="ste"),
    lambda: mq.MultiFC(hidden=6, init_scheme="ste"),
    lambda: mq.MultiFC(hidden=6, nonlinearity="relu", init_scheme="ste"),
    lambda: mq.LSTMFC(hidden=4, init_scheme="ste"),
    lambda: mq.LSTMFC(hidden=4, num_lstm=2, nonlinearity="tanh", init_scheme="ste"),
]


@pytest.mark.parametrize("make_meta", START_AT_STE)
@pytest.mark.parametrize("opt", [(torch.optim.SGD, dict(lr=0.05)), (torch.optim.Adam, dict(lr=1e-2))])
def test_a_meta_quantizer_started_at_the_ste_takes_the_ste_step_first(make_meta, opt):
    # Oracle: IdentityMeta, whose MetaQuant step is the STE one step late (the test above); the first weight
    # update (iteration 1) must be the same to the bit, the second differs once φ has learned.
    cls, kwargs = opt
    data = batches(3, seed=4)
    models = [mq.quantize_(conv_net(seed=2), mq.QuantConfig("dorefa", 1)) for _ in range(2)]
    metas = [mq.IdentityMeta(), make_meta()]
    trainers = [mq.MetaQuant(m, cls(m.parameters(), **kwargs), meta) for m, meta in zip(models, metas)]
    for t, (x, y) in enumerate(data):
        for model, trainer in zip(models, trainers):
            trainer.step(closure(model, x, y))
        same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
        assert same == (t < 2), t  # iterations 0 and 1 equal, 2 not: φ moved after iteration 1
    assert any(p.abs().sum() > 0 for p in metas[1].parameters())


@pytest.mark.parametrize("make_meta", START_AT_STE)
def test_a_meta_quantizer_started_at_the_ste_returns_its_input_gradient(make_meta):
    meta = make_meta()
    g, w_tilde = torch.randn(50) * 10.0 ** torch.randint(-6, 3, (50,)), torch.rand(50)
    out, _ = meta(g, w_tilde)
    assert torch.equal(out, g)
    # ... and φ receives a gradient from the first step: the last layer's, non-zero
    (meta(g, w_tilde)[0] * torch.randn(50)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in meta.parameters())


@pytest.mark.parametrize(
    "make_meta",
    [
        lambda: mq.FCGrad(hidden=4, nonlinearity="tanh", init_scheme="paper"),
        lambda: mq.FCGrad(hidden=4, init_scheme="paper"),
        lambda: mq.MultiFC(hidden=4, num_layers=3, nonlinearity="relu", init_scheme="paper"),
        lambda: mq.MultiFC(hidden=4, init_scheme="paper"),
        lambda: mq.LSTMFC(hidden=3, num_lstm=2, init_scheme="paper"),
        lambda: mq.FCGrad(hidden=4, init_scheme="ste"),
        lambda: mq.FCGrad(hidden=4, nonlinearity="tanh", init_scheme="ste"),
        lambda: mq.MultiFC(hidden=4, init_scheme="ste"),
        lambda: mq.MultiFC(hidden=4, num_layers=3, nonlinearity="relu", init_scheme="ste"),
        lambda: mq.LSTMFC(hidden=3, init_scheme="ste"),
    ],
    ids=[
        "fcgrad-tanh",
        "fcgrad",
        "multifc-relu",
        "multifc",
        "lstmfc",
        "fcgrad-ste-start",
        "fcgrad-tanh-ste-start",
        "multifc-ste-start",
        "multifc-relu-ste-start",
        "lstmfc-ste-start",
    ],
)
def test_meta_gradient_matches_finite_differences(make_meta):
    torch.manual_seed(3)
    q, lr = DoReFa(1), 0.5
    model = mq.quantize_(nn.Sequential(nn.Linear(5, 3, bias=False)), mq.QuantConfig("dorefa", 1)).double()
    meta = make_meta().double()
    # SGD with lr 0 on φ: φ stays put and its gradient stays readable after the step
    trainer = mq.MetaQuant(
        model, torch.optim.SGD(model.parameters(), lr=lr), meta, meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0)
    )
    (x0, y0), (x1, y1) = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    w0 = model[0].weight.detach().clone()
    trainer.step(lambda: F.cross_entropy(model(x0), y0))
    trainer.step(lambda: F.cross_entropy(model(x1), y1))
    analytic = [p.grad.clone() for p in meta.parameters()]

    # The loss as a function of φ, written out: Algorithm 1 steps 1-3 with Q replaced by its STE linearization
    # around the forward value (so that finite differences see what back-propagation differentiates).
    g0, w_tilde0 = _quantities_of_step_zero(w0, x0, y0, q)
    c0 = q.calibration(w0)

    def look_ahead():
        g_tilde, _ = meta(g0.reshape(-1), w_tilde0.reshape(-1), None)
        return w0 - lr * g_tilde.reshape(w0.shape) * c0

    with torch.no_grad():
        w1_ref = look_ahead()

    def loss_of_phi():
        w1 = look_ahead()
        w_hat = q(w1_ref) + q.calibration(w1_ref) * (w1 - w1_ref)
        return F.cross_entropy(x1 @ w_hat.T, y1)

    eps = 1e-6
    with torch.no_grad():
        for p, grad in zip(meta.parameters(), analytic):
            numeric = torch.zeros_like(p)
            for i in range(p.numel()):
                flat = p.view(-1)
                flat[i] += eps
                up = loss_of_phi()
                flat[i] -= 2 * eps
                down = loss_of_phi()
                flat[i] += eps
                numeric.view(-1)[i] = (up - down) / (2 * eps)
            torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in analytic)


@pytest.mark.parametrize("order", ["paper", "original"])
def test_iteration_zero_keeps_quantized_weights(order):
    model = mq.quantize_(conv_net(bias=True, bn=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4), step_order=order)
    x, y = batches(1)[0]
    trainer.step(closure(model, x, y))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if order == "paper":
        assert moved == {"0.bias", "1.weight", "1.bias", "4.bias"}  # biases and BatchNorm, no quantized weight
    else:
        assert moved == set()  # the original code updates nothing at t = 0


def test_original_order_evaluates_the_committed_weight_moved_once_more():
    torch.manual_seed(5)
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 3)), mq.QuantConfig("bwn", 1))
    layer = model[0]
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=4, nonlinearity="tanh"), step_order="original")
    outputs = []
    layer.register_forward_hook(lambda m, i, o: outputs.append(o[-1].detach().clone()))
    data = [(torch.cat([torch.randn(5, 4), torch.zeros(1, 4)]), torch.randint(0, 3, (6,))) for _ in range(5)]

    # G_0, B_0: the plain STE gradients of iteration 0, computed independently
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    w_leaf, b_leaf = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    x0, y0 = data[0]
    loss0 = F.cross_entropy(F.linear(x0, mq.fake_quantize(w_leaf, BWN()), b_leaf), y0)
    g_w0, g_b0 = torch.autograd.grad(loss0, [w_leaf, b_leaf])

    committed_w, committed_b = [w0], [b0]
    forward_w = []
    for x, y in data:
        trainer.step(closure(model, x, y))
        forward_w.append(trainer.state_dict()["records"]["0"]["w_tilde"])  # BWN: W̃ is the forward weight
        committed_w.append(layer.weight.detach().clone())
        committed_b.append(layer.bias.detach().clone())
    # at t = 1 the forward weight is W_0 − α·G_0; the forward bias b_0 − α·B_0 (the output on a zero input)
    torch.testing.assert_close(forward_w[1], w0 - lr * g_w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs[1], b0 - lr * g_b0, rtol=0, atol=1e-12)
    for t in range(2, 5):
        # later: the committed weight moved once more along the last committed step, 2·W_{t−1} − W_{t−2}
        torch.testing.assert_close(forward_w[t], 2 * committed_w[t] - committed_w[t - 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(outputs[t], 2 * committed_b[t] - committed_b[t - 1], rtol=0, atol=1e-12)
    # and the paper's order would have used the committed weight instead
    assert not torch.allclose(forward_w[4], committed_w[5])


def test_lstm_state_is_carried_detached_and_restored():
    data = batches(6, seed=7)
    model = mq.quantize_(conv_net(seed=2))
    reference = copy.deepcopy(model)

    def make(m):
        torch.manual_seed(11)  # the same φ at the start of both runs
        return mq.MetaQuant(m, torch.optim.SGD(m.parameters(), lr=0.05), mq.LSTMFC(hidden=3, num_lstm=2))

    trainer = make(model)
    states = []
    for x, y in data[:3]:
        trainer.step(closure(model, x, y))
        states.append(trainer.state_dict()["records"]["0"]["meta_state"])
    assert states[0] is None  # nothing before the first meta step
    h, c = states[1]
    assert h.shape == c.shape == (2, model[0].weight.numel(), 3)
    assert not h.requires_grad and h.grad_fn is None
    assert not torch.equal(states[2][0], h)  # carried and advanced

    # a checkpoint restored into a fresh trainer continues exactly like the uninterrupted one
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": trainer.optimizer.state_dict(), "trainer": trainer.state_dict()}
    )
    ref_trainer = make(reference)
    for x, y in data[:3]:
        ref_trainer.step(closure(reference, x, y))
    for x, y in data[3:]:
        ref_trainer.step(closure(reference, x, y))
    resumed = mq.quantize_(conv_net(seed=99))
    resumed.load_state_dict(saved["model"])
    resumed_trainer = make(resumed)
    resumed_trainer.optimizer.load_state_dict(saved["opt"])
    resumed_trainer.load_state_dict(saved["trainer"])
    for x, y in data[3:]:
        resumed_trainer.step(closure(resumed, x, y))
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref_trainer.meta.parameters(), resumed_trainer.meta.parameters()):
        assert torch.equal(a, b)


def test_frozen_meta_quantizer_stops_learning():
    model = mq.quantize_(conv_net())
    trainer = mq.MetaQuant(
        model, torch.optim.SGD(model.parameters(), lr=0.05), mq.MultiFC(hidden=4), freeze_meta_epoch=1
    )
    data = batches(3)
    trainer.set_epoch(0)
    for x, y in data:
        trainer.step(closure(model, x, y))
    learned = [p.detach().clone() for p in trainer.meta.parameters()]
    assert trainer.state_dict()["iteration"] == 3
    trainer.set_epoch(1)
    weights = model[0].weight.detach().clone()
    for x, y in data:
        trainer.step(closure(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(learned, trainer.meta.parameters()))
    assert not torch.equal(weights, model[0].weight)  # the network still trains


def test_meta_learning_rate_follows_the_base_schedule():
    model = mq.quantize_(conv_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    trainer = mq.MetaQuant(model, opt, mq.MultiFC(hidden=4), meta_lr=1e-3)
    x, y = batches(1)[0]
    trainer.step(closure(model, x, y))
    sched.step()
    trainer.step(closure(model, x, y))
    assert trainer.meta_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(step_order="reverse"), ValueError, "step_order 'reverse' is not supported; allowed: paper, original"),
        (dict(through="approx"), ValueError, "through 'approx' is not supported; allowed: residual, exact"),
        (dict(meta_lr=0), ValueError, "meta_lr must be a finite number > 0"),
        (dict(meta_lr=True), ValueError, "meta_lr must be a finite number > 0, got True"),
        (dict(meta_weight_decay=False), ValueError, "meta_weight_decay must be a finite number >= 0, got False"),
        (dict(freeze_meta_epoch=True), ValueError, "freeze_meta_epoch must be an integer >= 0 or None, got True"),
        (dict(meta=mq.STE()), TypeError, "meta must be a MetaQuantizer"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    model = mq.quantize_(conv_net())
    args = dict(meta=mq.MultiFC(hidden=2)) | kwargs
    with pytest.raises(error, match=message):
        mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)


def test_unsupported_optimizer_and_untrained_weights_are_refused():
    model = mq.quantize_(conv_net())
    with pytest.raises(ValueError, match="RMSprop is not supported; supported: torch.optim.SGD"):
        mq.MetaQuant(model, torch.optim.RMSprop(model.parameters()), mq.MultiFC())
    with pytest.raises(ValueError, match="3.weight requires grad but is not in the optimizer.*filter_fn"):
        mq.MetaQuant(model, torch.optim.SGD(model[0].parameters(), lr=0.1), mq.MultiFC())
    with pytest.raises(ValueError, match="call metaquant.quantize_"):
        plain = conv_net()
        mq.MetaQuant(plain, torch.optim.SGD(plain.parameters(), lr=0.1), mq.MultiFC())


def test_a_weight_tied_between_quantized_layers_takes_one_look_ahead_and_the_sum_of_its_gradients():
    # Oracle: one layer used twice. Tying the weight of two layers must train exactly like it.
    torch.manual_seed(11)
    shared = nn.Linear(4, 4, bias=False)
    once = mq.quantize_(nn.Sequential(shared, nn.Tanh(), shared))
    tied = mq.quantize_(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False)))
    tied[2].weight = tied[0].weight
    with torch.no_grad():
        tied[0].weight.copy_(shared.weight)
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    runs = []
    for model in (once, tied):
        torch.manual_seed(3)
        trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
        losses = [trainer.step(closure(model, x, y)) for _ in range(4)]
        runs.append((torch.stack(losses), model[0].weight.detach().clone(), trainer.state_dict()["records"]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    assert set(runs[1][2]) == {"0", "2"} and runs[1][2]["2"]["grad_w_hat"] is None  # one record per weight


def test_tied_weights_quantized_differently_or_used_in_full_precision_are_refused():
    tied = mq.quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), filter_fn=lambda m, n: n == "0")
    mq.quantize_(tied, mq.QuantConfig("bwn"), filter_fn=lambda m, n: n == "1")
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="quantized differently"):
        mq.MetaQuant(tied, torch.optim.SGD(tied.parameters(), lr=0.1), mq.MultiFC())
    mixed = mq.quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), filter_fn=lambda m, n: n == "0")
    mixed[1].weight = mixed[0].weight
    with pytest.raises(ValueError, match="also used by a layer that is not quantized"):
        mq.MetaQuant(mixed, torch.optim.SGD(mixed.parameters(), lr=0.1), mq.MultiFC())


def test_exact_adam_derivative_is_finite_where_a_gradient_was_always_zero():
    torch.manual_seed(4)
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 3, bias=False)))
    trainer = mq.MetaQuant(model, torch.optim.Adam(model.parameters(), lr=1e-2), mq.MultiFC(hidden=4), through="exact")
    x = torch.randn(6, 4)
    x[:, 0] = 0  # input 0 is dead: the gradient of every weight reading it is exactly 0
    y = torch.randint(0, 3, (6,))
    for _ in range(3):
        trainer.step(closure(model, x, y))
    assert all(torch.isfinite(p).all() for p in trainer.meta.parameters())
    assert trainer.skipped_steps == 0


def test_layers_left_in_full_precision_train_normally():
    model = mq.quantize_(conv_net(bias=True), filter_fn=lambda m, name: name == "0")
    first = model[3].weight.detach().clone()
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    x, y = batches(1)[0]
    trainer.step(closure(model, x, y))
    assert type(model[3]) is nn.Linear and not torch.equal(first, model[3].weight)


@pytest.mark.slow
def test_real_fashion_mnist_metaquant_run(fashion_subset, pretrained_resnet20):
    torch.set_default_dtype(torch.float32)
    train, test, info = fashion_subset
    state_dict, _ = pretrained_resnet20
    model = mq.models.resnet20(num_classes=info.num_classes, in_channels=info.in_channels)
    model.load_state_dict(state_dict)
    mq.quantize_(model, mq.QuantConfig("dorefa", 1))
    torch.manual_seed(0)
    meta = mq.MultiFC(hidden=100)
    before = [p.detach().clone() for p in meta.parameters()]
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=1e-3), meta, meta_lr=1e-3)
    state = mq.fit(model, trainer, train, test, epochs=1, schedule=lambda e: 1.0, progress=False)
    assert state.iteration == 100
    assert state.last_acc > 40.0  # chance is 10%; 1-bit weights on every layer, 100 steps
    assert all(not torch.equal(a, b) for a, b in zip(before, meta.parameters()))


def test_learning_rate_is_read_from_the_live_optimizer_after_load_state_dict():
    model = mq.quantize_(nn.Sequential(nn.Linear(4, 3, bias=False)), mq.QuantConfig("bwn", 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = mq.MetaQuant(model, opt, mq.IdentityMeta())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    trainer.step(closure(model, x, y))
    g0 = trainer.state_dict()["records"]["0"]["grad_w_hat"]
    opt.load_state_dict(opt.state_dict())  # as a resumed run does: new param-group dicts
    opt.param_groups[0]["lr"] = 0.01  # as a schedule does
    w0 = model[0].weight.detach().clone()
    trainer.step(closure(model, x, y))
    # identity meta, BWN (c = 1): the look-ahead is W0 − 0.01·g_Ŵ^0, recorded as W̃ (= W for BWN)
    torch.testing.assert_close(trainer.state_dict()["records"]["0"]["w_tilde"], w0 - 0.01 * g0, rtol=0, atol=1e-15)


# --- one meta call for all layers ---------------------------------------------------------------------------
class _PerLayerMax(mq.IdentityMeta):
    """Not coordinate-wise: each layer's g_Ŵ divided by its own largest magnitude. Called layer by layer."""

    def forward(self, grad_w_hat, w_tilde, state=None):
        return grad_w_hat / grad_w_hat.abs().max(), None


class _OwnLSTMFC(mq.LSTMFC):
    """A subclass, not known to be coordinate-wise: called layer by layer, with its state per layer."""


def wide_net(seed=0):
    """Layers of several shapes, channels-last convolutions among them (their flat order is the memory order)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=True),
        nn.ReLU(),
        nn.Conv2d(3, 2, 1),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 4, bias=False),
    )
    return mq.layout.apply_memory_format(mq.quantize_(net), torch.channels_last)


@pytest.mark.parametrize("step_order", ["paper", "original"])
@pytest.mark.parametrize(
    "make_meta",
    [
        lambda: mq.FCGrad(hidden=4),
        lambda: mq.MultiFC(hidden=4),
        lambda: mq.MultiFC(hidden=4, nonlinearity="tanh"),
        lambda: mq.LSTMFC(hidden=3),
        lambda: mq.LSTMFC(hidden=3, num_lstm=2, nonlinearity="relu"),
        lambda: _PerLayerMax(),
        lambda: _OwnLSTMFC(hidden=3, num_lstm=2),
    ],
    ids=["fc-grad", "multifc", "multifc-tanh", "lstmfc", "lstmfc-2", "per-layer-subclass", "lstmfc-subclass"],
)
def test_one_meta_call_for_all_layers_equals_a_call_per_layer(make_meta, step_order):
    # Oracle: from the per-layer records of iteration t−1, call the meta quantizer on each layer alone, form
    # g_W = M_φ(g_Ŵ, W̃) ⊙ c(W) and the committed weight W − α·π(g_W) (plain SGD: π = identity, and for the
    # original order the commit is the same); compare with what the batched step did, weights and LSTM states.
    model = wide_net()
    lr = 0.05
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=lr), make_meta(), step_order=step_order)
    for x, y in batches(3, seed=1):
        before = copy.deepcopy(trainer.state_dict())
        meta = copy.deepcopy(trainer.meta)  # φ^{t−1}: g_W is computed before the meta quantizer's step
        weights = {name: layer.weight.detach().clone() for name, layer in trainer.layers.items()}
        trainer.step(closure(model, x, y))
        if before["iteration"] == 0:
            continue
        for name, layer in trainer.layers.items():
            record = before["records"][name]
            grad_w_tilde, state = meta(
                record["grad_w_hat"].reshape(-1), record["w_tilde"].reshape(-1), record["meta_state"]
            )
            grad_w = grad_w_tilde.reshape(layer.weight.shape) * layer.quantizer.calibration(weights[name])
            torch.testing.assert_close(layer.weight.detach(), weights[name] - lr * grad_w, rtol=0, atol=1e-12)
            if state is not None:
                after = trainer.state_dict()["records"][name]["meta_state"]
                for mine, theirs in zip(after, state):
                    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def test_checkpointed_records_do_not_depend_on_the_memory_layout():
    # The records are saved in the weight's logical order: a channels-last run resumes in NCHW exactly.
    x, y = batches(1, seed=2)[0]
    runs = {}
    for fmt in (torch.channels_last, torch.contiguous_format):
        model = mq.layout.apply_memory_format(wide_net(), fmt)
        torch.manual_seed(5)
        trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.05), mq.LSTMFC(hidden=3))
        for _ in range(3):
            trainer.step(closure(model, x, y))
        runs[fmt] = trainer.state_dict()["records"]
    for name, record in runs[torch.channels_last].items():
        for key in ("grad_w_hat", "w_tilde"):
            torch.testing.assert_close(record[key], runs[torch.contiguous_format][name][key], rtol=0, atol=1e-12)
        for a, b in zip(record["meta_state"], runs[torch.contiguous_format][name]["meta_state"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_layer_the_loss_does_not_use_keeps_its_weight_and_records():
    torch.manual_seed(6)
    model = mq.quantize_(nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.LSTMFC(hidden=3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for branch in ("a", "b", "a", "a"):
        kept_w = model["b"].weight.detach().clone()
        kept = copy.deepcopy(trainer.state_dict()["records"]["b"])
        trainer.step(lambda branch=branch: F.cross_entropy(model[branch](x), y))
        if branch == "a":
            assert torch.equal(model["b"].weight, kept_w)
            if kept["grad_w_hat"] is not None:
                after = trainer.state_dict()["records"]["b"]
                assert torch.equal(after["grad_w_hat"], kept["grad_w_hat"])
                assert all(torch.equal(s, k) for s, k in zip(after["meta_state"], kept["meta_state"]))
    assert trainer.iteration == 4
    with pytest.raises(RuntimeError, match="does not depend on any quantized layer"):
        trainer.step(lambda: torch.zeros((), requires_grad=True) * 1.0)


def test_frozen_quantized_layers_are_skipped_and_keep_their_weights(caplog):
    model = mq.quantize_(conv_net())
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    with caplog.at_level("INFO", logger="metaquant.algorithm"):
        trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    assert "frozen quantized layer(s) keep their weights: 0" in caplog.text
    linear = model[3].weight.detach().clone()
    for x, y in batches(3):
        trainer.step(closure(model, x, y))
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[3].weight, linear)
    assert list(trainer.state_dict()["records"]) == ["3"]


def test_a_layer_unused_at_the_first_meta_step_keeps_its_initial_lstm_state():
    torch.manual_seed(7)
    model = mq.quantize_(nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.LSTMFC(hidden=3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    trainer.step(lambda: F.cross_entropy(model["a"](x) + model["b"](x), y))  # t = 0 records both layers
    trainer.step(lambda: F.cross_entropy(model["b"](x), y))  # t = 1 does not use "a"
    h, c = trainer.state_dict()["records"]["a"]["meta_state"]
    assert not h.any() and not c.any()  # the initial state, as before its first meta step
    h_b, _ = trainer.state_dict()["records"]["b"]["meta_state"]
    assert h_b.abs().sum() > 0


@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.AdamW, {})])
def test_an_optimizer_subclass_that_keeps_the_update_rule_trains_as_its_parent(base, kwargs):
    class Defaults(base):  # e.g. one that only sets defaults
        pass

    runs = []
    for cls in (base, Defaults):
        model = mq.quantize_(conv_net(bias=True))
        torch.manual_seed(1)
        trainer = mq.MetaQuant(model, cls(model.parameters(), **kwargs), mq.MultiFC(hidden=4))
        for x, y in batches(3):
            trainer.step(closure(model, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_an_optimizer_subclass_that_changes_its_step_is_refused_by_name(base):
    class Clipped(base):
        def step(self, closure=None):
            return super().step(closure)

    model = mq.quantize_(conv_net())
    with pytest.raises(ValueError, match=f"Clipped overrides {base.__name__}.step, so its update rule may not be"):
        mq.MetaQuant(model, Clipped(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))


@pytest.mark.parametrize("config", [mq.QuantConfig("dorefa", 1), mq.QuantConfig("lsq", 4)], ids=["dorefa", "lsq"])
def test_metaquant_refuses_to_go_on_when_the_model_holds_new_weights(config):
    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 3)), config)
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    x = torch.randn(5, 4)
    trainer.step(lambda: model(x).sum())
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new Parameters: the optimizer and MetaQuant hold the old ones
    with pytest.raises(RuntimeError, match=r"layer 0 was replaced after MetaQuant was built .*build the optimizer"):
        trainer.step(lambda: model(x).sum())


# Finer scales and learned steps: uniform per output channel, per group of inputs, LSQ's learned step, DoReFa per
# output channel.
FINE_SCALES = [
    ("uniform-channel", 3, None),
    ("uniform-group", 4, 4),
    ("lsq", 3, None),
    ("lsq-channel", 3, None),
    ("dorefa-channel", 2, None),
]


@pytest.mark.parametrize("name,bits,group_size", FINE_SCALES, ids=[c[0] for c in FINE_SCALES])
def test_finer_scales_take_the_oracle_meta_step_and_train_with_every_method(name, bits, group_size):
    torch.manual_seed(5)
    config = mq.QuantConfig(name, bits, group_size=group_size)
    model = mq.quantize_(nn.Sequential(nn.Linear(10, 4, bias=False)), config).double()
    layer, lr = model[0], 0.1
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=lr), mq.MultiFC(hidden=6, init_scheme="ste"))
    (x0, y0), (x1, y1) = [(torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(2)]
    w0, q0 = layer.weight.detach().clone(), layer.quantizer
    w_hat0 = q0(w0).requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(x0 @ w_hat0.T, y0), w_hat0)
    trainer.step(lambda: F.cross_entropy(model(x0), y0))  # t = 0: W stays (a learned step moves, as a bias would)
    assert torch.equal(layer.weight.detach(), w0)
    c = layer.quantizer.calibration(w0)  # c(W) of step 1, with the step as it is now
    trainer.step(lambda: F.cross_entropy(model(x1), y1))
    # the STE start: M_φ(g, ·) = g at step 1, so W^1 = W^0 − α·g_Ŵ^0 ⊙ c(W^0) (Eq. 4-6), committed as it is
    torch.testing.assert_close(layer.weight.detach(), w0 - lr * g0 * c, rtol=1e-12, atol=1e-15)

    for make in (
        lambda m, o: mq.Trainer(m, o),
        lambda m, o: mq.Trainer(m, o, mq.EWGS(1e-2)),
        lambda m, o: mq.MetaQuant(m, o, mq.MultiFC(hidden=6, nonlinearity="tanh")),
        lambda m, o: mq.MetaQuant(m, o, mq.LSTMFC(hidden=4)),
    ):
        torch.manual_seed(5)
        model = mq.quantize_(nn.Sequential(nn.Linear(10, 4, bias=False)), config).double()
        trainer, first = make(model, torch.optim.SGD(model.parameters(), lr=lr)), model.state_dict()
        first = {k: v.clone() for k, v in first.items()}
        losses = [trainer.step(lambda model=model: F.cross_entropy(model(x1), y1)) for _ in range(4)]
        assert torch.isfinite(torch.stack(losses)).all()
        assert all(not torch.equal(first[k], v) for k, v in model.state_dict().items())  # weights and steps move


def test_metaquant_takes_a_quantizer_changed_between_steps_and_refuses_what_it_cannot_train():
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 3)), mq.QuantConfig("lsq", 4))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    x = torch.randn(5, 6)
    seen = []
    for _ in range(2):
        trainer.step(lambda: model(x).sum())
    model[0].quantizer = mq.get_quantizer("lsq", 2)  # fewer bits: the same step Parameter, restarted in place

    def closure():
        seen.append(model[0].forward_params()[0].detach())  # the Ŵ the step computes with
        return model(x).sum()

    trainer.step(closure)
    assert seen[0].unique().numel() <= 4  # 2 bits: the new quantizer's levels
    model[0].quantizer = mq.get_quantizer("lsq-channel", 2)  # a new step Parameter the optimizer does not hold
    with pytest.raises(ValueError, match=r"the optimizer does not hold 0\.weight_step"):
        trainer.step(lambda: model(x).sum())


def test_metaquant_refuses_tied_layers_given_different_quantizers_between_steps():
    emb, out = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    out.weight = emb.weight
    net = mq.quantize_(nn.ModuleDict({"emb": emb, "out": out}), mq.QuantConfig("uniform", 4), include=("embedding",))
    trainer = mq.MetaQuant(net, torch.optim.SGD(net.parameters(), lr=0.1), mq.MultiFC(hidden=4))
    tokens = torch.tensor([[0, 1, 2]])
    trainer.step(lambda: net["out"](net["emb"](tokens)).sum())
    net["out"].quantizer = mq.get_quantizer("uniform", 3)
    with pytest.raises(RuntimeError, match=r"share one weight but are now quantized differently"):
        trainer.step(lambda: net["out"](net["emb"](tokens)).sum())


# --- what a saved state must agree on --------------------------------------------------------------------------
def _stepped_state(meta, steps=3):
    model = mq.quantize_(conv_net())
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), meta)
    for x, y in batches(steps):
        trainer.step(closure(model, x, y))
    return trainer.state_dict()


@pytest.mark.parametrize(
    "saved,loading,message",
    [
        (lambda: mq.MultiFC(4, init_scheme="paper"), lambda: mq.MultiFC(4), "init_scheme='paper', .* uses 'ste'"),
        (lambda: mq.FCGrad(4), lambda: mq.FCGrad(4, init_scheme="paper"), "init_scheme='ste', .* uses 'paper'"),
        (lambda: mq.LSTMFC(3, init_scheme="paper"), lambda: mq.LSTMFC(3), "init_scheme='paper', .* uses 'ste'"),
        (lambda: mq.MultiFC(4), lambda: mq.MultiFC(4, nonlinearity="tanh"), "nonlinearity='none', .* uses 'tanh'"),
        (lambda: mq.FCGrad(4), lambda: mq.MultiFC(4), "meta_quantizer='FCGrad', .* uses 'MultiFC'"),
    ],
    ids=["multifc-scheme", "fc-grad-scheme", "lstmfc-scheme", "nonlinearity", "kind"],
)
def test_a_state_of_a_meta_quantizer_computing_another_function_is_refused(saved, loading, message):
    # φ's shapes agree in each pair, so the parameters alone would load; the meta outputs would differ.
    state = _stepped_state(saved())
    model = mq.quantize_(conv_net())
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), loading())
    before = copy.deepcopy(trainer.meta.state_dict())
    with pytest.raises(ValueError, match=f"MetaQuant state was saved with {message}"):
        trainer.load_state_dict(state)
    assert trainer.iteration == 0 and all(torch.equal(before[k], v) for k, v in trainer.meta.state_dict().items())


def test_a_state_saved_before_the_settings_were_recorded_is_one_of_the_paper_start():
    # Such a state does not tell its kind or nonlinearity (φ's shapes are checked), and its start was the
    # paper's, the only one of that time: loaded into a meta quantizer started at the STE, it would compute
    # another function.
    state = _stepped_state(mq.MultiFC(4, init_scheme="paper"))
    for key in ("meta_quantizer", "init_scheme", "nonlinearity"):
        del state[key]

    def trainer_with(meta):
        model = mq.quantize_(conv_net())
        return mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), meta)

    with pytest.raises(ValueError, match="saved with init_scheme='paper', this trainer uses 'ste'"):
        trainer_with(mq.MultiFC(4)).load_state_dict(state)
    for meta in (mq.MultiFC(4, init_scheme="paper"), mq.MultiFC(4, nonlinearity="tanh", init_scheme="paper")):
        trainer = trainer_with(meta)
        trainer.load_state_dict(state)
        assert trainer.iteration == 3


def test_a_meta_quantizer_without_those_settings_saves_none_and_loads():
    state = _stepped_state(mq.IdentityMeta())
    assert (state["meta_quantizer"], state["init_scheme"], state["nonlinearity"]) == ("IdentityMeta", None, None)
    model = mq.quantize_(conv_net())
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.IdentityMeta())
    trainer.load_state_dict(state)
    assert trainer.iteration == 3


def test_a_run_resumed_after_a_hand_decayed_rate_keeps_the_meta_rate_of_the_uninterrupted_run():
    # γ_t = γ·α_t/α_0: without a scheduler the group has no initial_lr, so α_0 must come from the checkpoint,
    # not from the rate of the optimizer the resumed trainer is built with.
    data = batches(7, seed=3)

    def make(model):
        torch.manual_seed(5)  # the same φ at the start of both runs
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return opt, mq.MetaQuant(model, opt, mq.MultiFC(hidden=4), meta_lr=1e-2)

    model = mq.quantize_(conv_net(bn=True))
    opt, trainer = make(model)
    for i, (x, y) in enumerate(data[:4]):
        if i == 2:
            for group in opt.param_groups:
                group["lr"] *= 0.1  # decayed by hand
        trainer.step(closure(model, x, y))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "trainer": trainer.state_dict()})
    for x, y in data[4:]:
        trainer.step(closure(model, x, y))

    resumed = mq.quantize_(conv_net(seed=9, bn=True))
    resumed.load_state_dict(saved["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(saved["opt"])  # its rate is the decayed one, 0.01
    torch.manual_seed(5)
    resumed_trainer = mq.MetaQuant(resumed, resumed_opt, mq.MultiFC(hidden=4), meta_lr=1e-2)
    resumed_trainer.load_state_dict(saved["trainer"])
    for x, y in data[4:]:
        resumed_trainer.step(closure(resumed, x, y))
    assert resumed_trainer.meta_optimizer.param_groups[0]["lr"] == trainer.meta_optimizer.param_groups[0]["lr"]
    for a, b in zip(
        [*model.parameters(), *trainer.meta.parameters()], [*resumed.parameters(), *resumed_trainer.meta.parameters()]
    ):
        assert torch.equal(a, b)


# --- learning rates --------------------------------------------------------------------------------------------
def _two_groups(model, lrs):
    return [{"params": [model[0].weight], "lr": lrs[0]}, {"params": [model[3].weight], "lr": lrs[1]}]


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1])
def test_a_learning_rate_that_is_not_a_finite_number_at_least_zero_is_refused_by_group(lr):
    # torch.optim lets NaN through (nan < 0 is False) and never sees a rate set on a group later
    message = rf"optimizer param group 1 has lr={lr!r}; a learning rate must be a finite number >= 0"
    model = mq.quantize_(conv_net())
    opt = torch.optim.SGD(_two_groups(model, [0.1, 0.1]))
    opt.param_groups[1]["lr"] = lr
    with pytest.raises(ValueError, match=message):
        mq.MetaQuant(model, opt, mq.MultiFC(4))
    # set between steps: refused before anything moves (a NaN is not blamed on the meta gradients)
    opt.param_groups[1]["lr"] = 0.1
    trainer = mq.MetaQuant(model, opt, mq.MultiFC(4))
    data = batches(3)
    for x, y in data[:2]:
        trainer.step(closure(model, x, y))
    before = [p.detach().clone() for p in [*model.parameters(), *trainer.meta.parameters()]]
    opt.param_groups[1]["lr"] = lr
    with pytest.raises(ValueError, match=message):
        trainer.step(closure(model, *data[2]))
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *trainer.meta.parameters()]))
    assert trainer.iteration == 2


def test_a_meta_optimizer_with_a_bad_rate_is_refused():
    model = mq.quantize_(conv_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta_optimizer param group 0 has lr=nan"):
        mq.MetaQuant(model, opt, mq.MultiFC(4), meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=float("nan")))


def test_a_schedule_that_stops_at_a_zero_rate_is_allowed():
    # oracle: torch.optim with lr 0 leaves every weight where it is; the meta rate follows to 0 as well
    model = mq.quantize_(conv_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    trainer = mq.MetaQuant(model, opt, mq.MultiFC(4))
    data = batches(4)
    for x, y in data[:2]:
        trainer.step(closure(model, x, y))
    schedule.step()
    before = [p.detach().clone() for p in [*model.parameters(), *trainer.meta.parameters()]]
    for x, y in data[2:]:
        trainer.step(closure(model, x, y))
    assert opt.param_groups[0]["lr"] == 0 and trainer.meta_optimizer.param_groups[0]["lr"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *trainer.meta.parameters()]))
