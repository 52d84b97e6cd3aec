"""Stopping at a clean point: SIGINT/SIGTERM turned into a flag that the training loop reads after each step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class StopFlag:
    """Set by SIGINT/SIGTERM inside ``StopFlag.installed()``; read by the training loop after each step.

    The flag is false until ``request`` is called (by the installed signal handlers, or directly); it then
    holds the signal's number in ``signum``. ``fit(..., stop=flag)`` checks it after every step.

    Example:
        >>> import signal
        >>> stop, before = mq.guards.StopFlag(), signal.getsignal(signal.SIGINT)
        >>> with stop.installed():
        ...     signal.raise_signal(signal.SIGINT)  # Ctrl-C: recorded, no KeyboardInterrupt
        >>> bool(stop), stop.signum == signal.SIGINT, signal.getsignal(signal.SIGINT) == before
        (True, True, True)
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Ask the training loop to stop, on behalf of signal ``signum``."""
        self.signum = signum

    @contextlib.contextmanager
    def installed(self, *, exiting: bool = False) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM to this flag for the duration (main thread only; elsewhere a no-op).

        Args:
            exiting: for a process that ends once a stop was requested (the command line): on leaving the
                block after a stop, SIGINT and SIGTERM stay ignored instead of getting their previous handlers
                back, so that a second Ctrl-C during the shutdown cannot interrupt the last message or the
                interpreter's exit with a traceback. Without a stop, the previous handlers come back as usual.
        """
        signums = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {s: signal.signal(s, lambda signum, frame: self.request(signum)) for s in signums}
        except ValueError:  # not the main thread
            yield self
            return
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_IGN if exiting and self else handler)
