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

A ``[[grid]]`` entry may set ``label`` to name its backward method in reports (default: derived from the
estimator, step order and momentum). Runs that are ``done`` are skipped when the sweep is run again; a run
left unfinished by an interruption is resumed from its last checkpoint (exactly: see ``pipeline.resume``).
A directory holding a run of another configuration is never touched: the sweep stops and says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .guards import StopFlag
from .pipeline import execute, resume
from .runs import RunDir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SweepSpec", "PlannedRun", "load_sweep", "plan", "run_sweep", "backward_label"]

logger = logging.getLogger(__name__)

_TOP_KEYS = {"name", "trials", "seed", "pretrain", "base", "grid", "optimizer_overrides", "run_dir"}
_DISPLAY = {"ste": "STE", "identity": "STE (unclipped)", "ewgs": "EWGS", "fc-grad": "FC-Grad",
            "multifc": "MultiFC", "lstmfc": "LSTMFC"}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file."""

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
    """One run of the sweep: where it goes, its configuration, and how reports name its backward method."""

    path: Path
    config: RunConfig
    label: str
    trial: int


def backward_label(config: RunConfig) -> str:
    """How tables and figures name a run's backward method, e.g. ``MultiFC (original order)``."""
    label = _DISPLAY.get(config.estimator, config.estimator)
    if config.uses_meta and config.step_order == "original":
        label += " (original order)"
    if config.optimizer == "sgd" and config.momentum > 0:
        label += f" + momentum {config.momentum:g}"
    return label


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, unknown keys, or a field value every run would refuse.
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
        name=str(data.get("name", path.stem)), trials=trials, seed=int(data.get("seed", 0)),
        pretrain=data.get("pretrain"), base=dict(data.get("base", {})), grid=list(data["grid"]),
        optimizer_overrides=dict(data.get("optimizer_overrides", {})), run_dir=data.get("run_dir"),
    )
    plan(spec, Path("."))  # validates every configuration before anything runs
    return spec


def _expand(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    keys = list(entry)
    values = [v if isinstance(v, list) else [v] for v in entry.values()]
    for combo in itertools.product(*values):
        yield dict(zip(keys, combo))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pretrain_config(spec: SweepSpec, model: str, dataset: str) -> RunConfig:
    fields = {"seed": spec.seed, **(spec.pretrain or {})}
    fields.update(task="pretrain", model=model, dataset=dataset)
    return RunConfig(**fields)


def pretrain_path(root: Path, model: str, dataset: str) -> Path:
    return root / f"pretrain-{model}-{dataset}"


def plan(spec: SweepSpec, root: Path) -> list[PlannedRun]:
    """Every quantization run of the sweep, in order, with validated configurations."""
    runs: list[PlannedRun] = []
    seen: set[Path] = set()
    for entry in spec.grid:
        for combo in _expand(entry):
            label = combo.pop("label", None)
            fields = {**spec.base, **combo}
            fields.update(spec.optimizer_overrides.get(fields.get("optimizer", "sgd"), {}))
            fields.update(combo)  # the grid entry wins over the optimizer overrides
            for trial in range(1, spec.trials + 1):
                try:
                    config = RunConfig(**{**fields, "task": "quantize", "seed": spec.seed + trial - 1})
                except TypeError as err:
                    raise ValueError(f"sweep {spec.name!r}: {err}") from None
                if spec.pretrain is not None and config.init is None:
                    config = dataclasses.replace(
                        config, init=str(pretrain_path(root, config.model, config.dataset))
                    )
                name = label or backward_label(config)
                config = dataclasses.replace(config, label=name)
                path = root / (
                    f"{_slug(name)}-{config.model}-{config.dataset}-{config.quantizer}{config.bits}-"
                    f"{config.optimizer}-trial-{trial}"
                )
                if path in seen:
                    raise ValueError(f"sweep {spec.name!r}: two runs would share the directory {path.name}")
                seen.add(path)
                runs.append(PlannedRun(path, config, name, trial))
    return runs


def _differences(a: RunConfig, b: RunConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig) if getattr(a, f.name) != getattr(b, f.name)]


def _run_once(
    path: Path, config: RunConfig, progress: bool, stop: StopFlag | None = None
) -> tuple[str, float | None, float | None]:
    run = RunDir(path)
    if run.config_path.exists():
        differ = _differences(run.config(), config)
        if differ:
            raise ValueError(
                f"{path} holds a run with another configuration ({', '.join(differ)} differ); remove it or "
                "change the sweep's run directory"
            )
        if run.is_done():
            metrics = run.metrics()
            return "skipped (done)", metrics[-1]["test_acc"], max(m["test_acc"] for m in metrics)
        result = resume(path, progress=progress, stop=stop)
        return "resumed, done", result.final_acc, result.best_acc
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and holds no run; remove it or change the sweep's run directory")
    result = execute(config, path, progress=progress, stop=stop)
    return "done", result.final_acc, result.best_acc


def run_sweep(
    spec: SweepSpec,
    root: str | Path,
    *,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    stop: StopFlag | None = None,
) -> list[PlannedRun]:
    """Run every run of ``spec`` under ``root`` that is not done yet; one progress line per run via ``echo``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = plan(spec, root)
    if spec.pretrain is not None:
        for model, dataset in dict.fromkeys((r.config.model, r.config.dataset) for r in runs):
            path = pretrain_path(root, model, dataset)
            start = time.perf_counter()
            status, final, _ = _run_once(path, pretrain_config(spec, model, dataset), progress, stop)
            echo(f"[pretrain] {model} on {dataset}: {status}, test accuracy {final:.2f}% "
                 f"({time.perf_counter() - start:.0f}s)")
    for i, run in enumerate(runs, 1):
        start = time.perf_counter()
        status, final, best = _run_once(run.path, run.config, progress, stop)
        c = run.config
        echo(f"[{i}/{len(runs)}] {run.label} | {c.model} {c.quantizer}{c.bits} {c.optimizer} | trial {run.trial}: "
             f"{status}, final {final:.2f}%, best {best:.2f}% ({time.perf_counter() - start:.0f}s)")
    return runs
