"""Activation quantizers against independent computations (the papers' formulas by hand, autograd of the papers'
reference expressions, finite differences), their configuration, initialisation, resume and data parallelism."""

import copy
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import metaquant as mq
from metaquant.activations import (
    ACT_QUANTIZERS,
    STEP_FLOOR,
    ActQuantConfig,
    LSQActivation,
    PACTActivation,
    SignActivation,
    act_quantizer_names,
    build_act_quantizer,
    check_initialized,
)


def lsq(bits=3, signed=True, step=0.5):
    q = LSQActivation(bits, signed=signed)
    with torch.no_grad():
        q.step.fill_(step)
    q.initialized.fill_(True)
    return q


# --- sign -----------------------------------------------------------------------------------------------------
def test_sign_is_plus_or_minus_one_and_plus_one_at_zero():
    x = torch.tensor([-2.0, -1e-30, 0.0, -0.0, 1e-30, 3.0])
    assert SignActivation()(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_sign_propagates_nan_and_keeps_the_sign_of_infinities():
    x = torch.tensor([math.nan, -math.inf, -1.0, -0.0, 0.0, 1.0, math.inf])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = SignActivation()(x.to(dtype))
        assert out.dtype == dtype and out[0].isnan()
        assert out[1:].tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_sign_ste_passes_the_gradient_where_the_input_is_within_one():
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.01], requires_grad=True)
    g = torch.arange(1.0, 8.0)
    SignActivation("ste")(x).backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def _approx_sign_integral(x):
    """Bi-Real Net's piecewise polynomial: −1, 2x + x², 2x − x², 1 on (−∞, −1), [−1, 0), [0, 1), [1, ∞)."""
    return torch.where(x < -1, -1.0, torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, 1.0)))


def test_approx_sign_gradient_is_the_derivative_of_the_piecewise_polynomial():
    x = torch.tensor([-1.7, -1.0, -0.75, -0.2, 0.0, 0.1, 0.5, 0.99, 1.0, 2.0], dtype=torch.float64)
    ours = x.clone().requires_grad_()
    g = torch.linspace(0.5, 2.0, len(x), dtype=torch.float64)
    SignActivation("approxsign")(ours).backward(g)
    oracle = x.clone().requires_grad_()
    _approx_sign_integral(oracle).backward(g)
    torch.testing.assert_close(ours.grad, oracle.grad, rtol=0, atol=1e-12)
    h = 1e-6  # and central differences away from the kinks
    smooth = torch.tensor([-0.75, -0.2, 0.1, 0.5], dtype=torch.float64)
    fd = (_approx_sign_integral(smooth + h) - _approx_sign_integral(smooth - h)) / (2 * h)
    y = smooth.clone().requires_grad_()
    SignActivation("approxsign")(y).sum().backward()
    torch.testing.assert_close(y.grad, fd, rtol=0, atol=1e-6)
    assert y.grad.tolist() == pytest.approx([0.5, 1.6, 1.8, 1.0])


# --- LSQ ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_forward_backward_and_scaled_step_gradient_by_hand(signed):
    bits, s = 3, 0.5
    q_n, q_p = (4, 3) if signed else (0, 7)
    v = torch.tensor([[-5.0, -2.1, -0.3, 0.0], [0.26, 0.74, 1.4, 9.0]], requires_grad=True)
    q = lsq(bits, signed, s)
    out = q(v)
    g_out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    out.backward(g_out)
    r = v.detach() / s
    expected = torch.clamp(r, -q_n, q_p).round() * s
    assert torch.equal(out, expected)
    inside = (r > -q_n) & (r < q_p)
    assert torch.equal(v.grad, g_out * inside)
    d_step = torch.where(r <= -q_n, -float(q_n), torch.where(r >= q_p, float(q_p), r.round() - r))
    scale = 1 / math.sqrt(4 * q_p)  # N = 4 features per example
    torch.testing.assert_close(q.step.grad, (g_out * d_step).sum() * scale, rtol=1e-6, atol=0)


def test_lsq_gradients_equal_autograd_of_the_papers_reference_expression():
    """Esser et al.'s code: ``s' = grad_scale(s, g)``, ``v̂ = round_pass(clamp(v/s', −Q_N, Q_P))·s'``."""
    torch.manual_seed(0)
    v = (torch.randn(5, 6) * 2).requires_grad_()
    q = lsq(4, True, 0.3)
    q(v).pow(2).sum().backward()
    q_n, q_p, g = 8, 7, 1 / math.sqrt(6 * 7)
    s = torch.tensor(0.3, requires_grad=True)
    w = v.detach().clone().requires_grad_()
    s_scaled = (s - s * g).detach() + s * g
    c = torch.clamp(w / s_scaled, -q_n, q_p)
    ((c + (c.round() - c).detach()) * s_scaled).pow(2).sum().backward()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.step.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_lsq_first_training_batch_sets_the_step_and_the_sign_mode():
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.5, 1.5]])  # all >= 0: unsigned, Q_P = 15
    q = LSQActivation(4).eval()
    with pytest.warns(UserWarning, match="never|no training-mode batch"):
        q(x)
    assert not q.initialized and q.step.item() == 1.0  # evaluation does not initialise (it warns)
    q.train()(x)
    assert bool(q.initialized) and not bool(q.signed)
    torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(15))
    q(x * 100)  # later batches do not
    torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(15))
    signed = LSQActivation(4).train()
    signed(x - 1)
    assert bool(signed.signed)
    torch.testing.assert_close(signed.step.detach(), 2 * (x - 1).abs().mean() / math.sqrt(7))
    fixed = LSQActivation(4, signed=False).train()
    fixed(x - 1)
    assert not bool(fixed.signed)


@pytest.mark.parametrize(
    "first",
    [torch.zeros(4, 8), torch.full((4, 8), math.nan), torch.full((4, 8), math.inf), torch.empty(0, 8)],
    ids=["zeros", "nan", "inf", "empty"],
)
def test_lsq_does_not_initialise_from_a_batch_without_a_usable_mean(first):
    q = LSQActivation(4).train()
    x = first.clone().requires_grad_()
    out = q(x)
    out.sum().backward()
    assert not bool(q.initialized) and q.step.item() == 1.0  # the step of an uninitialised quantizer
    assert out.shape == first.shape
    later = torch.tensor([[-1.0, 2.0], [0.5, 3.0]])  # the next usable batch: signed, Q_P = 7
    q(later)
    assert bool(q.initialized) and bool(q.signed)
    torch.testing.assert_close(q.step.detach(), 2 * later.abs().mean() / math.sqrt(7))


def test_lsq_step_below_the_floor_keeps_everything_finite():
    q = LSQActivation(4).train()
    q(torch.full((4, 8), 1e-9))  # a tiny first batch: the step floor
    assert bool(q.initialized) and q.step.item() == pytest.approx(STEP_FLOOR)
    x = torch.randn(4, 8, requires_grad=True)
    out = q(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(q.step.grad)
    with torch.no_grad():
        q.step.fill_(-1.0)  # an update past zero: the floor is used, the gradient still reaches the step
    q.step.grad = None
    q(x).sum().backward()
    assert torch.isfinite(q(x)).all() and q.step.grad.item() != 0


@pytest.mark.parametrize(
    "make, points",
    [
        (lambda: lsq(3, True, 0.5), [-2.0, -1.75, 0.0, 0.25, 1.5, 1.75]),  # the range's ends and a tie
        (lambda: lsq(3, False, 0.5), [0.0, 3.5, 0.25]),
        (lambda: PACTActivation(2, alpha=1.5), [0.0, 1.5, -0.0, 0.25]),
        (lambda: SignActivation("approxsign"), [-1.0, 0.0, 1.0]),
        (lambda: SignActivation("ste"), [-1.0, 0.0, 1.0]),
    ],
)
def test_gradients_are_finite_at_the_boundaries(make, points):
    q = make()
    x = torch.tensor(points, requires_grad=True)
    q(x).sum().backward()
    grads = [x.grad] + [p.grad for p in q.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)


def test_quantizers_compute_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(4, 16).to(torch.bfloat16)
    for q in (lsq(4, True, 0.17), PACTActivation(4, alpha=2.0), SignActivation("approxsign")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, q(x.float()).to(torch.bfloat16))
        y = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q(y).float().sum().backward()
        assert y.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in q.parameters())


@pytest.mark.parametrize("shape", [(0, 4), (0, 3, 2, 2), (2, 0, 3), (0,)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batches_pass_through_every_quantizer(shape, training):
    for q in (LSQActivation(4), lsq(4, True, 0.5), PACTActivation(4), SignActivation()):
        x = torch.randn(shape, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an uninitialised LSQ in evaluation mode
            out = q.train(training)(x)
        out.sum().backward()
        assert out.shape == x.shape and x.grad.shape == x.shape
        assert all(torch.isfinite(p.grad).all() for p in q.parameters())


def test_lsq_step_gradient_scale_takes_dim_0_as_the_batch():
    v = torch.randn(5, 2, 3)  # [T, B, D]: N = B·D = 6
    q = lsq(4, True, 0.3)
    q(v.requires_grad_()).sum().backward()
    r = v.detach() / 0.3
    d_step = torch.where(r <= -8, -8.0, torch.where(r >= 7, 7.0, r.round() - r))
    torch.testing.assert_close(q.step.grad, d_step.sum() / math.sqrt(6 * 7), rtol=1e-5, atol=1e-7)


def test_lsq_evaluation_before_initialisation_warns_once_per_quantizer():
    x = torch.rand(3, 4)
    first, second = LSQActivation(4).eval(), LSQActivation(4).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for q in (first, first, second):
            q(x)
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    assert len(messages) == 2 and all("one training-mode forward pass" in m for m in messages)
    initialised = LSQActivation(4).train()
    initialised(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        initialised.eval()(x)  # no warning once a training-mode batch has set the step
        lsq(4).eval()(x)


def test_the_warning_names_the_range_in_use_and_a_compiled_model_loaded_initialised_does_not_warn():
    with pytest.warns(UserWarning, match=r"\(1, signed range\)"):
        LSQActivation(4, signed=True).eval()(torch.randn(3, 4))
    trained = LSQActivation(4).train()
    trained(torch.randn(3, 4))
    loaded = LSQActivation(4)
    loaded.load_state_dict(trained.state_dict())
    compiled = torch.compile(loaded.eval(), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(torch.randn(3, 4))
    assert out.shape == (3, 4) and not [w for w in caught if "LSQActivation" in str(w.message)]


def test_check_initialized_names_the_layer_of_an_uninitialised_lsq_step():
    check_initialized({"a": lsq(4), "b": PACTActivation(4), "c": SignActivation()}, "export")
    with pytest.raises(ValueError, match=r"^export: the input quantizer of b \(LSQActivation\) was never init.*train"):
        check_initialized({"a": lsq(4), "b": LSQActivation(4)}, "export")


def test_lsq_cache_follows_a_buffer_replaced_by_load_state_dict_with_assign():
    q = LSQActivation(4).train()
    fresh = copy.deepcopy(q.state_dict())
    q(torch.rand(3, 5))
    assert q._is_initialized()
    flag = fresh["initialized"]
    while flag._version < q.initialized._version:  # the new buffer's version counter equals the old one's
        flag.fill_(False)
    q.load_state_dict(fresh, assign=True)
    assert q.initialized is flag and not q._is_initialized()
    x = torch.rand(3, 5) * 7
    q(x)  # initialised again, from this batch
    torch.testing.assert_close(q.step.detach(), 2 * x.abs().mean() / math.sqrt(15))


def test_lsq_state_dict_resumes_without_initialising_again():
    q = LSQActivation(4).train()
    q(torch.rand(3, 5))
    resumed = LSQActivation(4).train()
    assert not resumed._is_initialized()  # the cached value is read ...
    resumed.load_state_dict(q.state_dict())
    x = torch.rand(3, 5) * 7
    assert torch.equal(resumed(x), q(x)) and torch.equal(resumed.step, q.step)  # ... and read again after loading


# --- PACT -----------------------------------------------------------------------------------------------------
def test_pact_forward_and_gradients_by_hand_and_by_the_papers_expression():
    alpha, bits = 2.0, 2
    x = torch.tensor([-1.0, 0.0, 0.3, 0.9, 1.2, 1.99, 2.0, 5.0], requires_grad=True)
    q = PACTActivation(bits, alpha=alpha)
    g = torch.arange(1.0, 9.0)
    out = q(x)
    out.backward(g)
    y = x.detach().clamp(0, alpha)
    torch.testing.assert_close(out, torch.round(y * 3 / alpha) * alpha / 3, rtol=1e-6, atol=0)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]  # 1 for 0 <= x < α
    assert q.alpha.grad.item() == 7.0 + 8.0  # 1 for x >= α
    # PACT's y = (|x| − |x − α| + α)/2 with the STE through the quantization (Eq. 3), away from x = 0 and x = α
    a = torch.tensor(alpha, requires_grad=True)
    z = torch.tensor([-0.5, 0.3, 0.9, 1.2, 5.0, 7.0], requires_grad=True)
    y = 0.5 * (z.abs() - (z - a).abs() + a)
    (y + (torch.round(y * 3 / a) * a / 3 - y).detach()).sum().backward()
    mine = PACTActivation(bits, alpha=alpha)
    w = z.detach().clone().requires_grad_()
    mine(w).sum().backward()
    assert torch.equal(w.grad, z.grad) and torch.equal(mine.alpha.grad, a.grad)


# --- configuration --------------------------------------------------------------------------------------------
def test_registry_and_builders():
    assert act_quantizer_names() == ["sign", "lsq", "pact"] == list(ACT_QUANTIZERS)
    assert isinstance(ActQuantConfig("sign", 1, "approxsign").build(), SignActivation)
    assert ActQuantConfig("pact", 3).build().bits == 3
    assert ActQuantConfig(first_layer_bits=None).build_first() is None
    for q in (SignActivation("approxsign"), LSQActivation(5, signed=True), PACTActivation(6)):
        rebuilt = build_act_quantizer(q.spec())
        assert type(rebuilt) is type(q) and rebuilt.spec() == q.spec()
    with pytest.raises(ValueError, match="activation quantizer 'ternary' is not supported; allowed: sign, lsq"):
        build_act_quantizer({"kind": "ternary", "bits": 2})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "sign", "bits": 4}, "activation quantizer 'sign' does not support bits=4; allowed: 1"),
        ({"kind": "lsq", "bits": 9, "signed": None}, "'lsq' does not support bits=9; allowed: 2..8"),
        ({"kind": "pact", "bits": 1}, "'pact' does not support bits=1; allowed: 2..8"),
    ],
)
def test_build_act_quantizer_refuses_a_bit_width_its_kind_does_not_have(spec, message):
    with pytest.raises(ValueError, match=message):
        build_act_quantizer(spec)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"quantizer": "relu"},
            ValueError,
            "ActQuantConfig.quantizer 'relu' is not supported; allowed: sign, lsq, pact",
        ),
        (
            {"quantizer": "sign", "bits": 2},
            ValueError,
            "ActQuantConfig.bits: .*'sign' does not support bits=2; allowed: 1",
        ),
        (
            {"quantizer": "lsq", "bits": 1},
            ValueError,
            "ActQuantConfig.bits: .*'lsq' does not support bits=1; allowed: 2..8",
        ),
        ({"quantizer": "pact", "bits": 9}, ValueError, "'pact' does not support bits=9; allowed: 2..8"),
        ({"bits": 4.0}, TypeError, "ActQuantConfig.bits: bits must be an int, got 4.0"),
        ({"backward": "approxsign"}, ValueError, "backward 'approxsign' applies to quantizer 'sign' only"),
        ({"quantizer": "sign", "bits": 1, "backward": "tanh"}, ValueError, "backward 'tanh' is not supported"),
        ({"first_layer_bits": 16}, ValueError, "ActQuantConfig.first_layer_bits: .*bits=16; allowed: 2..8"),
    ],
)
def test_bad_configurations_name_the_field_the_value_and_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        ActQuantConfig(**kwargs)


def test_bad_quantizer_arguments():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        PACTActivation(4, alpha=0)
    with pytest.raises(TypeError, match="signed must be True, False or None"):
        LSQActivation(4, signed="yes")
    with pytest.raises(ValueError, match="backward 'x' is not supported; allowed: ste, approxsign"):
        SignActivation("x")


# --- data parallelism -----------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = LSQActivation(4).train()
        x = torch.arange(12.0).reshape(3, 4) * (rank + 1) - (5.0 if rank == 1 else 0.0)  # negatives on rank 1 only
        q(x)
        torch.save(q.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        # an empty batch on one process: no process initialises; then an all-zero one: the average is usable
        late = LSQActivation(4).train()
        late(torch.empty(0, 4) if rank == 0 else x)
        skipped = copy.deepcopy(late.state_dict())
        late(torch.zeros(3, 4) if rank == 0 else x)
        torch.save({"skipped": skipped, "late": late.state_dict()}, os.path.join(out, f"late{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_under_data_parallelism_every_process_starts_from_the_averaged_step(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = [torch.arange(12.0).reshape(3, 4), torch.arange(12.0).reshape(3, 4) * 2 - 5]
    mean_abs = (batches[0].abs().mean() + batches[1].abs().mean()) / 2
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert bool(state["signed"]) and bool(state["initialized"])  # rank 1's negatives make both signed
        torch.testing.assert_close(state["step"], 2 * mean_abs / math.sqrt(7))
        late = torch.load(tmp_path / f"late{rank}.pt", weights_only=True)
        assert not bool(late["skipped"]["initialized"]) and late["skipped"]["step"].item() == 1.0
        assert bool(late["late"]["initialized"]) and bool(late["late"]["signed"])
        torch.testing.assert_close(late["late"]["step"], 2 * (batches[1].abs().mean() / 2) / math.sqrt(7))


# --- training with quantized activations ----------------------------------------------------------------------
W1A1 = mq.QuantConfig("dorefa", 1, activations=ActQuantConfig("sign", 1, backward="approxsign"))
W4A4 = mq.QuantConfig("uniform", 4, activations=ActQuantConfig("lsq", 4))
W4A4_LEARNED = mq.QuantConfig("lsq", 4, activations=ActQuantConfig("lsq", 4))  # learned weight steps too


def small_net(config, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.Hardtanh(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )
    return mq.quantize_(net, config)


def make_trainer(model, method):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return mq.Trainer(model, opt) if method == "ste" else mq.MetaQuant(model, opt, mq.MultiFC(hidden=4))


def batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def step(trainer, model, x, y):
    return trainer.step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("config", [W1A1, W4A4, W4A4_LEARNED], ids=["W1A1", "W4A4", "W4A4-learned-weight-steps"])
@pytest.mark.parametrize("method", ["ste", "metaquant"])
def test_training_moves_the_activation_parameters_and_resumes_bit_for_bit(config, method):
    model = small_net(config)
    trainer = make_trainer(model, method)
    data = batches()
    learned = ("input_quantizer.step", "weight_step")
    first = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(learned)}
    assert sum(k.endswith("weight_step") for k in first) == (3 if config is W4A4_LEARNED else 0)
    for x, y in data[:2]:
        step(trainer, model, x, y)
    moved = {k: v for k, v in model.state_dict().items() if k in first}
    assert first and all(not torch.equal(first[k], moved[k]) for k in first)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": trainer.optimizer.state_dict(), "trainer": trainer.state_dict()}
    )
    reference = [step(trainer, model, x, y) for x, y in data[2:]]
    resumed = small_net(config, seed=99)
    resumed.load_state_dict(saved["model"])
    resumed_trainer = make_trainer(resumed, method)
    resumed_trainer.optimizer.load_state_dict(saved["opt"])
    resumed_trainer.load_state_dict(saved["trainer"])
    again = [step(resumed_trainer, resumed, x, y) for x, y in data[2:]]
    assert torch.equal(torch.stack(reference), torch.stack(again))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_pact_alpha_moves_when_inputs_reach_it():
    config = mq.QuantConfig("dorefa", 2, activations=ActQuantConfig("pact", 4))
    model = small_net(config)
    for q in mq.layers.input_quantizers(model).values():
        if isinstance(q, PACTActivation):
            nn.init.constant_(q.alpha, 0.5)
    trainer = make_trainer(model, "ste")
    for x, y in batches(2):
        step(trainer, model, x, y)
    alphas = [q.alpha.item() for q in mq.layers.input_quantizers(model).values() if isinstance(q, PACTActivation)]
    assert alphas and all(a != 0.5 for a in alphas)
