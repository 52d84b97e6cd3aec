"""Re-run the first epoch of a finished run from its own configuration and compare it with the recorded one.

    python scripts/rerun_first_epoch.py RUN_DIR [--init CHECKPOINT_OR_RUN] [--data-dir DIR] [--keep DIR]

trains the configuration in ``RUN_DIR/config.json`` (same seeds, data order, augmentation and starting model) in
a scratch directory until its first epoch is recorded, stops it, and prints the first epoch's training loss,
training accuracy and test accuracy next to those in ``RUN_DIR/metrics.jsonl``. ``--init`` replaces the
configuration's starting model, for a run directory moved away from the one it started from (a published
study's runs start from the pre-training run beside them). The exit status is 0 when the training losses agree
to ``--tolerance`` (0.01 by default), else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
from pathlib import Path

from metaquant.experiments.config import RunConfig
from metaquant.experiments.lifecycle import execute
from metaquant.experiments.runs import RunDir
from metaquant.guards import StopFlag, TrainingInterrupted

COMPARED = ("train_loss", "train_acc", "test_acc")


def _stop_after_first_epoch(run_dir: Path, stop: StopFlag, done: threading.Event) -> None:
    """Ask the run to stop once its first epoch is in ``metrics.jsonl``."""
    while not done.wait(1.0):
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            stop.request(0)
            return


def rerun_first_epoch(config: RunConfig, scratch: Path) -> dict:
    """The first epoch's metrics of ``config`` trained in ``scratch`` (a missing or empty directory)."""
    stop, done = StopFlag(), threading.Event()
    watcher = threading.Thread(target=_stop_after_first_epoch, args=(scratch, stop, done), daemon=True)
    watcher.start()
    try:
        execute(config, scratch, progress=False, stop=stop)
    except TrainingInterrupted:
        pass
    finally:
        done.set()
    return RunDir(scratch).metrics()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory")
    parser.add_argument("--init", default=None, help="the starting model, instead of the configuration's")
    parser.add_argument("--data-dir", default=None, help="where the data set is, instead of the configuration's")
    parser.add_argument("--keep", type=Path, default=None, help="train in this new directory and keep it")
    parser.add_argument("--tolerance", type=float, default=0.01, help="on the training loss (default 0.01)")
    args = parser.parse_args(argv)
    recorded = RunDir(args.run).metrics()
    if not recorded:
        print(f"rerun_first_epoch: error: {args.run} has no recorded epoch", file=sys.stderr)
        return 1
    config = RunConfig.load(args.run / "config.json")
    changes = {k: v for k, v in (("init", args.init), ("data_dir", args.data_dir)) if v is not None}
    config = dataclasses.replace(config, **changes)
    with tempfile.TemporaryDirectory() as tmp:
        rerun = rerun_first_epoch(config, args.keep or Path(tmp) / "run")
    for key in COMPARED:
        print(f"{key}: recorded {recorded[0][key]:.4f}, re-run {rerun[key]:.4f}")
    difference = abs(rerun["train_loss"] - recorded[0]["train_loss"])
    agrees = difference <= args.tolerance
    print(
        f"training loss {'agrees' if agrees else 'differs'}: |difference| {difference:.4f} (tolerance {args.tolerance})"
    )
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
