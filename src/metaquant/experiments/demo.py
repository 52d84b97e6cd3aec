"""The main job: pre-train ResNet20 on Fashion-MNIST, then quantize it to 1 bit with STE and with MetaQuant.

``metaquant demo`` runs four real runs on a fixed, seeded subset of Fashion-MNIST, sized for about ten minutes
on two CPU cores, and prints their accuracies side by side:

1. full-precision pre-training (SGD with momentum, cosine schedule);
2. the reference: the float model trained on from it as long as, and with the recipe of, the 1-bit runs, so
   that a 1-bit model is compared with a float model of the same training, not with its shorter-trained start;
3. 1-bit DoReFa quantization training from it with the clipped STE, under one good recipe (Adam, lr 1e-3,
   cosine schedule): the recipe that gave the best 1-bit accuracy in the full-scale Fashion-MNIST study;
4. the same with MetaQuant's MultiFC meta quantizer (identical data, seed, optimizer and schedule).

The comparison under the paper's own protocols (plain SGD or Adam with a step schedule, three trials) is the
``fashion-mnist-full`` preset (``metaquant sweep fashion-mnist-full``), reported in docs/results/.

A stage whose run directory is complete is reused and an interrupted one resumed, so running the demo again
continues where it stopped, or only reprints the table.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..guards import StopFlag
from .config import RunConfig, option
from .lifecycle import RunResult, execute, resume
from .runs import RunDir, RunExistsError

__all__ = ["DemoConfig", "run_demo"]

logger = logging.getLogger(__name__)
#: The group of the demo's options in ``--help``.
DEMO = "demo"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults take about ten minutes on two CPU cores.

    Raises:
        ValueError: a value its runs' ``RunConfig`` refuses (e.g. ``train_size=0``); the message names it.
    """

    run_dir: str = option("runs/demo", "--run-dir", group=DEMO, help="where the runs go")
    train_size: int = option(10_000, "--train-size", group=DEMO, help="training subset")
    test_size: int = option(2_000, "--test-size", group=DEMO, help="test subset")
    pretrain_epochs: int = option(3, "--pretrain-epochs", group=DEMO, help="full-precision epochs")
    quantize_epochs: int = option(
        4, "--quantize-epochs", group=DEMO, help="quantization epochs per method, and of the float reference"
    )
    batch_size: int = option(128, "-bs", "--batch-size", group=DEMO, help="batch size")
    seed: int = option(0, "--seed", group=DEMO, help="random seed")
    device: str = option("auto", "--device", group=DEMO, help="auto, cpu, cuda or cuda:N")
    data_dir: str | None = option(None, "--data-dir", group=DEMO, help="where the Fashion-MNIST files are")

    def __post_init__(self) -> None:
        self.stages()  # each stage's RunConfig validates the values it is given

    def stages(self) -> dict[str, tuple[Path, RunConfig]]:
        """The runs, by name (``full precision``, ``full precision, tuned``, ``STE``, ``MetaQuant (MultiFC)``):
        directory, config."""
        root = Path(self.run_dir)
        common: dict[str, Any] = dict(
            model="resnet20",
            dataset="fashion-mnist",
            data_dir=self.data_dir,
            train_size=self.train_size,
            test_size=self.test_size,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
        )
        pretrain = RunConfig(
            task="pretrain",
            epochs=self.pretrain_epochs,
            optimizer="sgd",
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            lr_schedule="cosine",
            **common,
        )
        # One good recipe for both: Adam, lr 1e-3 (meta lr 1e-3), cosine schedule; 1-bit DoReFa on every layer.
        ste = RunConfig(
            task="quantize",
            init=str(root / "pretrain"),
            epochs=self.quantize_epochs,
            optimizer="adam",
            lr=1e-3,
            lr_schedule="cosine",
            quantizer="dorefa",
            bits=1,
            estimator="ste",
            **common,
        )
        metaquant = dataclasses.replace(ste, estimator="multifc", hidden_size=100, num_fc=2, meta_lr=1e-3)
        # the reference: float weights, the 1-bit runs' start, epochs and recipe
        tuned = RunConfig(task="pretrain", **{k: getattr(ste, k) for k in _RECIPE}, **common)
        return {
            "full precision": (root / "pretrain", pretrain),
            "full precision, tuned": (root / "pretrain-tuned", tuned),
            "STE": (root / "quantize-ste", ste),
            "MetaQuant (MultiFC)": (root / "quantize-multifc", metaquant),
        }


_RECIPE = ("init", "epochs", "optimizer", "lr", "momentum", "weight_decay", "lr_schedule")


def _stage(path: Path, config: RunConfig, progress: bool, stop: StopFlag | None) -> RunResult:
    run = RunDir(path)
    if run.config_path.exists():  # a run of an earlier demo: reused only if it is this stage's
        differ = run.config().differences(config)
        if differ:
            raise RunExistsError(
                f"{path} holds a run of another configuration ({', '.join(differ)} differ; made by another "
                "version of the demo?): give another --run-dir, or remove it to run the stage anew"
            )
    if run.is_done():
        logger.info("reusing the finished run %s", path)
        metrics = run.metrics()
        return RunResult(path, metrics[-1]["test_acc"], max(m["test_acc"] for m in metrics), len(metrics))
    if run.config_path.exists():
        return resume(path, progress=progress, stop=stop)  # interrupted earlier: continue it
    return execute(config, path, progress=progress, stop=stop)


def run_demo(demo: DemoConfig, progress: bool = True, stop: StopFlag | None = None) -> dict[str, RunResult]:
    """Run the stages in order; returns their results by name (``DemoConfig.stages``)."""
    return {name: _stage(path, config, progress, stop) for name, (path, config) in demo.stages().items()}
