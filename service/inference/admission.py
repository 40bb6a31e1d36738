"""Admission control over decoding: a budget of pixels being decoded and prepared at once.

An image's memory while it is decoded and prepared grows with its pixel count (the
decoded frame, its RGB copy, the windowing and cropping intermediates), not with its
upload size: a 6000 x 6000 PNG is a 35 KB upload. Each request takes its image's pixel
count (read from the header, before any decoding) from the budget and gives it back when
its answer is built (the decoded frame lives until then: heatmap overlays are drawn on
it); a request that does not fit waits a little for others to finish, then is refused
with 503 `busy` and a Retry-After, so the process's memory stays bounded however many
clients upload at once (docs/api.md, "Limits").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import threading
from collections.abc import Iterator

from service.errors import ApiError

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20


def return_big_buffers() -> bool:
    """Have glibc serve every allocation of 1 MiB or more by mmap, so that a decoded frame,
    once freed, goes back to the system.

    By default glibc raises that threshold (up to 32 MiB) after the first big free, and
    each request thread's arena then keeps the frames it decoded: with the budget at one
    image, 12 concurrent maximum-size uploads still left the process ~930 MB above its
    idle size; with the fixed threshold ~500 MB (tests/test_memory_bound.py). The price
    is a fresh mapping per big buffer. False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class PixelBudget:
    """At most `capacity` pixels admitted at once; a wait of at most `timeout_s` for room."""

    def __init__(self, capacity: int, timeout_s: float):
        if capacity < 1:
            raise ValueError(f"the pixel budget must be positive, got {capacity}")
        self.capacity, self.timeout_s = capacity, timeout_s
        self.in_use = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def held(self) -> Iterator[Ticket]:
        """A ticket for one request: what it takes from the budget is given back when the
        block ends (the request's answer is built), not when its decoding does, because
        the decoded frame lives until then."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.release()

    @contextlib.contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget for the block (held() and take() in one)."""
        with self.held() as ticket:
            ticket.take(pixels)
            yield

    def _acquire(self, pixels: int) -> None:
        with self._room:
            if not self._room.wait_for(
                lambda: self.in_use + pixels <= self.capacity, timeout=self.timeout_s
            ):
                retry = max(1, math.ceil(self.timeout_s))
                raise ApiError(
                    503,
                    "busy",
                    f"{self.in_use} of {self.capacity} pixels are being decoded; this image "
                    f"needs {pixels}: retry after {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            self.in_use += pixels

    def _release(self, pixels: int) -> None:
        with self._room:
            self.in_use -= pixels
            self._room.notify_all()


class Ticket:
    """One request's share of a PixelBudget (PixelBudget.held())."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels = budget, 0

    def take(self, pixels: int) -> None:
        """Take room for an image of `pixels` (from its header), waiting for it if need be.

        An image over the whole capacity takes the whole capacity (it runs alone): its
        size is the pixel limit's business (413), not the budget's.

        Raises:
            ApiError: 503 `busy` (with Retry-After) when there is no room within timeout_s.
        """
        pixels = min(max(pixels, 1), self.budget.capacity - self.pixels)
        if pixels > 0:
            self.budget._acquire(pixels)
            self.pixels += pixels

    def release(self) -> None:
        if self.pixels:
            self.budget._release(self.pixels)
            self.pixels = 0
