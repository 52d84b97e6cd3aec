"""scripts/rerun_first_epoch.py: a run's first epoch re-run from its own configuration gives the recorded loss."""

import json
import sys

from metaquant.experiments.cli import main as cli
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import rerun_first_epoch  # noqa: E402


def test_a_rerun_reproduces_the_first_epoch_and_a_changed_record_is_caught(tmp_path, tiny_mnist, capsys):
    args = [*tiny_mnist, "-m", "resnet8", "-bs", "32", "-n", "3", "-meta", "multifc", "-hidden", "4", "--no-progress"]
    assert cli(["quantize", *args, "--run-dir", str(tmp_path), "--name", "run"]) == 0
    run = tmp_path / "run"
    recorded = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert rerun_first_epoch.main([str(run), "--keep", str(tmp_path / "again"), "--tolerance", "0"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: again[k] for k in ("train_loss", "train_acc", "test_acc")} == {
        k: recorded[k] for k in ("train_loss", "train_acc", "test_acc")
    }
    assert f"train_loss: recorded {recorded['train_loss']:.4f}, re-run {recorded['train_loss']:.4f}" in (
        capsys.readouterr().out
    )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**recorded, "train_loss": recorded["train_loss"] + 0.05})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert rerun_first_epoch.main([str(run)]) == 1
    assert "training loss differs: |difference| 0.0500" in capsys.readouterr().out
