"""The stop sequence: how the whole process tree is brought down, in one place.

    [cooperative window] -> stop signal + SIGCONT -> grace period -> SIGKILL -> sweeps -> done

- ``begin()`` sends the stop signal at once, on the caller's thread (the
  latency of a stop is the time to this ``killpg``), or opens a cooperative
  window first, in which the command is expected to stop itself.
- ``advance()`` is driven by the sentinel thread on a clock of its own, so a
  slow hook, a blocked write or a flood of output cannot delay the SIGKILL: it
  watches the tree, and at the end of the grace period counts what is alive
  (the count is taken before the kill) and SIGKILLs the group and every member
  outside it.
- After SIGKILL it sweeps again every few tens of milliseconds, since a helper
  outside the group may still be forking, until the tree is empty or
  ``KILL_SWEEP_LIMIT`` has passed (a process stuck in the kernel, state D,
  cannot be killed): then it gives up, says who is left, and the run ends.
- The grace period is counted once, from the first stop signal; a later signal
  does not restart it (as coreutils ``timeout`` and torchrun's agent).
- When the command has exited, what it left behind (a worker in another
  session, a double-forked daemon) gets the stop signal too: nobody else will
  tell it.

Pure logic over a tree and a clock: the unit tests drive it with fakes of both.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from typing import Callable, List, Optional

from .process import describe


class Stage(enum.Enum):
    IDLE = "idle"
    COOPERATIVE = "cooperative"  # the command was asked to stop itself; no signal yet
    SIGNALLED = "signalled"  # the stop signal went out; the grace period runs
    KILLING = "killing"  # SIGKILL went out; sweeping until nothing is left
    DONE = "done"  # the command exited and nothing of the tree is alive
    GAVE_UP = "gave_up"  # still something alive after SIGKILL and the sweeps


#: How often the tree is looked at while it comes down: quickly at first, then less often.
CHECK_FIRST = 0.005
CHECK_MAX = 0.1
#: After SIGKILL: look (and kill again) this often, for at most this long.
KILL_SWEEP_INTERVAL = 0.05
KILL_SWEEP_LIMIT = 10.0


class StopSequence:
    """Brings one process tree down. Thread-safe: ``begin`` from any thread,
    ``advance`` from the sentinel.

    ``tree`` needs ``signal_group(signum)``, ``signal_outside_group(members, signum)``,
    ``kill_all(members)``, ``live_members()`` (a list, or None when it cannot
    tell), ``poll_exit()`` and ``quiet(now)`` (no adopted orphan died just now). ``notify(text)`` is told what was done, in words.
    """

    def __init__(self, tree, stop_signal: int, grace_period: float, clock: Callable[[], float] = time.monotonic,
                 notify: Callable[[str], None] = lambda text: None):
        self.tree = tree
        self.stop_signal = signal.Signals(stop_signal)
        self.grace_period = float(grace_period)
        self.clock = clock
        self.notify = notify
        self.stage = Stage.IDLE
        self.signal_sent: Optional[int] = None  # the signal that started the grace period
        self.killed = False  # SIGKILL was needed
        self.began_cooperatively = False  # it opened with a cooperative window
        self._then_signal: Optional[int] = None  # the signal after that window, if not the stop signal
        self.started_at: Optional[float] = None
        self._deadline = 0.0  # end of the cooperative window, the grace period, or the sweeps
        self._next_check = 0.0
        self._interval = CHECK_FIRST
        self._leftovers_told = False
        self._lock = threading.RLock()

    # -- starting ---------------------------------------------------------------

    def begin(self, cooperative_window: Optional[float] = None, already_sent: Optional[int] = None,
              then_signal: Optional[int] = None) -> bool:
        """Start bringing the tree down, unless that already started; True if this call started it.

        ``already_sent``: the caller passed this signal on itself (a signal stopstep
        received), so only SIGCONT and the grace period follow. ``cooperative_window``:
        the command was asked to stop itself; the signal (``then_signal``, else the stop
        signal) comes only if it has not exited by the end of the window.
        """
        with self._lock:
            if self.stage is not Stage.IDLE:
                return False
            now = self.clock()
            self.started_at = now
            if cooperative_window is not None and already_sent is None:
                self.stage = Stage.COOPERATIVE
                self.began_cooperatively = True
                self._then_signal = then_signal
                self._deadline = now + cooperative_window
                self._schedule(now, reset=True)
            else:
                self._signal(now, already_sent)
            return True

    def escalate(self) -> None:
        """End a cooperative window now: the signal path runs."""
        with self._lock:
            if self.stage is Stage.COOPERATIVE:
                self._signal(self.clock(), None)

    def kill_now(self) -> None:
        """Skip what is left of the grace period (a second Ctrl-C): SIGKILL now."""
        with self._lock:
            if self.stage in (Stage.COOPERATIVE, Stage.SIGNALLED):
                self._kill(self.clock(), self.tree.live_members(), "killed at once on a second Ctrl-C")

    def _signal(self, now: float, already_sent: Optional[int]) -> None:
        if already_sent is None:
            signum = signal.Signals(self._then_signal or self.stop_signal)
            self.tree.signal_group(signum)
            self.signal_sent = signum
        else:
            self.signal_sent = already_sent
        self.tree.signal_group(signal.SIGCONT)  # a stopped process must be able to act on it
        self.stage = Stage.SIGNALLED
        self._deadline = now + self.grace_period
        self._schedule(now, reset=True)

    # -- on the sentinel's clock ---------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.stage in (Stage.COOPERATIVE, Stage.SIGNALLED, Stage.KILLING)

    @property
    def finished(self) -> bool:
        return self.stage in (Stage.DONE, Stage.GAVE_UP)

    def next_wake(self) -> Optional[float]:
        return self._next_check if self.active else None

    def advance(self) -> Optional[float]:
        """Do what is due now; the time this should be called again (None: nothing to do)."""
        with self._lock:
            if not self.active:
                return None
            if self.clock() < self._next_check:
                return self._next_check
            exited = self.tree.poll_exit() is not None
            members = self.tree.live_members()
            now = self.clock()  # after the walk: it may have waited for the interpreter
            if exited and (members is None or not members):
                if self.tree.quiet(now):
                    self.stage = Stage.DONE
                    return None
                self._next_check = now + CHECK_FIRST  # orphans still dying: look again soon
                return self._next_check
            if exited and members and not self._leftovers_told and self.stage is not Stage.KILLING:
                self._tell_leftovers(members)
            if self.stage is Stage.COOPERATIVE and now >= self._deadline:
                self.notify(f"the command did not stop itself within {self.grace_period:g}s; "
                            f"sending {signal.Signals(self._then_signal or self.stop_signal).name}")
                self._signal(now, None)
                return self._next_check
            if self.stage is Stage.SIGNALLED and now >= self._deadline:
                self._kill(now, members)
                return self._next_check
            if self.stage is Stage.KILLING:
                if now >= self._deadline:
                    self.stage = Stage.GAVE_UP
                    left = ", ".join(describe(info) for info in (members or [])[:10])
                    self.notify(f"giving up: still alive {KILL_SWEEP_LIMIT:g}s after SIGKILL: "
                                f"{left or 'the command (its exit cannot be seen)'}")
                    return None
                self.tree.kill_all(members or [])  # a helper may still be forking
                self._next_check = min(now + KILL_SWEEP_INTERVAL, self._deadline)
                return self._next_check
            self._schedule(now)
            return self._next_check

    def _tell_leftovers(self, members: List) -> None:
        """The command is gone; nobody else will tell what it left behind."""
        self._leftovers_told = True
        self.tree.signal_group(self.stop_signal)
        outside = self.tree.signal_outside_group(members, self.stop_signal)
        self.tree.signal_group(signal.SIGCONT)
        self.notify(f"{len(members)} process(es) outlived the command ({outside} outside its group); "
                    f"sent {self.stop_signal.name}")

    def _kill(self, now: float, members: Optional[List], why: str = "") -> None:
        self.tree.kill_all(members or [])
        self.killed = True
        self.stage = Stage.KILLING
        self._deadline = now + KILL_SWEEP_LIMIT
        self._next_check = now + KILL_SWEEP_INTERVAL
        why = why or f"grace period of {self.grace_period:g}s over"
        if members is None:  # the processes cannot be listed here (no /proc)
            self.notify(f"{why}; killed the process group with SIGKILL")
            return
        # the count is what was alive when the kill went out
        shown = ", ".join(describe(info) for info in members[:5]) + (" ..." if len(members) > 5 else "")
        self.notify(f"{why}; killed {len(members)} process(es) with SIGKILL: {shown}")

    def _schedule(self, now: float, reset: bool = False) -> None:
        self._interval = CHECK_FIRST if reset else min(self._interval * 2, CHECK_MAX)
        self._next_check = min(now + self._interval, self._deadline)
