"""Showing people how far the run has come, without touching its output.

On a terminal, a status line on stderr (step, target, steps/s, ETA) that is
erased before any of the command's output is written and redrawn only when
that output has ended a line, so it never splits or overwrites the command's
own lines and bars. Without a terminal (CI), a plain line every
``status_interval`` seconds. With ``GITHUB_STEP_SUMMARY`` set, a Markdown
summary appended to that file at the end.
"""

from __future__ import annotations

import os
import time
from typing import Optional

ERASE = b"\r\x1b[K"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Step, target and rate, drawn as a status line or printed as lines."""

    def __init__(self, status_line: bool, status_interval: float, fd: int = 2):
        self.status_line = status_line
        self.status_interval = status_interval
        self.fd = fd
        self.shown = False  # the status line is on the screen now
        self.at_line_start = True  # the last byte written to the terminal ended a line
        self._next_redraw = time.monotonic()
        self._next_line = time.monotonic() + status_interval if status_interval else None
        self._rate_since: Optional[tuple] = None  # (time, step) the rate is measured from
        self.step: Optional[int] = None
        self.target: Optional[int] = None

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
            parts.append(f"{rate:.3g} steps/s")
            if self.target is not None and self.step < self.target:
                parts.append(f"ETA {format_duration((self.target - self.step) / rate)}")
        return ", ".join(parts)

    def rate(self, now: float) -> Optional[float]:
        if self._rate_since is None or self.step is None:
            return None
        since, first = self._rate_since
        return (self.step - first) / (now - since) if now > since and self.step > first else None

    # -- the status line (terminal) -------------------------------------------------

    def before_output(self) -> None:
        if self.shown:
            self._write(ERASE)
            self.shown = False

    def after_output(self, last_byte: int) -> None:
        self.at_line_start = last_byte == 10  # "\n"

    def draw(self, now: float) -> None:
        if not self.status_line or not self.at_line_start:
            return
        line = f"stopstep: {self.text(now)}"
        self._write(ERASE + line.encode()[:200])
        self.shown = True

    def clear(self) -> None:
        self.before_output()

    # -- lines (no terminal) ---------------------------------------------------------

    def next_due(self) -> Optional[float]:
        return self._next_redraw if self.status_line else self._next_line

    def tick(self, now: float, console) -> None:
        if self.status_line:
            # once a second, drawn or not (the command may have a line open): never a busy loop
            self._next_redraw = now + 1.0
            self.draw(now)
        elif self._next_line is not None and now >= self._next_line:
            self._next_line = now + self.status_interval
            console.info(f"progress: {self.text(now)}")

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:
            self.status_line = False


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
