"""Trial-by-trial comparisons with the STE: each experiment of another estimator against every STE experiment run
under the same settings, trial n against trial n.

A sweep gives trial n of every configuration the same seed, so the same data order, augmentation and starting
point (pairs whose seeds or start differ are not compared): the difference between two configurations in one
trial is free of the spread between trials, which in a 1-bit network is often larger than the effect being
measured. The statistics are those of the tables, per trial: the mean of its last ``k`` test accuracies and its
final one, and the same with BatchNorm statistics recomputed when both trials have them; a comparison reports
each pair's difference (method − STE) and their mean.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import META_FIELDS
from .report import TrialCurves

__all__ = ["PairedRow", "paired_differences", "METHOD_FIELDS"]

#: Run settings that make the backward method, which a comparison with the STE is about: everything else (data,
#: model, optimizer, schedule, epochs, precision, ...) must be equal for two experiments to be paired. A run started
#: from a trained meta quantizer (``meta_init``) is another experiment.
METHOD_FIELDS = frozenset({"estimator", "ewgs_delta", *META_FIELDS} - {"meta_init"})
BASELINE = "ste"


@dataclass(frozen=True)
class PairedRow:
    """One experiment against one STE experiment of the same settings, over the trials both have.

    Attributes:
        model, dataset, forward, bits, optimizer, act_bits: the experiment, as the tables name it.
        backward: the experiment's backward method (the tables' label); ``baseline``: the STE experiment's.
        trials: the trial numbers both have, in order.
        last, final: per trial, the difference of the mean of the last ``k`` test accuracies and of the final one.
        precise_last, precise_final: the same with BatchNorm statistics recomputed; None unless every trial of
            both has them.
    """

    model: str
    dataset: str
    forward: str
    bits: int
    optimizer: str
    act_bits: int | None
    backward: str
    baseline: str
    trials: tuple[int, ...]
    last: tuple[float, ...]
    final: tuple[float, ...]
    precise_last: tuple[float, ...] | None = None
    precise_final: tuple[float, ...] | None = None

    @property
    def last_mean(self) -> float:
        """The mean over the pairs of trials of ``last``."""
        return statistics.fmean(self.last)


def _last_mean(curve: Sequence[float], k: int) -> float:
    return statistics.fmean(curve[-k:])


def _differences(
    ours: list[TrialCurves], theirs: list[TrialCurves], k: int
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per pair of trials: Δ last-``k`` mean, Δ final, and both with BatchNorm statistics recomputed (or None)."""
    last = tuple(_last_mean(a.test_acc, k) - _last_mean(b.test_acc, k) for a, b in zip(ours, theirs))
    final = tuple(a.test_acc[-1] - b.test_acc[-1] for a, b in zip(ours, theirs))
    precise = [(a.precise_acc, b.precise_acc) for a, b in zip(ours, theirs)]
    if not all(p is not None and q is not None for p, q in precise):
        return last, final, None, None
    p_last = tuple(_last_mean(p, k) - _last_mean(q, k) for p, q in precise if p is not None and q is not None)
    p_final = tuple(p[-1] - q[-1] for p, q in precise if p is not None and q is not None)
    return last, final, p_last, p_final


def _group(trials: Iterable[TrialCurves]) -> dict[tuple[Any, ...], dict[int, TrialCurves]]:
    """The trials of each experiment (``TrialCurves.key`` and ``act_bits``) by trial number (the first of a
    repeated trial number counts, as the tables warn about repeats)."""
    groups: dict[tuple[Any, ...], dict[int, TrialCurves]] = defaultdict(dict)
    for t in trials:
        groups[t.key + (t.act_bits,)].setdefault(t.trial, t)
    return groups


def _without_method(setting: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in setting if k not in METHOD_FIELDS)


def _is_baseline(setting: tuple[tuple[str, Any], ...]) -> bool:
    return dict(setting).get("estimator") == BASELINE


def _comparable(ours: TrialCurves, theirs: TrialCurves) -> bool:
    """Whether two trials of the same number may be compared: the same seeds and start, and a baseline that takes
    its gain from a run (an equivalent STE) only against that run; an equivalent STE only against the STE."""
    if ours.start != theirs.start:
        return False
    if theirs.gain_from is not None:
        return ours.gain_from is None and ours.path is not None and ours.path.name == theirs.gain_from
    return True


def paired_differences(trials: Iterable[TrialCurves], last_k: int = 10) -> list[PairedRow]:
    """Every experiment of another estimator than the STE against every STE experiment whose settings are its
    own except ``METHOD_FIELDS`` (the same model, data, quantizer, optimizer, schedule, ...), trial by trial.

    Trial ``n`` of both must share their seeds and start (``TrialCurves.start``); an equivalent STE (an STE that
    takes its gain from a run) is the baseline of the run it takes the gain from only, and is itself compared with
    the STE. Runs of the original code (no settings recorded) and experiments without such a pair of trials are
    left out. Give it the trials the tables use (``report.told_apart(report.collect(...))``)
    so that the labels agree.

    Example:
        >>> from metaquant.experiments.report import TrialCurves
        >>> from metaquant.experiments.paired import paired_differences
        >>> def trial(estimator, n, acc):
        ...     backward = {"ste": "STE", "multifc": "MultiFC"}[estimator]
        ...     setting = (("estimator", estimator), ("lr", 0.001))
        ...     return TrialCurves("metaquant", "ResNet20", "CIFAR10", "dorefa", 1, backward, "Adam", n, acc,
        ...                        [1.0] * 2, setting=setting)
        >>> ste = [trial("ste", 1, [80.0, 82.0]), trial("ste", 2, [70.0, 90.0])]
        >>> multifc = [trial("multifc", 1, [81.0, 85.0]), trial("multifc", 2, [71.0, 85.0])]
        >>> (row,) = paired_differences(ste + multifc, last_k=2)
        >>> row.backward, row.baseline, row.trials, row.last, row.final, row.last_mean
        ('MultiFC', 'STE', (1, 2), (2.0, -2.0), (3.0, -5.0), 0.0)
    """
    groups = _group(trials)
    rows = []
    for key, ours in groups.items():
        setting = key[7]
        if not setting or (_is_baseline(setting) and not any(t.gain_from for t in ours.values())):
            continue  # the original code's runs, and the STE itself
        for other, theirs in groups.items():
            if not _is_baseline(other[7]) or other[:5] + other[6:7] + other[8:] != key[:5] + key[6:7] + key[8:]:
                continue
            if _without_method(other[7]) != _without_method(setting):
                continue
            common = [n for n in sorted(set(ours) & set(theirs)) if _comparable(ours[n], theirs[n])]
            if not common:
                continue
            diffs = _differences([ours[n] for n in common], [theirs[n] for n in common], last_k)
            _, model, dataset, forward, bits, backward, optimizer = key[:7]
            rows.append(
                PairedRow(model, dataset, forward, bits, optimizer, key[8], backward, other[5], tuple(common), *diffs)
            )
    return sorted(rows, key=lambda r: (r.model, r.dataset, r.forward, r.bits, r.optimizer, r.backward, r.baseline))
