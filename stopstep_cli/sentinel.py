"""The sentinel: a thread that keeps the stop path moving whatever the main loop does.

The main loop runs hooks, which are other people's code, and writes output to
readers that may stall. Neither may hold up a stop, so three things happen on
this thread instead:

1. **Signals in.** It reads the signal inbox and passes each signal on to the
   command's process group at once; a terminating one (INT, TERM, HUP, QUIT,
   ALRM) also starts the stop sequence and is remembered for the exit status.
   SIGCHLD: orphans are reaped, and a Ctrl-Z of the command suspends stopstep's
   own job too.
2. **The stop sequence on time.** It calls :meth:`StopSequence.advance` when
   the sequence asks to be called, so the grace period's SIGKILL comes on time.
3. **Overruns.** The loop marks a call it makes to a hook (and a write while
   stopping) as a *guarded section* with a deadline. A section still open at
   its deadline is interrupted: this thread sends :data:`INTERRUPT_SIGNAL` to
   the main thread, whose handler raises :class:`Overrun` inside the call (a
   ``time.sleep`` or blocked ``write`` is interrupted too). A hook's overrun
   also starts the stop sequence from here. If the main thread still does not
   come back (a hook that swallows the exception), ``on_abandon`` is called
   once the tree is down: the command line writes its report and exits.

Everything it has to tell the loop goes through :attr:`events` and a wake-up pipe.
"""

from __future__ import annotations

import collections
import select
import signal
import threading
import time
from typing import Callable, NamedTuple, Optional, Sequence

from .signals import INTERRUPT_SIGNAL, TERMINATING_SIGNALS, SignalInbox
from .stop_sequence import Stage
from .waker import Waker

#: How long after an overrun (and the tree being down) the main thread has to come back.
ABANDON_AFTER = 5.0

# What the sentinel tells the loop (Event.kind).
SIGNAL_RECEIVED = "signal_received"  # a terminating signal, passed on; the stop sequence started
SIGNAL_PASSED = "signal_passed"  # any other signal, passed on
CHILD = "child"  # SIGCHLD: the command may have exited
WINCH = "winch"  # the terminal was resized
STOP_PROGRESS = "stop_progress"  # the stop sequence did something worth saying (text)
OVERRUN = "overrun"  # a guarded section overran (text)


class Event(NamedTuple):
    kind: str
    signum: Optional[int] = None
    text: str = ""


class Overrun(BaseException):
    """Raised in the main thread inside a guarded call that overran its deadline.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in a
    hook does not swallow it.
    """

    def __init__(self, what: str, seconds: float, after_the_tree: bool = False):
        when = "of the tree coming down" if after_the_tree else ""
        super().__init__(f"{what} did not return within {seconds:g}s {when}".rstrip())
        self.what, self.seconds, self.after_the_tree = what, seconds, after_the_tree


class _Section:
    __slots__ = ("sentinel", "what", "seconds", "kind", "outer")

    def __init__(self, sentinel: "Sentinel", what: str, seconds: float, kind: str):
        self.sentinel, self.what, self.seconds, self.kind = sentinel, what, seconds, kind
        self.outer = None

    def __enter__(self):
        sentinel = self.sentinel
        sentinel._token += 1
        now = time.monotonic()
        self.outer = sentinel._section  # a message written while a write is guarded: nested
        sentinel._section = (sentinel._token, now + self.seconds, self.what, self.seconds, self.kind, now)
        return self

    def __exit__(self, *exc_info):
        self.sentinel._section, self.outer = self.outer, None
        return False


class Sentinel:
    """See the module docstring. Create it on the main thread (it installs the
    signal handlers), ``start()`` it, ``attach()`` each attempt's tree and stop
    sequence, ``close()`` it at the end."""

    def __init__(self, signals: Sequence[int], check_interval: float = 1.0, write_limit: float = 3.0):
        self.events: collections.deque = collections.deque()
        self.loop_waker = Waker()  # the main loop polls this
        self._wake = Waker()
        self.inbox = SignalInbox(signals, interrupt_handler=self._interrupt_main)
        self.check_interval = check_interval
        self.write_limit = write_limit  # a write may take this long once the tree is down
        self._finished_at = float("inf")  # when the attached stop sequence finished
        self._hook_cut_at = float("-inf")  # when a hook running past the tree's end was cut short
        self.received_signal: Optional[int] = None  # the first terminating signal, in any phase
        self.tree = None
        self.sequence = None
        self.foreground = None
        #: resizes the command's pseudo-terminals like the window; True when it had any
        self.resize_ptys: Optional[Callable[[], bool]] = None
        self.cooperative = None  # how a received signal becomes a cooperative stop, when one can
        self.on_abandon: Optional[Callable[[str, float], None]] = None  # (what, its time)
        self.terminal = None  # a TerminalSignals listener, while the command holds the terminal
        self._suspended = False  # stopstep stopped its own job after the command's Ctrl-Z
        self._attach_lock = threading.Lock()
        self._main_ident = threading.main_thread().ident
        self._section = None  # (token, deadline, what, seconds, kind) while the main thread is in one
        self._token = 0
        self._fired: Optional[int] = None  # the token of the section interrupted last
        self._fired_at = 0.0
        self._abandoned = False
        self._finished_said = None
        self._interrupts_seen = 0
        self._closing = False
        self._poller = select.poll()
        self._thread = threading.Thread(target=self._run, name="stopstep-sentinel", daemon=True)

    # -- the main thread's side ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def attach(self, tree, sequence) -> None:
        with self._attach_lock:
            self.tree, self.sequence = tree, sequence
            self._finished_at = float("inf")
            self._hook_cut_at = float("-inf")
        self.wake()

    def detach(self) -> None:
        """Before the command is reaped: no signal may be passed to its group after this."""
        with self._attach_lock:
            self.tree, self.sequence = None, None
            self.terminal = None

    def listen_to_terminal(self, listener) -> None:
        """Hear the terminal's signals to the command's group through ``listener``."""
        if listener.fd is not None:
            self._poller.register(listener.fd, select.POLLIN)
            self.terminal = listener
            self.wake()

    def wind_down(self) -> None:
        """The run is ending: whatever is under way gets at most write_limit more."""
        self._finished_at = min(self._finished_at, time.monotonic())

    def guard(self, what: str, seconds: float, kind: str = "hook") -> _Section:
        """``with sentinel.guard("hook X.after_run", 60): ...`` raises Overrun past the deadline."""
        return _Section(self, what, seconds, kind)

    def enter(self, what: str, seconds: float, kind: str = "hook"):
        """:meth:`guard` without a context-manager object, for the per-line path (every
        hook call): ``outer = sentinel.enter(...)``, then ``sentinel.leave(outer)`` in a
        ``finally``."""
        outer = self._section
        self._token += 1
        now = time.monotonic()
        self._section = (self._token, now + seconds, what, seconds, kind, now)
        return outer

    def leave(self, outer) -> None:
        self._section = outer

    def wake(self) -> None:
        self._wake.wake()

    def post(self, event: Event) -> None:
        self.events.append(event)
        self.loop_waker.wake()

    def close(self) -> None:
        self._closing = True
        self._wake.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.inbox.close()
        self.loop_waker.close()
        self._wake.close()

    def _interrupt_main(self, signum, frame):  # noqa: ARG002
        """INTERRUPT_SIGNAL's handler, run on the main thread."""
        section = self._section
        if section is not None and section[0] == self._fired:
            cut_short = time.monotonic() < section[1]
            raise Overrun(section[2], self.write_limit if cut_short else section[3], cut_short)

    # -- the sentinel's own thread -----------------------------------------------------------

    def _run(self) -> None:
        poller = self._poller
        poller.register(self.inbox.fileno(), select.POLLIN)
        poller.register(self._wake.fileno(), select.POLLIN)
        while not self._closing:
            now = time.monotonic()
            wake_at = now + self.check_interval
            sequence = self.sequence
            if sequence is not None and sequence.next_wake() is not None:
                wake_at = min(wake_at, sequence.next_wake())
            section = self._section
            if section is not None and section[0] != self._fired:
                wake_at = min(wake_at, self._deadline_of(section))
            try:
                ready = poller.poll(max(0.0, wake_at - now) * 1000.0)
            except InterruptedError:
                ready = []
            if self._closing:
                return
            self._wake.clear()
            for signum in self.inbox.drain():
                self._on_signal(signum)
            terminal = self.terminal
            if terminal is not None and any(fd == terminal.fd for fd, _ in ready):
                heard = terminal.heard()
                if not heard:
                    poller.unregister(terminal.fd)  # the listener is gone
                    self.terminal = None
                for signum in heard:
                    self._on_signal(signum, from_terminal=True)
            self._advance_sequence()
            self._check_section(time.monotonic())

    def _on_signal(self, signum: int, from_terminal: bool = False) -> None:
        """A signal stopstep received, or (``from_terminal``) one the terminal sent to the
        command's group, which has it already and must not get it twice."""
        if signum == INTERRUPT_SIGNAL:
            return
        with self._attach_lock:
            tree, sequence = self.tree, self.sequence
            if signum == signal.SIGCHLD:
                if tree is not None:
                    tree.reap_orphans()  # no zombie piles up under a subreaper or PID 1
                    if self.foreground is not None and not self._suspended and tree.poll_stopped():
                        self._suspended = True
                        self.foreground.stop_own_job()  # Ctrl-Z: we stop; SIGCONT comes back here
                self.post(Event(CHILD, signum))
                return
            if signum == signal.SIGCONT:
                if self._suspended:
                    self._suspended = False
                    if tree is not None:
                        self.foreground.resume(tree)
                return
            terminating = signum in TERMINATING_SIGNALS
            if terminating and self.received_signal is None:
                self.received_signal = signum
            if terminating and (sequence is None or sequence.finished):
                self.wind_down()  # nothing left to stop: what still runs (a hook) gets write_limit more
            if terminating and self.cooperative is not None and self.cooperative(signum):
                self.post(Event(SIGNAL_RECEIVED, signum, "cooperative"))
                return
            if signum == signal.SIGINT and sequence is not None and self._interrupts_seen \
                    and sequence.stage in (Stage.COOPERATIVE, Stage.SIGNALLED):
                sequence.kill_now()  # Ctrl-C again: the user means it
                self.post(Event(SIGNAL_RECEIVED, signum, "forced"))
                return
            if signum == signal.SIGINT:
                self._interrupts_seen += 1
            if terminating and sequence is not None and sequence.stage is Stage.COOPERATIVE:
                # The command is stopping itself (and may be saving): a signal now would cut
                # that short. It is most often the same request again (`timeout` and a group
                # kill each deliver one); it is kept for the exit status, and the window's end
                # still brings the signal path.
                self.post(Event(SIGNAL_RECEIVED, signum, "held terminal" if from_terminal else "held"))
                return
            if signum == signal.SIGWINCH:
                # The command's pseudo-terminals take the new size before it hears of the resize,
                # so that what it reads is the new size; the terminal's own signal came before
                # they had it, so the command gets a second one once they do.
                resized = self.resize_ptys is not None and self.resize_ptys()
                if tree is not None and (resized or not from_terminal):
                    tree.signal_group(signum)
                self.post(Event(WINCH, signum))
                if not from_terminal:
                    self.post(Event(SIGNAL_PASSED, signum))
                return
            if tree is not None and not from_terminal:
                tree.signal_group(signum)
            if terminating:
                started = sequence.begin(already_sent=signum) if sequence is not None else False
                how = "started" if started else "again"
                self.post(Event(SIGNAL_RECEIVED, signum, f"{how} terminal" if from_terminal else how))
            else:
                self.post(Event(SIGNAL_PASSED, signum))

    def _advance_sequence(self) -> None:
        with self._attach_lock:
            sequence = self.sequence
            if sequence is None:
                return
            sequence.advance()
            if sequence.finished and self._finished_said is not sequence:
                self._finished_said = sequence
                self._finished_at = time.monotonic()
                self.post(Event(STOP_PROGRESS, None, ""))  # the loop looks at the sequence

    def _deadline_of(self, section) -> float:
        # Once the tree is down (or the run winds down), what was already under way (a
        # hook that sleeps) gets write_limit more; then the run goes on without it. The
        # writes still to do (the command's output, stopstep's messages) get write_limit in
        # all, counted from when no hook holds them back any more (the messages of the stop
        # itself wait for the hook), and the report write_limit of its own. Before that, a
        # slow reader slows the command as it would without stopstep, and a hook has its
        # own --hook-timeout.
        finished = self._finished_at
        if finished == float("inf"):
            return section[1]
        if section[4] == "report":  # the report has write_limit of its own, whatever came before
            return min(section[1], max(section[5], finished) + self.write_limit)
        if section[4] == "write":  # all the writes together: write_limit
            return min(section[1], max(finished, self._hook_cut_at) + self.write_limit)
        if section[5] <= finished:  # a hook under way when the tree came down
            return min(section[1], finished + self.write_limit)
        return section[1]

    def _check_section(self, now: float) -> None:
        section = self._section
        if section is None:
            return
        token, deadline, what, seconds, kind, _armed = section
        if now < self._deadline_of(section):
            return
        if now < deadline:  # cut short: the tree is down
            seconds = self.write_limit
            if kind == "hook" and token != self._fired:
                self._hook_cut_at = now  # the writes it held back get their time from here
        if token != self._fired:
            self._fired, self._fired_at = token, now
            if kind == "hook" and now >= deadline:
                self.post(Event(OVERRUN, None, f"{what} did not return within {seconds:g}s"))
                with self._attach_lock:
                    if self.sequence is not None:
                        self.sequence.begin()  # the tree goes down whatever the main thread does
        elif self.on_abandon is not None and not self._abandoned:
            sequence = self.sequence
            if (sequence is None or sequence.finished) and now - self._fired_at >= ABANDON_AFTER:
                self._abandoned = True
                self.on_abandon(what, seconds)
                return
        if not self.inbox.active:
            return  # run() is not on the main thread: nothing there can be interrupted
        try:
            signal.pthread_kill(self._main_ident, INTERRUPT_SIGNAL)  # again, while it stays in there
        except (ProcessLookupError, OSError):
            pass
