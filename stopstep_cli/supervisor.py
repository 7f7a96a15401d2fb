"""The supervision loop: one main thread, explicit phases, one ``poll``.

The loop pumps the command's output (scanning each read for steps), takes
steps from the other sources, feeds every new step through the hooks, wakes
hooks whose deadline came (stall, time limit), and acts on stop requests by
starting the stop sequence. It is the only place the phase changes
(:meth:`Supervisor._enter`), and :class:`~stopstep_cli.phases.Timers` is the
only place it keeps what it must do later.

What must happen even when this thread is held up (by a hook, a blocked write,
a flood of output) happens on the sentinel's thread: signals passed on, the
grace period's SIGKILL, interrupting an overrunning hook. How the run ends is
decided from the facts by :func:`~stopstep_cli.outcome.conclude`.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

from . import outcome
from .channel import InProcessChannel, stop_step_ahead
from .console import Console
from .errors import StopstepError
from .hooks import (
    Coordinator,
    HookFailed,
    HookRunner,
    SessionRunHook,
    StopAtStepHook,
    TrainingSession,
    safe_text,
)
from .observation import Observation
from .outcome import RunFacts, conclude
from .patterns import StepFormat, resolve_formats
from .phases import Phase, Timers, check_move
from .process import Guardian, ProcessTree, Subreaper, ensure_standard_fds, own_children
from .pump import OutputPump, Stream
from .report import RunReport
from .restart import RestartPolicy
from .sentinel import (
    CHILD,
    OVERRUN,
    SIGNAL_RECEIVED,
    STOP_PROGRESS,
    WINCH,
    Event,
    Overrun,
    Sentinel,
)
from .signals import FORWARDED_SIGNALS, all_catchable_signals
from .sources import SourceSet, show
from .start_point import StartPoint
from .steps import StepLedger
from .stop_sequence import Stage, StopSequence
from .terminal import Foreground, TerminalSignals, is_terminal, wants_pty

#: How long the pipes may take to give up what they still hold once the tree is down.
DRAIN_LIMIT = 3.0


class StopCause(NamedTuple):
    reason: str
    exit_code: int


class Supervisor:
    """Runs one command under the hooks until it exits or a hook stops it.

    ``target`` is the :class:`StopAtStepHook` whose ``last_step`` the report
    calls ``target_step`` (it runs first, before ``hooks``). ``sources`` are
    extra step sources (log files, checkpoint directories); the latest complete
    checkpoint at launch is the step the run starts at. With
    ``stop_after_checkpoint``, a reached target waits (up to the grace period)
    for a complete checkpoint at or past it before the stop goes out.
    ``max_restarts`` restarts a command that exits non-zero before the target.
    A hook call that has not returned after ``hook_timeout`` seconds is a failed
    hook. ``subreaper`` adopts orphaned descendants (the command line turns it
    on; from Python it is off unless asked); ``guardian`` starts a small process
    that brings the tree down if stopstep itself is SIGKILLed. ``on_report(report)``
    is called at the end of every run (writes in it are bounded in time);
    ``on_abandon(report)`` after it when a hook never returned and the run ended
    without it (the command line exits there; without it, :meth:`run` waits for
    the hook). ``cooperative`` gives the command's Python processes stopstep's
    in-process side, so that a framework (or the beacon) stops itself at the
    target, or at a stop step announced ahead, before any signal is sent.
    :meth:`run` returns a :class:`RunReport`; its ``exit_code`` is stopstep's status.
    """

    def __init__(
        self,
        argv: Sequence[str],
        target: Optional[StopAtStepHook] = None,
        hooks: Iterable[SessionRunHook] = (),
        formats: Sequence[StepFormat] = (),
        stop_signal: int = signal.SIGINT,
        grace_period: float = 30.0,
        require_target: bool = False,
        env: Optional[Dict[str, str]] = None,
        console: Optional[Console] = None,
        start_step: Optional[int] = None,
        sources: Iterable = (),
        stop_after_checkpoint: bool = False,
        max_restarts: int = 0,
        restart_delay: float = 0.0,
        subreaper: bool = False,
        tty: str = "never",
        foreground: bool = False,
        progress=None,
        hook_timeout: float = 60.0,
        guardian: bool = False,
        on_report: Optional[Callable[[RunReport], None]] = None,
        on_abandon: Optional[Callable[[RunReport], None]] = None,
        cooperative: bool = False,
    ):
        self.argv = list(argv)
        self.target = target
        self.runner = HookRunner(([target] if target else []) + list(hooks), call=self._call_hook)
        self.formats = tuple(formats) or resolve_formats()
        self.stop_signal = signal.Signals(stop_signal)
        self.grace_period = float(grace_period)
        self.require_target = require_target
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.console = console or Console()
        self.sources = SourceSet(sources, self.console.info, self.console.debug)
        self.stop_after_checkpoint = stop_after_checkpoint
        self.restarts = RestartPolicy(max_restarts, restart_delay)
        self.subreaper, self.guardian_wanted = subreaper, guardian
        self.tty, self.foreground_wanted = tty, foreground
        self.progress = progress
        self.hook_timeout = float(hook_timeout)
        self.cooperative = cooperative
        self.inprocess: Optional[InProcessChannel] = None  # the channel to the command's Python processes
        self.on_report = on_report  # publish the report while the stop path still bounds writes
        self.on_abandon = on_abandon  # the main thread is lost in a hook: what to do after the report

        self.coord = Coordinator()
        self.session = TrainingSession(self.argv, start_step=start_step)
        self.report = RunReport(command=self.argv, start_step=start_step)
        self.phase = Phase.STARTING
        self.timers = Timers()
        self.cause: Optional[StopCause] = None  # the first reason a stop was asked for
        self.hook_error: Optional[HookFailed] = None
        self._pending: List[str] = []  # our messages, held until the read that caused them is written
        self.steps = StepLedger(self.report, start_step, self.console.debug)
        self.start = StartPoint(self.session, self.report, self.steps, self.sources, target, self.console.info,
                                self._pending.append, self._announce_target)
        self.tree: Optional[ProcessTree] = None
        self.sequence: Optional[StopSequence] = None
        self.pump = OutputPump(self.formats, self._say, progress, self._guard_write)
        self._poller = select.poll()
        self._sentinel: Optional[Sentinel] = None
        self._foreground = self._guardian = None
        self._subreaper = Subreaper()
        self._listener: Optional[TerminalSignals] = None
        self._stopping: Optional[StopSequence] = None  # the sequence of a stop stopstep made (not a clean-up)
        self._froze_gc = False
        self._source_fds: set = set()
        self._started = self._attempt_started = 0.0
        self._run_thread: Optional[int] = None  # the thread in run(): where a stuck hook is
        self._concluded = False  # the outcome is settled and the report handed over

    # -- the run --------------------------------------------------------------------

    def run(self) -> RunReport:
        if not sys.platform.startswith("linux"):
            raise StopstepError(f"stopstep supervises processes on Linux only, not on {sys.platform}")
        if self._started:
            raise StopstepError("this Supervisor has run already; make a new one for another run")
        self._started = time.monotonic()
        self._run_thread = threading.get_ident()
        ensure_standard_fds()
        pid1 = os.getpid() == 1
        self._sentinel = Sentinel(all_catchable_signals() if pid1 else FORWARDED_SIGNALS,
                                  check_interval=min(1.0, self.hook_timeout / 4), write_limit=DRAIN_LIMIT)
        self._sentinel.on_abandon = self._abandon if self.on_abandon is not None else None
        self._poller.register(self._sentinel.loop_waker.fileno(), select.POLLIN)
        self._sentinel.cooperative = self._stop_cooperatively_on
        if self.cooperative:
            try:
                self.inprocess = InProcessChannel()
                self._poller.register(self.inprocess.fileno(), select.POLLIN)
            except OSError as exc:  # no private socket here: the outside view is all there is
                self.console.info(f"no in-process channel ({exc.strerror or exc}); stopping with signals only")
        self.console.before_write = self.pump.before_message
        self.console.guard = lambda: self._sentinel.guard("writing stopstep's messages", float("inf"), kind="write")
        try:
            self._sentinel.start()
            if self.subreaper or pid1:
                self._subreaper.enable()
            self._sentinel.resize_ptys = self.pump.resize_ptys
            if self.foreground_wanted:
                self._foreground = self._sentinel.foreground = Foreground(0, self.progress)
            if self.progress is not None:
                self.progress.start()  # the bottom row of the terminal is the status's
            self._run_hooks(self.runner.begin)
            while self.phase is not Phase.DONE:
                if self.phase is Phase.STARTING:
                    self._launch()
                else:
                    self._turn()
            self._finish()
        except BaseException as exc:  # noqa: B902 - outside any hook call: see _crashed
            self._crashed(exc)
        finally:
            self._tidy_up()
        return self.report

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes."""
        check_move(self.phase, phase)
        self.console.debug(f"phase: {self.phase.value} -> {phase.value}")
        self.phase = phase

    def _launch(self) -> None:
        """Start (or restart) the command and open its session."""
        self._on_sentinel_events()  # a signal that came before the launch ends the run here
        if self.phase is not Phase.STARTING:
            return
        self.start.at_launch()
        foreground = self._foreground if self._foreground is not None and self._foreground.active else None
        # stopstep's children that are not the tree's: its host's own (API), the guardian
        foreign = self.tree.foreign if self.tree is not None else frozenset(own_children() if self.subreaper else ())
        env = self.env
        if self.inprocess is not None:  # the command's Python processes get the in-process side
            env = dict(env, **self.inprocess.environment(self.start.target_for(self.start.step), env))
        try:
            tree = ProcessTree(self.argv, env, self.stop_signal,
                               adopts_orphans=self.subreaper or os.getpid() == 1, foreign=foreign)
        except StopstepError as exc:  # an empty command name
            self.console.error(f"error: {exc}")
            self.cause = StopCause(outcome.LAUNCH_FAILED, exc.exit_code)
            self._enter(Phase.DONE)
            return
        self.tree = tree
        self.sequence = StopSequence(tree, self.stop_signal, self.grace_period, notify=self._sentinel_says)
        try:
            tree.spawn(stdout_pty=wants_pty(self.tty, 1), stderr_pty=wants_pty(self.tty, 2),
                       child_setup=foreground.child_setup if foreground else None)
        except StopstepError as exc:  # not found (127), not executable (126): said, and in the report
            self.console.error(f"error: {exc}")
            self.cause = StopCause(outcome.LAUNCH_FAILED, exc.exit_code)
            self.sequence = None
            self._enter(Phase.DONE)
            return
        self._sentinel.attach(tree, self.sequence)
        self._attempt_started = time.monotonic()
        if foreground:
            foreground.attach(tree.pid)
            self._listener = TerminalSignals(tree.pid)  # Ctrl-C now goes to the command's group
            if self._listener.pid is not None:
                tree.foreign = tree.foreign | {self._listener.pid}
                self._sentinel.listen_to_terminal(self._listener)
        if self.guardian_wanted and self._guardian is None and os.getpid() != 1:
            region = self.progress is not None and self.progress.region is not None
            self._guardian = Guardian(self.stop_signal, self.grace_period, os.ttyname(2) if region else None)
            self._guardian.start()
            tree.foreign = tree.foreign | {self._guardian.pid}
        if self._guardian is not None:
            self._guardian.watch(tree.pid)
        if not self.report.attempts and not os.path.exists("/proc/self/stat"):
            self.console.info("no /proc here: processes that leave the command's process group cannot be found "
                              "or ended; the group itself is still signalled")
        self.report.pid = self.session.pid = tree.pid
        self.console.debug(f"started pid {tree.pid}: {show(' '.join(self.argv))}")
        status_line = self.progress is not None and self.progress.status_line
        for name, in_fd, out_fd in (("stdout", tree.stdout_fd, 1), ("stderr", tree.stderr_fd, 2)):
            self.pump.add(name, in_fd, out_fd, to_terminal=status_line and is_terminal(out_fd))
            self._poller.register(in_fd, select.POLLIN)
        if tree.pidfd is not None:
            self._poller.register(tree.pidfd, select.POLLIN)
        else:
            self.timers.set("child_check", time.monotonic() + 1.0)  # SIGCHLD can be lost to a full pipe
        self._enter(Phase.RUNNING)
        seen_at_start: List[Observation] = []
        if not self.report.attempts:
            seen_at_start = self.sources.start()
            if self.sources.fileno() is not None:
                self._poller.register(self.sources.fileno(), select.POLLIN)
            # What start-up made (click, the hooks, the formats) lives until the end:
            # keep the collector from walking it again on every full collection.
            gc.freeze()
            self._froze_gc = True
        self._run_hooks(lambda: self.runner.after_create_session(self.session, self.coord))
        self.report.target_step = self.target.last_step if self.target else None
        if self.coord.should_stop():
            self._request_stop(self.coord.reason, self.coord.exit_code, self.coord.message)
        self._observe(seen_at_start)  # after after_create_session, as every step
        self._plan_wakes()

    def _turn(self) -> None:
        """One wake-up of the loop. The common case, a line of output, costs a
        poll, a read, a scan, the hooks and a write."""
        if self.phase is Phase.DRAINING:
            self._end_attempt()
            return
        due = self.timers.next()
        timeout = None if due is None else max(0.0, min(due - time.monotonic(), 3600.0)) * 1000.0
        for fd, _events in self._poller.poll(timeout):
            stream = self.pump.streams.get(fd)
            if stream is not None:
                self._pump(stream)
            elif fd == self._sentinel.loop_waker.fileno():
                self._on_sentinel_events()
            elif fd == self.sources.fileno():
                self._observe(self.sources.on_events())
                self._plan_wakes()
            elif fd in self._source_fds:
                self._observe(self.sources.on_readable(fd))
                self._plan_wakes()
            elif self.tree is not None and fd == self.tree.pidfd:
                self._poller.unregister(fd)
                self._on_command_exit()
            elif self.inprocess is not None and fd == self.inprocess.fileno():
                self._on_inprocess()
        for name in self.timers.pop_due(time.monotonic()):
            self._on_timer(name)
        if self.phase is Phase.STOPPING and self.sequence.finished:
            self._enter(Phase.DRAINING)
        if self._pending:
            self._flush_messages()

    # -- output -----------------------------------------------------------------------

    def _pump(self, stream: Stream) -> None:
        n = self.pump.read(stream)
        if n >= 0:
            self._on_read(stream, n)
            self._flush_messages()

    def _on_read(self, stream: Stream, n: int) -> None:
        """One read of the command's output (0: the stream ended)."""
        if n == 0:  # a last line without a newline counts now
            self._poller_forget(stream.in_fd)
            self._observe(self.pump.end_of_stream(stream))
            return
        self._observe(self.pump.scan(stream, n))  # the stop signal goes out before the read is written
        if stream.scanner.notes:  # e.g. a number too long to be a step, once
            for note in stream.scanner.notes:
                self.console.debug(note)
            stream.scanner.notes.clear()
        try:
            self.pump.write_out(stream, n)
        except Overrun:
            self.pump.drop(stream, f"the reader of stopstep's {stream.name} did not take it within "
                                   f"{DRAIN_LIMIT:g}s of the tree coming down")

    def _guard_write(self, stream: Stream):
        # Unbounded while the run goes (back-pressure, as without stopstep); the sentinel
        # bounds it once the tree is down (a reader that stopped reading cannot hold the end).
        return self._sentinel.guard(f"writing the command's {stream.name}", float("inf"), kind="write")

    def _poller_forget(self, fd: int) -> None:
        try:
            self._poller.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- events from the sentinel, the files, the timers ------------------------------------------

    def _on_sentinel_events(self) -> None:
        sentinel = self._sentinel
        sentinel.loop_waker.clear()
        while sentinel.events:
            event = sentinel.events.popleft()
            if event.kind == SIGNAL_RECEIVED:
                self._on_signal_received(event.signum, event.text)
            elif event.kind == CHILD and self.tree is not None and self.tree.pidfd is None:
                if self.phase in (Phase.RUNNING, Phase.WAITING_FOR_CHECKPOINT, Phase.STOPPING):
                    if self.tree.returncode is None and self.tree.poll_exit() is not None:
                        self._on_command_exit()
            elif event.kind == WINCH:  # the sentinel resized the command's pseudo-terminals
                if self.progress is not None:
                    self.progress.resize()
            elif event.kind == OVERRUN and self.hook_error is None:
                # the hook swallowed the interruption and came back on its own
                self._hook_failed(HookFailed(None, "", TimeoutError(event.text), where=event.text.split()[1]))
            elif event.text:
                self._pending.append(event.text)

    def _signal_came_first(self) -> None:
        """A terminating signal the sentinel took is the cause of the stop, if nothing came
        before it (the loop may hear of it late, from inside a slow hook)."""
        received = self._sentinel.received_signal if self._sentinel is not None else None
        if received is not None and self.cause is None:
            self.cause = StopCause(outcome.SIGNAL, outcome.exit_for_signal(received))

    def _on_signal_received(self, signum: int, how: str) -> None:
        """``how``: "started" (it began the stop), "again", "forced" (a second Ctrl-C),
        "cooperative" (it began a cooperative stop), "held" (not passed on: the command is
        stopping itself); "... terminal" when the terminal sent it to the command's group."""
        name = signal.Signals(signum).name
        self._signal_came_first()
        if self.phase in (Phase.STARTING, Phase.RESTART_DELAY):
            self.console.info(f"received {name}; ending the run")
            self._enter(Phase.DONE)
            return
        if how == "cooperative":
            self._stopping = self.sequence
            self.console.info(f"received {name}; {self._announce_stop(outcome.SIGNAL)}; "
                              f"{name} follows in {self.grace_period:g}s if it has not exited")
        elif how == "forced":
            self.console.info("Ctrl-C again: killing the tree now")
        elif how.startswith("held"):
            sent = "the command got it from the terminal" if how.endswith("terminal") else "not passed on"
            hint = "; Ctrl-C again kills it at once" if signum == signal.SIGINT else ""
            self.console.info(f"received {name}; the training is stopping itself already ({sent}){hint}")
        elif how.startswith("again") or self.phase in (Phase.DRAINING, Phase.DONE):
            self.console.debug(f"passed {name} on; the grace period is not restarted")
        else:
            sent = "the command got it from the terminal" if how.endswith("terminal") else "passed it on"
            hint = "; Ctrl-C again kills it at once" if signum == signal.SIGINT else ""
            self.console.info(f"received {name}; {sent}; waiting up to {self.grace_period:g}s for the command{hint}")
        if self.phase in (Phase.RUNNING, Phase.WAITING_FOR_CHECKPOINT):
            self.timers.clear("checkpoint_wait")
            if self.sequence.stage is Stage.IDLE:  # it came before the sentinel knew this tree
                self.sequence.begin()
                self._sentinel.wake()
            self._stopping = self.sequence
            self._enter(Phase.STOPPING)

    def _deadlines_run(self) -> bool:
        """Deadline hooks (stall, time limit) are woken until a stop is under way; while
        the target waits for its checkpoint the command still trains, so they go on."""
        return self.runner.timed and (self.cause is None or self.phase is Phase.WAITING_FOR_CHECKPOINT)

    def _on_timer(self, name: str) -> None:
        now = time.monotonic()
        if name == "hooks":
            if self._deadlines_run():
                self._run_hooks(lambda: self.runner.on_deadlines(self.session, self.coord, now))
                if self.coord.should_stop():
                    self._request_stop(self.coord.reason, self.coord.exit_code, self.coord.message)
        elif name == "sources":
            self._observe(self.sources.due(now))
        elif name == "checkpoint_wait" and self.phase is Phase.WAITING_FOR_CHECKPOINT:
            done = self._stop_tree()
            self._pending.append(f"no complete checkpoint at or past step {self.report.target_step} "
                                 f"within {self.grace_period:g}s; stopping anyway: {done}")
        elif name == "restart" and self.phase is Phase.RESTART_DELAY:
            self.report.restarts = self.restarts.restarts  # counted when it happens, not when it is planned
            self._enter(Phase.STARTING)
        elif name == "progress" and self.progress is not None:
            self.progress.tick(now, self.console)
        elif name == "child_check" and self.tree is not None and self.tree.returncode is None:
            if self.tree.poll_exit() is not None:
                self._on_command_exit()
            else:
                self.timers.set("child_check", now + 1.0)
        self._plan_wakes()

    def _plan_wakes(self) -> None:
        """Put the hooks', the sources' and the progress line's next times in the table."""
        if self._deadlines_run():
            self._run_hooks(lambda: self.timers.set("hooks", self.runner.next_deadline()))
        else:
            self.timers.clear("hooks")
        self.timers.set("sources", self.sources.next_due())
        fds = self.sources.fds()  # a FIFO as a log file: its writes make no inotify event
        if fds != self._source_fds:
            for fd in self._source_fds - fds:
                self._poller_forget(fd)
            for fd in fds - self._source_fds:
                self._poller.register(fd, select.POLLIN)
            self._source_fds = fds
        if self.progress is not None:
            self.timers.set("progress", self.progress.next_due())

    # -- the command's exit, the end of an attempt, restarts ----------------------------------

    def _on_inprocess(self) -> None:
        """What the command's Python processes sent: steps (through the hooks like any), hellos."""
        for message in self.inprocess.receive():
            if message["t"] == "hello":
                self.console.debug(f"in-process: {message.get('fw')} engaged in pid {message.get('pid')} "
                                   f"(rank {message.get('rank', 0)}), starting at step {message.get('step')}")
                self._on_hello(message)
            elif message["t"] == "stopping":
                self.console.debug(f"in-process: pid {message.get('pid')} stops itself after step "
                                   f"{message.get('step')}")
            obs = self.inprocess.to_observation(message)
            if obs is not None:
                self._observe_one(obs)

    def _on_command_exit(self) -> None:
        # Output written before the exit is already in the pipes (and the channel): read it
        # first, so a last step counts before the exit does.
        if self.inprocess is not None:
            self._on_inprocess()
        self.pump.drain(time.monotonic() + DRAIN_LIMIT, self._on_read)
        self.report.child_returncode = self.tree.poll_exit()
        self.timers.clear("child_check")
        if self.phase is Phase.WAITING_FOR_CHECKPOINT:
            self._look_at_sources_once_more()
            if self.phase is Phase.WAITING_FOR_CHECKPOINT:  # it never came
                self.cause = StopCause(outcome.CHECKPOINT_MISSING, 1)
                self._pending.append(f"the command exited before a complete checkpoint at or past step "
                                     f"{self.report.target_step} came")
        if self.phase in (Phase.RUNNING, Phase.WAITING_FOR_CHECKPOINT):
            self.console.debug(f"command exited with status {outcome.exit_status(self.tree.returncode)}")
            self.sequence.begin()  # ends what it left behind, if anything; done at once otherwise
            self._sentinel.wake()
            self._enter(Phase.STOPPING)

    def _end_attempt(self) -> None:
        """The tree is down: pass on what the pipes hold, reap, record; restart or finish."""
        self._on_sentinel_events()  # what it said while the loop was busy
        self.pump.drain(time.monotonic() + DRAIN_LIMIT, self._on_read)
        for stream in list(self.pump.streams.values()):
            self._poller_forget(stream.in_fd)
        self.pump.close_all()
        self._sentinel.detach()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._foreground is not None:
            self._foreground.take_back()  # between runs, Ctrl-C is for stopstep
        if self._guardian is not None:
            self._guardian.forget()  # before the reap frees the group's id for reuse
        tree = self.tree
        tree.reap()
        self.session.pid = None  # no process until the next start (a stall clock rests)
        self._look_at_sources_once_more()
        self._flush_messages()
        self._record_attempt(tree)
        stopped = self.cause is not None or self._sentinel.received_signal is not None
        if not self.restarts.should_restart(tree.returncode, stopped):
            self._enter(Phase.DONE)
            return
        self._plan_wakes()  # a time limit holds in the restart delay too
        number = self.restarts.count()
        seen = "none" if self.steps.global_step is None else self.steps.global_step
        delay = self.restarts.delay
        self.console.info(f"command exited with status {outcome.exit_status(tree.returncode)} at step {seen}; "
                          f"restarting{f' in {delay:g}s' if delay else ''} "
                          f"(restart {number} of {self.restarts.max_restarts})")
        self.timers.set("restart", time.monotonic() + delay)
        self._enter(Phase.RESTART_DELAY)

    def _record_attempt(self, tree: ProcessTree) -> None:
        self.report.child_returncode = tree.returncode
        self.report.attempts.append({
            "pid": tree.pid,
            "start_step": self.session.start_step,
            "last_step_seen": self.steps.global_step,
            "child_returncode": tree.returncode,
            "exit_status": outcome.exit_status(tree.returncode) if tree.returncode is not None else None,
            "duration_s": round(time.monotonic() - self._attempt_started, 3),
        })

    def _look_at_sources_once_more(self) -> None:
        self._observe(self.sources.final())

    # -- steps and hooks ------------------------------------------------------------------------

    def _observe(self, observations: List[Observation]) -> None:
        for obs in observations:
            self._observe_one(obs)

    def _observe_one(self, obs: Observation) -> None:
        self.start.first_step(obs)
        if (obs.is_checkpoint and self.phase is Phase.WAITING_FOR_CHECKPOINT
                and obs.step >= (self.report.target_step or 0)):
            self._pending.append(f"checkpoint for step {obs.step} is complete; {self._stop_tree()}")
        if not self.steps.record(obs):
            return
        if self.progress is not None:  # while it stops too: the steps it still makes are shown
            self.progress.update(obs.step, self.report.target_step, self.steps.rate_anchor)
        if self.cause is not None:
            return
        session, report = self.session, self.report
        session.global_step, session.fields = obs.step, obs.fields
        values = {"global_step": obs.step}
        values.update(obs.fields)
        if obs.is_checkpoint:
            values["checkpoint_step"], values["checkpoint_path"] = obs.step, obs.path
        report.observations += 1
        ctx = self._run_hooks(lambda: self.runner.run(session, values))
        if ctx is not None and ctx.stop_requested:
            self._request_stop(ctx.stop_reason, ctx.stop_exit_code, ctx.stop_message, obs)
        elif self.coord.should_stop():
            self._request_stop(self.coord.reason, self.coord.exit_code, self.coord.message, obs)
        if self.runner.timed and self.cause is None:
            self._run_hooks(lambda: self.timers.set("hooks", self.runner.next_deadline()))

    def _call_hook(self, hook, method: str, *args):
        """Every hook call: bounded by --hook-timeout, whatever it raises contained."""
        sentinel = self._sentinel
        outer = sentinel.enter(f"hook {type(hook).__name__}.{method}", self.hook_timeout)
        try:
            return getattr(hook, method)(*args)
        except BaseException as exc:  # noqa: B902 - SystemExit, KeyboardInterrupt and Overrun included
            raise HookFailed(hook, method, exc) from exc
        finally:
            sentinel.leave(outer)

    def _run_hooks(self, call):
        """Run a lifecycle step; a failed hook stops the run (exit 5)."""
        if self.hook_error is not None:
            return None
        try:
            return call()
        except HookFailed as failure:
            self._hook_failed(failure)
            return None

    def _hook_failed(self, failure: HookFailed) -> None:
        if self.hook_error is not None:
            return
        self._signal_came_first()
        self.hook_error = failure
        for line in failure.explain(self.hook_timeout):
            self.console.error(line)
        self.timers.clear("hooks")
        self._request_stop(outcome.HOOK_ERROR, outcome.EXIT_HOOK_FAILED, "a hook failed")

    # -- stopping -----------------------------------------------------------------------------

    def _request_stop(self, reason: Optional[str], exit_code: int, message: Optional[str] = None,
                      obs: Optional[Observation] = None) -> None:
        """A hook (or a timer) asked to stop: now, or once the checkpoint is whole."""
        self._signal_came_first()
        if self.cause is not None and self.phase is Phase.WAITING_FOR_CHECKPOINT and reason != outcome.TARGET_REACHED:
            # the checkpoint at the target has not come: this stop (a time limit) is the one made
            self.cause = StopCause(reason or outcome.HOOK_REQUESTED, exit_code)
            self._pending.append(f"{message or 'stopping: ' + self.cause.reason} while waiting for the checkpoint; "
                                 f"{self._stop_tree()}")
            return
        if self.cause is not None:
            return
        reason = reason or outcome.HOOK_REQUESTED
        self.cause = StopCause(reason, exit_code)
        self.timers.clear("hooks")
        if self.phase in (Phase.STARTING, Phase.RESTART_DELAY):
            if message:
                self._pending.append(message)
            self._enter(Phase.DONE)  # no command is running
            return
        if self.phase is not Phase.RUNNING:
            return  # the command already exited: its tree is coming down anyway
        target = self.report.target_step
        if (reason == outcome.TARGET_REACHED and self.stop_after_checkpoint
                and (self.report.last_checkpoint_step is None or self.report.last_checkpoint_step < target)):
            self._enter(Phase.WAITING_FOR_CHECKPOINT)
            self.timers.set("checkpoint_wait", time.monotonic() + self.grace_period)
            self._pending.append(f"step {obs.step if obs else self.steps.global_step} reached (target {target}); "
                                 f"waiting up to {self.grace_period:g}s for a complete checkpoint at or past it")
            return
        sent = self._stop_tree()
        if reason != outcome.TARGET_REACHED or obs is None:
            self._pending.append(f"{message or 'stopping: ' + reason}; {sent}")
        elif self.report.observations == 1 and target is not None and obs.step > target:
            self._pending.append(f"first step seen ({obs.step}) is already past the target ({target}); stopping")
        else:
            self._pending.append(f"step {obs.step} reached (target {target}); {sent}")

    def _stop_tree(self) -> str:
        """Stop the command: cooperatively when its Python side engaged (it stops itself at
        the target, or at a step announced ahead; the signal path follows after the grace
        period if it has not exited), else the stop signal to the group, now (on this
        thread). The sentinel times the rest."""
        self.timers.clear("checkpoint_wait")
        self._stopping = self.sequence
        if self._cooperative_now():
            self.sequence.begin(cooperative_window=self.grace_period)
            done = "the training stops itself there"
            if self.cause.reason != outcome.TARGET_REACHED:
                done = self._announce_stop(self.cause.reason)
            done += f"; {self.stop_signal.name} follows in {self.grace_period:g}s if it has not exited"
        else:
            self.sequence.begin()
            done = f"sent {self.stop_signal.name} to the command's process group"
        self._sentinel.wake()
        self._enter(Phase.STOPPING)
        return done

    def _cooperative_now(self) -> bool:
        return self.inprocess is not None and self.inprocess.engaged and self.sequence is not None

    def _stop_cooperatively_on(self, signum: int) -> bool:
        """On the sentinel's thread: a SIGTERM (docker stop, a preempting scheduler) becomes a
        cooperative stop when the command's Python side engaged: it saves at the next step
        and exits; the signal follows after the grace period if it has not."""
        if signum != signal.SIGTERM or not self._cooperative_now():
            return False
        return self.sequence.begin(cooperative_window=self.grace_period, then_signal=signum)

    def _announce_stop(self, reason: str) -> str:
        """A stop decided while running: every process stops after the same step, announced
        ahead of the highest seen so that no rank has passed it when the word reaches it.
        Returns what was asked, in words."""
        highest = self.steps.global_step or 0
        senders = list(self.inprocess.senders.values()) if self.inprocess else []
        if len(senders) <= 1 and all((s.world or 1) <= 1 for s in senders):
            # One process agrees with itself: it stops after the next step it finishes (a
            # NaN stop should not train on for a quarter of a second). Its reports come at
            # most every 20 ms, so it may be a step or two past the highest seen here: the
            # words name no step, the summary says where it stopped.
            self.inprocess.announce_stop(highest + 1, reason)
            return "asked the training to stop itself after its next step"
        stop_at = stop_step_ahead(highest, self.steps.steps_per_s())
        self.inprocess.announce_stop(stop_at, reason)
        return f"asked the training to stop itself after step {stop_at}"

    def _on_hello(self, message: dict) -> None:
        """A process of the command engaged. The first framework to say at which step it
        starts (its own restored global step, exact) settles the run's start step; then
        every process learns the target, which the launch may have left unsaid."""
        start = message.get("step")
        if isinstance(start, int) and not isinstance(start, bool):
            self.start.framework_says(start, str(message.get("fw")))
        if self.target is not None and self.target.last_step is not None and message.get("target") != self.target.last_step:
            self.inprocess.announce_target(self.target.last_step)  # it was launched without the target

    def _announce_target(self, step: int) -> None:
        if self.inprocess is not None:
            self.inprocess.announce_target(step)

    def _sentinel_says(self, text: str) -> None:
        """The stop sequence's words, from the sentinel's thread: printed by the loop."""
        self._sentinel.post(Event(STOP_PROGRESS, None, text))

    # -- messages and terminals --------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.console.info(text)

    def _flush_messages(self) -> None:
        while self._pending:
            self.console.info(self._pending.pop(0))

    # -- the end -------------------------------------------------------------------------------------

    def _facts(self) -> RunFacts:
        self._signal_came_first()  # one that came after the loop last looked
        report, cause, sequence = self.report, self.cause, self.sequence
        received = self._sentinel.received_signal if self._sentinel is not None else None
        return RunFacts(
            stop_reason=cause.reason if cause else None,
            stop_exit_code=cause.exit_code if cause else 0,
            received_signal=received,
            returncode=self.tree.returncode if self.tree is not None else None,
            killed=bool(sequence and sequence.killed),
            require_target=self.require_target,
            target_step=report.target_step,
            last_step_seen=report.last_step_seen,
            duration_s=report.duration_s,
            steps_per_s=report.steps_per_s,
            stop_signal=self._stopping.signal_sent if self._stopping is not None else None,
            stop_mode=self._stop_mode(cause),
        )

    def _stop_mode(self, cause: Optional[StopCause]) -> Optional[str]:
        """How stopstep stopped the command: "cooperative" (it stopped itself when asked),
        "signal", or None when the command ended by itself."""
        sequence = self._stopping  # a clean-up after the command exited by itself is no stop
        if cause is None or cause.reason == outcome.LAUNCH_FAILED or sequence is None:
            return None
        if sequence.began_cooperatively and not sequence.signal_sent:
            return "cooperative"
        return "signal" if sequence.signal_sent else None

    def _finish(self) -> None:
        self._sentinel.wind_down()  # from here on, a write that blocks has write_limit seconds
        self.report.steps_per_s = self.steps.steps_per_s()
        facts = self._facts()
        status = outcome.exit_status(facts.returncode) if facts.returncode is not None else None
        ended_well = facts.received_signal is None and (
            (facts.stop_reason is not None and facts.stop_reason not in (outcome.SIGNAL, outcome.CHECKPOINT_MISSING))
            or (facts.stop_reason is None and status == 0))
        if self.hook_error is None and ended_well:
            self._run_hooks(lambda: self.runner.end(self.session))
            if self.hook_error is not None:  # a failed end() fails the run, whatever stopped it
                self.cause = StopCause(outcome.HOOK_ERROR, outcome.EXIT_HOOK_FAILED)
            facts = self._facts()
        self._conclude(facts)

    def _conclude(self, facts: RunFacts) -> None:
        self._concluded = True
        report = self.report
        report.duration_s = round(time.monotonic() - self._started, 6)
        facts = facts._replace(duration_s=report.duration_s)
        result = conclude(facts)
        report.reason, report.exit_code = result.reason, result.exit_code
        report.killed = facts.killed
        report.stop_signal = outcome.signal_name(facts.stop_signal)
        report.stop_mode = facts.stop_mode
        report.received_signal = outcome.signal_name(facts.received_signal)
        if facts.returncode is not None and facts.returncode < 0 and self._sentinel is not None:
            with self._sentinel.guard("writing to the terminal", float("inf"), kind="write"):
                self.pump.reset_terminals()
        if self.progress is not None:
            self.progress.give_back()
        self._flush_messages()
        for what in self.sources.missing():
            self.console.info(f"{what} never appeared")
        if result.target_not_reached:
            seen = "none" if report.last_step_seen is None else report.last_step_seen
            self.console.error(f"command exited 0 before reaching step {report.target_step} "
                               f"(last step seen: {seen}); failing as --require-target asks")
        elif result.reason != outcome.LAUNCH_FAILED:  # that one said it all already
            self.console.info(result.summary)
        if self.on_report is not None:
            try:
                with self._sentinel.guard("writing the report", float("inf"), kind="report"):
                    self.on_report(report)
            except Overrun:
                self.console.error(f"the report's reader did not take it within {DRAIN_LIMIT:g}s; not written")
                if report.exit_code == 0:
                    report.exit_code = outcome.EXIT_OWN_FAILURE
            received = self._sentinel.received_signal
            if received is not None and report.received_signal is None:  # it came during the write
                report.received_signal = outcome.signal_name(received)
                report.exit_code = outcome.exit_for_signal(received)

    def _crashed(self, exc: BaseException) -> None:
        """Something raised outside any hook call: a hook's own signal handler (it runs
        wherever the loop is), or stopstep itself. The tree comes down, the report is
        written, and the status is stopstep's own failure (125)."""
        if self._concluded:  # it ended already; what failed came after the report
            raise exc
        where = "a signal handler a hook installed, or stopstep itself"
        self.console.error(f"error: {type(exc).__name__}: {safe_text(exc)} (raised outside any hook call: "
                           f"{where}); bringing the tree down")
        import traceback

        self.console.debug("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        self.cause = StopCause(outcome.INTERNAL_ERROR, outcome.EXIT_OWN_FAILURE)
        tree = self.tree
        if tree is not None and not tree.reaped and tree.pid is not None:
            self._stopping = self._stopping or self.sequence
            if self.sequence is not None and not self.sequence.finished:
                self.sequence.begin()  # (recorded as the stop signal when it was not sent yet)
                tree.kill_all(tree.live_members() or [])
                self.sequence.killed = True
            self._sentinel.detach()
            if self._guardian is not None:
                self._guardian.forget()
            tree.reap()
            self._record_attempt(tree)
        self._conclude(self._facts())

    def _abandon(self, what: str, seconds: float) -> None:
        """On the sentinel's thread: the main thread is stuck in a hook that will not
        come back, and the tree is down. Say so, show where it is stuck, and hand over
        the report."""
        self.hook_error = self.hook_error or HookFailed(None, "", TimeoutError("did not come back"), where=what)
        if self.cause is None or self.cause.reason != outcome.SIGNAL:
            self.cause = StopCause(outcome.HOOK_ERROR, outcome.EXIT_HOOK_FAILED)  # whatever it was stopping for
        if self._guardian is not None:
            self._guardian.release()  # the tree is down; the process ends without the usual tidy-up
        self._stopping = self._stopping or self.sequence  # the sentinel sent the stop signal
        tree = self.tree
        if tree is not None and tree.returncode is None:
            tree.poll_exit()
        if tree is not None and not self.report.attempts:
            self._record_attempt(tree)
        self.console.error(f"{what} did not return within {seconds:g}s and did not come back after it was "
                           f"interrupted (--hook-timeout {self.hook_timeout:g}); ending without it. It is stuck in:")
        frame = sys._current_frames().get(self._run_thread)
        if frame is not None:
            import traceback

            self.console.error("    " + "".join(traceback.format_stack(frame)).rstrip().replace("\n", "\n    "))
        self._conclude(self._facts())  # (gives the terminal's status row back too)
        if self._foreground is not None:
            self._foreground.restore()
        self.on_abandon(self.report)

    def _tidy_up(self) -> None:
        self.console.guard = None  # the sentinel is going
        self.pump.close_all()
        if self.inprocess is not None:
            self.inprocess.close()
        self.sources.close()
        if self._foreground is not None:
            self._foreground.restore()
        if self.progress is not None:
            self.progress.give_back()
        if self._sentinel is not None:
            self._sentinel.close()
        if self.tree is not None and not self.tree.reaped and self.tree.pid is not None:
            # an error on the way: never leave the tree behind
            if self.sequence is not None and not self.sequence.finished:
                self.tree.kill_all(self.tree.live_members() or [])
            self.tree.reap()
        if self._listener is not None:
            self._listener.close()
        if self._guardian is not None:
            self._guardian.release()
        self._subreaper.restore()
        if self._froze_gc:
            gc.unfreeze()  # a library leaves its host's collector as it found it
