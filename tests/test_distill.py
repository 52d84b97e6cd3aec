"""Knowledge distillation: the loss against an independent computation, its gradient against the closed form,
the frozen teacher, ``fit(criterion=...)`` against a plain loop, and quantize runs that distil from ``init``."""

import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaquant as mq
from metaquant.distill import Distillation, distillation_loss
from metaquant.experiments.builders import build_teacher
from metaquant.experiments.config import RunConfig
from metaquant.experiments.lifecycle import execute, resume
from metaquant.guards import StopFlag, TrainingInterrupted


def _numpy_distillation(z_s, y, z_t, weight, temperature):
    """(1 − λ)·CE + λ·T²·KL(p_t ‖ p_s), written out in float64 with numpy."""
    z_s, z_t = np.asarray(z_s, dtype=np.float64), np.asarray(z_t, dtype=np.float64)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ce = -log_softmax(z_s)[np.arange(len(y)), y].mean()
    log_p_t, log_p_s = log_softmax(z_t / temperature), log_softmax(z_s / temperature)
    kl = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(axis=1).mean()
    return (1 - weight) * ce + weight * temperature**2 * kl


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_the_loss_is_hintons_mixture_of_cross_entropy_and_softened_kl(weight, temperature):
    g = torch.Generator().manual_seed(int(10 * weight + temperature))
    z_s, z_t = 3 * torch.randn(7, 10, generator=g, dtype=torch.float64), 3 * torch.randn(7, 10, generator=g)
    y = torch.randint(0, 10, (7,), generator=g)
    loss = distillation_loss(z_s, y, z_t.double(), weight=weight, temperature=temperature)
    expected = _numpy_distillation(z_s.numpy(), y.numpy(), z_t.numpy(), weight, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_gradient_is_the_closed_form_whose_soft_part_the_t_squared_keeps_on_scale(temperature):
    """d L / d z_s = ((1 − λ)(softmax(z_s) − onehot(y)) + λ·T·(softmax(z_s/T) − softmax(z_t/T))) / B."""
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_t, y, weight = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2]), 0.6
    distillation_loss(z_s, y, z_t, weight=weight, temperature=temperature).backward()
    hard = torch.softmax(z_s.detach(), 1) - F.one_hot(y, 4)
    soft = temperature * (torch.softmax(z_s.detach() / temperature, 1) - torch.softmax(z_t / temperature, 1))
    assert torch.allclose(z_s.grad, ((1 - weight) * hard + weight * soft) / 5, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda z: distillation_loss(z, y, z_t, weight=weight, temperature=temperature), (z_s.detach().requires_grad_(),)
    )


def test_without_weight_it_is_the_cross_entropy_and_a_student_equal_to_its_teacher_pays_the_hard_term_only():
    z, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.equal(distillation_loss(z, y, torch.randn(6, 5), weight=0.0, temperature=2.0), F.cross_entropy(z, y))
    mixed = distillation_loss(z, y, z.clone(), weight=0.25, temperature=4.0)
    assert torch.allclose(mixed, 0.75 * F.cross_entropy(z, y), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -0.1, "temperature": 1.0}, r"distill_weight must be a number in \[0, 1\], got -0.1"),
        ({"weight": 1.5, "temperature": 1.0}, r"distill_weight must be a number in \[0, 1\], got 1.5"),
        ({"weight": float("nan"), "temperature": 1.0}, r"distill_weight must be a number in \[0, 1\], got nan"),
        ({"weight": True, "temperature": 1.0}, r"distill_weight must be a number in \[0, 1\], got True"),
        ({"weight": 0.5, "temperature": 0.0}, r"distill_temperature must be a number in \[0.01, 1000\], got 0.0"),
        ({"weight": 0.5, "temperature": 1e-300}, r"distill_temperature must be a number in \[0.01, 1000\], got 1e-300"),
        ({"weight": 0.5, "temperature": 1e200}, r"distill_temperature must be a number in \[0.01, 1000\], got 1e\+200"),
        ({"weight": 0.5, "temperature": math.inf}, r"distill_temperature must be a number in \[0.01, 1000\], got inf"),
        ({"weight": 0.5, "temperature": math.nan}, r"distill_temperature must be a number in \[0.01, 1000\], got nan"),
        ({"weight": 0.5, "temperature": "4"}, r"distill_temperature must be a number in \[0.01, 1000\], got '4'"),
    ],
)
def test_bad_weights_and_temperatures_are_refused_by_name(kwargs, message):
    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message):
        distillation_loss(z, y, z, **kwargs)
    with pytest.raises(ValueError, match=message):
        Distillation(torch.nn.Identity(), **kwargs)
    with pytest.raises(ValueError, match=message):
        RunConfig(distill_weight=kwargs["weight"], distill_temperature=kwargs["temperature"])


def test_logits_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) and teacher logits \(2, 4\) differ in shape"):
        distillation_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4), weight=0.5, temperature=1.0)


def test_only_quantize_runs_distil():
    with pytest.raises(ValueError, match="distill_weight 0.5 applies to quantize runs .* not to task 'pretrain'"):
        RunConfig(task="pretrain", distill_weight=0.5)
    assert RunConfig(task="pretrain").distill_weight == 0.0


def test_the_teacher_is_frozen_in_evaluation_mode_and_untouched_by_training():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss_fn = Distillation(teacher, weight=0.5, temperature=2.0)
    student = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn(student(x), y, x).backward()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # running stats too
    teacher_logits = teacher(x)  # evaluation mode: the running statistics, not the batch's
    assert loss_fn(student(x), y, x).item() == pytest.approx(
        distillation_loss(student(x), y, teacher_logits, weight=0.5, temperature=2.0).item(), rel=1e-6
    )


def test_without_weight_the_teacher_is_not_run_and_a_teacher_put_back_in_training_mode_is_refused():
    class Refuses(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher ran")

    z, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    assert torch.equal(Distillation(Refuses(), weight=0.0, temperature=2.0)(z, y, z), F.cross_entropy(z, y))
    loss_fn = Distillation(torch.nn.Linear(4, 4), weight=0.5, temperature=2.0)
    loss_fn.teacher.train()
    with pytest.raises(RuntimeError, match="the teacher was put back in training mode"):
        loss_fn(z, y, z)


def test_fit_with_a_criterion_trains_as_a_plain_loop_on_that_loss(tmp_path):
    from metaquant.experiments.runs import RunDir

    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 4, (24,))
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    teacher = torch.nn.Linear(6, 4)
    student = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    oracle = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    oracle.load_state_dict(student.state_dict())
    criterion = Distillation(teacher, weight=0.7, temperature=3.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    run = RunDir.create(tmp_path / "run", RunConfig())
    state = mq.fit(
        student, mq.Trainer(student, optimizer), batches, batches, epochs=2, schedule=None, progress=False,
        criterion=criterion, run=run,
    )  # fmt: skip
    oracle_optimizer = torch.optim.SGD(oracle.parameters(), lr=0.1, momentum=0.9)
    cross_entropy, objective = [[], []], [[], []]
    for epoch in range(2):
        for xb, yb in batches:
            oracle_optimizer.zero_grad()
            logits = oracle(xb)
            loss = distillation_loss(logits, yb, teacher(xb).detach(), weight=0.7, temperature=3.0)
            loss.backward()
            oracle_optimizer.step()
            cross_entropy[epoch].append(F.cross_entropy(logits, yb).item())
            objective[epoch].append(loss.item())
    assert state.iteration == 6 and not criterion.teacher.training  # still evaluating after fit's evaluations
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(student.parameters(), oracle.parameters()))
    # train_loss stays the labels' cross-entropy (comparable with other runs); the criterion is train_objective
    metrics = run.metrics()
    assert [m["train_loss"] for m in metrics] == pytest.approx([np.mean(c) for c in cross_entropy], rel=1e-5)
    assert [m["train_objective"] for m in metrics] == pytest.approx([np.mean(o) for o in objective], rel=1e-5)
    assert [float(line.split(",")[1]) for line in run.loss_path.read_text().splitlines()[1:]] == pytest.approx(
        objective[0] + objective[1], rel=1e-5
    )


class _StopAfter(StopFlag):
    """A stop request after ``steps`` training steps, as SIGTERM would make one."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.checks = steps

    def __bool__(self) -> bool:
        self.checks -= 1
        if self.checks < 0:
            self.request(signal.SIGTERM)
        return super().__bool__()


@pytest.fixture
def pretrained_resnet8(tmp_path, tiny_mnist):
    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    fields = {"model": "resnet8", "dataset": "mnist", "data_dir": data_dir, "download": False, "batch_size": 32}
    execute(RunConfig(task="pretrain", epochs=1, lr=0.05, **fields), tmp_path / "pretrain", progress=False)
    return fields, tmp_path / "pretrain"


def test_a_quantize_run_distils_from_its_init_model(tmp_path, pretrained_resnet8):
    fields, init = pretrained_resnet8
    config = RunConfig(init=str(init), epochs=1, distill_weight=0.5, distill_temperature=2.0, seed=3, **fields)
    execute(config, tmp_path / "distilled", progress=False)
    # The first step's loss, before any update: the quantized model against the init model on the first batch.
    from metaquant.data import make_loaders
    from metaquant.experiments.builders import build_model

    torch.manual_seed(3)
    train, _, info = make_loaders("mnist", data_dir=fields["data_dir"], batch_size=32, seed=3, download=False)
    x, y = next(iter(train))
    student = build_model(config, info.num_classes, info.in_channels, info.image_size)
    teacher = build_teacher(config, info.num_classes, info.in_channels, info.image_size).eval()
    with torch.no_grad():
        expected = distillation_loss(student.train()(x), y, teacher(x), weight=0.5, temperature=2.0).item()
    first = float((tmp_path / "distilled" / "loss.csv").read_text().splitlines()[1].split(",")[1])
    assert first == pytest.approx(expected, rel=1e-6)
    plain = RunConfig(init=str(init), epochs=1, seed=3, **fields)
    execute(plain, tmp_path / "plain", progress=False)
    assert (tmp_path / "plain" / "loss.csv").read_text() != (tmp_path / "distilled" / "loss.csv").read_text()


def test_a_stopped_distillation_run_resumes_exactly_with_its_teacher(tmp_path, pretrained_resnet8):
    fields, init = pretrained_resnet8
    config = RunConfig(init=str(init), epochs=2, estimator="multifc", hidden_size=4, distill_weight=0.8, **fields)
    execute(config, tmp_path / "straight", progress=False)
    with pytest.raises(TrainingInterrupted):
        execute(config, tmp_path / "stopped", progress=False, stop=_StopAfter(3))
    resume(tmp_path / "stopped", progress=False)
    assert (tmp_path / "stopped" / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_distillation_without_an_init_model_is_refused_by_name(tmp_path, tiny_mnist, capsys):
    from metaquant.experiments.cli import main

    args = ["quantize", *tiny_mnist, "-m", "resnet8", "-n", "1", "--no-progress", "--run-dir", str(tmp_path)]
    assert main([*args, "--distill-weight", "0.5"]) != 0
    err = capsys.readouterr().err
    assert "distill_weight 0.5 distils from a full-precision model: give teacher" in err and "Traceback" not in err
    assert main([*args, "--distill-weight", "2"]) != 0
    assert "distill_weight must be a number in [0, 1], got 2.0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before a run directory was made


def test_a_resumed_run_refuses_a_teacher_that_changed_or_went_missing(tmp_path, pretrained_resnet8):
    fields, init = pretrained_resnet8
    config = RunConfig(init=str(init), epochs=1, distill_weight=0.5, **fields)
    with pytest.raises(TrainingInterrupted):
        execute(config, tmp_path / "stopped", progress=False, stop=_StopAfter(1))
    checkpoint = init / "checkpoint.pt"
    original = checkpoint.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + 1.0
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="is not the model the run started with"):
        resume(tmp_path / "stopped", progress=False)
    checkpoint.unlink()
    with pytest.raises(FileNotFoundError, match=r"the teacher of this run, init '.*pretrain', is not there"):
        resume(tmp_path / "stopped", progress=False)
    checkpoint.write_bytes(original)
    assert resume(tmp_path / "stopped", progress=False).epochs == 1


def test_sweeps_name_distilled_runs_apart_and_refuse_one_without_a_teacher(tmp_path):
    from metaquant.experiments.sweep import SweepSpec, plan

    grid = [{"estimator": "ste", "distill_weight": [0.0, 0.9]}]
    spec = SweepSpec("kd", 1, 0, {"epochs": 1}, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    assert [r.label for r in plan(spec, tmp_path)] == ["STE", "STE + distillation (0.9, T 4)"]
    no_teacher = SweepSpec("kd", 1, 0, None, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    with pytest.raises(ValueError, match="sweep 'kd': distill_weight 0.9 distils .* set one, or add a \\[pretrain\\]"):
        plan(no_teacher, tmp_path)


def test_a_named_teacher_replaces_the_init_model_and_a_quantized_run_is_refused_as_one(
    tmp_path, pretrained_resnet8, caplog
):
    """Fine-tuning a 1-bit run (its init) while distilling from the pre-trained model (its teacher)."""
    from metaquant.experiments.builders import build_model
    from metaquant.models import extract_state_dict, get_model, load_weights

    fields, pretrained = pretrained_resnet8
    first = execute(RunConfig(init=str(pretrained), epochs=1, **fields), tmp_path / "first", progress=False).run_dir
    config = RunConfig(init=str(first), teacher=str(pretrained), epochs=1, distill_weight=0.5, **fields)
    reference = get_model("resnet8", num_classes=10, in_channels=1)
    load_weights(reference, pretrained / "checkpoint.pt")
    teacher = build_teacher(config, 10, 1, 28)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values()))
    student = build_model(config, 10, 1, 28)
    source = extract_state_dict(torch.load(first / "checkpoint.pt", weights_only=True))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in source.items())  # the 1-bit run's weights
    with caplog.at_level("INFO", logger="metaquant.experiments.builders"):
        assert execute(config, tmp_path / "tuned", progress=False).epochs == 1
    assert f"distilling from {pretrained} (" in caplog.text

    as_teacher = RunConfig(init=str(pretrained), teacher=str(first), distill_weight=0.5, **fields)
    with pytest.raises(ValueError, match="the teacher .*first/checkpoint.pt is a checkpoint of a quantization run"):
        build_teacher(as_teacher, 10, 1, 28)
    missing = RunConfig(init=str(first), teacher=str(tmp_path / "nowhere"), distill_weight=0.5, **fields)
    with pytest.raises(FileNotFoundError, match=r"the teacher of this run, teacher '.*nowhere', is not there"):
        execute(missing, tmp_path / "missing", progress=False)
    assert not (tmp_path / "missing").exists()


def test_a_teacher_without_distillation_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"teacher 'fp.pt' is the model a run distils from: give distill_weight > 0"):
        RunConfig(teacher="fp.pt")
    from metaquant.experiments.cli import main

    done = main(["quantize", "--teacher", "fp.pt", "--run-dir", str(tmp_path)])
    assert done == 2 and not list(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert "teacher 'fp.pt' is the model a run distils from" in err and "Traceback" not in err
