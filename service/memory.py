"""Memory the service holds for a moment: decoded photos, admitted by what they cost, and freed back to the system.

A photo's bytes say little about what decoding it costs (a 77 KB 16-bit PNG decodes to 79 MB; six concurrent
40-megapixel JPEGs once took the server from 0.7 to 2.5 GB). :class:`ByteBudget` admits a photo by its decoded
cost (:func:`model.align.decoding_cost`, from its header) before it is decoded, so what all photos in flight hold
is bounded, and :func:`release_free_memory` hands the freed pages back after a large one.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from service.errors import Overloaded

__all__ = ["ByteBudget", "release_free_memory", "TRIM_AFTER_BYTES"]

#: After a photo that cost at least this much, the C heap's free memory goes back to the system at once.
TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc keeps large freed blocks, and after one large
    block is freed it serves the next ones from its heap too: the process would stay at its peak; elsewhere a
    no-op)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ByteBudget:
    """Bytes that requests in flight may hold; :meth:`take` refuses (503 ``OVERLOADED``) what would pass it.

    A request costing more than the whole budget is still admitted when nothing else holds any: the budget
    bounds what is held together, never refuses a photo the limits allow.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, cost: int) -> None:
        with self._lock:
            if self.held and self.held + cost > self.limit:
                raise Overloaded(
                    f"photos being decoded hold {self.held // 2**20} MiB of the {self.limit // 2**20} MiB allowed "
                    "(OAML_DECODE_BUDGET_MB); retry later"
                )
            self.held += cost

    def give(self, cost: int) -> None:
        with self._lock:
            self.held -= cost
