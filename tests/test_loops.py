"""MetaQuant and Trainer in ordinary PyTorch training loops: the gradient hook (clipping), gradient
accumulation, wrapped optimizers, closures that back-propagate themselves, ``fit`` with a ``DataLoader`` and a
``torch.optim.lr_scheduler``, and ``torch.func`` through a quantized layer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import metaquant as mq


def _model(seed=0):
    torch.manual_seed(seed)
    return mq.quantize_(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    )


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _metaquant(model, opt_factory=None, **kw):
    opt = (opt_factory or (lambda ps: torch.optim.SGD(ps, lr=0.05)))(model.parameters())
    torch.manual_seed(3)
    return mq.MetaQuant(model, opt, meta=mq.MultiFC(hidden=4), meta_lr=1e-2, **kw)


def _state(model, trainer):
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(trainer, mq.MetaQuant):
        out.update({f"meta.{k}": v.detach().clone() for k, v in trainer.meta.state_dict().items()})
    return out


# --- a closure that calls backward() ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["trainer", "metaquant"])
def test_a_closure_that_calls_backward_is_refused_with_a_message(kind):
    model = _model()
    x, y = _data()
    trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)) if kind == "trainer" else _metaquant(model)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2 if kind == "metaquant" else 1):  # t = 0 and t >= 1 of MetaQuant
        with pytest.raises(RuntimeError, match=r"closure called backward\(\) itself"):
            trainer.step(closure)
        if kind == "metaquant":
            trainer.step(lambda: F.cross_entropy(model(x), y))  # a good step in between: the trainer still works


# --- gradient clipping through before_update --------------------------------------------------------------
def test_metaquant_hook_that_changes_nothing_leaves_the_step_as_it_was():
    x, y = _data()
    a, b = _model(), _model()
    ta, tb = _metaquant(a), _metaquant(b)
    seen = []
    for _ in range(3):
        ta.step(lambda: F.cross_entropy(a(x), y))
        tb.step(lambda: F.cross_entropy(b(x), y), before_update=lambda t: seen.append(t.iteration))
    assert seen == [0, 1, 2]
    sa, sb = _state(a, ta), _state(b, tb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_metaquant_clipping_in_the_hook_equals_clipping_by_hand():
    x, y = _data()
    model = _model()
    lr, meta_lr, max_norm = 0.05, 0.1, 1e-3  # a small norm: every step is clipped
    trainer = mq.MetaQuant(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        meta=mq.MultiFC(hidden=4),
        meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=meta_lr),
    )
    for t in range(3):
        record = {}

        def hook(tr, t=t, record=record):
            params = list(tr.model.parameters())
            quantized = [layer.weight for layer in tr.layers.values()]
            # at t >= 1 every quantized weight holds g_W; at t = 0 None (they do not move)
            assert all((w.grad is not None) == (t >= 1) for w in quantized)
            record["before"] = [p.detach().clone() for p in params]
            record["meta_before"] = [p.detach().clone() for p in tr.meta.parameters()]
            grads = [p.grad.clone() for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = min(1.0, max_norm / (float(norm) + 1e-6))
            record["expected"] = [
                p.detach() - lr * coef * p.grad if p.grad is not None else p.detach().clone() for p in params
            ]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            meta_params = [p for p in tr.meta.parameters() if p.grad is not None]
            if meta_params:
                torch.nn.utils.clip_grad_norm_(meta_params, max_norm)
            record["meta_expected"] = [
                p.detach() - meta_lr * p.grad if p.grad is not None else p.detach().clone()
                for p in tr.meta.parameters()
            ]

        trainer.step(lambda: F.cross_entropy(model(x), y), before_update=hook)
        for p, expected in zip(model.parameters(), record["expected"]):
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        for p, expected in zip(trainer.meta.parameters(), record["meta_expected"]):
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        if t >= 1:  # the clipped update is not the look-ahead's: the quantized weights moved less
            w_before = record["before"][0]
            assert 0 < float((model[1].weight.detach() - w_before).norm()) <= lr * max_norm * (1 + 1e-4)


def test_trainer_clipping_in_the_hook_equals_clipping_by_hand():
    x, y = _data()
    a, b = _model(), _model()
    ta = mq.Trainer(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9))
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        ta.step(
            lambda: F.cross_entropy(a(x), y),
            before_update=lambda t: torch.nn.utils.clip_grad_norm_(t.model.parameters(), 0.01),
        )
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()  # the oracle: the plain torch loop (quantized layers' default STE)
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.01)
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


# --- gradient accumulation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt_factory",
    [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)],
    ids=["sgd", "adam"],
)
def test_metaquant_accumulation_over_micro_batches_equals_one_step_on_their_union(opt_factory):
    x, y = _data(12)
    a, b = _model(), _model()
    ta, tb = _metaquant(a, opt_factory), _metaquant(b, opt_factory)
    for _ in range(4):
        la = ta.step(lambda: F.cross_entropy(a(x), y))
        micro = [lambda i=i: F.cross_entropy(b(x[i : i + 4]), y[i : i + 4]) for i in (0, 4, 8)]
        lb = tb.step(micro)
        torch.testing.assert_close(la, lb)
    sa, sb = _state(a, ta), _state(b, tb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert tb.iteration == 4


def test_trainer_accumulation_equals_one_step_on_the_union():
    x, y = _data(12)
    a, b = _model(), _model()
    ta = mq.Trainer(a, torch.optim.Adam(a.parameters(), lr=1e-2))
    tb = mq.Trainer(b, torch.optim.Adam(b.parameters(), lr=1e-2))
    for _ in range(3):
        ta.step(lambda: F.cross_entropy(a(x), y))
        tb.step([lambda i=i: F.cross_entropy(b(x[i : i + 6]), y[i : i + 6]) for i in (0, 6)])
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_an_empty_list_of_closures_is_refused():
    model = _model()
    with pytest.raises(TypeError, match="non-empty list of closures"):
        _metaquant(model).step([])


# --- wrapped optimizers -----------------------------------------------------------------------------------
class AcceleratedLike(torch.optim.Optimizer):
    """What Accelerate's AcceleratedOptimizer looks like: an Optimizer holding the real one as .optimizer."""

    def __init__(self, optimizer, sync=True):
        self.optimizer = optimizer
        self.gradient_state = type("GradientState", (), {"sync_gradients": sync})()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def step(self, closure=None):
        if self.gradient_state.sync_gradients:
            self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()


def lightning_like(optimizer):
    """What Lightning's LightningOptimizer does: a subclass of the optimizer's class sharing its __dict__."""

    class Wrapper:
        def __init__(self, opt):
            self.__dict__ = {k: v for k, v in opt.__dict__.items() if k not in ("step", "__del__")}
            self.__class__ = type("Lightning" + type(opt).__name__, (Wrapper, type(opt)), {})
            self._optimizer = opt

        @property
        def optimizer(self):
            return self._optimizer

        def step(self, closure=None):
            return self._optimizer.step(closure)

    return Wrapper(optimizer)


@pytest.mark.parametrize("wrap", [AcceleratedLike, lightning_like], ids=["accelerate-like", "lightning-like"])
@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)],
    ids=["sgd", "adam"],
)
def test_a_wrapped_optimizer_trains_as_the_optimizer_it_wraps(wrap, make):
    x, y = _data()
    a, b = _model(), _model()
    ta, tb = _metaquant(a, make), _metaquant(b, lambda ps: wrap(make(ps)))
    for _ in range(3):
        ta.step(lambda: F.cross_entropy(a(x), y))
        tb.step(lambda: F.cross_entropy(b(x), y))
    sa, sb = _state(a, ta), _state(b, tb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_wrapped_unsupported_optimizer_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="RMSprop is not supported"):
        _metaquant(model, lambda ps: AcceleratedLike(torch.optim.RMSprop(ps)))


def test_accelerate_style_accumulation_is_refused_with_what_to_do():
    x, y = _data()
    model = _model()
    opt = AcceleratedLike(torch.optim.SGD(model.parameters(), lr=0.1), sync=False)
    trainer = mq.MetaQuant(model, opt, meta=mq.MultiFC(hidden=4))
    before = _state(model, trainer)
    with pytest.raises(RuntimeError, match=r"accelerator.accumulate\(\).*step\(\[closure_1"):
        trainer.step(lambda: F.cross_entropy(model(x), y))
    after = _state(model, trainer)
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.iteration == 0


# --- fit with a DataLoader and an LR scheduler ------------------------------------------------------------
class _RecordingTrainer:
    """Records the rate of each step, then steps the real trainer."""

    def __init__(self, trainer):
        self.inner, self.optimizer, self.rates = trainer, trainer.optimizer, []

    def __getattr__(self, name):  # the rest of fit's StepTrainer: on_nonfinite, skipped_steps, overflow_steps
        return getattr(self.inner, name)

    def step(self, closure):
        self.rates.append(self.optimizer.param_groups[0]["lr"])
        if isinstance(self.inner, mq.MetaQuant) and self.inner.meta_optimizer is not None:
            self.rates[-1] = (self.rates[-1], self.inner.meta_optimizer.param_groups[0]["lr"])
        out = self.inner.step(closure)
        if isinstance(self.inner, mq.MetaQuant):  # the meta rate was set at the start of step
            self.rates[-1] = (self.rates[-1][0], self.inner.meta_optimizer.param_groups[0]["lr"])
        return out

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def state_dict(self):
        return self.inner.state_dict()


def _loader(n=8, batch_size=4):
    x, y = _data(n)
    return DataLoader(
        TensorDataset(x.reshape(n, 1, 6), y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )


def _step_lr_oracle(interval, factors=(1.0, 1.0, 1.0), steps_per_epoch=2):
    """The rate of each step of a plain loop with ``StepLR(lr 0.1, step 1, gamma 0.5)`` stepped per ``interval``,
    times the epoch's factor; and the oracle scheduler at the end."""
    oracle_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    oracle = torch.optim.lr_scheduler.StepLR(oracle_opt, step_size=1, gamma=0.5)
    expected = []
    for factor in factors:
        for _ in range(steps_per_epoch):
            expected.append(oracle_opt.param_groups[0]["lr"] * factor)
            oracle_opt.step()  # no gradient: moves nothing; the scheduler's order of calls as in a real loop
            if interval == "step":
                oracle.step()
        if interval == "epoch":
            oracle.step()
    return expected, oracle


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_fit_with_a_dataloader_follows_a_step_lr_scheduler_exactly(interval):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected, _ = _step_lr_oracle(interval)
    trainer = _RecordingTrainer(_metaquant(model, lambda ps: opt))
    state = mq.fit(
        model,
        trainer,
        _loader(),
        _loader(),
        epochs=3,
        schedule=None,
        scheduler=scheduler,
        scheduler_interval=interval,
        progress=False,
    )
    assert state.iteration == 6
    assert [base for base, _ in trainer.rates] == expected
    # the meta rate follows the base rate: γ_t = γ·α_t/α_0
    assert [meta for _, meta in trainer.rates] == pytest.approx([1e-2 * r / 0.1 for r in expected], rel=1e-12)


def test_fit_with_a_plain_list_of_batches_and_no_schedule_keeps_the_rate():
    model = _model()
    trainer = _RecordingTrainer(mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    batches = list(_loader())  # no set_epoch, but a len
    mq.fit(model, trainer, batches, batches, epochs=2, schedule=None, progress=False)
    gen = (b for b in batches)  # neither set_epoch nor len: a one-shot iterable trains its one pass
    mq.fit(model, trainer, gen, batches, epochs=1, schedule=None, progress=False)
    assert trainer.rates == [0.1] * 6


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_fit_with_a_schedule_besides_a_scheduler_trains_at_their_product(interval):
    """fit's own schedule multiplies the scheduler's rates, and the scheduler steps from its own rates."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    factors = [1.0, 0.1, 0.01]
    expected, oracle = _step_lr_oracle(interval, factors)
    trainer = _RecordingTrainer(mq.Trainer(model, opt))
    mq.fit(
        model,
        trainer,
        _loader(),
        _loader(),
        epochs=3,
        schedule=lambda epoch: factors[epoch],
        scheduler=scheduler,
        scheduler_interval=interval,
        progress=False,
    )
    assert trainer.rates == pytest.approx(expected, rel=1e-12)
    assert scheduler.get_last_lr() == pytest.approx(oracle.get_last_lr(), rel=1e-12)  # never saw the factor


def test_fit_steps_reduce_lr_on_plateau_with_the_epochs_test_loss():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    seen = []
    original_step = scheduler.step
    scheduler.step = lambda metrics: (seen.append(metrics), original_step(metrics))[1]
    test = _loader()
    losses = []
    mq.fit(
        model,
        mq.Trainer(model, opt),
        _loader(),
        test,
        epochs=3,
        schedule=None,
        scheduler=scheduler,
        on_epoch_end=lambda done: done and losses.append(mq.evaluate(model, test)["loss"]),
        progress=False,
    )
    assert seen == pytest.approx(losses, rel=1e-6)
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*scheduler_interval='epoch'"):
        mq.fit(
            model,
            mq.Trainer(model, opt),
            _loader(),
            test,
            epochs=1,
            schedule=None,
            scheduler=scheduler,
            scheduler_interval="step",
            progress=False,
        )


@pytest.mark.parametrize("with_schedule", [False, True])
def test_a_fit_resumed_with_restore_fit_continues_its_scheduler_exactly(tmp_path, with_schedule):
    from metaquant.experiments.config import RunConfig
    from metaquant.experiments.runs import RunDir
    from metaquant.files import load_checkpoint

    batches = list(_loader())
    schedule = (lambda epoch: 0.5**epoch) if with_schedule else None

    def setup():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = _metaquant(model, lambda ps: opt)
        return model, trainer, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)

    def train(model, trainer, scheduler, epochs, **kw):
        return mq.fit(
            model,
            trainer,
            batches,
            batches,
            epochs=epochs,
            schedule=schedule,
            scheduler=scheduler,
            scheduler_interval="step",
            progress=False,
            **kw,
        )

    model, trainer, scheduler = setup()
    torch.manual_seed(5)
    train(model, trainer, scheduler, 3)

    run = RunDir.create(tmp_path / "run", RunConfig())
    first, first_trainer, first_scheduler = setup()
    torch.manual_seed(5)
    train(first, first_trainer, first_scheduler, 2, run=run)
    resumed, resumed_trainer, resumed_scheduler = setup()
    torch.manual_seed(123)  # restore_fit puts the saved generator states back
    checkpoint = load_checkpoint(run.checkpoint_path)
    with pytest.raises(ValueError, match="pass the scheduler"):
        mq.restore_fit(checkpoint, resumed_trainer)
    state = mq.restore_fit(checkpoint, resumed_trainer, model=resumed, scheduler=resumed_scheduler)
    assert state.epoch == 2
    train(resumed, resumed_trainer, resumed_scheduler, 3, state=state)

    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert resumed_scheduler.state_dict() == scheduler.state_dict()
    assert resumed_trainer.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]


# --- torch.func through a quantized layer ------------------------------------------------------------------
def test_torch_func_grad_through_a_quantized_layer_equals_autograd():
    model = _model()
    x, y = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grads = torch.func.grad(loss_of)(params)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the oracle: ordinary autograd through the STE
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    assert grads["1.weight"].abs().sum() > 0


# --- the trainer's state in the module's state_dict -------------------------------------------------------
@pytest.mark.parametrize("meta", ["multifc", "lstm"])
def test_resuming_from_an_attached_modules_state_dict_equals_an_uninterrupted_run(meta, tmp_path):
    x, y = _data()

    def make():
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        m = mq.MultiFC(hidden=4) if meta == "multifc" else mq.LSTMFC(hidden=4)
        trainer = mq.MetaQuant(model, opt, meta=m, meta_lr=1e-2)
        trainer.attach(model)
        return model, opt, trainer

    def steps(model, trainer, n):
        for _ in range(n):
            trainer.step(lambda: F.cross_entropy(model(x), y))

    model, opt, trainer = make()
    steps(model, trainer, 6)
    uninterrupted = _state(model, trainer)

    model, opt, trainer = make()
    steps(model, trainer, 3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    assert "metaquant" in model.state_dict() and "metaquant" not in dict(model.named_parameters())
    model, opt, trainer = make()
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])  # strict: the entry is taken by the trainer
    opt.load_state_dict(checkpoint["optimizer"])
    assert trainer.iteration == 3
    steps(model, trainer, 3)
    resumed = _state(model, trainer)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed if k != "metaquant")
    assert torch.equal(resumed["metaquant"], uninterrupted["metaquant"])


def test_loading_a_state_dict_without_the_trainer_entry_is_a_missing_key():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    _metaquant(model).attach(model)
    with pytest.raises(RuntimeError, match="Missing key.*metaquant"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match="already a key"):
        _metaquant(model).attach(model)


def test_accumulation_and_the_hook_under_a_grad_scaler_see_unscaled_gradients():
    x, y = _data(12)
    a, b = _model(), _model()
    ta = _metaquant(a)
    tb = _metaquant(b, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    seen = {"a": [], "b": []}

    def hook(key):
        return lambda t: seen[key].append([p.grad.clone() for p in t.model.parameters() if p.grad is not None])

    for _ in range(3):
        micro_a = [lambda i=i: F.cross_entropy(a(x[i : i + 6]), y[i : i + 6]) for i in (0, 6)]
        micro_b = [lambda i=i: F.cross_entropy(b(x[i : i + 6]), y[i : i + 6]) for i in (0, 6)]
        ta.step(micro_a, before_update=hook("a"))
        tb.step(micro_b, before_update=hook("b"))
    assert len(seen["a"]) == len(seen["b"]) == 3
    for ga, gb in zip(seen["a"], seen["b"]):  # a power-of-two scale: unscaled to the same float32 values
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-9)
    sa, sb = _state(a, ta), _state(b, tb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7)
