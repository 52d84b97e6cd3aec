"""Sweeps: planning a grid, skipping finished runs, restarting an interrupted one."""

import dataclasses
import json
import shutil

import pytest
import torch

from metaquant.experiments.config import RunConfig
from metaquant.experiments.presets import preset_names, resolve_preset
from metaquant.experiments.runs import RunDir
from metaquant.experiments.scheduler import run_sweep
from metaquant.experiments.sweep import SweepSpec, load_sweep, plan, pretrain_config, run_state
from tests.conftest import REPO

SWEEP = """
name = "tiny"
trials = 2
seed = 5

[pretrain]
train_size = 64
test_size = 40
batch_size = 32
epochs = 1
lr = 0.05

[base]
train_size = 64
test_size = 40
batch_size = 32
epochs = 1
hidden_size = 4

[optimizer_overrides.adam]
weight_decay = 5e-4

[[grid]]
quantizer = "dorefa"
estimator = ["ste", "multifc"]
optimizer = ["sgd", "adam"]

[[grid]]
label = "STE + momentum"
estimator = "ste"
momentum = 0.9
"""


def write(tmp_path, text=SWEEP):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_plan_expands_the_grid_with_trials_and_overrides(tmp_path):
    spec = load_sweep(write(tmp_path))
    runs = plan(spec, tmp_path / "runs")
    assert len(runs) == (4 + 1) * 2
    names = [r.path.name for r in runs]
    assert "multifc-ste-start-resnet20-fashion-mnist-dorefa1-adam-trial-2" in names  # the default start, named
    assert "ste-momentum-resnet20-fashion-mnist-dorefa1-sgd-trial-1" in names
    adam = next(r for r in runs if r.config.optimizer == "adam")
    assert adam.config.weight_decay == 5e-4 and adam.config.init.endswith("pretrain-resnet20-fashion-mnist")
    assert sorted({r.config.seed for r in runs}) == [5, 6]
    assert {r.label for r in runs} == {"STE", "MultiFC (STE start)", "STE + momentum"}


def test_optimizer_overrides_apply_whatever_the_spelling_of_the_optimizer(tmp_path):
    text = "[optimizer_overrides.adam]\nweight_decay = 5e-4\n[[grid]]\nestimator = 'ste'\noptimizer = ['Adam', 'SGD']"
    runs = plan(load_sweep(write(tmp_path, text)), tmp_path / "runs")
    assert [(r.config.optimizer, r.config.weight_decay) for r in runs] == [("adam", 5e-4), ("sgd", 0.0)]


def test_a_label_in_base_names_every_run_unless_an_entry_sets_its_own(tmp_path):
    text = "[base]\nlabel = 'Mine'\n[[grid]]\nestimator = 'ste'\n[[grid]]\nestimator = 'ewgs'\nlabel = 'E'"
    runs = plan(load_sweep(write(tmp_path, text)), tmp_path / "runs")
    assert [(r.label, r.config.label, r.path.name.split("-")[0]) for r in runs] == [
        ("Mine", "Mine", "mine"),
        ("E", "E", "e"),
    ]


@pytest.mark.parametrize(
    "text,message",
    [
        ("trials = 0\n[[grid]]\nestimator = 'ste'", "trials must be an integer >= 1"),
        ("[[grid]]\nestimator = 'magic'", "estimator 'magic' is not supported"),
        ("[base]\nlr = -1\n[[grid]]\nestimator = 'ste'", "lr must be a number > 0"),
        ("colour = 1\n[[grid]]\nestimator = 'ste'", "unknown keys \\['colour'\\]"),
        ("name = 'x'", "has no \\[\\[grid\\]\\] entry"),
        ("[[grid]]\nestimator = 'ste'\nwidth = 3", "unknown configuration keys \\['width'\\]; allowed: .*batch_size"),
        ("[base]\nseed = 3\n[[grid]]\nestimator = 'ste'", "\\[base\\] sets seed, which the sweep sets"),
        ("[[grid]]\nestimator = 'ste'\ntask = 'pretrain'", "\\[\\[grid\\]\\] sets task"),
        ("[pretrain]\nwidth = 3\n[[grid]]\nestimator = 'ste'", "unknown configuration keys \\['width'\\]"),
        ("[pretrain]\nmodel = 'resnet8'\n[[grid]]\nestimator = 'ste'", "\\[pretrain\\]: sets model"),
        (
            "[optimizer_overrides.adma]\nweight_decay = 1e-4\n[[grid]]\nestimator = 'ste'",
            "unknown optimizers \\['adma'\\]; allowed: sgd, adam, adamw",
        ),
        ("[base]\nbits = '1'\n[[grid]]\nestimator = 'ste'", "sweep 'sweep': bits must be an integer > 0, got '1'"),
        ("[[grid", "is not valid TOML"),
    ],
)
def test_bad_sweep_files_are_refused_before_running(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write(tmp_path, text))


def test_second_call_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path, fashion_mnist_available):
    text = SWEEP.replace("trials = 2", "trials = 1").replace("epochs = 1\nhidden", "epochs = 2\nhidden")
    text = text.split("[[grid]]")[0] + "[[grid]]\nestimator = ['ste', 'multifc']\n"
    spec = load_sweep(write(tmp_path, text))
    root = tmp_path / "runs"
    lines = []
    runs = run_sweep(spec, root, echo=lines.append)
    assert all(RunDir(r.path).is_done() for r in runs) and len(lines) == 3
    finished = {r.path: (r.path / "metrics.jsonl").read_bytes() for r in runs}
    # interrupt the second run: as if killed during its last epoch, after the checkpoint of the one before
    victim = runs[1].path
    (victim / "done").unlink()
    (victim / "checkpoint.pt").unlink()
    (victim / "checkpoint.prev.pt").rename(victim / "checkpoint.pt")
    lines.clear()
    run_sweep(spec, root, echo=lines.append)
    assert "skipped (done)" in lines[0] and "skipped (done)" in lines[1]  # pretrain and the first run
    assert ": resumed, done," in lines[2]
    for run in runs:  # the resumed run ends exactly where it had ended
        assert (run.path / "metrics.jsonl").read_bytes().count(b"\n") == finished[run.path].count(b"\n")
    assert (runs[0].path / "metrics.jsonl").read_bytes() == finished[runs[0].path]
    assert RunDir(victim).is_done()
    # a run whose directory holds no checkpoint at all is started again
    (victim / "done").unlink()
    for f in victim.glob("checkpoint*.pt"):
        f.unlink()
    lines.clear()
    run_sweep(spec, root, echo=lines.append)
    assert RunDir(victim).is_done() and len(RunDir(victim).metrics()) == 2
    accuracies = [m["test_acc"] for m in RunDir(victim).metrics()]
    # a run whose creation was killed before its config.json was in place is created there afresh
    shutil.rmtree(victim)
    victim.mkdir()
    (victim / ".config.json.k1ll3d.tmp").write_text("{")
    lines.clear()
    run_sweep(spec, root, echo=lines.append)
    assert ": done," in lines[2] and RunDir(victim).is_done()
    assert [m["test_acc"] for m in RunDir(victim).metrics()] == accuracies
    # a directory holding a run of another configuration is refused, never deleted or overwritten
    config = (victim / "config.json").read_text()
    (victim / "config.json").write_text(config.replace('"lr": 0.001', '"lr": 0.002'))
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    with pytest.raises(ValueError, match=r"holds a run with another configuration \(lr differ\)"):
        run_sweep(spec, root, echo=lines.append)
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_presets_load():
    assert {"paper-cifar10", "paper-cifar100", "paper-imagenet", "fashion-mnist"} <= set(preset_names())
    for name in preset_names():
        spec = load_sweep(resolve_preset(name))
        assert spec.trials >= 3
    cifar10 = plan(load_sweep(resolve_preset("paper-cifar10")), resolve_preset("paper-cifar10").parent)
    assert len(cifar10) == 3 * 2 * 4 * 2 * 5
    with pytest.raises(FileNotFoundError, match="neither a sweep file nor a preset; presets: fashion-mnist"):
        resolve_preset("nope")


def test_a_stored_run_without_a_meta_quantizer_is_the_planned_one_whatever_the_meta_defaults(tmp_path):
    def stored(config, **changes):
        path = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        data = {**config.to_dict(), **changes}
        del data["meta_init_scheme"]  # written before the field existed: the paper's start
        (path / "config.json").write_text(json.dumps(data))
        (path / "done").touch()
        return path

    ste = RunConfig(estimator="ste", dataset="cifar10")
    assert run_state(stored(ste, hidden_size=7, step_order="original"), ste) == "done"
    assert run_state(stored(ste, epochs=3), ste) == "another configuration (epochs differ)"
    multifc = dataclasses.replace(ste, estimator="multifc")
    assert run_state(stored(multifc), multifc) == "another configuration (meta_init_scheme differ)"
    assert run_state(stored(multifc), dataclasses.replace(multifc, meta_init_scheme="paper")) == "done"
    # the published full-precision model is the pre-training of the studies that start from it
    for name in ("fashion-mnist-full", "fashion-mnist-ste-start", "fashion-mnist-act"):
        spec = load_sweep(resolve_preset(name))
        published = REPO / "docs/results/fashion-mnist-full/runs/pretrain-resnet20-fashion-mnist"
        assert run_state(published, pretrain_config(spec, "resnet20", "fashion-mnist")) == "done", name


@pytest.mark.parametrize(
    "preset, scheme",
    [
        (name, "paper")
        for name in ("paper-cifar10", "paper-cifar100", "paper-imagenet", "fashion-mnist", "fashion-mnist-full")
    ]
    + [("fashion-mnist-ste-start", "ste"), ("fashion-mnist-act", "ste")],
)
def test_the_reproduction_presets_keep_the_paper_start_of_the_meta_quantizers(preset, scheme):
    runs = plan(load_sweep(resolve_preset(preset)), resolve_preset(preset).parent)
    metas = [r for r in runs if r.config.uses_meta]
    assert metas and {r.config.meta_init_scheme for r in metas} == {scheme}
    assert all(("-ste-start-" in r.path.name) == (scheme == "ste") for r in metas)  # names say the start by value


def test_dry_run_says_where_each_run_stands_and_names_a_changed_configuration(tmp_path, capsys):
    import dataclasses

    from metaquant.experiments.cli import main

    path, root = write(tmp_path), tmp_path / "runs"
    runs = plan(load_sweep(path), root)
    done, started, changed, other = (r.path for r in runs[:4])
    for run_path, config in ((done, runs[0].config), (started, runs[1].config)):
        run_path.mkdir(parents=True)
        config.save(run_path / "config.json")
    (done / "done").touch()
    changed.mkdir(parents=True)
    dataclasses.replace(runs[2].config, epochs=3, lr=0.5).save(changed / "config.json")
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("not a run")
    garbled, a_file = runs[5].path, runs[6].path
    garbled.mkdir(parents=True)
    (garbled / "config.json").write_text("{not json")
    a_file.write_text("a file where the run's directory goes")
    interrupted = runs[7].path  # a creation killed before config.json was renamed into place
    interrupted.mkdir(parents=True)
    (interrupted / ".config.json.x1y2.tmp").write_text("{")
    assert main(["sweep", str(path), "--run-dir", str(root), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(runs)
    assert lines[:8] == [
        f"[1] {done} (done)",
        f"[2] {started} (started)",
        f"[3] {changed} (another configuration (epochs, lr differ))",
        f"[4] {other} (no run)",
        f"[5] {runs[4].path} (to run)",
        f"[6] {garbled} (unreadable configuration)",
        f"[7] {a_file} (a file, not a directory)",
        f"[8] {interrupted} (to run)",
    ]


def test_the_full_scale_preset_is_the_study_its_results_page_describes(tmp_path):
    """fashion-mnist-full: the whole data set, 1-bit DoReFa everywhere, the paper's two protocols for STE, FC-Grad
    and MultiFC with 3 trials each, the strong baselines and the best recipe (docs/results/fashion-mnist-full/)."""
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.sweep import pretrain_config, pretrain_path

    spec = load_sweep(resolve_preset("fashion-mnist-full"))
    pretrain = pretrain_config(spec, "resnet20", "fashion-mnist")
    assert (pretrain.task, pretrain.train_size, pretrain.test_size, pretrain.augment) == (
        "pretrain",
        None,
        None,
        "crop_flip",
    )
    runs = plan(spec, tmp_path)
    assert len(runs) == 36 and len({r.path for r in runs}) == 36
    pretrained = str(pretrain_path(tmp_path, "resnet20", "fashion-mnist"))
    tuned = [r for r in runs if r.label.endswith("+ fine-tuning")]
    for run in runs:
        c = run.config
        assert (c.dataset, c.train_size, c.test_size, c.quantizer, c.bits) == ("fashion-mnist", None, None, "dorefa", 1)
        if run not in tuned:
            assert c.init == pretrained and c.augment == "crop_flip" and c.teacher is None and c.ema_decay == 0
        assert c.seed == spec.seed + run.trial - 1 and RunConfig.from_dict(c.to_dict()) == c

    def trials(label, optimizer):
        return sorted(r.trial for r in runs if r.label == label and r.config.optimizer == optimizer)

    for label in ("STE", "FC-Grad", "MultiFC"):
        assert trials(label, "sgd") == trials(label, "adam") == [1, 2, 3], label
    paper = [r for r in runs if r.label in ("STE", "FC-Grad", "MultiFC")]
    for run in paper:  # the paper's protocols: alpha = gamma = 1e-3, divided by 10 at each third of the run
        c = run.config
        assert (c.lr, c.meta_lr, c.lr_schedule, c.lr_gamma, 3 * c.lr_step) == (1e-3, 1e-3, "step", 0.1, c.epochs)
        assert (c.momentum, c.weight_decay) == ((0.0, 0.0) if c.optimizer == "sgd" else (0.0, 5e-4))
    assert trials("STE + momentum 0.9", "sgd") == [1, 2, 3]
    index = {r.path: i for i, r in enumerate(runs)}
    equivalent = [r for r in runs if r.config.lr_gain_from is not None]
    assert [r.trial for r in equivalent] == [1, 2, 3]
    for run in equivalent:  # after the FC-Grad run of its trial and protocol, whose gain it takes
        (source,) = [r for r in paper if r.label == "FC-Grad" and r.config.optimizer == "sgd" and r.trial == run.trial]
        assert run.config.lr_gain_from == str(source.path) and index[source.path] < index[run.path]
        assert (run.config.estimator, run.config.lr, run.config.momentum) == ("ste", 1e-3, 0.0)
    best = [r for r in runs if r.label.endswith("best recipe")]
    assert sorted((r.config.estimator, r.trial) for r in best) == [
        (e, t) for e in ("multifc", "ste") for t in (1, 2, 3)
    ]
    for run in best:  # long enough that the report's Last 10 Acc is the low-rate last third of the run
        c = run.config
        assert (c.optimizer, c.lr_schedule, c.weight_decay, c.epochs) == ("adam", "cosine", 0.0, 30)
        assert (c.distill_weight, c.distill_temperature, c.precise_bn_batches) == (0.9, 4.0, 100)
    index = {r.path: i for i, r in enumerate(runs)}
    assert sorted((r.config.estimator, r.trial) for r in tuned) == sorted((r.config.estimator, r.trial) for r in best)
    for run in tuned:  # each best-recipe run, fine-tuned: from its weights, without augmentation, averaged
        (source,) = [r for r in best if (r.config.estimator, r.trial) == (run.config.estimator, run.trial)]
        c = run.config
        assert c.init == str(source.path) and index[source.path] < index[run.path] and c.teacher == pretrained
        assert c.meta_init == (str(source.path) if c.uses_meta else None)
        assert (c.optimizer, c.lr, c.lr_schedule, c.weight_decay, c.epochs, c.augment) == (
            "adam",
            5e-5,
            "constant",
            0.0,
            10,
            "none",
        )
        assert (c.distill_weight, c.precise_bn_batches, c.ema_decay) == (0.9, 100, 0.998)
    for run in runs:  # the protocols train on labels only and evaluate with the running averages, as the paper
        if run not in best and run not in tuned:
            assert (run.config.distill_weight, run.config.precise_bn_batches) == (0, 0), run.label


def _metrics_without_times(run_dir):
    import json

    return [
        {k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_runs_side_by_side_give_the_metrics_of_runs_one_after_another(tmp_path, tiny_mnist):
    """``sweep --jobs 2`` (two processes) against ``--jobs 1`` on a tiny grid with a shared pre-training: every
    run's per-epoch metrics, losses and accuracies, are identical."""
    from metaquant.experiments.cli import main

    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    text = f"""
name = "pair"
trials = 1
[pretrain]
dataset = "mnist"
data_dir = "{data_dir}"
download = false
batch_size = 32
epochs = 1
lr = 0.05
device = "cpu"
[base]
dataset = "mnist"
data_dir = "{data_dir}"
download = false
model = "resnet8"
batch_size = 32
epochs = 2
hidden_size = 4
device = "cpu"
[[grid]]
estimator = ["ste", "multifc"]
"""
    sweep = write(tmp_path, text)
    # One CPU thread per run either way (--jobs 2 gives each process 1/2 of this process's threads): a
    # convolution's sums, and so the last bits of every result, depend on the number of threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["sweep", str(sweep), "--jobs", "2", "--run-dir", str(tmp_path / "jobs2")]) == 0
        torch.set_num_threads(1)
        assert main(["sweep", str(sweep), "--jobs", "1", "--run-dir", str(tmp_path / "jobs1")]) == 0
    finally:
        torch.set_num_threads(threads)
    serial = sorted(p.name for p in (tmp_path / "jobs1").iterdir())
    assert serial == sorted(p.name for p in (tmp_path / "jobs2").iterdir()) and len(serial) == 1 + 2
    for name in serial:
        assert _metrics_without_times(tmp_path / "jobs1" / name) == _metrics_without_times(tmp_path / "jobs2" / name)
    assert main(["sweep", str(sweep), "--jobs", "0"]) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stopped_sweep_returns_with_runs_still_to_start(tmp_path, tiny_mnist, jobs):
    """A stop request (Ctrl-C, SIGTERM) while runs are still waiting ends the sweep: it raises
    ``TrainingInterrupted`` and starts nothing more, side by side too (where it used to wait forever)."""
    import signal

    from metaquant.experiments.sweep import SweepSpec
    from metaquant.guards import StopFlag, TrainingInterrupted

    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    base = {
        "dataset": "mnist",
        "data_dir": data_dir,
        "download": False,
        "model": "resnet8",
        "batch_size": 32,
        "epochs": 1,
        "device": "cpu",
    }
    spec = SweepSpec("stop", 3, 0, None, base, grid=[{"estimator": "ste"}], optimizer_overrides={})
    stop = StopFlag()
    stop.request(signal.SIGTERM)  # asked before the first run starts: all three are still waiting
    with pytest.raises(TrainingInterrupted):
        run_sweep(spec, tmp_path / "runs", stop=stop, jobs=jobs, echo=lambda line: None)
    assert not any((run.path / "done").exists() for run in plan(spec, tmp_path / "runs"))


@pytest.mark.timeout(120)
def test_a_failed_run_ends_a_side_by_side_sweep_with_runs_still_to_start(tmp_path):
    """Two runs side by side fail (their data is not there) while a third waits: the sweep raises the runs'
    error instead of waiting for the third forever."""
    from metaquant.experiments.sweep import SweepSpec

    base = {"dataset": "mnist", "data_dir": str(tmp_path / "nowhere"), "download": False, "model": "resnet8"}
    spec = SweepSpec("fail", 3, 0, None, {**base, "device": "cpu"}, grid=[{"estimator": "ste"}], optimizer_overrides={})
    with pytest.raises(FileNotFoundError):
        run_sweep(spec, tmp_path / "runs", jobs=2, echo=lambda line: None)


def test_equivalent_ste_runs_take_the_fc_grad_run_of_their_trial(tmp_path):
    from metaquant.experiments.sweep import SweepSpec, plan

    spec = SweepSpec(
        "eq",
        2,
        0,
        None,
        {"dataset": "cifar10", "lr": 1e-3},
        grid=[{"estimator": "fc-grad"}, {"estimator": "ste", "equivalent_of": "fc-grad"}],
        optimizer_overrides={},
    )
    runs = plan(spec, tmp_path)
    fc_grad = {r.trial: r.path for r in runs if r.config.estimator == "fc-grad"}
    equivalent = [r for r in runs if r.config.lr_gain_from is not None]
    assert [r.trial for r in equivalent] == [1, 2]
    for run in equivalent:
        assert run.config.lr_gain_from == str(fc_grad[run.trial]) and run.label == "STE (FC-Grad's gain)"
        assert run.config.lr == 1e-3  # the gain is applied when the run starts, from the finished FC-Grad run
    bad = SweepSpec(
        "eq",
        1,
        0,
        None,
        {"dataset": "cifar10"},
        grid=[{"estimator": "ste", "equivalent_of": "lstmfc"}],
        optimizer_overrides={},
    )
    with pytest.raises(ValueError, match="equivalent_of 'lstmfc' is not supported; allowed: fc-grad"):
        plan(bad, tmp_path)
    meta = SweepSpec(
        "eq",
        1,
        0,
        None,
        {"dataset": "cifar10"},
        grid=[{"estimator": "multifc", "equivalent_of": "fc-grad"}],
        optimizer_overrides={},
    )
    with pytest.raises(ValueError, match="lr_gain_from .* applies to quantize runs with a classical estimator"):
        plan(meta, tmp_path)


def test_an_equivalent_ste_takes_the_fc_grad_run_of_its_settings_whatever_meta_settings_that_entry_sets(tmp_path):
    def spec(*grid):
        return SweepSpec("eq", 2, 0, None, {"dataset": "cifar10", "lr": 1e-3}, grid=list(grid), optimizer_overrides={})

    fc_grad = {"estimator": "fc-grad", "hidden_size": 50, "meta_lr": 1e-4}
    equivalent = {"estimator": "ste", "equivalent_of": "fc-grad"}
    other = {"estimator": "fc-grad", "weight_decay": 1e-4, "label": "FC-Grad wd"}  # not the source of a gain here
    wide = {**fc_grad, "hidden_size": 100, "label": "FC-Grad 100"}
    runs = plan(spec(other, fc_grad, equivalent), tmp_path)
    sources = {r.trial: r for r in runs if r.config.estimator == "fc-grad" and r.config.hidden_size == 50}
    for run in (r for r in runs if r.config.lr_gain_from is not None):
        assert run.config.lr_gain_from == str(sources[run.trial].path)
    # two FC-Grad runs of the STE's settings but for their meta quantizers: the STE entry's own ones decide
    runs = plan(spec(fc_grad, wide, {**equivalent, "hidden_size": 100, "meta_lr": 1e-4}), tmp_path / "b")
    for run in (r for r in runs if r.config.lr_gain_from is not None):
        assert RunConfig.from_dict(_config_of(runs, run.config.lr_gain_from)).hidden_size == 100
    with pytest.raises(
        ValueError, match=r"more than one such run is planned \(fc-grad-ste-start-resnet20-.*-trial-1, fc-grad-100-"
    ):
        plan(spec(fc_grad, wide, equivalent), tmp_path / "c")
    with pytest.raises(ValueError, match="no such run is planned: put the fc-grad entry before this one"):
        plan(spec(equivalent, fc_grad), tmp_path / "d")
    with pytest.raises(
        ValueError, match=r"no such run is planned \(fc-grad-wd-resnet20-.*-1 differs in weight_decay\)"
    ):
        plan(spec(other, equivalent), tmp_path / "e")


def test_an_equivalent_ste_that_continues_a_run_takes_the_gain_of_the_fc_grad_run_that_continues_it(tmp_path):
    spec = SweepSpec(
        "eq",
        1,
        0,
        None,
        {"dataset": "cifar10", "lr": 1e-3},
        grid=[
            {"estimator": "fc-grad", "label": "A"},
            {"estimator": "fc-grad", "label": "A2", "continue_from": "A"},
            {"estimator": "ste", "equivalent_of": "fc-grad", "continue_from": "A"},
        ],
        optimizer_overrides={},
    )
    a, a2, ste = plan(spec, tmp_path)
    assert ste.config.init == a2.config.init == str(a.path) and ste.config.lr_gain_from == str(a2.path)


def _config_of(runs, path):
    return next(r.config.to_dict() for r in runs if str(r.path) == path)


def test_side_by_side_a_run_waits_for_the_run_whose_result_it_needs(tmp_path):
    """An equivalent STE (``lr_gain_from``) starts only once its FC-Grad run is neither pending nor running;
    runs without prerequisites start in plan order."""
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.scheduler import _next_task, _Task

    fc_grad = _Task(tmp_path / "fc-grad", RunConfig(estimator="fc-grad"), "fc-grad", False)
    equivalent = _Task(
        tmp_path / "equivalent", RunConfig(estimator="ste", lr_gain_from=str(tmp_path / "fc-grad")), "equivalent", False
    )
    ste = _Task(tmp_path / "ste", RunConfig(estimator="ste"), "ste", False)
    assert _next_task([fc_grad, equivalent, ste], set()) is fc_grad
    assert _next_task([equivalent, ste], {fc_grad.path}) is ste  # FC-Grad still running: the STE goes first
    assert _next_task([equivalent], {fc_grad.path}) is None
    assert _next_task([equivalent], set()) is equivalent  # FC-Grad finished


def test_a_run_continues_the_run_of_its_trial_that_an_earlier_entry_labels(tmp_path):
    """``continue_from``: init is the source run of the same trial, the teacher stays the pre-trained model, a meta
    quantizer continues from the source's; an unknown or later label is refused, naming the earlier labels."""
    from metaquant.experiments.sweep import SweepSpec, _prerequisites, plan, pretrain_path

    grid = [
        {"estimator": ["ste", "multifc"], "label": "first"},
        {"estimator": "multifc", "label": "tuned", "continue_from": "first", "distill_weight": 0.5, "lr": 1e-5},
    ]
    spec = SweepSpec("chain", 2, 0, {"epochs": 1}, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    with pytest.raises(ValueError, match="two runs would share the directory first-resnet20"):
        plan(spec, tmp_path)  # both estimators of "first" have one label: the grid must name them apart
    grid[0] = {"estimator": "multifc", "label": "first"}
    grid.insert(1, {"estimator": "ste", "label": "other"})
    runs = plan(spec, tmp_path)
    assert [r.label for r in runs] == ["first", "first", "other", "other", "tuned", "tuned"]
    for run in runs[4:]:
        (source,) = [r for r in runs if r.label == "first" and r.trial == run.trial]
        c = run.config
        assert (c.init, c.meta_init) == (str(source.path), str(source.path))
        assert c.teacher == str(pretrain_path(tmp_path, "resnet20", "cifar10")) and c.lr == 1e-5
        assert _prerequisites(c) == {source.path}
    grid[-1] = {**grid[-1], "estimator": "ste", "distill_weight": 0.0}  # no teacher, no meta quantizer to carry
    (tuned, _) = [r for r in plan(spec, tmp_path) if r.label == "tuned"]
    assert (tuned.config.teacher, tuned.config.meta_init) == (None, None)
    for bad in ("fits", "tuned"):  # unknown; its own label (no earlier entry has it)
        grid[-1] = {**grid[-1], "continue_from": bad}
        with pytest.raises(ValueError, match=f"continue_from '{bad}' names no run of an earlier .*'first', 'other'"):
            plan(spec, tmp_path)


def test_a_sweep_fine_tunes_the_delivered_model_of_the_run_it_continues(tmp_path, tiny_mnist):
    """End to end, on a tiny data set: the fine-tuning run starts from the source run's averaged weights, distils
    from the pre-trained model, and its first epoch's metrics equal those of the same run made by hand."""
    import metaquant as mq
    from metaquant.experiments.builders import build_model, build_teacher
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.lifecycle import execute
    from metaquant.experiments.sweep import SweepSpec
    from metaquant.files import load_checkpoint
    from metaquant.models import extract_state_dict, load_weights

    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    data = {"dataset": "mnist", "data_dir": data_dir, "download": False, "batch_size": 32, "device": "cpu"}
    grid = [
        {"estimator": "ste", "label": "first", "ema_decay": 0.5},
        {"estimator": "ste", "label": "tuned", "continue_from": "first", "distill_weight": 0.5, "lr": 1e-4},
    ]
    spec = SweepSpec(
        "chain",
        1,
        0,
        {**data, "epochs": 1, "lr": 0.05},
        {**data, "model": "resnet8", "epochs": 1},
        grid=grid,
        optimizer_overrides={},
    )
    first, tuned = run_sweep(spec, tmp_path / "sweep")
    source = load_checkpoint(first.path / "checkpoint.pt")
    student = build_model(tuned.config, 10, 1, 28)
    for name, value in extract_state_dict(source).items():  # the average, not the last trained weights
        assert torch.equal(student.state_dict()[name], value), name
    assert any(not torch.equal(source["model"][k], v) for k, v in extract_state_dict(source).items())
    teacher = build_teacher(tuned.config, 10, 1, 28)
    pretrained = mq.models.get_model("resnet8", num_classes=10, in_channels=1)
    load_weights(pretrained, tmp_path / "sweep" / "pretrain-resnet8-mnist" / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), pretrained.state_dict().values()))
    by_hand = execute(RunConfig.from_dict(tuned.config.to_dict()), tmp_path / "by-hand", progress=False)
    assert _metrics_without_times(tuned.path) == _metrics_without_times(by_hand.run_dir)


def test_continue_from_pairs_runs_by_model_and_optimizer_and_refuses_what_would_not_load(tmp_path):
    from metaquant.experiments.sweep import SweepSpec, plan

    grid = [
        {"estimator": "ste", "optimizer": ["sgd", "adam"], "label": "first"},
        {"estimator": "ste", "optimizer": ["sgd", "adam"], "label": "tuned", "continue_from": "first"},
    ]
    spec = SweepSpec("pair", 1, 0, None, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    runs = plan(spec, tmp_path)
    for run in runs[2:]:  # each optimizer's fine-tuning continues the run of the same optimizer
        (source,) = [r for r in runs[:2] if r.config.optimizer == run.config.optimizer]
        assert run.config.init == str(source.path)
    grid[1] = {**grid[1], "model": "resnet8"}  # no run of that label has this model
    with pytest.raises(ValueError, match="continue_from 'first': no run of that label has this run's model"):
        plan(spec, tmp_path)
    grid[1] = {"estimator": "ste", "optimizer": "sgd", "label": "tuned", "continue_from": "first", "lr": 1e-4}
    grid[0] = {**grid[0], "lr": [1e-3, 1e-2], "optimizer": "sgd", "label": "first"}
    with pytest.raises(ValueError, match="two runs would share the directory"):
        plan(spec, tmp_path)
    grid[0] = {"estimator": "fc-grad", "label": "first"}
    grid[1] = {"estimator": "multifc", "label": "tuned", "continue_from": "first"}
    with pytest.raises(ValueError, match="the meta quantizer of first-.* is not this run's .* it would not load"):
        plan(spec, tmp_path)
    grid[1] = {"estimator": "ste", "label": "tuned", "continue_from": "first", "init": "elsewhere"}
    with pytest.raises(ValueError, match="continue_from 'first' starts from that run; it cannot also set init"):
        plan(spec, tmp_path)


def test_only_selects_runs_by_name_in_plan_order_and_refuses_a_pattern_that_matches_nothing(tmp_path, capsys):
    from metaquant.experiments.cli import main
    from metaquant.experiments.sweep import select_runs

    path, root = write(tmp_path), tmp_path / "runs"
    runs = plan(load_sweep(path), root)
    names = [r.path.name for r in runs]
    # an independent selection: every name against each pattern by hand
    picked = select_runs(runs, ["multifc-*", "*momentum*-trial-2"])
    expected = [n for n in names if n.startswith("multifc-") or ("momentum" in n and n.endswith("-trial-2"))]
    assert [r.path.name for r in picked] == expected and len(expected) == 4 + 1
    assert select_runs(runs, [names[3], names[3]]) == [runs[3]]  # a run matched twice is made once
    assert select_runs(runs, names[3]) == [runs[3]]  # one string is one pattern, not a list of characters
    assert select_runs(runs, [str(runs[2].path)]) == [runs[2]]  # a path as --dry-run prints it
    for bad, message in (
        (["lstmfc-*"], "pattern 'lstmfc-\\*' matches no run of the sweep .*--dry-run"),
        (["ste-*", " "], "blank"),
        ([], "no pattern"),
    ):
        with pytest.raises(ValueError, match=message):
            select_runs(runs, bad)
    assert main(["sweep", str(path), "--run-dir", str(root), "--dry-run", "--only", "*-adam-trial-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numbered = [f"[{i}] {r.path} (to run)" for i, r in enumerate(runs, 1) if r.path.name.endswith("-adam-trial-1")]
    assert lines == numbered and len(lines) == 2  # the sweep's numbering, so that lists can be compared
    assert main(["sweep", str(path), "--run-dir", str(root), "--only", "ste-*-adm-*"]) == 2
    assert "pattern 'ste-*-adm-*' matches no run" in capsys.readouterr().err
    assert not root.exists()


def test_only_refuses_to_leave_out_an_unfinished_run_that_a_selected_one_starts_from(tmp_path, capsys):
    from metaquant.experiments.cli import main
    from metaquant.experiments.sweep import SweepSpec, select_runs

    grid = [
        {"estimator": "fc-grad"},
        {"estimator": "ste", "equivalent_of": "fc-grad"},
        {"estimator": "ste", "label": "tuned", "continue_from": "FC-Grad (STE start)", "lr": 1e-5},
    ]
    spec = SweepSpec("chain", 1, 0, None, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    root = tmp_path / "runs"
    runs = plan(spec, root)
    fc_grad, equivalent, tuned = runs
    for selected, reason in ((equivalent, "learned gain"), (tuned, "model")):
        message = f"run {selected.path.name} starts from run {fc_grad.path.name} \\(its {reason}\\), which is not done"
        with pytest.raises(ValueError, match=message):
            run_sweep(spec, root, only=[selected.path.name])
    assert not root.exists()  # refused before anything was written
    assert select_runs(runs, ["*"]) == runs  # selected together, they run in order
    sweep = write(tmp_path, '[[grid]]\nestimator = "fc-grad"\n[[grid]]\nestimator = "ste"\nequivalent_of = "fc-grad"\n')
    sweep.write_text('name = "chain"\ntrials = 1\n[base]\ndataset = "cifar10"\n' + sweep.read_text())
    assert main(["sweep", str(sweep), "--run-dir", str(root), "--only", "ste-*", "--dry-run"]) == 2
    assert "not done and not selected" in capsys.readouterr().err  # a usage error, seen before anything runs
    fc_grad.path.mkdir(parents=True)  # once the source is done, the selection stands on its own
    fc_grad.config.save(fc_grad.path / "config.json")
    (fc_grad.path / "done").touch()
    assert select_runs(runs, ["ste-*", "tuned-*"]) == [equivalent, tuned]


def test_only_makes_the_pre_training_that_the_selected_runs_start_or_distil_from(tmp_path):
    from metaquant.experiments.scheduler import _tasks
    from metaquant.experiments.sweep import SweepSpec, pretrain_path

    grid = [
        {"estimator": "ste", "model": ["resnet20", "resnet32"], "label": "first"},
        {"estimator": "ste", "model": "resnet20", "label": "tuned", "continue_from": "first", "lr": 1e-5},
        {"estimator": "ste", "model": "resnet32", "label": "taught", "continue_from": "first", "distill_weight": 0.5},
    ]
    spec = SweepSpec("chain", 1, 0, {"epochs": 1}, {"dataset": "cifar10"}, grid=grid, optimizer_overrides={})
    root = tmp_path / "runs"
    runs = plan(spec, root)
    by_label = {(r.label, r.config.model): r for r in runs}

    def pretrains(*keys):
        return [task.path for task in _tasks(spec, root, runs, [by_label[k] for k in keys])[0]]

    resnet20, resnet32 = (pretrain_path(root, m, "cifar10") for m in ("resnet20", "resnet32"))
    assert pretrains(*by_label) == [resnet20, resnet32]  # the whole sweep
    assert pretrains(("first", "resnet32")) == [resnet32]  # its initialisation
    assert pretrains(("tuned", "resnet20")) == []  # starts from its source run, without a teacher
    assert pretrains(("taught", "resnet32")) == [resnet32]  # its teacher


def test_only_makes_the_selected_runs_and_the_pre_training_they_start_from(tmp_path, tiny_mnist, capsys):
    from metaquant.experiments.cli import main

    data_dir = tiny_mnist[tiny_mnist.index("--data-dir") + 1]
    data = f'dataset = "mnist"\ndata_dir = "{data_dir}"\ndownload = false\nbatch_size = 32\ndevice = "cpu"\n'
    text = (
        f'name = "part"\ntrials = 2\n[pretrain]\n{data}epochs = 1\nlr = 0.05\n'
        f'[base]\n{data}model = "resnet8"\nepochs = 1\nhidden_size = 4\n[[grid]]\nestimator = ["ste", "multifc"]\n'
    )
    root = tmp_path / "runs"
    assert main(["sweep", str(write(tmp_path, text)), "--run-dir", str(root), "--only", "multifc-*-trial-2"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] MultiFC (STE start) | resnet8 dorefa1 sgd | trial 2: done" in out
    assert f"the 1 selected run(s) of sweep part finished; summarize it with: metaquant report {root}" in out
    made = "multifc-ste-start-resnet8-mnist-dorefa1-sgd-trial-2"
    assert sorted(p.name for p in root.iterdir()) == [made, "pretrain-resnet8-mnist"]
    assert (root / made / "done").exists()
