"""The results table's statistics against values computed by hand, the original logs' reader against the raw
text, and the written table and figures."""

import dataclasses
import json
import logging
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from metaquant.experiments.config import RunConfig
from metaquant.experiments.plots import plot_comparisons
from metaquant.experiments.report import best_stats, collect, last_k_stats, read_original_run, summarize
from metaquant.experiments.tables import write_precise_table, write_table


def test_best_and_pooled_last_k_statistics_by_hand():
    curves = [[50.0, 60.0, 55.0, 58.0], [40.0, 70.0, 65.0, 66.0], [45.0, 52.0, 64.0, 61.0]]
    # best per trial: 60, 70, 64 -> mean 64.666..., population variance ((−4.667)² + 5.333² + (−0.667)²) / 3
    mean, var = best_stats(curves)
    assert mean == pytest.approx((60 + 70 + 64) / 3)
    assert var == pytest.approx(((60 - 194 / 3) ** 2 + (70 - 194 / 3) ** 2 + (64 - 194 / 3) ** 2) / 3)
    # last 2 of every trial pooled: 55, 58, 65, 66, 64, 61
    mean, var = last_k_stats(curves, k=2)
    pooled = [55.0, 58.0, 65.0, 66.0, 64.0, 61.0]
    assert mean == pytest.approx(sum(pooled) / 6)
    assert var == pytest.approx(statistics.pvariance(pooled))


def _write_run(root, name, estimator, accs, losses, optimizer="sgd", quantizer="dorefa"):
    run = root / name
    run.mkdir(parents=True)
    RunConfig(estimator=estimator, optimizer=optimizer, quantizer=quantizer).save(run / "config.json")
    lines = [json.dumps({"epoch": i, "test_acc": a, "train_loss": x}) for i, (a, x) in enumerate(zip(accs, losses))]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "done").touch()
    return run


def test_summary_of_synthetic_runs(tmp_path):
    accs = {1: [10.0 + i for i in range(12)], 2: [20.0 + 2 * i for i in range(12)]}
    for trial, a in accs.items():
        _write_run(tmp_path, f"ste-trial-{trial}", "ste", a, [1.0] * 12)
    _write_run(tmp_path, "multifc-trial-1", "multifc", [30.0] * 12, [0.5] * 12)
    unfinished = _write_run(tmp_path, "multifc-trial-2", "multifc", [90.0] * 3, [0.1] * 3)
    (unfinished / "done").unlink()  # left out: its partial curve would bias the statistics
    rows = {r.backward: r for r in summarize(collect([tmp_path]))}
    ste = rows["STE"]
    assert ste.trials == 2
    assert ste.best_mean == pytest.approx((21 + 42) / 2) and ste.best_var == pytest.approx(10.5**2)
    pooled = accs[1][-10:] + accs[2][-10:]
    assert ste.last_mean == pytest.approx(statistics.fmean(pooled))
    assert ste.last_var == pytest.approx(statistics.pvariance(pooled))
    assert rows["MultiFC (STE start)"].best_var == 0.0 and rows["MultiFC (STE start)"].trials == 1


@pytest.fixture
def original_copy(tmp_path):
    """A run of the original code as its logs lay it out: ``<Model>-<Dataset>/<folder>/<run name>/`` with
    ``test-acc.txt`` (``iteration, accuracy`` after each of 100 epochs of 390 steps, 3 decimals) and
    ``loss.txt`` (``iteration, loss`` after every step, 8 decimals), each line ending in a newline."""
    run = tmp_path / "ResNet20-CIFAR10" / "runs" / "Baseline-BWN-optimizer-SGD-1bits-trial-2"
    run.mkdir(parents=True)
    generator = torch.Generator().manual_seed(2)
    steps = torch.arange(1, 39_001)
    losses = 2.3 * steps.double() ** -0.1 + 0.05 * torch.rand(len(steps), generator=generator, dtype=torch.float64)
    accuracies = 80 - 30 * torch.arange(1, 101).double() ** -0.5 + torch.rand(100, generator=generator) * 3
    (run / "loss.txt").write_text("".join(f"{i}, {x:.8f}\n" for i, x in zip(steps.tolist(), losses.tolist())))
    (run / "test-acc.txt").write_text("".join(f"{390 * e}, {a:.3f}\n" for e, a in enumerate(accuracies.tolist(), 1)))
    return run


def test_original_run_reader_against_the_raw_text(original_copy):
    trial = read_original_run(original_copy)
    raw_acc = [float(line.split(",")[1]) for line in (original_copy / "test-acc.txt").read_text().split("\n") if line]
    raw_it = [int(line.split(",")[0]) for line in (original_copy / "test-acc.txt").read_text().split("\n") if line]
    raw_loss = {
        int(line.split(",")[0]): float(line.split(",")[1])
        for line in (original_copy / "loss.txt").read_text().split("\n")
        if line
    }
    assert (trial.model, trial.dataset, trial.forward, trial.backward, trial.optimizer, trial.trial) == (
        "ResNet20",
        "CIFAR10",
        "BWN",
        "STE",
        "SGD",
        2,
    )
    assert trial.test_acc == raw_acc
    # epoch e's training loss: mean of the iterations after the previous evaluation, up to this one
    starts = [0] + raw_it[:-1]
    expected = [statistics.fmean(v for k, v in raw_loss.items() if s < k <= e) for s, e in zip(starts, raw_it)]
    assert trial.train_loss == pytest.approx(expected, rel=1e-12)
    (row,) = summarize([trial])
    assert row.best_mean == max(raw_acc) and row.best_var == 0.0
    assert row.last_mean == pytest.approx(statistics.fmean(raw_acc[-10:]))
    assert row.last_var == pytest.approx(statistics.pvariance(raw_acc[-10:]))


def test_report_writes_table_and_figures(tmp_path, original_copy):
    ours = tmp_path / "ours"
    for t in (1, 2):
        _write_run(
            ours,
            f"ste-trial-{t}",
            "ste",
            [50.0 + t + i for i in range(11)],
            [2.0 - 0.1 * i for i in range(11)],
            quantizer="bwn",
        )
    trials = collect([ours, original_copy.parent.parent])
    md, csv_path = write_table(summarize(trials), tmp_path / "out")
    text = md.read_text()
    assert "| metaquant | ResNet20 | Fashion-MNIST | BWN | 1 | STE | SGD |" in text
    assert "| original code | ResNet20 | CIFAR10 | BWN | 1 | STE | SGD |" in text
    assert "population variances" in text
    assert csv_path.read_text().count("\n") == 3
    written = plot_comparisons(trials, tmp_path / "out")
    assert [p.suffix for p in written] == [".png", ".pdf"] * 2 and all(p.stat().st_size > 10_000 for p in written)
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[1].read_bytes()[:5] == b"%PDF-"
    assert written[0].with_suffix("").name == "resnet20-cifar10-bwn1-sgd"


def test_comparison_figure_keeps_twin_curves_apart_and_shows_full_precision(tmp_path, monkeypatch):
    """Draw a figure in which a meta quantizer's two step orders give the same curve, and inspect it."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    pre = tmp_path / "runs" / "pretrain-resnet20-fashion-mnist"  # the pre-training beside the sweep's runs
    pre.mkdir(parents=True)
    (pre / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 85.5, "train_loss": 0.3}) + "\n")
    curves = {"multifc": [60.0, 70.0, 71.0], "ste": [50.0, 55.0, 56.0]}
    runs = (("multifc", "paper", None), ("multifc", "original", None), ("ste", "paper", None), ("ste", "paper", "eq"))
    for estimator, step_order, label in runs:
        run = tmp_path / "runs" / f"{estimator}-{step_order}-{label}-trial-1"
        run.mkdir()
        config = RunConfig(
            estimator=estimator,
            step_order=step_order,
            meta_init_scheme="paper",
            init="elsewhere/pretrain-resnet20-fashion-mnist",
        )
        # a second line of STE (as the equivalent STE is): it must not look like the first
        config = dataclasses.replace(config, label="STE (FC-Grad's gain)") if label else config
        config.save(run / "config.json")
        lines = [
            json.dumps({"epoch": i, "test_acc": a, "train_loss": 100.0**-i}) for i, a in enumerate(curves[estimator])
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "done").touch()
    plot_comparisons(collect([tmp_path / "runs"]), tmp_path / "out")
    figure = drawn[0]
    assert len(drawn) == 2 and drawn[1] is figure  # one figure, as PNG and as PDF
    loss_ax, acc_ax = figure.axes
    assert loss_ax.get_yscale() == "log"  # losses 1, 0.01, 0.0001
    assert not loss_ax.get_legend() and not acc_ax.get_legend() and len(figure.legends) == 1  # outside the panels
    lines = {text.get_text(): line for text, line in zip(figure.legends[0].texts, figure.legends[0].legend_handles)}
    assert set(lines) == {
        "STE (1)",
        "STE (FC-Grad's gain) (1)",
        "MultiFC (1)",
        "MultiFC (original order) (1)",
        "full precision (85.5%)",
    }
    ste, equivalent = lines["STE (1)"], lines["STE (FC-Grad's gain) (1)"]
    assert (ste.get_color(), ste.get_marker()) != (equivalent.get_color(), equivalent.get_marker())
    assert equivalent.get_color() not in {line.get_color() for name, line in lines.items() if "FC-Grad's" not in name}
    paper, original = lines["MultiFC (1)"], lines["MultiFC (original order) (1)"]
    assert paper.get_color() == original.get_color() and paper.get_linestyle() != original.get_linestyle()
    assert paper.get_marker() == original.get_marker() and paper.get_markersize() > original.get_markersize()
    assert lines["STE (1)"].get_color() != paper.get_color()
    assert [tuple(line.get_ydata()) for line in acc_ax.lines if line.get_linestyle() == ":"] == [(85.5, 85.5)]


def test_report_without_matplotlib_writes_the_table_and_exits_0(tmp_path):
    """Without the plot extra (matplotlib made unimportable in a fresh interpreter), the table is written, the
    missing figures are explained on stderr, and the exit status is 0."""
    for t in (1, 2):
        _write_run(tmp_path / "runs", f"ste-trial-{t}", "ste", [50.0 + t, 60.0], [2.0, 1.0])
    code = (
        "import sys; sys.modules['matplotlib'] = None; from metaquant.experiments.cli import main; "
        f"sys.exit(main(['report', {str(tmp_path / 'runs')!r}, '--out', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| metaquant | ResNet20 | Fashion-MNIST | dorefa | 1 | STE | SGD |" in done.stdout
    assert "no figures: drawing figures needs matplotlib (the plot extra): pip install matplotlib" in (done.stderr)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.md"]


def test_drawing_changes_no_global_matplotlib_state(tmp_path):
    """Importing metaquant and drawing never selects a backend nor imports pyplot, so a notebook's inline
    figures keep working."""
    _write_run(tmp_path / "runs", "ste-trial-1", "ste", [50.0, 60.0], [2.0, 1.0])
    code = (
        "import sys, matplotlib; matplotlib.use('svg'); from pathlib import Path; "
        "from metaquant.experiments import cli, trace; from metaquant.experiments.report import collect; "
        "from metaquant.experiments.plots import plot_comparisons; "
        f"plot_comparisons(collect([{str(tmp_path / 'runs')!r}]), Path({str(tmp_path / 'out')!r})); "
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no runs found"):
        collect([tmp_path])


def test_a_run_that_continues_a_quantization_run_is_compared_with_the_full_precision_model_it_descends_from(
    tmp_path, monkeypatch
):
    """A fine-tuning run's ``init`` is a 1-bit run: its full-precision accuracy is that of the pre-training at the
    start of the chain (also once the sweep's folder has moved), not the 1-bit run's; its curves are drawn after
    the epochs of the chain before it."""
    from matplotlib.figure import Figure

    root = tmp_path / "sweep"
    pre = root / "pretrain-resnet20-fashion-mnist"
    pre.mkdir(parents=True)
    RunConfig(task="pretrain").save(pre / "config.json")
    (pre / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 94.5, "train_loss": 0.2}) + "\n")
    chain = [
        ("first-trial-1", pre, [90.0, 92.0]),
        ("tuned-trial-1", root / "first-trial-1", [93.0, 93.5]),
        ("again-trial-1", root / "tuned-trial-1", [94.0]),
    ]
    for name, init, accuracies in chain:
        run = root / name
        run.mkdir()
        RunConfig(label=name.split("-")[0], init=str(init)).save(run / "config.json")
        lines = [json.dumps({"epoch": i, "test_acc": a, "train_loss": 1.0}) for i, a in enumerate(accuracies)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "done").touch()
    moved = tmp_path / "moved"
    root.rename(moved)  # the configurations still name the old folder
    by_label = {t.key[5]: t for t in collect([moved])}
    assert by_label["first"].fp_acc == 94.5 and by_label["tuned"].fp_acc == 94.5
    # each is drawn after the epochs of the runs it continues
    assert [by_label[k].first_epoch for k in ("first", "tuned", "again")] == [0, 2, 4]
    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    plot_comparisons(list(by_label.values()), tmp_path / "figures")
    acc_ax = drawn[0].axes[1]
    epochs = sorted(tuple(line.get_xdata()) for line in acc_ax.lines if line.get_linestyle() != ":")
    assert epochs == [(1, 2), (3, 4), (5,)]
    loop = moved / "loop-trial-1"  # runs that start from each other: no full-precision model to compare with
    loop.mkdir()
    RunConfig(init=str(loop)).save(loop / "config.json")
    (loop / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 50.0, "train_loss": 1.0}) + "\n")
    (loop / "done").touch()
    in_loop = {t.key[5]: t for t in collect([moved])}["STE"]
    assert in_loop.fp_acc is None and in_loop.first_epoch == 0


def _trial(root, name, accs, **config):
    run = root / name
    run.mkdir(parents=True)
    RunConfig(**config).save(run / "config.json")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": i, "test_acc": a, "train_loss": 1.0}) + "\n" for i, a in enumerate(accs))
    )
    (run / "done").touch()
    return run


def test_rows_are_experiments_and_a_trial_counts_once(tmp_path, caplog):
    """Runs that differ in precision or learning rate are separate rows, told apart in the table; seeds, data
    folders and devices are trials of one row; a copy of a run counts once; a repeated trial number is said."""
    _trial(tmp_path / "a", "ste-trial-1", [50.0, 60.0], seed=0)
    _trial(tmp_path / "a", "ste-trial-2", [52.0, 62.0], seed=1, data_dir="/elsewhere", device="cpu")
    _trial(tmp_path / "a", "ste-bf16-trial-1", [40.0, 70.0], seed=0, amp="bf16")
    shutil.copytree(tmp_path / "a" / "ste-trial-1", tmp_path / "b" / "ste-trial-1")  # an identical copy
    _trial(tmp_path / "b", "ste-trial-2", [54.0, 64.0], seed=2)  # another run, also called trial 2
    _trial(tmp_path / "a", "fast-trial-1", [30.0, 35.0], lr=0.01, label="STE, fast")
    _trial(tmp_path / "a", "fast-other-trial-1", [31.0, 36.0], lr=0.02, label="STE, fast")
    with caplog.at_level(logging.WARNING, logger="metaquant"):
        rows = {r.backward: r for r in summarize(collect([tmp_path]))}
    assert sorted(rows) == ["STE [amp=bf16]", "STE [amp=none]", "STE, fast [lr=0.01]", "STE, fast [lr=0.02]"]
    fp32 = rows["STE [amp=none]"]
    assert fp32.trials == 3 and fp32.best_mean == pytest.approx((60 + 62 + 64) / 3)  # the copy counted once
    assert rows["STE [amp=bf16]"].trials == 1 and rows["STE [amp=bf16]"].best_mean == 70.0
    assert dict(rows["STE [amp=bf16]"].setting)["amp"] == "bf16"
    messages = [r.getMessage() for r in caplog.records]
    copy = [m for m in messages if "is a copy of" in m]
    assert len(copy) == 1 and "ste-trial-1" in copy[0]
    (repeated,) = [m for m in messages if "appears 2 times" in m]
    assert repeated.startswith("trial 2 of ResNet20 | Fashion-MNIST | dorefa | 1 | STE | SGD appears")
    md, _ = write_table(summarize(collect([tmp_path])), tmp_path / "out")
    assert "| dorefa | 1 | STE [amp=bf16] | SGD | 70.000 (0.000) |" in md.read_text()
    # the same trials given to summarize directly are grouped the same way
    again = summarize([t for t in collect([tmp_path / "a"])] + collect([tmp_path / "b"]))
    assert {r.backward: r.trials for r in again} == {k: r.trials for k, r in rows.items()}


def _write_precise_run(root, name, accs, precise=None, **config):
    run = root / name
    run.mkdir(parents=True)
    RunConfig(**config).save(run / "config.json")
    records = [{"epoch": i, "test_acc": a, "train_loss": 1.0} for i, a in enumerate(accs)]
    for record, p in zip(records, precise or []):
        record["test_acc_precise_bn"] = p
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "done").touch()


def test_the_precise_bn_table_puts_recomputed_accuracies_beside_the_raw_ones(tmp_path):

    raw = {1: [80.0, 70.0, 85.0], 2: [82.0, 84.0, 60.0]}  # running statistics: one-epoch collapses
    precise = {1: [81.0, 83.0, 86.0], 2: [83.0, 85.0, 87.0]}
    for t in (1, 2):
        _write_precise_run(tmp_path, f"ste-trial-{t}", raw[t], precise[t], record_precise_bn=100)
        _write_precise_run(tmp_path, f"multifc-trial-{t}", raw[t], None, estimator="multifc")  # nothing recorded
    _write_precise_run(tmp_path, "ewgs-trial-1", [70.0, 71.0], None, estimator="ewgs", precise_bn_batches=50)
    rows = {r.backward: r for r in summarize(collect([tmp_path]), last_k=2)}
    ste = rows["STE"]
    # by hand: finals 85, 60; recomputed finals 86, 87; last 2 pooled 70, 85, 84, 60 and 83, 86, 85, 87
    assert ste.final == (72.5, 156.25) and ste.precise_final == (86.5, 0.25)
    assert ste.precise_last == (statistics.fmean([83, 86, 85, 87]), statistics.pvariance([83, 86, 85, 87]))
    assert rows["MultiFC (STE start)"].precise_final is None and rows["MultiFC (STE start)"].precise_last is None
    assert rows["EWGS + precise BN"].precise_final == (71.0, 0.0)  # its every test recomputed the statistics
    md, csv_path = write_precise_table(list(rows.values()), tmp_path / "out")
    lines = md.read_text().splitlines()
    assert "MultiFC" not in md.read_text() and len([line for line in lines if "| metaquant |" in line]) == 2
    last = statistics.pvariance([70, 85, 84, 60])  # 107.6875
    assert f"| STE | SGD | 72.500 (156.250) | 86.500 (0.250) | 74.750 ({last:.3f}) | 85.250 (2.188) | 2 |" in lines[2]
    assert csv_path.read_text().splitlines()[0].endswith("last10_precise_bn_mean,last10_precise_bn_var,trials")
    assert write_precise_table([rows["MultiFC (STE start)"]], tmp_path / "none") == []


def test_the_report_command_never_replaces_a_table_unasked_and_writes_the_precise_bn_table(tmp_path, capsys):
    from metaquant.experiments.cli import main

    for t in (1, 2):
        _write_precise_run(tmp_path / "runs", f"ste-trial-{t}", [80.0, 81.0], [82.0, 83.0], record_precise_bn=10)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--no-figures"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "results-precise-bn.csv",
        "results-precise-bn.md",
        "results.csv",
        "results.md",
    ]
    assert "| STE | SGD | 81.000 (0.000) | 83.000 (0.000) |" in capsys.readouterr().out
    (out / "results.md").write_text("a table someone edited")
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert f"--out {out} already holds a table (results.md, results.csv)" in err and "--overwrite" in err
    assert (out / "results.md").read_text() == "a table someone edited"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--no-figures", "--overwrite"]) == 0
    assert (out / "results.md").read_text().startswith("| Source |")


def test_a_table_that_cannot_be_written_whole_leaves_the_old_one(tmp_path, monkeypatch):
    import errno

    import metaquant.files

    _write_run(tmp_path / "runs", "ste-trial-1", "ste", [50.0, 60.0], [2.0, 1.0])
    rows = summarize(collect([tmp_path / "runs"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("old md")
    (out / "results.csv").write_text("old csv")
    calls = []

    def fsync(fd):  # the disk fills up while the second file is written
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metaquant.files.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left") as info:
        write_table(rows, out)
    assert info.value.filename == str(out / "results.csv")
    assert (out / "results.md").read_text() == "old md" and (out / "results.csv").read_text() == "old csv"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]  # no temporary file left
