"""scripts/study_numbers.py: the per-trial Last-10 means, loss points and paired differences against sums done
here, on run directories written in the library's format."""

import json
import statistics
import sys

from metaquant.experiments.config import RunConfig
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import study_numbers  # noqa: E402


def _run(root, name, estimator, optimizer, accuracies, losses, fp_dir):
    run = root / name
    run.mkdir(parents=True)
    RunConfig(estimator=estimator, optimizer=optimizer, init=str(fp_dir)).save(run / "config.json")
    lines = [
        json.dumps({"epoch": i, "test_acc": a, "train_loss": loss})
        for i, (a, loss) in enumerate(zip(accuracies, losses))
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "done").touch()


def test_study_numbers_by_hand(tmp_path, capsys):
    pre = tmp_path / "runs" / "pretrain-resnet20-fashion-mnist"
    pre.mkdir(parents=True)
    RunConfig(task="pretrain").save(pre / "config.json")
    (pre / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 90.0, "train_loss": 0.1}) + "\n")
    curves = {}
    for estimator in ("ste", "fc-grad"):
        for trial in (1, 2):
            base = 70.0 + trial + (3.0 if estimator == "fc-grad" else 0.0)
            acc = [base + 0.5 * e for e in range(12)]
            loss = [2.0 / (e + 1) + trial for e in range(12)]
            curves[estimator, trial] = (acc, loss)
            name = f"{estimator}-resnet20-fashion-mnist-dorefa1-sgd-trial-{trial}"
            _run(tmp_path / "runs", name, estimator, "sgd", acc, loss, pre)
    assert study_numbers.main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    last10 = {k: sum(v[0][2:]) / 10 for k, v in curves.items()}  # epochs 3..12
    ste_mean = (last10["ste", 1] + last10["ste", 2]) / 2
    assert f"STE: Last-10 mean {ste_mean:.3f} (trials 1: {last10['ste', 1]:.2f}, 2: {last10['ste', 2]:.2f})" in out
    loss_at_4 = statistics.fmean(curves["ste", t][1][3] for t in (1, 2))  # epochs 1, 12 // 3 = 4, 8, 12
    assert f"epoch 1: {statistics.fmean(curves['ste', t][1][0] for t in (1, 2)):.4f}, epoch 4: {loss_at_4:.4f}" in out
    assert "FC-Grad (STE start) - STE, trial by trial: +3.00, +3.00 (mean +3.000)" in out
    assert "learned gain k̄ per trial: 1: - (no trace.pt), 2: - (no trace.pt)" in out
    fc_mean = (last10["fc-grad", 1] + last10["fc-grad", 2]) / 2
    best = f"best Last-10 mean: {fc_mean:.3f}, FC-Grad (STE start) (SGD); full precision 90.00"
    assert f"{best}, difference {fc_mean - 90:+.3f}" in out
    # an FC-Grad run under Adam has no equivalent STE, so no gain to report: said, not a failure
    adam = "fc-grad-resnet20-fashion-mnist-dorefa1-adam-trial-1"
    _run(tmp_path / "runs", adam, "fc-grad", "adam", [80.0] * 12, [1.0] * 12, pre)
    (tmp_path / "runs" / adam / "trace.pt").touch()
    assert study_numbers.main([str(tmp_path / "runs")]) == 0
    assert "learned gain k̄ per trial: 1: - (the equivalent STE is defined for SGD)" in capsys.readouterr().out
    assert study_numbers.main([str(tmp_path / "nothing")]) == 1
    assert "study_numbers: error:" in capsys.readouterr().err
