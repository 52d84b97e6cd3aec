"""The experiment application on top of the ``metaquant`` library: run configurations and directories, the
run lifecycle (``execute``, ``resume``), sweeps, reports, figures, presets, the demo and the ``metaquant``
command. The library never imports it.

Example:
    >>> from metaquant.experiments import RunConfig
    >>> RunConfig.for_task("pretrain").lr, RunConfig.for_task("quantize").lr
    (0.1, 0.001)
"""

from .artifacts import evaluate_artifact, export_run
from .config import RunConfig
from .lifecycle import RunResult, execute, resume
from .runs import RunDir
from .scheduler import run_sweep
from .sweep import load_sweep, plan

__all__ = [
    "RunConfig",
    "RunDir",
    "RunResult",
    "execute",
    "resume",
    "export_run",
    "evaluate_artifact",
    "load_sweep",
    "plan",
    "run_sweep",
]
