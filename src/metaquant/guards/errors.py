"""The errors that stop a training run: a non-finite step, too many skipped steps, a requested stop."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite value; nothing was updated.

    Raised by ``Trainer.step`` and ``MetaQuant.step`` with ``on_nonfinite="raise"`` (through ``reject_step``)
    before any parameter or optimizer state changes; ``fit`` re-raises it with the epoch, the step and the last
    good checkpoint in the message. A subclass of ``FloatingPointError``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> try:
        ...     trainer.step(lambda: model(torch.randn(4, 2)).sum() * float("nan"))
        ... except mq.guards.NonFiniteError as err:
        ...     print(err)
        non-finite loss
    """


class SkipLimitError(NonFiniteError):
    """More steps were skipped for non-finite values than the run allows (``RunConfig.max_skipped``).

    Raised by ``fit`` with ``max_skipped`` set: a run that skips step after step is failing, not finishing; it
    stops with its last good checkpoint intact, and the message names the epoch and the step. A
    ``NonFiniteError``.

    Example:
        >>> data = mq.data.ImageTensors(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1] * 4))
        >>> info = mq.data.DatasetInfo("toy", 2, 1, 2, (0.5,), (0.5,), "none")
        >>> loader = mq.data.TensorLoader(data, info, 2, train=True)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> _ = model[1].bias.data.fill_(float("nan"))  # every loss is NaN
        >>> trainer = mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="skip")
        >>> try:
        ...     mq.fit(model, trainer, loader, loader, epochs=1, schedule=lambda e: 1.0, progress=False, max_skipped=1)
        ... except mq.guards.SkipLimitError as err:
        ...     print(err)
        2 steps skipped for non-finite values, more than the limit of 1, at epoch 1, step 2 (iteration 2); ...
    """


class TrainingInterrupted(Exception):
    """Training stopped at a clean point on request; a checkpoint was written.

    Raised by ``fit`` after the step during which its ``StopFlag`` became true (a SIGINT or SIGTERM); the
    checkpoint (when ``fit`` has a run directory) holds the exact position, so the run resumes from it.

    Args:
        message: says where the run stopped and where the checkpoint is.
        signum: the signal that asked for the stop, kept as ``self.signum``.

    Example:
        >>> import signal
        >>> data = mq.data.ImageTensors(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
        >>> loader = mq.data.TensorLoader(data, mq.data.DatasetInfo("toy", 2, 1, 2, (0.5,), (0.5,), "none"), 2,
        ...                               train=True)
        >>> model, stop = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), mq.guards.StopFlag()
        >>> stop.request(signal.SIGTERM)
        >>> try:
        ...     mq.fit(model, mq.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1)), loader, loader,
        ...            epochs=1, schedule=lambda e: 1.0, progress=False, stop=stop)
        ... except mq.guards.TrainingInterrupted as err:
        ...     print(err.signum == signal.SIGTERM, err)
        True stopped by signal ... at epoch 1, step 1
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
