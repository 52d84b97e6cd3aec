"""MetaQuant under Accelerate and Lightning (optional test dependencies: skipped when not installed)."""

import pytest
import torch
import torch.nn.functional as F

import metaquant as mq


def _model():
    torch.manual_seed(0)
    return mq.quantize_(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    )


def _batches(n=4, size=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def _metaquant(model, opt):
    torch.manual_seed(3)
    return mq.MetaQuant(model, opt, meta=mq.MultiFC(hidden=4), meta_lr=1e-2)


def _plain_run(steps):
    model = _model()
    trainer = _metaquant(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    for x, y in steps:
        trainer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    return model, trainer


def test_accelerate_prepared_optimizer_trains_as_the_plain_one():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    trainer = _metaquant(model, opt)
    batches = _batches()
    for x, y in batches:
        trainer.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    oracle, _ = _plain_run(batches)
    for a, b in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(a, b)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state (accumulation steps, synchronization) in process-wide singletons: each test
    here, and the tests after them, start from a fresh one."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_accumulate_is_refused_with_what_to_do():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    trainer = _metaquant(model, opt)
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match=r"MetaQuant accumulates by itself"):
        with accelerator.accumulate(model):
            trainer.step(lambda: F.cross_entropy(model(x), y))


def _quiet_lightning(root):
    """Lightning trainer options for a test: on the CPU, writing and printing nothing."""
    return dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def _lightning_module(pl, batches_per_epoch):
    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # MetaQuant.step does backward and the updates
            self.model = _model()
            self.base = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
            self.mq = _metaquant(self.model, self.base)
            self.mq.attach(self)  # Lightning's checkpoints carry φ, its optimizer and the records

        def configure_optimizers(self):
            return self.base  # Lightning checkpoints the base optimizer's state

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.mq.step(lambda: F.cross_entropy(self.model(x), y))

    return Lit()


def test_lightning_manual_optimization_resumes_exactly_from_its_checkpoint(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    batches = _batches(2)
    options = _quiet_lightning(tmp_path)

    def train(epochs, lit, ckpt=None):
        trainer = pl.Trainer(max_epochs=epochs, **options)
        data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt)
        return trainer

    whole = _lightning_module(pl, 2)
    train(4, whole)
    half = _lightning_module(pl, 2)
    train(2, half).save_checkpoint(tmp_path / "half.ckpt")
    resumed = _lightning_module(pl, 2)
    train(4, resumed, tmp_path / "half.ckpt")
    assert resumed.mq.iteration == whole.mq.iteration == 8
    oracle, oracle_mq = _plain_run(batches * 4)
    for a, b, c in zip(resumed.model.parameters(), whole.model.parameters(), oracle.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(resumed.mq.meta.parameters(), oracle_mq.meta.parameters()):
        assert torch.equal(a, b)


def test_lightning_optimizer_from_self_optimizers_trains_as_the_plain_one(tmp_path):
    """The optimizer a manual-optimization step gets from ``self.optimizers()`` is a LightningOptimizer wrapper."""
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.core.optimizer import LightningOptimizer

    batches = _batches(4)
    wrappers = []

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.model = _model()
            self.mq = None

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)

        def training_step(self, batch, batch_idx):
            if self.mq is None:
                wrappers.append(self.optimizers())
                self.mq = _metaquant(self.model, self.optimizers())
            x, y = batch
            return self.mq.step(lambda: F.cross_entropy(self.model(x), y))

    lit = Lit()
    trainer = pl.Trainer(max_epochs=1, **_quiet_lightning(tmp_path))
    data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    assert isinstance(wrappers[0], LightningOptimizer)
    oracle, oracle_mq = _plain_run(batches)
    assert lit.mq.iteration == oracle_mq.iteration == 4
    for a, b in zip(lit.model.parameters(), oracle.parameters()):
        assert torch.equal(a, b)
