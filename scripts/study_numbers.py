"""The numbers a study's text quotes beyond the report's table, from its run directories.

    python scripts/study_numbers.py runs/fashion-mnist-full

prints, for every configuration (optimizer and backward method of one model, data set and quantizer):

- each trial's Last-10 mean test accuracy (the report pools them; here they are side by side) and their mean;
- the mean training loss over the trials after the first epoch, a third, two thirds and the whole run (the
  paper's "faster decrease of the training loss");
- for FC-Grad runs, the learned gain ``k̄`` of each trial (``metaquant.experiments.equivalent.learned_gain``), which the
  "equivalent STE" multiplies its learning rate by;
- per optimizer, each backward method's paired difference from STE, trial by trial (runs of one trial share
  the data order and augmentation), with their mean: the paper's "gap" under SGD and "parity" under Adam;
- the best configuration's Last-10 mean against the full-precision model's accuracy.

Only finished runs are read (as ``metaquant report`` does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

from metaquant.experiments.equivalent import learned_gain
from metaquant.experiments.report import TrialCurves, collect

LAST_K = 10


def last_k_mean(curve: list[float], k: int = LAST_K) -> float:
    return statistics.fmean(curve[-k:])


def loss_points(trials: list[TrialCurves]) -> dict[int, float]:
    """Mean training loss over the trials after epochs 1, E/3, 2E/3 and E (1-based; E the shortest run)."""
    epochs = min(len(t.train_loss) for t in trials)
    points = sorted({1, max(1, epochs // 3), max(1, 2 * epochs // 3), epochs})
    return {e: statistics.fmean(t.train_loss[e - 1] for t in trials) for e in points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or folders of them")
    args = parser.parse_args(argv)
    try:
        trials = [t for t in collect(args.runs) if t.source == "metaquant"]
    except (FileNotFoundError, ValueError) as err:
        print(f"study_numbers: error: {err}", file=sys.stderr)
        return 1
    groups: dict[tuple, dict[str, list[TrialCurves]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        groups[(t.model, t.dataset, t.forward, t.bits, t.optimizer)][t.backward].append(t)
    best: tuple[float, str, float | None] | None = None
    for (model, dataset, forward, bits, optimizer), methods in sorted(groups.items()):
        print(f"\n{model} {dataset} {forward}{bits} {optimizer}")
        for backward, members in sorted(methods.items()):
            members.sort(key=lambda t: t.trial)
            per_trial = [last_k_mean(t.test_acc) for t in members]
            mean = statistics.fmean(per_trial)
            losses = ", ".join(f"epoch {e}: {v:.4f}" for e, v in loss_points(members).items())
            trial_text = ", ".join(f"{t.trial}: {v:.2f}" for t, v in zip(members, per_trial))
            print(f"  {backward}: Last-{LAST_K} mean {mean:.3f} (trials {trial_text}); training loss {losses}")
            if backward.startswith("FC-Grad"):
                gains = []
                for t in members:
                    try:
                        gains.append(f"{t.trial}: {learned_gain(t.path):.3f}")
                    except FileNotFoundError:  # the run's trace.pt was not kept with it
                        gains.append(f"{t.trial}: - (no trace.pt)")
                    except ValueError as err:  # e.g. under Adam, where no learning rate is equivalent
                        gains.append(f"{t.trial}: - ({str(err).split(':')[0]})")
                print(f"    learned gain k̄ per trial: {', '.join(gains)}")
            fp = members[0].fp_acc
            if best is None or mean > best[0]:
                best = (mean, f"{backward} ({optimizer})", fp)
        ste = {t.trial: last_k_mean(t.test_acc) for t in methods.get("STE", [])}
        for backward, members in sorted(methods.items()):
            paired = [last_k_mean(t.test_acc) - ste[t.trial] for t in members if t.trial in ste]
            if backward != "STE" and paired:
                diffs = ", ".join(f"{d:+.2f}" for d in paired)
                print(f"  {backward} - STE, trial by trial: {diffs} (mean {statistics.fmean(paired):+.3f})")
    if best is not None:
        mean, name, fp = best
        against = f"; full precision {fp:.2f}, difference {mean - fp:+.3f}" if fp is not None else ""
        print(f"\nbest Last-{LAST_K} mean: {mean:.3f}, {name}{against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
