"""LR schedules against torch.optim.lr_scheduler, the independent implementation of the same rules."""

import math

import pytest
import torch

from metaquant.schedules import lr_factor, scale_lr, set_scaled_rates


def _torch_lrs(make_scheduler, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_matches_steplr():
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.1), 100)
    ours = [lr_factor("step", e, 100, 30, 0.1) for e in range(100)]
    assert ours == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_matches_cosineannealinglr():
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), 20)
    ours = [lr_factor("cosine", e, 20) for e in range(20)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_constant_and_errors():
    assert lr_factor("constant", 7, 10) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; allowed: step, cosine, constant"):
        lr_factor("linear", 0, 10)
    with pytest.raises(ValueError, match="step size must be >= 1"):
        lr_factor("step", 0, 10, step_size=0)


def test_scale_lr_keeps_per_group_rates():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    scale_lr(opt, 0.1)
    scale_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.005])
    assert math.isclose(opt.state_dict()["param_groups"][1]["initial_lr"], 0.5)


def test_the_paper_s_step_schedule_divides_by_ten_every_30_epochs_and_cosine_is_half_way_at_the_middle():
    assert [lr_factor("step", e, 100) for e in (0, 29, 30, 60, 99)] == pytest.approx([1.0, 1.0, 0.1, 0.01, 0.001])
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)


def test_scaled_rates_multiply_each_group_s_given_rate_and_need_one_per_group():
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 1.0}])
    set_scaled_rates(opt, [0.2, 0.4], 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match=r"1 rate\(s\) for 2 parameter group\(s\)"):
        set_scaled_rates(opt, [0.2], 0.5)
