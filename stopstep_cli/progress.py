"""Showing people how far the run has come, without touching its output.

On a terminal, the bottom row is kept for stopstep's status (step, target,
steps/s, ETA) with a scroll region (``ESC [ top ; bottom r``, as apt's
``Progress: [ 40%]`` bar does): the command's output, its own ``\\r`` bars
included, scrolls in the rows above and never reaches the status row, so the
status is there all the time (a command that manages the screen owns it: the row
is given up while it is on the alternate screen, and for good once it sets a
scroll region of its own) and is redrawn on a timer, with the cursor saved
and restored around it. It is drawn only between whole escape sequences and
whole characters of the command's output, never inside one. The terminal is
given back whole at every ending (the region reset, the status row cleared),
and before a Ctrl-Z hands the terminal to the shell.

Where the terminal's size cannot be had (``--progress always`` into a pipe),
the status is one line that is erased before the command's output and drawn
again only where that output ended a line. Without a terminal (CI), a plain
line every ``status_interval`` seconds. With ``GITHUB_STEP_SUMMARY`` set, a
Markdown summary is appended to that file at the end.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from typing import Optional

from .outcome import format_duration, format_rate

ERASE = b"\r\x1b[K"
#: How often the status row is drawn again (it has no output of its own to wait for).
REDRAW_EVERY = 0.5
# An escape sequence at the end of what was written, not yet finished: CSI
# (ESC [ params intermediates, no final byte yet), OSC/DCS without their end, a lone ESC.
_OPEN_ESCAPE = re.compile(rb"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*|[\]P_^X][^\x07\x1b]*|)\Z")


# The command managing the screen itself: the alternate screen (until it leaves it) or a
# scroll region of its own (DECSTBM). The bottom row is then its, not ours.
_ENTERS_THE_ALTERNATE_SCREEN = re.compile(rb"\x1b\[\?(?:1049|1047|47)h")
_LEAVES_THE_ALTERNATE_SCREEN = re.compile(rb"\x1b\[\?(?:1049|1047|47)l")
_SETS_A_SCROLL_REGION = re.compile(rb"\x1b\[[0-9;]*r")


def terminal_size(fd: int) -> Optional[tuple]:
    """(rows, columns) of the terminal on ``fd``, or None."""
    import fcntl
    import termios

    try:
        rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def cut_off(tail: bytes) -> bool:
    """Does written output end inside an escape sequence or a UTF-8 character? (Nothing of
    stopstep's may be written there: it would break the sequence or the character.)"""
    if _OPEN_ESCAPE.search(tail[-64:]):
        return True
    for back in range(1, min(4, len(tail)) + 1):
        byte = tail[-back]
        if byte < 0x80:
            return False
        if byte >= 0xC0:  # the lead byte: how many bytes its character has
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back < need
    return False


class Progress:
    """Step, target and rate, drawn in the terminal's bottom row or printed as lines."""

    def __init__(self, status_line: bool, status_interval: float, fd: int = 2):
        self.status_line = status_line
        self.status_interval = status_interval
        self.fd = fd
        self.region: Optional[tuple] = None  # (rows, columns) while the bottom row is ours
        self.shown = False  # line mode: the status line is on the screen now
        self.at_line_start = True  # line mode: the last byte written ended a line
        self.safe = True  # region mode: the output so far ends between sequences and characters
        self._next_draw = time.monotonic()
        self._next_line = time.monotonic() + status_interval if status_interval else None
        self._rate_since: Optional[tuple] = None  # (time, step) the rate is measured from
        self._lock = threading.Lock()  # the sentinel thread gives the terminal back on Ctrl-Z
        self.step: Optional[int] = None
        self.target: Optional[int] = None
        self.yielded: Optional[str] = None  # "alternate" or "region": the command manages the screen
        self._before = b""  # the end of the output before the last write (a sequence split in two)
        self._line_width = 200  # line mode: the most of the status shown

    # -- what it says -----------------------------------------------------------------

    def update(self, step: int, target: Optional[int], since: Optional[tuple]) -> None:
        """The latest step; ``since`` is the (time, step) the rate counts from."""
        self.step, self.target, self._rate_since = step, target, since

    def text(self, now: float) -> str:
        if self.step is None:
            return "waiting for the first step"
        parts = [f"step {self.step}" + (f"/{self.target}" if self.target is not None else "")]
        if self.target:
            parts[0] += f" ({min(100.0, 100.0 * self.step / self.target):.0f}%)"
        rate = self.rate(now)
        if rate:
            parts.append(format_rate(rate))
            if self.target is not None and self.step < self.target:
                parts.append(f"ETA {format_duration((self.target - self.step) / rate)}")
        return ", ".join(parts)

    def rate(self, now: float) -> Optional[float]:
        if self._rate_since is None or self.step is None:
            return None
        since, first = self._rate_since
        return (self.step - first) / (now - since) if now > since and self.step > first else None

    # -- the terminal's bottom row ----------------------------------------------------------

    def start(self) -> None:
        """Keep the bottom row (when stderr is a terminal whose size is known)."""
        if not self.status_line or self.yielded is not None:
            return
        size = terminal_size(self.fd)
        if size is not None:
            self._line_width = max(1, min(200, size[1] - 1))  # a line that wraps cannot be erased
        if size is None or size[0] < 3:
            return  # line mode
        with self._lock:
            self._keep_bottom_row(size)

    def _keep_bottom_row(self, size: tuple) -> None:
        rows, _cols = size
        # Down a line first (an index, ESC D: it scrolls at the bottom as a newline does, but
        # keeps the column, so a prompt or a half-written line stays whole), so that a cursor
        # on the bottom row moves up into what stays the scrolling part; setting the region
        # moves the cursor home, so save it around that.
        if self._write(b"\x1bD\x1b7\x1b[1;%dr\x1b8\x1b[1A" % (rows - 1)):
            self.region = size

    def resize(self) -> None:
        """The window changed size: the region follows, the status row is drawn again."""
        with self._lock:
            if self.region is None:
                return
            size = terminal_size(self.fd)
            self._give_back()
            if size is not None and size[0] >= 3:
                self._keep_bottom_row(size)
        self.draw(time.monotonic())

    def give_back(self) -> None:
        """The whole terminal back, as it was (at the end, or before a Ctrl-Z stops us)."""
        with self._lock:
            self._give_back()

    def _give_back(self) -> None:
        if self.region is not None:
            rows = self.region[0]
            self._write(b"\x1b7\x1b[r\x1b[%d;1H\x1b[2K\x1b8" % rows)  # all rows scroll again; ours empty
            self.region = None
        self.before_output()

    def take_again(self) -> None:
        """After ``fg``: keep the bottom row again."""
        if self.status_line:
            self.start()

    # -- around the command's output ------------------------------------------------------------

    def before_output(self) -> None:
        if self.shown:  # line mode: erase our line before the command writes
            self._write(ERASE)
            self.shown = False

    def after_output(self, tail, written=None, n: int = 0) -> None:
        """What the command's output ended with (the last bytes written); ``written[:n]``,
        when given, is all that was written."""
        self.at_line_start = tail[-1:] == b"\n"
        self.safe = not cut_off(bytes(tail))
        if written is None or not self.status_line:
            return
        before, self._before = self._before, bytes(tail[-8:])
        if written.find(b"\x1b[", 0, n) < 0 and (not before or b"\x1b" not in before):
            return
        # where a sequence may stand: this write, and across its start (one split in two)
        seams = (written, 0, n), (before + bytes(written[:min(n, 8)]), 0, len(before) + min(n, 8))

        def found(pattern) -> bool:
            return any(pattern.search(*seam) for seam in seams)

        if self.yielded is None and self.region is not None:
            # A full-screen program (or one that set its own region): redrawing our row, or
            # resetting the region at the end, would break its screen. It has the whole screen.
            yielded = "alternate" if found(_ENTERS_THE_ALTERNATE_SCREEN) else \
                "region" if found(_SETS_A_SCROLL_REGION) else None
            if yielded is not None:
                with self._lock:
                    self.region, self.yielded = None, yielded
        elif self.yielded == "alternate" and found(_LEAVES_THE_ALTERNATE_SCREEN):
            self.yielded = None  # back on the main screen: our row again (where the status was)
            self.start()

    def draw(self, now: float) -> None:
        if not self.status_line or self.yielded is not None:
            return
        line = f"stopstep: {self.text(now)}".encode()
        with self._lock:
            if self.region is not None:
                if self.safe:
                    cols = self.region[1]
                    self._write(b"\x1b7\x1b[%d;1H\x1b[2K" % self.region[0] + line[: cols - 1] + b"\x1b8")
            elif self.at_line_start:
                self._write(ERASE + line[:self._line_width])
                self.shown = True

    def clear(self) -> None:
        """Before one of stopstep's own lines (line mode: erase the status line)."""
        self.before_output()

    # -- the loop's timer ---------------------------------------------------------------------------

    def next_due(self) -> Optional[float]:
        return self._next_draw if self.status_line else self._next_line

    def tick(self, now: float, console) -> None:
        if self.status_line:
            # drawn on a timer, whatever the output does: never a busy loop
            self._next_draw = now + (REDRAW_EVERY if self.region is not None else 1.0)
            self.draw(now)
        elif self._next_line is not None and now >= self._next_line:
            self._next_line = now + self.status_interval
            console.info(f"progress: {self.text(now)}")

    def _write(self, data: bytes) -> bool:
        try:
            os.write(self.fd, data)
            return True
        except OSError:
            self.status_line = False
            self.region = None
            return False


def github_step_summary(report, path: Optional[str] = None) -> None:
    """Append a Markdown summary of the run to $GITHUB_STEP_SUMMARY, if set."""
    path = path or os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    rows = [
        ("reason", report.reason),
        ("exit status", report.exit_code),
        ("target step", report.target_step),
        ("last step seen", report.last_step_seen),
        ("start step", report.start_step),
        ("last complete checkpoint", report.last_checkpoint_step),
        ("stopped", report.stop_mode or "by itself"),
        ("steps/s", report.steps_per_s),
        ("duration", format_duration(report.duration_s)),
        ("restarts", report.restarts),
        ("killed after the grace period", "yes" if report.killed else "no"),
    ]
    text = "### stopstep\n\n| | |\n|---|---|\n" + "".join(
        f"| {name} | {'' if value is None else value} |\n" for name, value in rows
    ) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:
        pass
