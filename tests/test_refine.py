"""π against torch.optim: ``p − lr·π(g)`` is the value one optimizer step gives, over several steps with state."""

import pytest
import torch

from metaquant.refine import refinement_for, sgd_direction, unwrap_optimizer, with_derivative

CONFIGS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=5e-4)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1, amsgrad=True)),
]


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_direction_equals_one_torch_optim_step(cls, kwargs):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    opt = cls([p], **kwargs)
    rule = refinement_for(opt)
    for _ in range(6):
        grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
        before = p.detach().clone()
        state_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        direction = rule(grad, p, opt.state[p], opt.param_groups[0])
        # the optimizer's state is read, not changed
        for k, v in state_before.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
        p.grad = grad
        opt.step()
        torch.testing.assert_close(before - kwargs["lr"] * direction, p.detach(), rtol=1e-12, atol=1e-14)


def test_residual_form_has_identity_derivative_and_exact_value():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()  # some state
    rule = refinement_for(opt)
    grad = torch.randn(5, dtype=torch.float64, requires_grad=True)
    state, group = opt.state[p], opt.param_groups[0]
    residual = with_derivative(rule, "residual")(grad, p, state, group)
    torch.testing.assert_close(residual, rule(grad, p, state, group))
    (d_res,) = torch.autograd.grad(residual.sum(), grad)
    assert torch.equal(d_res, torch.ones_like(d_res))
    (d_exact,) = torch.autograd.grad(with_derivative(rule, "exact")(grad, p, state, group).sum(), grad)
    assert not torch.allclose(d_exact, torch.ones_like(d_exact))


def test_unsupported_optimizers_are_named():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="RMSprop is not supported; supported: torch.optim.SGD, torch.optim.Adam"):
        refinement_for(torch.optim.RMSprop([p]))
    with pytest.raises(ValueError, match="maximize=True"):
        refinement_for(torch.optim.SGD([p], lr=0.1, maximize=True))
    with pytest.raises(ValueError, match="allowed: residual, exact"):
        with_derivative(refinement_for(torch.optim.SGD([p], lr=0.1)), "approx")


def test_unwrap_optimizer_follows_nested_wrappers_to_the_optimizer():
    class Wrapper:  # like Accelerate's AcceleratedOptimizer: the groups and state are the wrapped optimizer's
        def __init__(self, optimizer):
            self.optimizer, self.param_groups, self.state = optimizer, optimizer.param_groups, optimizer.state

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(Wrapper(Wrapper(sgd))) is sgd and unwrap_optimizer(sgd) is sgd
    assert refinement_for(Wrapper(sgd)) is sgd_direction
    selfish = Wrapper(sgd)
    selfish.optimizer = selfish  # a wrapper that holds itself ends the search
    assert unwrap_optimizer(selfish) is selfish
