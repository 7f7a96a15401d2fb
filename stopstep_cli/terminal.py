"""Terminals: pseudo-terminals for the command's output, and job control.

Two separate concerns, both only when a terminal is really there:

- :func:`open_output_pty` gives the command a pseudo-terminal to write to, so
  progress bars and colours render live as they would without stopstep
  (rich prints nothing live on a pipe). Output processing is switched off on
  it, so the bytes still pass through unchanged.
- :class:`Foreground` hands the terminal's foreground to the command's
  process group, so the command can read the terminal, Ctrl-C reaches it once
  (from the terminal, not again from stopstep), and Ctrl-Z / ``fg`` suspend
  and resume the whole tree, stopstep with it.
"""

from __future__ import annotations

import os
import signal
import termios
import threading
from typing import Optional, Tuple


def is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def open_output_pty(like_fd: Optional[int] = None) -> Tuple[int, int]:
    """A (master, slave) pseudo-terminal pair for one output stream, sized like ``like_fd``."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no \n -> \r\n: the bytes pass through as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    if like_fd is not None:
        copy_window_size(like_fd, master)
    os.set_inheritable(master, False)
    return master, slave


def copy_window_size(from_fd: int, to_fd: int) -> None:
    import fcntl

    try:
        size = fcntl.ioctl(from_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(to_fd, termios.TIOCSWINSZ, size)
    except OSError:
        pass


class Foreground:
    """The terminal on stdin, handed to the command's process group while it runs.

    Active only when stdin is a terminal and stopstep's group is its foreground
    group (a backgrounded ``stopstep ... &`` leaves the terminal alone).
    """

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.active = False
        self._own_group = os.getpgrp()
        try:
            self.active = is_terminal(fd) and os.tcgetpgrp(fd) == self._own_group
        except OSError:
            self.active = False
        self._child_group: Optional[int] = None

    def child_setup(self) -> None:
        """In the command, before exec: take the terminal (SIGTTOU is still ignored
        here, inherited from stopstep, so this does not stop it)."""
        if self.active:
            try:
                os.tcsetpgrp(self.fd, os.getpgrp())
            except OSError:
                pass

    def attach(self, child_group: int) -> None:
        self._child_group = child_group

    def _give(self, group: int) -> None:
        if self.active:
            try:
                os.tcsetpgrp(self.fd, group)
            except OSError:
                pass

    def suspend(self, tree) -> None:
        """The command was stopped from the terminal (Ctrl-Z): stop stopstep's own
        job too, so the shell gets its prompt back; on ``fg`` resume the tree."""
        if not self.active:
            return
        self._give(self._own_group)
        os.killpg(self._own_group, signal.SIGSTOP)
        # A process-directed SIGSTOP may be taken by another of our threads, and this
        # one would run on (and continue the tree) before the stop takes hold. One
        # directed at this thread stops it right here, on the way out of the call.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        # ...continued (fg or bg). In the foreground again: give the terminal back.
        try:
            foreground = os.tcgetpgrp(self.fd) == self._own_group
        except OSError:
            foreground = False
        if foreground and self._child_group is not None:
            self._give(self._child_group)
        tree.signal_group(signal.SIGCONT)

    def restore(self) -> None:
        """Take the terminal back for stopstep's group (the shell expects its job to have it)."""
        if self.active:
            self._give(self._own_group)
            self.active = False


def wants_pty(mode: str, fd: int) -> bool:
    """--tty auto|always|never for one stream."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return is_terminal(fd)

