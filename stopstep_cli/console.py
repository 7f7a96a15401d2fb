"""stopstep's own messages: one line each, on stderr, prefixed ``stopstep:``."""

from __future__ import annotations

import sys

QUIET, NORMAL, VERBOSE = 0, 1, 2


class Console:
    def __init__(self, level: int = NORMAL, stream=None):
        self.level = level
        self.stream = stream
        self.before_write = None  # e.g. erase a status line first
        self.guard = None  # a context manager around each write: bounds it in time (the supervisor's)
        self.gone = False  # a write was cut short: the reader stopped reading; say nothing more

    def _write(self, text: str) -> None:
        if self.gone:
            return
        stream = self.stream or sys.stderr
        try:
            if self.guard is None:
                self._write_now(stream, text)
            else:
                with self.guard():
                    self._write_now(stream, text)
        except (OSError, ValueError, AttributeError):  # stderr closed or gone: nothing to tell
            pass
        except BaseException as exc:  # the guard's Overrun: stderr's reader does not take it
            if type(exc).__name__ != "Overrun":
                raise
            self.gone = True

    def _write_now(self, stream, text: str) -> None:
        if self.before_write is not None:
            self.before_write()
        stream.write(f"stopstep: {text}\n")
        stream.flush()

    def error(self, text: str) -> None:
        self._write(text)

    def info(self, text: str) -> None:
        if self.level >= NORMAL:
            self._write(text)

    def debug(self, text: str) -> None:
        if self.level >= VERBOSE:
            self._write(text)
