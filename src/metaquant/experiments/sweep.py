"""Multi-trial sweeps: a grid of quantization runs from one TOML file, each in its own run directory.

A sweep file has four parts (see ``presets/`` for complete ones)::

    name = "fashion-mnist-resnet20"
    trials = 3                       # trial n (1-based) runs with seed = seed + n - 1
    seed = 0

    [pretrain]                       # optional: one shared full-precision model per model name, made once
    dataset = "fashion-mnist"        # RunConfig fields (task = "pretrain")
    epochs = 3

    [base]                           # RunConfig fields shared by every quantization run
    dataset = "fashion-mnist"
    epochs = 10

    [[grid]]                         # each entry: lists are crossed, scalars are fixed; entries are unioned
    model = ["resnet20"]
    quantizer = ["dorefa", "bwn"]
    estimator = ["ste", "multifc"]
    optimizer = ["sgd", "adam"]

    [optimizer_overrides.adam]       # fields applied to every run with that optimizer
    weight_decay = 5e-4

A ``[[grid]]`` entry (or ``[base]``) may set ``label`` to name its backward method in reports (default: derived
from the estimator, step order and momentum); ``seed`` and ``task`` are the sweep's to set. An entry with
``equivalent_of = "fc-grad"`` (and a classical estimator) is the *equivalent STE* of the FC-Grad run of the
same trial and options but for the meta quantizer's (``metaquant.equivalent``; among several such runs, the one
of the entry's own meta settings): its learning rate is multiplied by the mean gain that run learned, so the
FC-Grad entry must come first. An entry with ``continue_from = "<label>"`` fine-tunes the run
of the same trial that an earlier entry labelled so: it starts from that run's model (``init``: its delivered
weights; with a meta quantizer, also ``meta_init``: the trained meta quantizer), and a distilling run keeps the
sweep's pre-trained model as its ``teacher``; it starts once that run has finished. Runs that are
``done`` are skipped when the sweep is run again; a run left unfinished by an interruption is resumed from its
last checkpoint (exactly: see ``lifecycle.resume``). ``scheduler.run_sweep(..., jobs=N)`` (``metaquant sweep
--jobs N``) makes N runs at a time, each in its own process, with the same results; ``only=[pattern, ...]``
(``metaquant sweep --only PATTERN``) makes only the runs whose directory names match, e.g. to share a sweep out
between machines.
A directory holding a run of another configuration is never touched: the sweep stops and says so.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import META_FIELDS, OPTIMIZERS, RunConfig
from .equivalent import check_equivalent
from .meta_files import meta_config
from .naming import backward_label
from .runs import RunDir, RunExistsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "SweepSpec",
    "PlannedRun",
    "load_sweep",
    "plan",
    "run_state",
    "select_runs",
    "pretrain_config",
    "pretrain_path",
]

logger = logging.getLogger(__name__)

_TOP_KEYS = {"name", "trials", "seed", "pretrain", "base", "grid", "optimizer_overrides", "run_dir"}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file (see the module docstring for the file's parts).

    Made by ``load_sweep``; can also be built directly and given to ``plan`` or ``run_sweep``.

    Attributes:
        name: the sweep's name (default: the file's stem).
        trials: runs per configuration; trial ``n`` (1-based) runs with seed ``seed + n − 1``.
        seed: the seed of trial 1.
        pretrain: ``RunConfig`` fields of the shared full-precision model per (model, dataset), or None.
        base: ``RunConfig`` fields of every quantization run.
        grid: the ``[[grid]]`` entries: lists are crossed, scalars fixed; the entries' runs are unioned.
        optimizer_overrides: fields applied to every run with that optimizer (the grid entry wins).
        run_dir: where the runs go, if the file says.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.sweep import plan, SweepSpec
        >>> spec = SweepSpec(name="demo", trials=3, seed=0, pretrain=None, base={"dataset": "cifar10"},
        ...                  grid=[{"quantizer": ["dorefa", "bwn"], "estimator": ["ste", "multifc"]}],
        ...                  optimizer_overrides={})
        >>> len(plan(spec, pathlib.Path("sweeps/demo")))  # 2 quantizers × 2 estimators × 3 trials
        12
    """

    name: str
    trials: int
    seed: int
    pretrain: dict[str, Any] | None
    base: dict[str, Any]
    grid: list[dict[str, Any]]
    optimizer_overrides: dict[str, dict[str, Any]]
    run_dir: str | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: where it goes, its configuration, and how reports name its backward method.

    Attributes:
        path: the run directory, ``<root>/<label>-<model>-<dataset>-<quantizer><bits>-<optimizer>-trial-<n>``
            with the label in lower case and ``-`` for other characters than letters and digits.
        config: the run's validated ``RunConfig`` (``task="quantize"``, its ``label`` set).
        label: how reports name its backward method (``backward_label`` or the grid entry's ``label``).
        trial: the trial number, from 1.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.sweep import plan, SweepSpec
        >>> spec = SweepSpec(name="demo", trials=2, seed=5, pretrain=None, base={"dataset": "cifar10"},
        ...                  grid=[{"estimator": "lstmfc", "label": "LSTMFC h100"}], optimizer_overrides={})
        >>> run = plan(spec, pathlib.Path("sweeps/demo"))[-1]
        >>> run.path.name, run.label, run.trial, run.config.seed
        ('lstmfc-h100-resnet20-cifar10-dorefa1-sgd-trial-2', 'LSTMFC h100', 2, 6)
    """

    path: Path
    config: RunConfig
    label: str
    trial: int


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file.

    Every run's configuration is built and validated (``plan``) before the spec is returned, so a mistake is
    reported before anything runs.

    Args:
        path: the TOML file.

    Returns:
        The ``SweepSpec``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, unknown keys, no ``[[grid]]`` entry, ``trials`` not an integer >= 1, an unknown
            ``RunConfig`` field, a field value a run refuses, or two runs that would share a directory.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.sweep import load_sweep
        >>> _ = pathlib.Path("tiny.toml").write_text('''
        ... name = "tiny"
        ... trials = 2
        ... [base]
        ... dataset = "mnist"
        ... [[grid]]
        ... estimator = ["ste", "multifc"]
        ... ''')
        >>> spec = load_sweep("tiny.toml")
        >>> spec.name, spec.trials, spec.base, spec.grid
        ('tiny', 2, {'dataset': 'mnist'}, [{'estimator': ['ste', 'multifc']}])
        >>> _ = pathlib.Path("typo.toml").write_text('''
        ... [[grid]]
        ... estimater = "ste"
        ... ''')
        >>> try:
        ...     load_sweep("typo.toml")
        ... except ValueError as err:
        ...     print(err)
        sweep 'typo': unknown configuration keys ['estimater']; allowed: ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"sweep file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"sweep file {path}: unknown keys {unknown}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    if not data.get("grid"):
        raise ValueError(f"sweep file {path} has no [[grid]] entry")
    trials = data.get("trials", 1)
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"sweep file {path}: trials must be an integer >= 1, got {trials!r}")
    spec = SweepSpec(
        name=str(data.get("name", path.stem)),
        trials=trials,
        seed=int(data.get("seed", 0)),
        pretrain=data.get("pretrain"),
        base=dict(data.get("base", {})),
        grid=list(data["grid"]),
        optimizer_overrides=dict(data.get("optimizer_overrides", {})),
        run_dir=data.get("run_dir"),
    )
    runs = plan(spec, Path("."))  # validates every configuration before anything runs
    if spec.pretrain is not None:
        for model, dataset in sorted({(run.config.model, run.config.dataset) for run in runs}):
            try:
                pretrain_config(spec, model, dataset)
            except ValueError as err:
                raise ValueError(f"sweep {spec.name!r}: [pretrain]: {err}") from None
    return spec


def _expand(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    for combo in itertools.product(*values):
        yield dict(zip(keys, combo))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pretrain_config(spec: SweepSpec, model: str, dataset: str) -> RunConfig:
    """The configuration of the sweep's one full-precision pre-training run for ``model`` on ``dataset``: its
    ``[pretrain]`` part with the sweep's seed (``ValueError`` if that part sets ``task`` or ``model``)."""
    fields = {"seed": spec.seed, **(spec.pretrain or {})}
    clash = sorted({"task", "model"} & set(fields))
    if clash:
        raise ValueError(
            f"sets {', '.join(clash)}, which the sweep sets: one pre-trained model is made for "
            "every model of the grid; remove it"
        )
    fields.update(task="pretrain", model=model, dataset=dataset)
    return RunConfig.from_fields(fields)


def pretrain_path(root: Path, model: str, dataset: str) -> Path:
    """Where the sweep keeps the pre-trained ``model`` for ``dataset``: ``<root>/pretrain-<model>-<dataset>``."""
    return root / f"pretrain-{model}-{dataset}"


def plan(spec: SweepSpec, root: Path) -> list[PlannedRun]:
    """Every quantization run of the sweep, in order, with validated configurations.

    Each ``[[grid]]`` entry is expanded (lists crossed), merged over ``base`` and the optimizer's overrides
    (the entry wins), and repeated for every trial. With a ``[pretrain]`` part, runs without ``init`` start
    from ``<root>/pretrain-<model>-<dataset>``.

    Args:
        spec: the sweep.
        root: the directory the run directories go in (nothing is created).

    Returns:
        The ``PlannedRun`` of every run: grid entries in order, then their combinations, then the trials.

    Raises:
        ValueError: an unknown ``RunConfig`` field, a value a run refuses, ``seed`` or ``task`` set by the file
            (the sweep sets them), overrides for an unknown optimizer, or two runs that would share a directory.

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.sweep import plan, SweepSpec
        >>> spec = SweepSpec(name="demo", trials=1, seed=0, pretrain=None, base={"dataset": "cifar10"},
        ...                  grid=[{"estimator": ["ste", "multifc"], "optimizer": ["sgd", "adam"]}],
        ...                  optimizer_overrides={"adam": {"weight_decay": 5e-4}})
        >>> for run in plan(spec, pathlib.Path("sweeps/demo")):
        ...     print(run.path.name, run.config.weight_decay)
        ste-resnet20-cifar10-dorefa1-sgd-trial-1 0.0
        ste-resnet20-cifar10-dorefa1-adam-trial-1 0.0005
        multifc-ste-start-resnet20-cifar10-dorefa1-sgd-trial-1 0.0
        multifc-ste-start-resnet20-cifar10-dorefa1-adam-trial-1 0.0005
    """
    unknown = sorted(set(spec.optimizer_overrides) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(
            f"sweep {spec.name!r}: [optimizer_overrides] for unknown optimizers {unknown}; "
            f"allowed: {', '.join(OPTIMIZERS)} (lower case)"
        )
    runs: list[PlannedRun] = []
    seen: set[Path] = set()
    for part, fields in [
        ("[base]", spec.base),
        *((f"[optimizer_overrides.{name}]", overrides) for name, overrides in spec.optimizer_overrides.items()),
        *(("[[grid]]", entry) for entry in spec.grid),
    ]:
        # The sweep sets these itself: a value given here would be silently replaced.
        clash = sorted({"task", "seed"} & set(fields))
        if clash:
            raise ValueError(
                f"sweep {spec.name!r}: {part} sets {', '.join(clash)}, which the sweep sets for every "
                "run (seed: the file's top-level seed plus the trial number minus one); remove it"
            )
    for entry in spec.grid:
        for combo in _expand(entry):
            fields = {**spec.base, **combo}
            optimizer = str(fields.get("optimizer", RunConfig.optimizer)).lower()  # RunConfig's spelling
            fields.update(spec.optimizer_overrides.get(optimizer, {}))
            fields.update(combo)  # the grid entry wins over the optimizer overrides
            label = fields.pop("label", None)
            equivalent_of = fields.pop("equivalent_of", None)
            continue_from = fields.pop("continue_from", None)
            if continue_from is not None and "init" in fields:
                raise ValueError(
                    f"sweep {spec.name!r}: an entry with continue_from {continue_from!r} starts from that run; "
                    f"it cannot also set init {fields['init']!r}"
                )
            if equivalent_of not in (None, "fc-grad"):
                raise ValueError(
                    f"sweep {spec.name!r}: equivalent_of {equivalent_of!r} is not supported; allowed: fc-grad"
                )
            for trial in range(1, spec.trials + 1):
                path, config, name = _planned(spec, root, fields, label, trial)
                earlier = [r for r in runs if r.trial == trial]
                if continue_from is not None:  # first: its starting point is one of the settings compared below
                    config = _continuing(spec, config, continue_from, earlier)
                if equivalent_of is not None:
                    source = _gain_source(spec, config, equivalent_of, earlier)
                    config = dataclasses.replace(config, lr_gain_from=str(source.path))
                    try:
                        check_equivalent(config.to_dict(), source.config.to_dict())
                    except ValueError as err:
                        raise ValueError(f"sweep {spec.name!r}: {err}") from None
                    name = label or backward_label(config)
                    config = dataclasses.replace(config, label=name)
                    path = _run_path(root, name, config, trial)
                if path in seen:
                    raise ValueError(f"sweep {spec.name!r}: two runs would share the directory {path.name}")
                seen.add(path)
                runs.append(PlannedRun(path, config, name, trial))
    return runs


#: What an equivalent STE and the FC-Grad run whose gain it takes may differ in: the backward method.
_METHOD = frozenset({"estimator", "label", "ewgs_delta", *META_FIELDS})


def _gain_source(spec: SweepSpec, config: RunConfig, estimator: str, earlier: list[PlannedRun]) -> PlannedRun:
    """The run of an earlier entry, same trial, that the equivalent STE ``config`` takes its gain from: the one
    of ``estimator`` that differs from it only in the backward method (``_METHOD``); among several, the one of
    the STE entry's own meta settings."""
    if config.uses_meta:
        raise ValueError(
            f"sweep {spec.name!r}: equivalent_of sets lr_gain_from (the equivalent STE), which applies to quantize "
            f"runs with a classical estimator (ste, identity, ewgs), not to estimator {config.estimator!r}"
        )
    found = [r for r in earlier if r.config.estimator == estimator and set(config.differences(r.config)) <= _METHOD]
    exact = [r for r in found if not set(config.differences(r.config)) - {"estimator", "label", "ewgs_delta"}]
    for candidates in (found, exact):
        if len(candidates) == 1:
            return candidates[0]
    intro = (
        f"sweep {spec.name!r}: the equivalent STE {config.label!r} takes the gain of an {estimator} run of the same "
        "settings but for the method, from an earlier entry of the same trial"
    )
    if found:
        raise ValueError(
            f"{intro}; more than one such run is planned ({', '.join(r.path.name for r in found)}): give the "
            "equivalent STE entry the meta quantizer's settings of the one it is equivalent to "
            f"({', '.join(sorted(META_FIELDS))})"
        )
    others = [
        f"{r.path.name} differs in {', '.join(sorted(set(config.differences(r.config)) - _METHOD))}"
        for r in earlier
        if r.config.estimator == estimator
    ]
    raise ValueError(
        f"{intro}; no such run is planned"
        + (f" ({'; '.join(others)})" if others else f": put the {estimator} entry before this one")
    )


def _continuing(spec: SweepSpec, config: RunConfig, label: object, earlier: list[PlannedRun]) -> RunConfig:
    """``config`` starting from the earlier run of the same trial labelled ``label`` (and of the same model, data
    set and quantizers; of the same optimizer when the label has runs of several): its weights as ``init``, its
    meta quantizer as ``meta_init`` (when both use one), the init model it replaces as the ``teacher``."""
    labelled = [r for r in earlier if r.label == label]
    if not labelled:
        labels = ", ".join(sorted({repr(r.label) for r in earlier})) or "none"
        raise ValueError(
            f"sweep {spec.name!r}: continue_from {label!r} names no run of an earlier [[grid]] entry; earlier "
            f"labels: {labels}"
        )

    def key(c: RunConfig) -> tuple[Any, ...]:
        return (c.model, c.dataset, c.quantizer, c.bits, c.act_quantizer, c.act_bits)

    sources = [r for r in labelled if key(r.config) == key(config)]
    if len(sources) > 1:
        sources = [r for r in sources if r.config.optimizer == config.optimizer]
    if len(sources) != 1:
        found = ", ".join(r.path.name for r in labelled)
        raise ValueError(
            f"sweep {spec.name!r}: continue_from {label!r}: {'no' if not sources else 'more than one'} run of that "
            f"label has this run's model, data set and quantizer ({config.model}, {config.dataset}, "
            f"{config.quantizer}{config.bits}, {config.optimizer}); runs of that label: {found}"
        )
    (source,) = sources
    fields: dict[str, Any] = {"init": str(source.path)}
    if config.distill_weight > 0:
        fields["teacher"] = config.teacher or config.init  # the full-precision model, not the run it continues
    if config.uses_meta and source.config.uses_meta:
        if meta_config(source.config) != meta_config(config):
            raise ValueError(
                f"sweep {spec.name!r}: continue_from {label!r}: the meta quantizer of {source.path.name} "
                f"({meta_config(source.config)}) is not this run's ({meta_config(config)}); it would not load"
            )
        fields["meta_init"] = str(source.path)
    try:
        return RunConfig.from_dict({**config.to_dict(), **fields})
    except ValueError as err:
        raise ValueError(f"sweep {spec.name!r}: {err}") from None


def _run_path(root: Path, name: str, config: RunConfig, trial: int) -> Path:
    return root / (
        f"{_slug(name)}-{config.model}-{config.dataset}-{config.quantizer}{config.bits}-"
        f"{config.optimizer}-trial-{trial}"
    )


def _planned(
    spec: SweepSpec, root: Path, fields: dict[str, Any], label: str | None, trial: int
) -> tuple[Path, RunConfig, str]:
    """The directory, configuration and label of one run of the sweep."""
    try:
        config = RunConfig.from_fields({**fields, "task": "quantize", "seed": spec.seed + trial - 1})
    except ValueError as err:
        raise ValueError(f"sweep {spec.name!r}: {err}") from None
    if spec.pretrain is not None and config.init is None:
        config = dataclasses.replace(config, init=str(pretrain_path(root, config.model, config.dataset)))
    if config.distill_weight > 0 and config.init is None and config.teacher is None:  # refused now, not later
        raise ValueError(
            f"sweep {spec.name!r}: distill_weight {config.distill_weight:g} distils from the full-precision model "
            "named by teacher or init: set one, or add a [pretrain] part"
        )
    name = label or backward_label(config)
    config = dataclasses.replace(config, label=name)
    return _run_path(root, name, config, trial), config, name


def run_state(path: str | Path, config: RunConfig) -> str:
    """Where the planned run ``config`` stands in ``path``, as ``sweep --dry-run`` lists it.

    Returns:
        ``"done"``, ``"started"`` (it will be resumed), ``"to run"``, or, for a path that the sweep would
        refuse, what is there instead: ``"another configuration (epochs, lr differ)"``, ``"no run"`` (other
        files), ``"unreadable configuration"`` or ``"a file, not a directory"``.

    Example:
        >>> from metaquant.experiments.config import RunConfig
        >>> from metaquant.experiments.sweep import run_state
        >>> config = RunConfig(epochs=2)
        >>> run_state("runs/a", config)
        'to run'
        >>> import pathlib; pathlib.Path("runs/a").mkdir(parents=True); config.save(pathlib.Path("runs/a/config.json"))
        >>> run_state("runs/a", config), run_state("runs/a", RunConfig(epochs=3, lr=0.1))
        ('started', 'another configuration (epochs, lr differ)')
    """
    run = RunDir(path)
    if run.config_path.exists():
        try:
            differ = run.config().differences(config)
        except (ValueError, TypeError, OSError):
            return "unreadable configuration"
        if differ:
            return f"another configuration ({', '.join(differ)} differ)"
        return "done" if run.is_done() else "started"
    # Whatever a new run may be created in (check_free: missing, empty, or left by an interrupted creation)
    # is "to run"; the sweep then creates it there.
    try:
        RunDir.check_free(run.path)
    except NotADirectoryError:
        return "a file, not a directory"
    except RunExistsError:
        return "no run"
    return "to run"


def _matches(run: PlannedRun, pattern: str) -> bool:
    return fnmatch.fnmatchcase(run.path.name, pattern) or fnmatch.fnmatchcase(str(run.path), pattern)


def select_runs(runs: list[PlannedRun], patterns: Sequence[str]) -> list[PlannedRun]:
    """The runs whose directory name matches one of ``patterns`` (shell-style: ``*``, ``?``, ``[...]``), in order.

    A pattern may also be a run's whole path, as ``metaquant sweep --dry-run`` prints it.

    A selected run that starts from another run of the sweep (an equivalent STE from its FC-Grad run's learned
    gain, a ``continue_from`` run from its source's model) needs that run to be selected too, or done already.

    Args:
        runs: the sweep's runs, as ``plan`` gives them.
        patterns: at least one pattern (a single string is one pattern); each must match at least one run (a
            typo would otherwise select nothing, silently).

    Returns:
        The selected runs, in the order of ``runs``.

    Raises:
        ValueError: no pattern, a blank pattern, a pattern that matches no run (named, with an example name),
            or a selection that leaves out an unfinished run that a selected one starts from (both named).

    Example:
        >>> import pathlib
        >>> from metaquant.experiments.sweep import plan, select_runs, SweepSpec
        >>> spec = SweepSpec(name="demo", trials=2, seed=0, pretrain=None, base={"dataset": "cifar10"},
        ...                  grid=[{"estimator": ["ste", "multifc"]}], optimizer_overrides={})
        >>> [r.path.name for r in select_runs(plan(spec, pathlib.Path("sweeps/demo")), ["*-trial-2"])]
        ['ste-resnet20-cifar10-dorefa1-sgd-trial-2', 'multifc-ste-start-resnet20-cifar10-dorefa1-sgd-trial-2']
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("no pattern given to select runs by; give at least one (e.g. 'ste-*-trial-1')")
    for pattern in patterns:
        if not pattern.strip():
            raise ValueError(f"a pattern to select runs by is blank ({pattern!r}); give a run name or a glob")
        if not any(_matches(run, pattern) for run in runs):
            names = f"run names look like {runs[0].path.name!r}" if runs else "the sweep has no run"
            raise ValueError(
                f"pattern {pattern!r} matches no run of the sweep ({names}; `metaquant sweep --dry-run` lists "
                "them; a pre-training is not selected: it is made for the selected runs that need it)"
            )
    selected = [run for run in runs if any(_matches(run, p) for p in patterns)]
    planned = {run.path: run for run in runs}
    chosen = {run.path for run in selected}
    for run in selected:
        for source in sorted(_prerequisites(run.config) - chosen):
            needed = planned.get(source)  # an init from outside the sweep is the user's to provide
            if needed is not None and run_state(needed.path, needed.config) != "done":
                gain_from = run.config.lr_gain_from
                what = "learned gain" if gain_from and Path(gain_from) == source else "model"
                raise ValueError(
                    f"run {run.path.name} starts from run {source.name} (its {what}), which is not done and not "
                    f"selected; select it too (its name as a pattern)"
                )
    return selected


def _prerequisites(config: RunConfig) -> set[Path]:
    """The runs that must be finished before a run of ``config`` starts: the FC-Grad run whose gain an equivalent
    STE uses, the run that a fine-tuning run continues (any other ``init`` is no run of the sweep)."""
    return {Path(source) for source in (config.lr_gain_from, config.init) if source}
