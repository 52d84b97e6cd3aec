"""Frozen, conditionally used and tied quantized layers under Trainer (MetaQuant's own behaviour is in
test_algorithm.py), and copies of a trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaquant as mq


def data(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=0.1),
    ],
)
def test_trainer_leaves_frozen_and_unused_quantized_layers_as_they_are(make_opt):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(6, 6).requires_grad_(False)
            self.left, self.right = nn.Linear(6, 3), nn.Linear(6, 3)
            self.branch = "left"

        def forward(self, x):
            return getattr(self, self.branch)(torch.relu(self.frozen(x)))

    torch.manual_seed(0)
    model = mq.quantize_(Model())
    trainer = mq.Trainer(model, make_opt(model.parameters()))
    x, y = data()
    frozen = model.frozen.weight.clone()
    for branch in ("left", "right", "left"):
        model.branch = branch
        other = model.right if branch == "left" else model.left
        kept = {name: p.detach().clone() for name, p in other.named_parameters()}
        used = model.left.weight.detach().clone() if branch == "left" else model.right.weight.detach().clone()
        trainer.step(lambda: F.cross_entropy(model(x), y))
        # the layer the loss did not use keeps its weight and bias, even with momentum and weight decay
        assert all(torch.equal(p, kept[name]) for name, p in other.named_parameters())
        assert not torch.equal(getattr(model, branch).weight, used)
    assert torch.equal(model.frozen.weight, frozen)


@pytest.mark.parametrize("name, bits", [("dorefa", 1), ("bwn", 1), ("bwn-channel", 1), ("ternary", 2), ("uniform", 4)])
@pytest.mark.parametrize("kind", ["ste", "multifc"])
def test_a_frozen_quantized_layer_computes_with_its_quantized_weight_and_keeps_it(name, bits, kind):
    """Every quantizer, including those whose pre-processing is the identity (the weight itself goes into the
    autograd function): a frozen layer in inference and under either trainer. Oracle: the quantizer applied by
    hand, and autograd through a plain network that uses the frozen ``Ŵ`` as a constant."""
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), mq.QuantConfig(name, bits))
    x, y = data()
    first = model[0]
    first.weight.requires_grad_(False)
    frozen = first.weight.detach().clone()
    w_hat = first.quantizer(frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[2](torch.relu(F.linear(x, w_hat, first.bias))), rtol=0, atol=0)
    # the bias of the frozen layer still trains: its gradient is plain autograd's with the frozen Ŵ
    bias = first.bias.detach().clone().requires_grad_(True)
    hidden = torch.relu(F.linear(x, w_hat, bias))
    F.cross_entropy(
        F.linear(hidden, model[2].quantizer(model[2].weight.detach()), model[2].bias.detach()), y
    ).backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = mq.Trainer(model, optimizer) if kind == "ste" else mq.MetaQuant(model, optimizer, mq.MultiFC(hidden=4))
    trainer.step(lambda: F.cross_entropy(model(x), y))
    torch.testing.assert_close(first.bias.detach(), bias.detach() - 0.1 * bias.grad)
    trainer.step(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(first.weight, frozen)


def test_trainer_on_a_tied_weight_sums_the_gradients_of_its_layers():
    """Two quantized layers with one weight Parameter train as one layer applied twice (the oracle: a shared
    module, where autograd sums the two uses)."""
    torch.manual_seed(0)
    once = nn.Linear(6, 6, bias=False)
    head = nn.Linear(6, 3)
    shared = mq.quantize_(nn.Sequential(once, nn.Tanh(), once, copy.deepcopy(head)))
    tied = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False), copy.deepcopy(head))
    tied[2].weight = tied[0].weight
    with torch.no_grad():
        tied[0].weight.copy_(once.weight)
    mq.quantize_(tied)
    assert tied[0].weight is tied[2].weight and tied[0] is not tied[2]
    (x, y), initial = data(), once.weight.detach().clone()
    for model in (shared, tied):
        trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        model.losses = [trainer.step(lambda m=model: F.cross_entropy(m(x), y)) for _ in range(4)]
    assert torch.equal(torch.stack(tied.losses), torch.stack(shared.losses))
    assert torch.equal(tied[0].weight, shared[0].weight) and not torch.equal(tied[0].weight, initial)


@pytest.mark.parametrize(
    "meta", [mq.FCGrad(hidden=4), mq.MultiFC(hidden=4), mq.LSTMFC(hidden=4)], ids=lambda m: type(m).__name__
)
def test_a_deep_copy_of_metaquant_trains_its_own_copy_of_the_model_exactly_as_the_original(meta):
    torch.manual_seed(0)
    model = mq.quantize_(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), meta)
    x, y = data()
    for _ in range(2):
        trainer.step(lambda: F.cross_entropy(model(x), y))
    clone = copy.deepcopy(trainer)  # a deep copy of a trainer copies its model, optimizers and records too
    assert clone.model is not model and clone.model[0].weight is not model[0].weight
    original = copy.deepcopy(model.state_dict())
    copied = [clone.step(lambda: F.cross_entropy(clone.model(x), y)) for _ in range(2)]
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the original is untouched
    again = [trainer.step(lambda: F.cross_entropy(model(x), y)) for _ in range(2)]
    assert torch.equal(torch.stack(copied), torch.stack(again))
    assert all(torch.equal(v, clone.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model[0].weight, original["0.weight"])


def test_with_bwn_the_meta_gradient_goes_through_the_ste_scale_and_gate_and_g_w_does_not():
    """docs/design.md §5.3: the look-ahead uses g_W = M_φ(...) ⊙ c(W) with c = 1, while ∂ℓ/∂φ takes ∂Ŵ/∂W from
    XNOR-Net's STE, a·1{|W| ≤ 1}. The reference is the loss as a function of φ written out here, with Q replaced
    by that linearization around the forward value, differentiated by autograd."""
    torch.manual_seed(0)
    q, lr = mq.quantizers.BWN(), 0.5
    model = mq.quantize_(nn.Sequential(nn.Linear(5, 3, bias=False)), mq.QuantConfig("bwn")).double()
    with torch.no_grad():
        model[0].weight.mul_(3)  # some weights beyond the clip |W| ≤ 1
    meta = mq.MultiFC(hidden=4).double()
    trainer = mq.MetaQuant(
        model, torch.optim.SGD(model.parameters(), lr=lr), meta, meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0)
    )  # φ stays, its gradient stays
    (x0, y0), (x1, y1) = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    w0 = model[0].weight.detach().clone()
    assert (w0.abs() > 1).any() and (w0.abs() <= 1).any()
    trainer.step(lambda: F.cross_entropy(model(x0), y0))
    trainer.step(lambda: F.cross_entropy(model(x1), y1))
    analytic = [p.grad.clone() for p in meta.parameters()]

    w_hat0 = q(w0).requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(x0 @ w_hat0.T, y0), w_hat0)  # g_Ŵ^0; W̃^0 = W^0 for BWN

    def reference(ste):
        g_tilde, _ = meta(g0.reshape(-1), w0.reshape(-1), None)
        w1 = w0 - lr * g_tilde.reshape(w0.shape)  # c(W) = 1
        w1_value = w1.detach()
        w_hat = q(w1_value) + ste(w1_value) * (w1 - w1_value)
        return torch.autograd.grad(F.cross_entropy(x1 @ w_hat.T, y1), list(meta.parameters()))

    with_scale_and_gate = reference(lambda w: w.abs().mean() * (w.abs() <= 1))
    without = reference(lambda w: torch.ones_like(w))
    for got, expected in zip(analytic, with_scale_and_gate):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not all(torch.allclose(g, o) for g, o in zip(analytic, without))
