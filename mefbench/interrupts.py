"""Interrupts of a training process: SIGTERM taken like Ctrl-C, and both held back while an epoch
commits, so that an interrupt never lands between the checkpoint and the record it carries."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Interrupted", "interrupts_held", "sigterm_as_interrupt"]


class Interrupted(KeyboardInterrupt):
    """A signal interrupted the run (SIGTERM, or one of ``train``'s ``interrupt_signals``); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


@contextmanager
def sigterm_as_interrupt(extra: tuple[int, ...] = ()) -> Iterator[None]:
    """Treat SIGTERM (schedulers, `kill`), and the ``extra`` signals, like Ctrl-C, so the record is
    marked interrupted; all wait while an epoch commits (:func:`interrupts_held`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _HELD.active:  # an epoch is committing: raise once it has
            _HELD.pending = signum
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in dict.fromkeys((signal.SIGTERM, signal.SIGINT, *extra))}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Held:
    """Whether an epoch's commit is under way, and the interrupt that arrived meanwhile."""

    active = False
    pending: int | None = None


_HELD = _Held()


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block (an epoch's commit and the assignment of the record
    it committed) is over, then interrupt: an interrupt never sees the checkpoint ahead of the
    record in hand. (Masking the signals would not do: another thread of the process, e.g. an
    OpenMP worker, would still take them.)"""
    _HELD.active, _HELD.pending = True, None
    try:
        yield
    finally:
        _HELD.active = False
        if _HELD.pending is not None:
            signum, _HELD.pending = _HELD.pending, None
            raise Interrupted(signum)
