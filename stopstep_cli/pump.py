"""The output pump: the command's stdout and stderr, read, scanned for steps and
written on unchanged.

One read is one turn of the pump: :meth:`OutputPump.read` fills the shared
buffer and returns the step observations in it, the loop runs them through the
hooks (so a stop signal goes out before the read that carried the target is
even written), then :meth:`OutputPump.write_out` passes the bytes on. Writes
go to whatever stopstep's own stdout and stderr are; a reader that went away
closes the command's end too (as it would have seen without stopstep), and a
stream that cannot be written (a full disk) is dropped with one message while
it is still read for steps.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable, Dict, List, Optional, Sequence

from .observation import Observation
from .patterns import StepFormat
from .scanner import LineScanner
from .terminal import copy_window_size, is_terminal

READ_SIZE = 1 << 20


#: attributes off, cursor shown: what a killed command could not do itself
RESET_TERMINAL = b"\x1b[0m\x1b[?25h"


class Stream:
    """One output stream of the command: where it is read, and where it goes."""

    __slots__ = ("name", "in_fd", "out_fd", "scanner", "open", "to_terminal")

    def __init__(self, name: str, in_fd: int, out_fd: int, scanner: LineScanner, to_terminal: bool = False):
        self.name, self.in_fd, self.out_fd, self.scanner = name, in_fd, out_fd, scanner
        self.open = True
        self.to_terminal = to_terminal


class OutputPump:
    """The command's output streams. ``say(text)`` prints stopstep's own messages;
    ``progress`` (optional) is erased before output reaches a terminal;
    ``guard_write(stream)`` returns a context manager around each write (the
    loop bounds writes in time once a stop is under way)."""

    def __init__(self, formats: Sequence[StepFormat], say: Callable[[str], None], progress=None,
                 guard_write: Optional[Callable[[Stream], object]] = None):
        self.formats = tuple(formats)
        self.say = say
        self.progress = progress
        self.guard_write = guard_write
        self.streams: Dict[int, Stream] = {}  # by the fd they are read from
        self.stderr_mid_line = False  # the command's stderr left a line open (a progress bar)
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)

    def add(self, name: str, in_fd: int, out_fd: int, to_terminal: bool = False) -> Stream:
        stream = Stream(name, in_fd, out_fd, LineScanner(self.formats, name), to_terminal)
        self.streams[in_fd] = stream
        return stream

    # -- one turn -------------------------------------------------------------

    def read(self, stream: Stream) -> int:
        """Read what is there into the buffer; bytes read (0: the stream ended and is closed)."""
        try:
            n = os.readv(stream.in_fd, [self._buf])
        except BlockingIOError:
            return -1
        except OSError:  # EIO: a pseudo-terminal whose last writer is gone
            n = 0
        if n == 0:
            self.close(stream)
        return n

    def scan(self, stream: Stream, n: int) -> List[Observation]:
        return stream.scanner.feed(self._buf, n)

    def end_of_stream(self, stream: Stream) -> List[Observation]:
        """A final line without a newline counts once its stream has ended."""
        finish = getattr(stream.scanner, "end_of_stream", None)
        return finish() if finish is not None else []

    def write_out(self, stream: Stream, n: int) -> None:
        if stream.out_fd < 0:
            return
        to_terminal = stream.to_terminal and self.progress is not None
        if to_terminal:
            self.progress.before_output()
        if self.guard_write is not None:
            with self.guard_write(stream):
                self._write(stream, n)
        else:
            self._write(stream, n)
        if to_terminal:
            self.progress.after_output(self._view[max(0, n - 64):n], self._buf, n)
        if stream.out_fd == 2:
            self.stderr_mid_line = self._buf[n - 1] != 10

    def _write(self, stream: Stream, n: int) -> None:
        view, done = self._view, 0
        while done < n:
            try:
                done += os.write(stream.out_fd, view[done:n])
            except BlockingIOError:  # an inherited non-blocking stdout
                select.select([], [stream.out_fd], [], 1.0)
            except InterruptedError:
                continue
            except BrokenPipeError:
                # Whoever read our output is gone. Close the command's end too,
                # so it sees what it would have seen without stopstep.
                self.say(f"{stream.name} was closed by its reader; closing the command's {stream.name} too")
                stream.out_fd = -1
                self.close(stream)
                return
            except OSError as exc:
                # A full disk, a vanished terminal: the training matters more than its log.
                self.say(f"cannot write the command's {stream.name} ({exc.strerror}); "
                         f"its {stream.name} is dropped from here on, the run goes on")
                stream.out_fd = -1
                return

    def before_message(self) -> None:
        """stopstep's own line goes on a line of its own, not after a bar left open on stderr."""
        if self.progress is not None:
            self.progress.clear()
        if self.stderr_mid_line:
            self.stderr_mid_line = False
            try:
                os.write(2, b"\n")
            except OSError:
                pass

    def resize_ptys(self) -> bool:
        """The terminal was resized: the command's pseudo-terminals follow. (Called on the
        sentinel's thread: an ioctl on descriptors the pump keeps open while it runs.)
        True when there was one."""
        resized = False
        for stream in list(self.streams.values()):
            if stream.out_fd >= 0 and is_terminal(stream.in_fd):
                copy_window_size(stream.out_fd, stream.in_fd)
                resized = True
        return resized

    def reset_terminals(self, fds=(1, 2)) -> None:
        """The command died of a signal (SIGKILL leaves it no handler): what it left
        switched on in the terminal, a hidden cursor, colours, is switched off, as it
        would have done itself, so that stopstep's summary and the shell's prompt read.
        Once a terminal (stdout and stderr are most often the same one)."""
        done = set()
        for fd in fds:
            try:
                device = os.fstat(fd).st_rdev
                if is_terminal(fd) and device not in done:
                    done.add(device)
                    os.write(fd, RESET_TERMINAL)
            except OSError:
                pass

    def drop(self, stream: Stream, why: str) -> None:
        """Stop writing a stream (its reader does not take it); keep reading it."""
        if stream.out_fd >= 0:
            self.say(f"{why}; the rest of the command's {stream.name} is dropped")
            stream.out_fd = -1

    # -- the end -----------------------------------------------------------------

    def drain(self, deadline: float, handle: Callable[[Stream, int], None]) -> None:
        """Read what the pipes still hold, without waiting for writers that may
        never close them, and at most until ``deadline``. ``handle(stream, n)``
        deals with each read as the loop does (0: the stream ended)."""
        for stream in list(self.streams.values()):
            os.set_blocking(stream.in_fd, False)
            while stream.open and time.monotonic() < deadline:
                n = self.read(stream)
                if n < 0:
                    break
                handle(stream, n)

    def close(self, stream: Stream) -> None:
        if not stream.open:
            return
        stream.open = False
        try:
            os.close(stream.in_fd)
        except OSError:
            pass
        self.streams.pop(stream.in_fd, None)

    def close_all(self) -> None:
        for stream in list(self.streams.values()):
            self.close(stream)
