"""One deadline for a whole gallery write: its wait for a turn, for the store's lock and for a connection.

A write asked for at time ``t`` is refused with 503 once ``t + OAML_STORE_TIMEOUT_S`` has passed, wherever it is
waiting. :class:`service.gallery.Gallery` sets the deadline around the store call it runs in its write thread;
the stores read what is left of it (:func:`time_left`) for every wait of their own, instead of starting a fresh
``timeout_s`` after the queue already took its share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["write_deadline", "time_left"]

_DEADLINE: ContextVar[float | None] = ContextVar("oaml_write_deadline", default=None)


@contextmanager
def write_deadline(at: float) -> Iterator[None]:
    """Store waits inside this block end by ``at`` (``time.monotonic()`` seconds)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left(budget: float) -> float:
    """Seconds a wait may take: ``budget``, or less when a write deadline is set and nearer (0 when it passed)."""
    at = _DEADLINE.get()
    return budget if at is None else max(0.0, min(budget, at - time.monotonic()))
