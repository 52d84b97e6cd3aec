"""The results table's statistics against values computed by hand, the original logs' reader against the raw
text, and the written table and figures."""

import json
import shutil
import statistics

import pytest

from metaquant.config import RunConfig
from metaquant.report import (
    best_stats, collect, last_k_stats, plot_comparisons, read_original_run, summarize, write_table,
)
from tests.conftest import SHARED

ORIGINAL = SHARED / "reference/original-runs/ResNet20-CIFAR10/runs-Quant-Multiple"


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
    lines = [json.dumps({"epoch": i, "test_acc": a, "train_loss": l}) for i, (a, l) in enumerate(zip(accs, losses))]
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
    assert rows["MultiFC"].best_var == 0.0 and rows["MultiFC"].trials == 1


@pytest.fixture
def original_copy(tmp_path):
    src = ORIGINAL / "BWN" / "Baseline-BWN-optimizer-SGD-1bits-trial-2"
    if not src.exists():
        pytest.skip("shared original runs not present")
    dst = tmp_path / "ResNet20-CIFAR10" / "runs" / src.name
    shutil.copytree(src, dst)
    return dst


def test_original_run_reader_against_the_raw_text(original_copy):
    trial = read_original_run(original_copy)
    raw_acc = [float(line.split(",")[1]) for line in (original_copy / "test-acc.txt").read_text().split("\n") if line]
    raw_it = [int(line.split(",")[0]) for line in (original_copy / "test-acc.txt").read_text().split("\n") if line]
    raw_loss = {int(l.split(",")[0]): float(l.split(",")[1])
                for l in (original_copy / "loss.txt").read_text().split("\n") if l}
    assert (trial.model, trial.dataset, trial.forward, trial.backward, trial.optimizer, trial.trial) == (
        "ResNet20", "CIFAR10", "BWN", "STE", "SGD", 2)
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
        _write_run(ours, f"ste-trial-{t}", "ste", [50.0 + t + i for i in range(11)], [2.0 - 0.1 * i for i in range(11)],
                   quantizer="bwn")
    trials = collect([ours, original_copy.parent.parent])
    md, csv_path = write_table(summarize(trials), tmp_path / "out")
    text = md.read_text()
    assert "| metaquant | ResNet20 | Fashion-MNIST | BWN | 1 | STE | SGD |" in text
    assert "| original code | ResNet20 | CIFAR10 | BWN | 1 | STE | SGD |" in text
    assert "population variances" in text
    assert csv_path.read_text().count("\n") == 3
    pngs = plot_comparisons(trials, tmp_path / "out")
    assert len(pngs) == 2 and all(p.stat().st_size > 10_000 for p in pngs)
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no runs found"):
        collect([tmp_path])
