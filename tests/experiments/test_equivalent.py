"""The equivalent STE: FC-Grad's learned gain, and the STE run that takes it."""

import json

import pytest
import torch

import metaquant as mq
from metaquant.experiments.config import RunConfig
from metaquant.experiments.equivalent import (
    ESTIMATORS_FOR,
    equivalent_sgd,
    fc_grad_gain,
    gain_tensor,
    learned_gain,
    mean_gain,
)
from metaquant.experiments.lifecycle import execute, resume
from metaquant.experiments.trace import MetaTrace
from metaquant.guards import StopFlag, TrainingInterrupted
from tests.conftest import save_as_from_a_gpu


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_fc_grad_gain_is_the_scale_fc_grad_applies(num_layers):
    torch.manual_seed(num_layers)
    meta = mq.FCGrad(hidden=5, num_layers=num_layers, init_scheme="paper")
    g = torch.randn(7)
    out, _ = meta(g, torch.randn(7))
    # oracle: the meta quantizer itself, on the incoming gradient
    torch.testing.assert_close(out, fc_grad_gain(meta.state_dict(), "paper") * g)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_fc_grad_gain_of_an_fc_grad_started_at_the_ste(num_layers):
    torch.manual_seed(num_layers)
    meta = mq.FCGrad(hidden=5, num_layers=num_layers, init_scheme="ste")
    g = torch.randn(7)
    assert fc_grad_gain(meta.state_dict(), "ste") == 1.0  # it starts as the STE
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out, _ = meta(g, torch.randn(7))
    torch.testing.assert_close(out, fc_grad_gain(meta.state_dict(), "ste") * g)


def test_mean_gain_interpolates_between_snapshots_and_weighs_epochs_by_their_rate():
    gains = {0: 1.0, 1: 2.0, 2: 4.0, 4: 8.0}  # epoch 3 is not snapshotted: k(3) = 6 by interpolation
    factors = [1.0, 1.0, 0.1, 0.1]
    # by hand: epochs' mean gains 1.5, 3, 5, 7, weighted 1, 1, 0.1, 0.1
    expected = (1.5 + 3 + 0.5 + 0.7) / 2.2
    assert mean_gain(gains, 4, factors.__getitem__) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="known after \\[0, 1\\]"):
        mean_gain({0: 1.0, 1: 2.0}, 4, factors.__getitem__)


def _fake_run(tmp_path, estimator="fc-grad", done=True, gains=(0.5, 1.5), **options):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"estimator": estimator, "nonlinearity": "none", "epochs": 2, "lr_schedule": "constant", **options})
    )
    snapshots = {}
    for epoch, k in zip((0, 2), gains):
        meta = mq.FCGrad(hidden=1, num_layers=1, init_scheme="paper")  # as the config (no meta_init_scheme) says
        with torch.no_grad():
            meta.net.layers[0].weight.fill_(k)
        snapshots[epoch] = {"meta": meta.state_dict(), "weights": {}}
    torch.save({"snapshots": snapshots, "bins": {}}, run / "trace.pt")
    if done:
        (run / "done").write_text("")
    return run


def test_learned_gain_reads_a_finished_fc_grad_run(tmp_path):
    assert learned_gain(_fake_run(tmp_path)) == pytest.approx(1.0)  # constant rate: mean of 0.5 → 1.5


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(estimator="multifc"), "is not an FC-Grad run"),
        (dict(done=False), "has not finished"),
    ],
)
def test_learned_gain_refuses_other_runs(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        learned_gain(_fake_run(tmp_path, **kwargs))


def test_learned_gain_reads_a_trace_written_on_a_gpu(tmp_path):
    run = _fake_run(tmp_path)
    save_as_from_a_gpu(torch.load(run / "trace.pt", weights_only=True), run / "trace.pt")
    if not torch.cuda.is_available():  # the file really is one that needs a map_location here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run / "trace.pt", weights_only=True)
    assert learned_gain(run) == pytest.approx(1.0)


def test_learned_gain_names_a_missing_or_damaged_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        learned_gain(tmp_path)
    run = _fake_run(tmp_path)
    (run / "trace.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="trace.pt is not a readable trace"):
        learned_gain(run)


def test_the_equivalent_ste_optimizer_takes_the_scaled_rate(tmp_path):
    from metaquant.experiments.builders import with_learned_gain
    from metaquant.experiments.config import RunConfig

    run = _fake_run(tmp_path, gains=(2.0, 2.0))
    config = RunConfig(estimator="ste", lr=1e-3, lr_gain_from=str(run))
    assert with_learned_gain(config).lr == pytest.approx(2e-3)
    negative = _fake_run(tmp_path / "n", gains=(-1.0, -1.0)) if (tmp_path / "n").mkdir() is None else None
    with pytest.raises(ValueError, match="learned a mean gain -1 <= 0"):
        with_learned_gain(RunConfig(estimator="ste", lr_gain_from=str(negative)))


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, weight_decay=5e-3),
        dict(momentum=0.9, dampening=0.3, weight_decay=1e-2),
        dict(momentum=0.8, nesterov=True, weight_decay=5e-4),
        dict(weight_decay=1e-2),
    ],
)
def test_the_equivalent_sgd_takes_fc_grads_steps_to_rounding(options):
    """Oracle: torch.optim.SGD itself, on FC-Grad's gradient k·g at (α, λ) and on the STE's g at equivalent_sgd."""
    k, lr = 2.5, 0.05
    g = torch.Generator().manual_seed(0)
    start = torch.randn(6, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(6)]
    fc_grad, ste = (torch.nn.Parameter(start.clone()) for _ in range(2))
    fc_grad_opt = torch.optim.SGD([fc_grad], lr=lr, **options)
    lr_eq, wd_eq = equivalent_sgd(lr, options["weight_decay"], k)
    ste_opt = torch.optim.SGD([ste], lr=lr_eq, **{**options, "weight_decay": wd_eq})
    for grad in grads:
        fc_grad.grad, ste.grad = k * grad, grad.clone()
        fc_grad_opt.step()
        ste_opt.step()
        torch.testing.assert_close(ste, fc_grad, rtol=1e-12, atol=1e-14)
    assert not torch.equal(fc_grad.detach(), start)
    with pytest.raises(ValueError, match="gain -1 <= 0"):
        equivalent_sgd(lr, 0.0, -1.0)


def test_the_equivalent_ste_divides_the_weight_decay_by_the_gain(tmp_path):
    from metaquant.experiments.builders import with_learned_gain
    from metaquant.experiments.config import RunConfig

    run = _fake_run(tmp_path, gains=(2.0, 2.0), lr=1e-3, weight_decay=5e-4)
    equivalent = with_learned_gain(RunConfig(estimator="ste", lr=1e-3, weight_decay=5e-4, lr_gain_from=str(run)))
    assert (equivalent.lr, equivalent.weight_decay) == pytest.approx((2e-3, 2.5e-4))


@pytest.mark.parametrize(
    "fc_grad,ste,message",
    [
        ({"optimizer": "adam"}, {"optimizer": "adam"}, "defined for SGD: Adam divides each coordinate's gradient"),
        ({"optimizer": "adamw"}, {"optimizer": "adamw"}, "allowed: 'sgd'"),
        ({"step_order": "original"}, {}, "uses `step_order` 'original'.*defined for `step_order` 'paper'"),
        (
            {"quantizer": "bwn"},
            {"quantizer": "bwn"},
            "`quantizer` 'bwn'.*allowed: `quantizer` dorefa, dorefa-channel, ternary, uniform, uniform-channel, "
            "uniform-group$",
        ),
        ({}, {"estimator": "ewgs"}, "`estimator` 'ewgs' is not FC-Grad's divided by its gain; allowed: `estimator`"),
        ({"quantizer": "ternary", "bits": 2}, {"quantizer": "ternary", "bits": 2}, "allowed: `estimator` 'identity'"),
        ({"lr": 1e-2}, {}, "its `lr` is 0.01, this run's 0.001"),
    ],
)
def test_the_equivalent_ste_is_refused_where_it_is_not_defined(tmp_path, fc_grad, ste, message):
    from metaquant.experiments.builders import with_learned_gain
    from metaquant.experiments.config import RunConfig

    run = _fake_run(tmp_path, **{"optimizer": "sgd", "lr": 1e-3, **fc_grad})
    config = RunConfig(**{"estimator": "ste", "lr": 1e-3, "lr_gain_from": str(run), **ste})
    with pytest.raises(ValueError, match=message):
        with_learned_gain(config)


def test_a_sweep_refuses_an_equivalent_ste_under_adam_when_it_is_planned(tmp_path):
    from metaquant.experiments.sweep import SweepSpec, plan

    grid = [{"estimator": "fc-grad"}, {"estimator": "ste", "equivalent_of": "fc-grad"}]
    spec = SweepSpec("eq", 1, 0, None, {"dataset": "cifar10", "optimizer": "adam"}, grid=grid, optimizer_overrides={})
    with pytest.raises(ValueError, match="sweep 'eq': the equivalent STE is defined for SGD"):
        plan(spec, tmp_path)
    assert not any(tmp_path.iterdir())


# --- the per-step gain a run records ---------------------------------------------------------------------------
class _Steps(mq.Callback):
    """The oracle's record: each step's rate, and the gain the meta quantizer has after it."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, loop, step):
        self.rows.append(
            (loop.trainer.optimizer.param_groups[0]["lr"], fc_grad_gain(loop.trainer.meta.state_dict(), "ste"))
        )


def test_the_trace_records_the_rate_weighted_mean_of_the_gain_each_step_used(tmp_path):
    torch.manual_seed(0)
    model = mq.quantize_(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    trainer = mq.MetaQuant(model, torch.optim.SGD(model.parameters(), lr=0.1), mq.FCGrad(hidden=4), meta_lr=1e-2)
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(4)]
    trace = MetaTrace(tmp_path / "trace.pt", 2, lambda meta: gain_tensor(meta.state_dict(), "ste"))
    steps = _Steps()
    mq.fit(
        model,
        trainer,
        batches,
        batches,
        epochs=2,
        schedule=lambda e: [1.0, 0.1][e],
        callbacks=[trace, steps],
        progress=False,
    )
    # step t ≥ 1 computes with the gain the meta quantizer had after step t − 1 (step 0 moves no quantized weight)
    rates, gains = [lr for lr, _ in steps.rows], [k for _, k in steps.rows]
    expected = sum(lr * k for lr, k in zip(rates[1:], gains[:-1])) / sum(rates[1:])
    recorded = torch.load(tmp_path / "trace.pt", weights_only=True)["gain"]
    assert recorded["steps"] == 7 and len(set(gains)) == 8  # the gain moved at every step
    assert recorded["lr_weighted_sum"] / recorded["lr_sum"] == pytest.approx(expected, rel=1e-12)


def test_a_resumed_run_records_the_gain_of_the_uninterrupted_one_and_learned_gain_reads_it(tmp_path, tiny_mnist):
    config = RunConfig(
        model="resnet8",
        dataset="mnist",
        data_dir=tiny_mnist[3],
        download=False,
        batch_size=16,
        epochs=2,
        estimator="fc-grad",
        hidden_size=4,
        device="cpu",
        lr_schedule="step",
        lr_step=1,
    )
    stop = StopFlag()
    stop.request(2)  # as if SIGINT arrived during the first step
    with pytest.raises(TrainingInterrupted):
        execute(config, tmp_path / "resumed", progress=False, stop=stop)
    resume(tmp_path / "resumed", progress=False)
    execute(config, tmp_path / "straight", progress=False)
    gains = [torch.load(tmp_path / name / "trace.pt", weights_only=True)["gain"] for name in ("resumed", "straight")]
    assert gains[0]["steps"] == gains[1]["steps"] == 7  # 2 epochs of 4 steps, the first moving no quantized weight
    assert gains[0]["lr_weighted_sum"] == pytest.approx(gains[1]["lr_weighted_sum"], rel=1e-12)
    assert gains[0]["lr_sum"] == pytest.approx(gains[1]["lr_sum"], rel=1e-12)
    assert learned_gain(tmp_path / "straight") == pytest.approx(gains[1]["lr_weighted_sum"] / gains[1]["lr_sum"])


@pytest.mark.parametrize("name,estimator", [(q, e) for q, estimators in ESTIMATORS_FOR.items() for e in estimators])
def test_each_listed_estimator_gives_fc_grads_gradient_divided_by_its_gain(name, estimator):
    # FC-Grad without a non-linearity is g_W = k·g_Ŵ ⊙ c(W) (Eq. 4-5); the listed estimator must give g_Ŵ ⊙ c(W)
    q = mq.get_quantizer(name, 2 if name == "ternary" else 3, group_size=4 if name == "uniform-group" else None)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    upstream = torch.randn(6, 8, generator=g, dtype=torch.float64)
    (mq.fake_quantize(w, q, mq.estimators.CLASSICAL_ESTIMATORS[estimator]()) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream * q.calibration(w.detach()), rtol=1e-12, atol=1e-15)
