"""Signals in: which ones stopstep passes on, and the inbox they arrive in.

A signal sent to stopstep is caught by a handler that does nothing in Python;
the interpreter's C-level handler writes its number to a pipe
(``signal.set_wakeup_fd``), whichever thread is running. The sentinel thread
reads that pipe, so a signal is passed on to the command at once even while
the main loop sits in a hook or a blocked write.

What a shell or nohup left ignored stays ignored: an inherited ``SIG_IGN`` is
a request not to be stopped by that signal (``nohup``'s SIGHUP, SIGINT in a
background job), so stopstep neither catches nor passes it on.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, FrozenSet, List, Sequence

#: Signals passed on to the command's process group.
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
)

#: Of those, the ones after which stopstep brings the tree down and exits 128+n.
TERMINATING_SIGNALS: FrozenSet[int] = frozenset(
    (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM)
)

#: Never passed on: uncatchable, stopstep's own business, or faults.
_NOT_FORWARDED = frozenset(
    (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGCONT,
     signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
     signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT)
)

#: Signals that cannot end a process, so cannot be a --stop-signal: they stop,
#: continue or are ignored by default.
NOT_STOPPING = frozenset(
    (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT,
     signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG)
)

#: The signal the sentinel sends to the main thread to interrupt a hook or a
#: write that overran its time. A real-time signal: nothing else uses it.
INTERRUPT_SIGNAL = signal.SIGRTMIN + 5


def all_catchable_signals() -> tuple:
    """Every standard signal stopstep can pass on (as PID 1, like tini and dumb-init)."""
    return tuple(s for s in signal.Signals if 0 < s < 32 and s not in _NOT_FORWARDED)


def parse_signal(value) -> signal.Signals:
    """``INT``, ``SIGINT``, ``int`` or ``2`` -> signal.SIGINT; ValueError otherwise."""
    text = str(value).strip()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise ValueError(f"no signal numbered {text}") from None
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


def parse_stop_signal(value) -> signal.Signals:
    """A signal that can end a process (so not STOP, TSTP, CONT, CHLD, WINCH...)."""
    signum = parse_signal(value)
    if signum in NOT_STOPPING or signum == signal.SIGKILL:
        why = "SIGKILL leaves no time to stop cleanly" if signum == signal.SIGKILL else \
            "it does not end a process"
        raise ValueError(f"{signum.name} cannot be the stop signal: {why}")
    return signum


# Signals caught before the inbox exists (the command line installs this first
# thing, before parsing), so a SIGTERM in the first milliseconds still ends the
# run through the usual path, report included, instead of killing stopstep.
_early_caught: List[int] = []
_early_original: Dict[int, object] = {}


def _note_early(signum, frame):
    _early_caught.append(signum)


def catch_early(signals: Sequence[int] = FORWARDED_SIGNALS) -> None:
    """Hold the signals stopstep will pass on until the inbox takes over (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signals:
        try:
            current = signal.getsignal(signum)
            if current != signal.SIG_IGN:  # an inherited ignore stays (nohup)
                _early_original[signum] = current
                signal.signal(signum, _note_early)
        except (OSError, ValueError):
            pass


def release_early() -> None:
    """Give back what :func:`catch_early` held, for a command that supervises nothing
    (``scan``, ``presets``...): the default dispositions again, and a signal that came
    meanwhile delivered now, so Ctrl-C or SIGTERM ends it as it ends any program."""
    for signum, original in list(_early_original.items()):
        try:
            if signal.getsignal(signum) is _note_early:
                signal.signal(signum, original)
        except (OSError, ValueError):
            pass
    _early_original.clear()
    caught = list(dict.fromkeys(_early_caught))
    _early_caught.clear()
    for signum in caught:
        signal.raise_signal(signum)


class SignalInbox:
    """Signals delivered to stopstep, as bytes on a pipe any thread can read.

    Installing a (do-nothing) handler also undoes what stopstep's parent may
    have left on the ones it handles: an ignored SIGCHLD (which would hide the
    command's exit status) or blocked signals. Only the main thread can install
    handlers; elsewhere (the Python API from a thread) the inbox stays empty.
    ``close`` puts back every disposition it changed.
    """

    def __init__(self, signals: Sequence[int] = FORWARDED_SIGNALS, interrupt_handler=None):
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: Dict[int, object] = {}
        self.active = threading.current_thread() is threading.main_thread()
        #: signals that were ignored when stopstep started: left ignored, not passed on
        self.ignored_at_start = frozenset(s for s in signals if signal.getsignal(s) == signal.SIG_IGN)
        # and two for stopstep itself: SIGCHLD (the command exited or stopped), SIGCONT (resumed after Ctrl-Z)
        self.signals = tuple(s for s in signals if s not in self.ignored_at_start) + (signal.SIGCHLD, signal.SIGCONT)
        if not self.active:
            return
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            previous = signal.signal(signum, _do_nothing)
            self._previous[signum] = _early_original.pop(signum, previous) if previous is _note_early else previous
        if _early_caught:  # hand over what came before us, in order
            os.write(self._write_fd, bytes(_early_caught))
            _early_caught.clear()
        if interrupt_handler is not None:
            self._previous[INTERRUPT_SIGNAL] = signal.signal(INTERRUPT_SIGNAL, interrupt_handler)
        # A job-control stop of a backgrounded stopstep would freeze the tree's output.
        for signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._previous[signum] = signal.signal(signum, signal.SIG_IGN)
        self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> List[int]:
        """The signals received since the last call, in order (duplicates kept)."""
        received: List[int] = []
        while True:
            try:
                data = os.read(self._read_fd, 512)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(data)

    def close(self) -> None:
        if self.active:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            signal.set_wakeup_fd(self._previous_wakeup)
            for signum, handler in self._previous.items():
                try:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
                except (TypeError, ValueError):
                    signal.signal(signum, signal.SIG_DFL)
            self.active = False
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read_fd = self._write_fd = -1


def _do_nothing(signum, frame):  # the wakeup fd carries the signal
    pass
