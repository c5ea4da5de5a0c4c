"""How a handshake step fails: an errno for the kernel, a reason for people.

The reason ends up in the driver's sysfs ``last_error``, so it says what
went wrong in operator terms and never carries a secret.
"""

from __future__ import annotations

import errno
import time


class Failure(Exception):
    """A step of the handshake or login failed; ``code`` is a positive errno."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Deadline:
    """The handshake's one deadline (the kernel's TIMEOUT_MS), for every step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self, step: str) -> float:
        """Seconds left; raises ETIMEDOUT naming ``step`` once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.expired(step)
        return left

    def expired(self, step: str) -> Failure:
        return Failure(errno.ETIMEDOUT, f"{step} timed out (deadline {self.seconds:g} s)")
