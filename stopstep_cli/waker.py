"""A pipe one thread polls and any other thread may write to, to wake it."""

from __future__ import annotations

import os


class Waker:
    """A byte per wake-up, no flag to keep in step: a full pipe already means "wake up"."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):  # full (already woken), or closed at the end
            pass

    def clear(self) -> None:
        try:
            while os.read(self._r, 65536):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1
