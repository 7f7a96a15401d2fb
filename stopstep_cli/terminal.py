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

    def __init__(self, fd: int = 0, progress=None):
        self.fd = fd
        self.progress = progress  # the status row is given back while the shell has the terminal
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

    def stop_own_job(self) -> None:
        """The command was stopped from the terminal (Ctrl-Z): stop stopstep's own job
        too, so the shell gets its prompt back. (Called from the sentinel's thread; the
        stop takes hold on every thread of ours soon after. :meth:`resume` follows
        once SIGCONT, ``fg`` or ``bg``, has come.)"""
        if self.active:
            if self.progress is not None:
                self.progress.give_back()
            self._give(self._own_group)
            os.killpg(self._own_group, signal.SIGSTOP)

    def resume(self, tree) -> None:
        """Continued after :meth:`stop_own_job`: in the foreground again (``fg``), give the
        terminal back to the command; continue the tree either way."""
        try:
            foreground = self.active and os.tcgetpgrp(self.fd) == self._own_group
        except OSError:
            foreground = False
        if foreground and self._child_group is not None:
            self._give(self._child_group)
            if self.progress is not None:
                self.progress.take_again()
        tree.signal_group(signal.SIGCONT)

    def take_back(self) -> None:
        """Between two runs of the command: the terminal is stopstep's, so Ctrl-C reaches it."""
        self._give(self._own_group)
        self._child_group = None

    def restore(self) -> None:
        """Take the terminal back for stopstep's group (the shell expects its job to have it)."""
        if self.active:
            self._give(self._own_group)
            self.active = False


# A process in the command's group that hears what the terminal sends it: the
# terminal's signals go to its foreground group (the command's), not to stopstep.
# Signals sent by stopstep or anyone else (si_code SI_USER) are not reported;
# the terminal's own (SI_KERNEL) are, one byte each, on its stdout.
_LISTENER = """
import os, signal
heard = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGWINCH)
held = heard + (signal.SIGTERM, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE)
signal.pthread_sigmask(signal.SIG_BLOCK, held)
parent = os.getppid()
while os.getppid() == parent:
    info = signal.sigtimedwait(held, 1.0)
    if info is not None and info.si_signo in heard and info.si_code == 0x80:
        os.write(1, bytes([info.si_signo]))
"""


class TerminalSignals:
    """Ctrl-C, Ctrl-\\, a hang-up and a window resize, as the terminal sends them to the command.

    With the terminal handed to the command's process group, stopstep does not
    get those signals itself. A small listener process joins that group and
    reports the ones the terminal sent (not stopstep's own stop signals), so a
    Ctrl-C is known for what it is: a request to stop, not a crash to restart;
    and a second one can force the stop.
    """

    def __init__(self, group: int):
        import subprocess
        import sys

        self.pid: Optional[int] = None
        self.fd: Optional[int] = None
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            proc = subprocess.Popen([sys.executable, "-S", "-E", "-c", _LISTENER], stdin=subprocess.DEVNULL,
                                    stdout=write_fd, stderr=subprocess.DEVNULL, close_fds=True,
                                    preexec_fn=lambda: os.setpgid(0, group))
        except (OSError, subprocess.SubprocessError):  # the group is gone already
            os.close(read_fd)
            return
        finally:
            os.close(write_fd)
        proc.returncode = 0  # stopstep reaps it itself
        self.pid, self.fd = proc.pid, read_fd

    def heard(self) -> bytes:
        """The signals the terminal sent since the last call (one byte each)."""
        try:
            return os.read(self.fd, 64)
        except OSError:
            return b""

    def close(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def wants_pty(mode: str, fd: int) -> bool:
    """--tty auto|always|never for one stream."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return is_terminal(fd)

