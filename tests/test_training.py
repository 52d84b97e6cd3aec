"""The training loop: evaluation against an independent count, and a real Fashion-MNIST run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaquant.layers import quantize_
from metaquant.trainer import Trainer
from metaquant.training import FitState, evaluate, fit


class ListLoader:
    def __init__(self, batches):
        self.batches = batches
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_evaluate_counts_top1_and_top5_like_an_explicit_loop():
    torch.manual_seed(0)
    model = nn.Linear(4, 7)
    batches = [(torch.randn(5, 4), torch.randint(0, 7, (5,))) for _ in range(3)]
    result = evaluate(model, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    logits = model(x).detach()
    top1 = sum(int(logits[i].argmax() == y[i]) for i in range(len(y))) / len(y) * 100
    top5 = sum(int(y[i] in logits[i].sort(descending=True).indices[:5]) for i in range(len(y))) / len(y) * 100
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_fit_equals_a_hand_written_sgd_loop_and_applies_the_schedule():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(4)]
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5)
    loader = ListLoader(batches)
    state = fit(
        a, Trainer(a, opt_a), loader, ListLoader(batches[:1]), epochs=3, schedule=lambda e: 0.1**e, progress=False
    )
    assert loader.epochs == [0, 1, 2] and state.epoch == 3 and state.iteration == 12
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5)
    for epoch in range(3):
        opt_b.param_groups[0]["lr"] = 0.5 * 0.1**epoch
        for x, y in batches:
            opt_b.zero_grad()
            F.cross_entropy(b(x), y).backward()
            opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_fit_resumes_from_a_state():
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    model = nn.Linear(3, 2)
    loader = ListLoader(batches)
    state = fit(
        model,
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
        loader,
        loader,
        epochs=5,
        schedule=lambda e: 1.0,
        state=FitState(epoch=3, iteration=3),
        progress=False,
    )
    assert state.epoch == 5 and state.iteration == 5


def _assert_equals_sgd_by_hand(trained, by_hand, batches, lr=0.1):
    """The oracle of a resumed fit: ``by_hand`` (a copy of the starting weights) trained by plain SGD over
    ``batches`` ends bit-exactly at ``trained``'s weights."""
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=lr)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(by_hand(x), y).backward()
        optimizer.step()
    for pa, pb in zip(trained.parameters(), by_hand.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_fit_resumed_mid_epoch_trains_the_remaining_batches_and_counts_them_once(monkeypatch):
    import metaquant.loop as loop

    bars = []

    class RecordingBar(loop.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    state = fit(
        a,
        Trainer(a, torch.optim.SGD(a.parameters(), lr=0.1)),
        ListLoader(batches),
        ListLoader(batches[:1]),
        epochs=1,
        schedule=lambda e: 1.0,
        state=FitState(epoch=0, batch=2, iteration=2),
        progress=True,
    )
    _assert_equals_sgd_by_hand(a, b, batches[2:])  # the checkpoint was written after batches 0 and 1
    assert state.iteration == 5
    # the bar starts at the resumed position and ends at the epoch's length, not past it
    assert [(bar.n, bar.total) for bar in bars] == [(5, 5)]


def test_fit_refuses_to_resume_past_the_end_of_a_shorter_loader():
    # a checkpoint at step 4 of an epoch, resumed with a loader of 3 batches, would otherwise train nothing
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"yields 3 batches in epoch 2 \(in this process\).*step 4"):
        fit(
            model,
            Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
            ListLoader(batches),
            ListLoader(batches[:1]),
            epochs=2,
            schedule=lambda e: 1.0,
            state=FitState(epoch=1, batch=4, iteration=7),
            progress=False,
        )
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fit_resumed_at_the_last_step_of_an_epoch_goes_on_with_the_next():
    # a stop after the last batch of an epoch writes a mid-epoch state at step len(loader): nothing is left of it
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    state = fit(
        a,
        Trainer(a, torch.optim.SGD(a.parameters(), lr=0.1)),
        ListLoader(batches),
        ListLoader(batches[:1]),
        epochs=2,
        schedule=lambda e: 1.0,
        state=FitState(epoch=0, batch=3, iteration=3),
        progress=False,
    )
    _assert_equals_sgd_by_hand(a, b, batches)  # epoch 2 only
    assert state.epoch == 2 and state.iteration == 6


@pytest.mark.slow
def test_real_fashion_mnist_full_precision_run_is_far_above_chance(pretrained_resnet20):
    _, accuracy = pretrained_resnet20  # 200 SGD steps of ResNet20 on 6400 real images (conftest)
    # chance is 10%; the exact figure depends on the processor (its convolution kernels' order of sums changes
    # the last bits of every step, and 200 steps at a constant rate amplify them): 69.2% on one, over 70% on another
    assert accuracy > 60.0


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.5])
def test_trainer_refuses_a_learning_rate_that_is_not_a_finite_number_at_least_zero(lr):
    # torch.optim lets NaN through (nan < 0 is False) and never sees a rate set on a group later
    message = rf"optimizer param group 1 has lr={lr!r}; a learning rate must be a finite number >= 0"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1)
    opt.param_groups[1]["lr"] = lr
    with pytest.raises(ValueError, match=message):
        Trainer(model, opt)
    opt.param_groups[1]["lr"] = 0.1
    trainer = Trainer(model, opt)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    trainer.step(lambda: F.cross_entropy(model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1]["lr"] = lr  # set between steps: refused before anything moves
    with pytest.raises(ValueError, match=message):
        trainer.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("rate", [np.float32(0.5), np.float64(0.5), np.int64(1)])
def test_trainer_takes_a_numpy_rate_as_torch_optim_does(rate):
    # oracle: the same steps with the rate as a Python number (0.5 and 1 are exact in every type)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    weights = []
    for lr in (rate, float(rate)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        quantize_(model)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=lr))
        for _ in range(2):
            trainer.step(lambda m=model: F.cross_entropy(m(x), y))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_trainer_follows_a_schedule_down_to_a_zero_rate():
    # oracle: torch.optim with lr 0 leaves the parameters where they are; a CPU tensor rate is checked as well
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    trainer = Trainer(model, opt)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    trainer.step(lambda: F.cross_entropy(model(x), y))
    schedule.step()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.param_groups[0]["lr"].fill_(float("nan"))
    with pytest.raises(ValueError, match="optimizer param group 0 has lr=nan"):
        trainer.step(lambda: F.cross_entropy(model(x), y))
