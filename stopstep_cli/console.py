"""stopstep's own messages: one line each, on stderr, prefixed ``stopstep:``."""

from __future__ import annotations

import sys

QUIET, NORMAL, VERBOSE = 0, 1, 2


class Console:
    def __init__(self, level: int = NORMAL, stream=None):
        self.level = level
        self.stream = stream
        self.before_write = None  # e.g. erase a status line first

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        if self.before_write is not None:
            self.before_write()
        try:
            stream.write(f"stopstep: {text}\n")
            stream.flush()
        except (OSError, ValueError, AttributeError):  # stderr closed or gone: nothing to tell
            pass

    def error(self, text: str) -> None:
        self._write(text)

    def info(self, text: str) -> None:
        if self.level >= NORMAL:
            self._write(text)

    def debug(self, text: str) -> None:
        if self.level >= VERBOSE:
            self._write(text)
