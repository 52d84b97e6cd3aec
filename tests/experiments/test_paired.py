"""Trial-by-trial differences with the STE against values computed by hand, and the table the report writes."""

import statistics

import pytest

from metaquant.experiments.paired import paired_differences
from metaquant.experiments.report import collect, told_apart
from metaquant.experiments.tables import write_paired_table
from tests.experiments.test_report import _write_precise_run as _run

STE = {1: [80.0, 70.0, 85.0], 2: [82.0, 84.0, 60.0], 3: [81.0, 83.0, 84.0]}
STE_BN = {1: [81.0, 83.0, 86.0], 2: [83.0, 85.0, 87.0], 3: [82.0, 84.0, 85.0]}
FC = {1: [79.0, 84.0, 84.0], 2: [83.0, 83.0, 86.0], 3: [80.0, 85.0, 85.5]}
FC_BN = {1: [80.0, 84.5, 85.0], 2: [83.5, 86.0, 86.5], 3: [81.0, 85.0, 86.0]}


def _study(root):
    adam = {"optimizer": "adam", "lr": 1e-3, "record_precise_bn": 100}
    for t in (1, 2, 3):
        _run(root, f"ste-adam-trial-{t}", STE[t], STE_BN[t], estimator="ste", **adam)
        # the meta quantizer's own settings differ from the STE's: they are the method, not the experiment
        _run(
            root,
            f"fc-grad-adam-trial-{t}",
            FC[t],
            FC_BN[t],
            estimator="fc-grad",
            meta_init_scheme="ste",
            hidden_size=50,
            meta_lr=1e-2,
            **adam,
        )
    for t in (2, 3, 4):  # trials 2 and 3 pair with the STE's; trial 4 has no STE partner
        _run(
            root,
            f"multifc-adam-trial-{t}",
            [70.0 + t, 75.0, 77.0 + t],
            estimator="multifc",
            meta_init_scheme="paper",
            **adam,
        )
    # the same estimator under another learning rate or another number of epochs: another experiment
    other_lr = {"optimizer": "adam", "lr": 1e-2, "meta_init_scheme": "paper"}
    _run(root, "fc-grad-other-lr-trial-1", [50.0, 60.0, 70.0], estimator="fc-grad", **other_lr)
    _run(root, "ewgs-long-trial-1", [50.0] * 4, estimator="ewgs", optimizer="adam", lr=1e-3, epochs=4)
    # an STE under SGD pairs with nothing of Adam's
    _run(root, "ste-sgd-trial-1", [10.0, 20.0, 30.0], estimator="ste", optimizer="sgd")


def test_each_trial_is_compared_with_the_ste_trial_of_its_number_under_the_same_settings(tmp_path):
    _study(tmp_path)
    rows = {r.backward: r for r in paired_differences(told_apart(collect([tmp_path])), last_k=2)}
    assert sorted(rows) == ["FC-Grad (STE start)", "MultiFC"]
    fc = rows["FC-Grad (STE start)"]
    assert (fc.baseline, fc.trials, fc.optimizer) == ("STE", (1, 2, 3), "Adam")

    def last2(curve):
        return (curve[-2] + curve[-1]) / 2

    assert fc.last == pytest.approx(tuple(last2(FC[t]) - last2(STE[t]) for t in (1, 2, 3)))
    # by hand, trial 1: (84 + 84)/2 − (70 + 85)/2 = 6.5; trial 2: 84.5 − 72 = 12.5; trial 3: 85.25 − 83.5 = 1.75
    assert fc.last == pytest.approx((6.5, 12.5, 1.75)) and fc.last_mean == pytest.approx(20.75 / 3)
    assert fc.final == pytest.approx((-1.0, 26.0, 1.5))
    assert fc.precise_last == pytest.approx((84.75 - 84.5, 86.25 - 86.0, 85.5 - 84.5))
    assert fc.precise_final == pytest.approx((-1.0, -0.5, 1.0))
    multifc = rows["MultiFC"]
    assert multifc.trials == (2, 3) and multifc.precise_last is None and multifc.precise_final is None
    assert multifc.final == pytest.approx((79.0 - 60.0, 80.0 - 84.0))


def test_the_paired_table_shows_the_mean_then_each_trial(tmp_path):
    _study(tmp_path / "runs")
    rows = paired_differences(told_apart(collect([tmp_path / "runs"])), last_k=2)
    md, csv_path = write_paired_table(rows, tmp_path / "out")
    lines = md.read_text().splitlines()
    fc = next(line for line in lines if "FC-Grad" in line)
    mean = statistics.fmean([6.5, 12.5, 1.75])
    assert f"| Adam | FC-Grad (STE start) | STE | 1 2 3 | {mean:+.3f} (+6.50, +12.50, +1.75) |" in fc
    assert fc.endswith("| -0.167 (-1.00, -0.50, +1.00) |")  # Δ final with BatchNorm statistics recomputed
    assert "| - |" in next(line for line in lines if "MultiFC" in line)
    header, *records = csv_path.read_text().splitlines()
    assert header.startswith("model,dataset,forward,bits,optimizer,backward,against,trials,d_last10_mean")
    assert "6.5000 12.5000 1.7500" in next(r for r in records if "FC-Grad" in r)
    assert write_paired_table([], tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_the_report_command_writes_the_paired_table_only_when_there_is_a_pair(tmp_path, capsys):
    from metaquant.experiments.cli import main

    _run(tmp_path / "runs", "ste-trial-1", [80.0, 81.0], estimator="ste")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "a"), "--no-figures"]) == 0
    assert not (tmp_path / "a" / "results-paired.md").exists()
    _run(tmp_path / "runs", "multifc-trial-1", [82.0, 84.0], estimator="multifc")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "b"), "--no-figures"]) == 0
    assert "| MultiFC (STE start) | STE | 1 | +2.500 (+2.50) |" in (tmp_path / "b" / "results-paired.md").read_text()
    assert "results-paired.csv" in capsys.readouterr().out


def test_a_report_of_other_runs_leaves_no_paired_table_of_the_runs_before(tmp_path):
    from metaquant.experiments.cli import main

    _run(tmp_path / "a", "ste-trial-1", [80.0, 81.0], [80.0, 81.0], estimator="ste", record_precise_bn=10)
    _run(tmp_path / "a", "multifc-trial-1", [82.0, 84.0], [82.0, 84.0], estimator="multifc", record_precise_bn=10)
    _run(tmp_path / "b", "ste-trial-1", [70.0, 71.0], estimator="ste")
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "a"), "--out", str(out), "--no-figures"]) == 0
    assert (out / "results-paired.md").exists() and (out / "results-precise-bn.csv").exists()
    assert main(["report", str(tmp_path / "b"), "--out", str(out), "--no-figures", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]


def test_trials_are_paired_only_with_the_same_seeds_and_an_equivalent_ste_only_with_its_run(tmp_path):
    adam = {"optimizer": "adam", "lr": 1e-3}
    for t in (1, 2):
        _run(tmp_path, f"ste-trial-{t}", [80.0, 80.0 + t], estimator="ste", seed=t - 1, **adam)
        _run(tmp_path, f"fc-grad-trial-{t}", [81.0, 83.0 + t], estimator="fc-grad", seed=t - 1, **adam)
        # the equivalent STE of FC-Grad's trial t: its baseline, and itself compared with the STE
        gain = {"lr_gain_from": str(tmp_path / f"fc-grad-trial-{t}"), "label": "STE (FC-Grad's gain)"}
        _run(tmp_path, f"equivalent-trial-{t}", [81.0, 82.0 + t], estimator="ste", seed=t - 1, **gain, **adam)
        # another sweep's seeds: trial t of it is not trial t of this one
        _run(tmp_path / "other", f"multifc-trial-{t}", [85.0, 90.0], estimator="multifc", seed=100 + t, **adam)
    rows = {(r.backward, r.baseline): r for r in paired_differences(told_apart(collect([tmp_path])), last_k=1)}
    assert sorted(rows) == [
        ("FC-Grad (STE start)", "STE"),
        ("FC-Grad (STE start)", "STE (FC-Grad's gain)"),
        ("STE (FC-Grad's gain)", "STE"),
    ]
    assert rows[("FC-Grad (STE start)", "STE (FC-Grad's gain)")].final == pytest.approx((1.0, 1.0))
    assert rows[("STE (FC-Grad's gain)", "STE")].trials == (1, 2)
    # a run that does not start where the STE started (another full-precision model) is not paired either
    _run(tmp_path / "late", "multifc-trial-1", [85.0, 90.0], estimator="multifc", init="elsewhere", **adam)
    rows = paired_differences(told_apart(collect([tmp_path / "late", tmp_path / "ste-trial-1"])))
    assert rows == []
