"""The supervision loop: one thread, one ``poll``.

It pumps the command's output through (scanning each read for steps), takes
steps from the other sources (log files, checkpoint directories), feeds every
new step through the hooks, wakes hooks whose deadline came (stall, time
limit), acts on stop requests, passes signals on, brings the process tree
down, and restarts a crashed command when asked to. The stop signal is sent
the moment a hook asks for it, before the read that carried the step is even
written out; everything slower (walking the process tree, messages) comes
after.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import sys
import time
import traceback
from typing import Dict, Iterable, List, Optional, Sequence

from . import report as reasons
from .console import Console
from .errors import StopstepError
from .outcome import EXIT_KILLED, EXIT_TARGET_NOT_REACHED
from .hooks import Coordinator, HookRunner, SessionRunHook, StopAtStepHook, TrainingSession
from .patterns import StepFormat
from .process import (
    FORWARDED_SIGNALS,
    TERMINATING_SIGNALS,
    ProcessTree,
    SignalInbox,
    all_catchable_signals,
    become_subreaper,
    ensure_standard_fds,
    status_to_exit_code,
)
from .report import RunReport
from .observation import Observation
from .scanner import LineScanner

READ_SIZE = 1 << 20
EXIT_HOOK_FAILED = 5
#: How often the process tree is walked while it is being brought down.
TREE_CHECK_FIRST = 0.005
TREE_CHECK_MAX = 0.1


def _describe(proc) -> str:
    try:
        return f"{proc.pid} ({proc.name()}, {proc.status()})"
    except Exception:
        return str(proc.pid)


class HookFailed(StopstepError):
    exit_code = EXIT_HOOK_FAILED


class _Stream:
    """One output stream of the command: where it is read and where it goes."""

    def __init__(self, name: str, in_fd: int, out_fd: int, scanner: LineScanner):
        self.name = name
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.scanner = scanner
        self.open = True
        self.to_terminal = False


class Supervisor:
    """Runs one command under the hooks until it exits or a hook stops it.

    ``target`` is the :class:`StopAtStepHook` whose ``last_step`` the report
    calls ``target_step`` (it runs first, before ``hooks``). ``sources`` are
    extra step sources (:class:`~stopstep_cli.sources.LogFileSource`,
    :class:`~stopstep_cli.sources.CheckpointSource`); the latest complete
    checkpoint at launch is the step the run starts at. With
    ``stop_after_checkpoint``, a reached target waits (up to the grace period)
    for a complete checkpoint at or past it before the stop signal goes out.
    ``max_restarts`` restarts a command that exits non-zero before the target.
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
        subreaper: bool = True,
        tty: str = "never",
        foreground: bool = False,
        progress=None,
    ):
        from .patterns import resolve_formats

        self.argv = list(argv)
        self.target = target
        self.runner = HookRunner(([target] if target else []) + list(hooks))
        self.formats = tuple(formats) or resolve_formats()
        self.stop_signal = signal.Signals(stop_signal)
        self.grace_period = float(grace_period)
        self.require_target = require_target
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.console = console or Console()
        self.sources = list(sources)
        self.stop_after_checkpoint = stop_after_checkpoint
        self.max_restarts = max_restarts
        self.restart_delay = restart_delay
        self.subreaper = subreaper
        self.tty = tty
        self.foreground_wanted = foreground
        self.progress = progress
        self.coord = Coordinator()
        self.session = TrainingSession(self.argv, start_step=start_step)
        self.report = RunReport(command=self.argv, start_step=start_step)

        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._poller = select.poll()
        self._inbox: Optional[SignalInbox] = None
        self._waker = None
        self._watcher = None
        self._sources_started = False
        self._foreground = None
        self._started = 0.0
        self._first_seen_at: Optional[float] = None
        self._last_seen_at: Optional[float] = None
        self._stop_requested = False  # hooks asked to stop (or a signal came): no more hook runs
        self._stop_exit_code = 0
        self._checkpoint_wait: Optional[float] = None  # stop deferred for a checkpoint until then
        self._pending: List[str] = []  # messages held until the output is written
        self._stderr_mid_line = False  # the command's stderr left a line open (a progress bar)
        self._hook_error: Optional[BaseException] = None
        # hooks that want to be woken on a timer (stall, time limit), not only by steps
        self._timed_hooks = [h for h in self.runner.hooks if type(h).deadline is not SessionRunHook.deadline]
        self._next_timer = 0.0
        self._new_attempt(start_step)

    def _new_attempt(self, start_step: Optional[int]) -> None:
        """State of one run of the command (restarts get a fresh one)."""
        self.tree = ProcessTree(self.argv, self.env, death_signal=self.stop_signal)
        self._streams: Dict[int, _Stream] = {}
        self._global_step: Optional[int] = start_step
        self._source_steps: Dict[str, int] = {}  # the last step each source saw
        self._stopping = False  # the stop signal (or a terminating signal) went out
        self._deadline: Optional[float] = None  # SIGKILL after this
        self._exited = False  # the command itself has exited
        self._leftovers_signalled = False
        self._next_tree_check = 0.0
        self._tree_check_interval = TREE_CHECK_FIRST
        self._done = False
        self._attempt_started = time.monotonic()
        self._child_changed = True  # look at the command at the first turn
        self._next_child_check = 0.0

    # -- the run ------------------------------------------------------------

    def run(self) -> RunReport:
        if not sys.platform.startswith("linux"):
            raise StopstepError(f"stopstep supervises processes on Linux only, not on {sys.platform}")
        self._started = time.monotonic()
        ensure_standard_fds()
        pid1 = os.getpid() == 1
        self._inbox = SignalInbox(all_catchable_signals() if pid1 else FORWARDED_SIGNALS)
        self._poller.register(self._inbox.fileno(), select.POLLIN)
        self.console.before_write = self._before_message
        try:
            if self.subreaper or pid1:
                become_subreaper()
            if self.foreground_wanted:
                from .terminal import Foreground

                self._foreground = Foreground(0)
            self._call_hooks("begin", self.runner.begin)
            if self._hook_error is not None:
                raise HookFailed(str(self._hook_error))
            while True:
                self._launch()
                while not self._done:
                    self._turn()
                self._end_attempt()
                if not self._restart():
                    break
            self._finish()
        finally:
            for stream in list(self._streams.values()):
                self._close(stream)
            self._stop_sources()
            if self._foreground is not None:
                self._foreground.restore()
            if self.progress is not None:
                self.progress.clear()
            self._inbox.close()
        return self.report

    def _launch(self) -> None:
        """Start (or restart) the command and open its session."""
        self._resume_point()
        from .terminal import wants_pty

        foreground = self._foreground if self._foreground is not None and self._foreground.active else None
        self.tree.spawn(
            stdout_pty=wants_pty(self.tty, 1),
            stderr_pty=wants_pty(self.tty, 2),
            child_setup=foreground.child_setup if foreground else None,
        )
        if foreground:
            foreground.attach(self.tree.pid)
        self.report.pid = self.session.pid = self.tree.pid
        self.console.debug(f"started pid {self.tree.pid}: {' '.join(self.argv)}")
        self._add_stream("stdout", self.tree.stdout_fd, 1)
        self._add_stream("stderr", self.tree.stderr_fd, 2)
        if not self._sources_started:
            self._start_sources()  # after the spawn: the command is not forked from a threaded process
        self.tree.prepare_walks()  # while the command starts up, not when stopping
        # What start-up made (click, psutil, the hooks, the formats) lives until the end:
        # keep the collector from walking it again on every full collection in the loop.
        gc.freeze()
        self._call_hooks("after_create_session", lambda: self.runner.after_create_session(self.session, self.coord))
        self.report.target_step = self.target.last_step if self.target else None
        if self._hook_error is not None:
            self._request_stop("hook_error", EXIT_HOOK_FAILED)
        elif self.coord.should_stop():
            self._request_stop(self.coord.reason, self.coord.exit_code, message=self.coord.message)

    def _turn(self) -> None:
        """One wake-up of the loop. The common case, a line of output, costs a
        poll, a read, a scan, the hooks and a write: the timers and the process
        table are looked at only when they can have something to say."""
        for fd, _events in self._poller.poll(self._timeout_ms()):
            if fd in self._streams:
                self._pump(self._streams[fd])
            elif fd == self._inbox.fileno():
                self._on_signals(self._inbox.drain())
            elif self._waker is not None and fd == self._waker.fileno():
                self._on_file_events()
        now = time.monotonic()
        if self._next_timer <= now:
            self._on_timers(now)
        if self._child_changed or now >= self._next_child_check:
            # SIGCHLD came (or a slow safety look is due: a signal byte can be lost to a full pipe)
            self._child_changed = False
            self._next_child_check = now + 1.0
            if self._foreground is not None and self.tree.poll_stopped():
                self._foreground.suspend(self.tree)  # Ctrl-Z: returns once we are continued
            if not self._exited and self.tree.poll_exit() is not None:
                self._on_command_exit()
        if self._stopping or self._exited:
            self._check_tree()
        if self._pending:
            self._flush_messages()

    def _on_timers(self, now: float) -> None:
        for source in self.sources:
            if source.next_due is not None and source.next_due <= now:
                self._observe_all(source.tick(now))
        if self._timed_hooks and not self._stop_requested:
            self._call_hooks("on_deadline", lambda: self.runner.on_deadlines(self.session, self.coord, now))
            if self._hook_error is not None:
                self._request_stop("hook_error", EXIT_HOOK_FAILED)
            elif self.coord.should_stop():
                self._request_stop(self.coord.reason, self.coord.exit_code, message=self.coord.message)
        if self._checkpoint_wait is not None and now >= self._checkpoint_wait:
            self.console.info(f"no complete checkpoint at or past step {self.report.target_step} "
                              f"within {self.grace_period:g}s; stopping anyway")
            self._send_stop()
        if self.progress is not None and (self.progress.next_due() or now + 1) <= now:
            self.progress.tick(now, self.console)

    def _timeout_ms(self) -> Optional[float]:
        """How long poll may sleep: until the next timer (sources, hooks, the grace period...)."""
        if not (self.sources or self._timed_hooks or self.progress or self._stopping or self._exited
                or self._deadline or self._checkpoint_wait):
            # the common case while training: only the slow look at the process table
            self._next_timer = self._next_child_check
            return max(0.0, self._next_timer - time.monotonic()) * 1000.0
        wakes = [source.next_due for source in self.sources if source.next_due is not None]
        if self._stopping or self._exited:
            wakes.append(self._next_tree_check)
        if self._deadline is not None:
            wakes.append(self._deadline)
        if self._checkpoint_wait is not None:
            wakes.append(self._checkpoint_wait)
        if self._timed_hooks and not self._stop_requested:
            hook_deadline = self.runner.next_deadline()
            if hook_deadline is not None:
                wakes.append(hook_deadline)
        if self.progress is not None and self.progress.next_due() is not None:
            wakes.append(self.progress.next_due())
        if not self._exited:
            wakes.append(self._next_child_check)
        self._next_timer = min(wakes) if wakes else float("inf")
        return min(max(0.0, self._next_timer - time.monotonic()), 3600.0) * 1000.0 if wakes else None

    # -- output ---------------------------------------------------------------

    def _add_stream(self, name: str, in_fd: int, out_fd: int) -> None:
        stream = _Stream(name, in_fd, out_fd, LineScanner(self.formats, name))
        if self.progress is not None and self.progress.status_line:
            from .terminal import is_terminal

            stream.to_terminal = is_terminal(out_fd)
        self._streams[in_fd] = stream
        self._poller.register(in_fd, select.POLLIN)

    def _pump(self, stream: _Stream) -> int:
        """One read: scan it, act on its steps, then pass it through. Bytes read."""
        try:
            n = os.readv(stream.in_fd, [self._buf])
        except BlockingIOError:
            return 0
        except OSError:  # EIO: a pseudo-terminal whose last writer is gone
            n = 0
        if n == 0:
            self._close(stream)
            return 0
        self._observe_all(stream.scanner.feed(self._buf, n))
        if stream.out_fd >= 0:
            if stream.to_terminal:
                self.progress.before_output()
            self._write_out(stream, n)
            if stream.to_terminal:
                self.progress.after_output(self._buf[n - 1])
            if stream.out_fd == 2:
                self._stderr_mid_line = self._buf[n - 1] != 10
        self._flush_messages()
        return n

    def _write_out(self, stream: _Stream, n: int) -> None:
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
                self.console.info(f"{stream.name} was closed by its reader; closing the command's {stream.name} too")
                stream.out_fd = -1
                self._close(stream)
                return
            except OSError as exc:
                # A full disk, a vanished terminal: the training matters more than its log.
                # Keep reading (and scanning) the command's output, and drop it.
                self.console.error(f"cannot write the command's {stream.name} ({exc.strerror}); "
                                   f"its {stream.name} is dropped from here on, the run goes on")
                stream.out_fd = -1
                return

    def _close(self, stream: _Stream) -> None:
        if not stream.open:
            return
        stream.open = False
        try:
            self._poller.unregister(stream.in_fd)
        except (KeyError, ValueError):
            pass
        os.close(stream.in_fd)
        self._streams.pop(stream.in_fd, None)

    def _drain(self) -> None:
        """Read what the pipes still hold, without waiting for writers that may never close them."""
        for stream in list(self._streams.values()):
            os.set_blocking(stream.in_fd, False)
            while stream.open and self._pump(stream) > 0:
                pass

    # -- other sources ----------------------------------------------------------

    def _resume_point(self) -> None:
        """The latest complete checkpoint now is where the (re)started command resumes."""
        resumed = None
        for source in self.sources:
            found = source.scan()  # a log file is opened here, before the command can write to it
            if found is None:
                continue
            self.console.debug(f"{source.name}: latest complete checkpoint is step {found.step}")
            self._note_checkpoint(found)
            resumed = found.step if resumed is None else max(resumed, found.step)
        if resumed is not None and (self.session.start_step is None or resumed > self.session.start_step
                                    or self.report.restarts):
            self.session.start_step = self.session.global_step = resumed
            self._global_step = resumed
            if not self.report.restarts:
                self.report.start_step = resumed
            self.console.info(f"resuming from step {resumed} (latest complete checkpoint)")
        elif self.report.restarts:
            self.session.start_step = self.session.global_step = None  # a fresh start, as far as we can tell
            self._global_step = None

    def _start_sources(self) -> None:
        self._sources_started = True
        if not self.sources:
            return
        from .sources import FileWatcher, Waker

        if any(source.poll is None for source in self.sources):
            self._waker = Waker()
            self._watcher = FileWatcher(self._waker)
            self._poller.register(self._waker.fileno(), select.POLLIN)
        for source in self.sources:
            self._observe_all(source.start(self._watcher))

    def _on_file_events(self) -> None:
        self._waker.clear()
        changed = self._watcher.changed()
        for source in self.sources:
            if source in changed:
                self._observe_all(source.refresh(changed[source]))

    def _stop_sources(self) -> None:
        for source in self.sources:
            source.close()
        if self._watcher is not None:
            self._watcher.stop()
        if self._waker is not None:
            self._waker.close()

    # -- steps and hooks ------------------------------------------------------

    def _observe_all(self, observations: List[Observation]) -> None:
        for obs in observations:
            self._observe(obs)

    def _note_checkpoint(self, obs: Observation) -> None:
        report = self.report
        if report.last_checkpoint_step is None or obs.step >= report.last_checkpoint_step:
            report.last_checkpoint_step = obs.step
            report.last_checkpoint_path = obs.path

    def _observe(self, obs: Observation) -> None:
        report = self.report
        report.observations_coalesced += obs.coalesced
        if obs.is_checkpoint:
            self._note_checkpoint(obs)
            self.console.debug(f"checkpoint for step {obs.step} is complete: {obs.line}")
            if self._checkpoint_wait is not None and obs.step >= (report.target_step or 0):
                self._pending.append(f"checkpoint for step {obs.step} is complete")
                self._send_stop()
        if report.first_step_seen is None:
            report.first_step_seen = obs.step
            self._first_seen_at = obs.time
        last_here = self._source_steps.get(obs.source)
        if last_here is not None and obs.step < last_here:
            self.console.debug(f"step went backwards on {obs.source}: {obs.step} after {last_here}")
        self._source_steps[obs.source] = obs.step
        previous = self._global_step
        if previous is not None and obs.step <= previous:
            return
        self._global_step = obs.step
        self._last_seen_at = obs.time
        if report.last_step_seen is None or obs.step > report.last_step_seen or self.report.restarts:
            report.last_step_seen = obs.step
        if self._stop_requested:
            return
        session = self.session
        session.global_step = obs.step
        session.fields = obs.fields
        values = {"global_step": obs.step}
        values.update(obs.fields)
        if obs.is_checkpoint:
            values["checkpoint_step"], values["checkpoint_path"] = obs.step, obs.path
        report.observations += 1
        if self.progress is not None:
            self.progress.update(obs.step, report.target_step, obs.time)
        try:
            ctx = self.runner.run(session, values)
        except Exception as exc:  # a user hook: report it, then bring the tree down
            self._hook_failed("before_run/after_run", exc)
            self._request_stop("hook_error", EXIT_HOOK_FAILED)
            return
        if ctx.stop_requested:
            self._request_stop(ctx.stop_reason, ctx.stop_exit_code, obs, ctx.stop_message)
        elif self.coord.should_stop():
            self._request_stop(self.coord.reason, self.coord.exit_code, obs, self.coord.message)

    def _call_hooks(self, what: str, call) -> None:
        try:
            call()
        except Exception as exc:  # a user hook: report it, then bring the tree down
            self._hook_failed(what, exc)

    def _hook_failed(self, what: str, exc: Exception) -> None:
        self._hook_error = exc
        self.console.error(f"a hook raised in {what}: {type(exc).__name__}: {exc}")
        self.console.error("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                           .rstrip().replace("\n", "\n    "))

    def _before_message(self) -> None:
        """stopstep's own line goes on a line of its own, not after a bar left open on stderr."""
        if self.progress is not None:
            self.progress.clear()
        if self._stderr_mid_line:
            self._stderr_mid_line = False
            try:
                os.write(2, b"\n")
            except OSError:
                pass

    def _flush_messages(self) -> None:
        while self._pending:
            self.console.info(self._pending.pop(0))

    # -- stopping ---------------------------------------------------------------

    def _request_stop(self, reason: str, exit_code: int, obs: Optional[Observation] = None,
                      message: Optional[str] = None) -> None:
        """A hook asked to stop: send the stop signal now (or once the checkpoint is whole)."""
        if self._stop_requested:
            return
        self._stop_requested = True
        self.report.reason = reason
        self._stop_exit_code = exit_code
        target = self.report.target_step
        if (
            reason == reasons.TARGET_REACHED
            and self.stop_after_checkpoint
            and (self.report.last_checkpoint_step is None or self.report.last_checkpoint_step < target)
        ):
            self._checkpoint_wait = time.monotonic() + self.grace_period
            self._pending.append(
                f"step {obs.step} reached (target {target}); waiting up to {self.grace_period:g}s "
                f"for a complete checkpoint at or past it"
            )
            return
        self._send_stop()
        sent = f"sent {self.stop_signal.name} to the command's process group"
        if reason != reasons.TARGET_REACHED or obs is None:
            self._pending.append(f"{message or 'stopping: ' + reason}; {sent}")
        elif self.report.observations == 1 and target is not None and obs.step > target:
            self._pending.append(f"first step seen ({obs.step}) is already past the target ({target}); stopping")
        else:
            self._pending.append(f"step {obs.step} reached (target {target}); {sent}")

    def _send_stop(self) -> None:
        """The stop signal to the group, now; everything else comes after."""
        self._checkpoint_wait = None
        if self._stopping:
            return
        self.tree.signal_group(self.stop_signal)
        self.tree.signal_group(signal.SIGCONT)  # a stopped process must be able to act on it
        self._begin_grace()
        self.report.stop_signal = self.stop_signal.name

    def _begin_grace(self) -> None:
        now = time.monotonic()
        self._stopping = True
        self._deadline = now + self.grace_period
        self._next_tree_check = now + TREE_CHECK_FIRST

    def _on_signals(self, received: List[int]) -> None:
        for signum in received:
            if signum == signal.SIGCHLD:
                self._child_changed = True  # the loop looks at the command after this batch
                self.tree.reap_orphans()  # no zombie piles up under a subreaper or PID 1
                continue
            name = signal.Signals(signum).name
            if signum == signal.SIGWINCH and self._streams:
                self._resize_ptys()
            self.tree.signal_group(signum)
            if signum not in TERMINATING_SIGNALS:
                self.console.debug(f"passed {name} on to the command")
                continue
            if self._stopping:
                self.console.debug(f"passed {name} on again; the grace period is not restarted")
                continue
            self.tree.signal_group(signal.SIGCONT)
            self._begin_grace()
            self._stopped_by(signum)
            self.console.info(f"received {name}; passed it on and waiting up to {self.grace_period:g}s for the command")

    def _stopped_by(self, signum: int) -> None:
        """stopstep itself was told to stop: no more hooks, and it will exit 128+n."""
        self._checkpoint_wait = None
        self._stop_requested = True
        self.report.reason = reasons.SIGNAL
        self.report.received_signal = signal.Signals(signum).name
        self._stop_exit_code = 128 + signum

    def _resize_ptys(self) -> None:
        from .terminal import copy_window_size, is_terminal

        for stream in self._streams.values():
            if stream.out_fd >= 0 and is_terminal(stream.in_fd):
                copy_window_size(stream.out_fd, stream.in_fd)

    def _on_command_exit(self) -> None:
        # Output written before the exit is already in the pipes: read it first,
        # so a last step line counts before the exit does.
        self._drain()
        self._exited = True
        self._checkpoint_wait = None if self._stopping else self._checkpoint_wait
        self.report.child_returncode = self.tree.returncode
        if not self._stopping:
            self.console.debug(f"command exited with status {status_to_exit_code(self.tree.returncode)}")
        self._next_tree_check = time.monotonic()

    def _check_tree(self) -> None:
        now = time.monotonic()
        if now < self._next_tree_check and (self._deadline is None or now < self._deadline):
            return
        self.tree.reap_orphans()
        alive = self.tree.live_descendants()
        if self._exited and not alive:
            self._done = True
            return
        if self._exited and not self._leftovers_signalled:
            # The command is gone; nobody else will tell what it left behind.
            self._leftovers_signalled = True
            self.tree.signal_group(self.stop_signal)
            outside = self.tree.signal_outside_group(self.stop_signal)
            self.tree.signal_group(signal.SIGCONT)
            self.console.debug(f"{len(alive)} process(es) outlived the command ({outside} outside its group); "
                               f"sent {self.stop_signal.name}")
            if self._deadline is None:
                self._deadline = now + self.grace_period
        if self._deadline is not None and now >= self._deadline and alive and not self.report.killed:
            self.console.debug("still alive: " + ", ".join(_describe(proc) for proc in alive))
            count = self.tree.kill_all()
            self.report.killed = True
            self.console.info(f"grace period of {self.grace_period:g}s over; killed {count} process(es) with SIGKILL")
        self._tree_check_interval = min(self._tree_check_interval * 2, TREE_CHECK_MAX)
        self._next_tree_check = now + self._tree_check_interval

    # -- the end of an attempt, restarts ------------------------------------------

    def _end_attempt(self) -> None:
        self._drain()
        for stream in list(self._streams.values()):
            self._close(stream)
        self.tree.reap()
        returncode = self.tree.returncode
        self.report.child_returncode = returncode
        self.report.attempts.append({
            "pid": self.tree.pid,
            "start_step": self.session.start_step,
            "last_step_seen": self._global_step,
            "child_returncode": returncode,
            "exit_status": status_to_exit_code(returncode) if returncode is not None else None,
            "duration_s": round(time.monotonic() - self._attempt_started, 3),
        })

    def _restart(self) -> bool:
        """Start the command again after a crash before the target, if restarts are left."""
        returncode = self.tree.returncode
        if (self._stop_requested or returncode in (None, 0) or self._hook_error is not None
                or self.report.restarts >= self.max_restarts):
            return False
        status = status_to_exit_code(returncode)
        self.report.restarts += 1
        seen = "none" if self._global_step is None else self._global_step
        self.console.info(f"command exited with status {status} at step {seen}; restarting"
                          f"{f' in {self.restart_delay:g}s' if self.restart_delay else ''} "
                          f"(restart {self.report.restarts} of {self.max_restarts})")
        if not self._wait_before_restart():
            return False
        self._new_attempt(self._global_step)
        return True

    def _wait_before_restart(self) -> bool:
        """Sleep the restart delay, still answering signals; False if one ends the run."""
        until = time.monotonic() + self.restart_delay
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return True
            for fd, _events in self._poller.poll(left * 1000.0):
                if fd == self._inbox.fileno():
                    for signum in self._inbox.drain():
                        if signum in TERMINATING_SIGNALS:
                            self._stopped_by(signum)
                            return False
                elif self._waker is not None and fd == self._waker.fileno():
                    self._waker.clear()
                    self._watcher.changed()

    # -- the end ----------------------------------------------------------------

    def _finish(self) -> None:
        for source in self.sources:  # the last lines, the final checkpoint
            self._observe_all(source.refresh(()))
        report = self.report
        report.duration_s = round(time.monotonic() - self._started, 6)
        if (
            report.first_step_seen is not None
            and report.last_step_seen is not None
            and self._last_seen_at is not None
            and self._first_seen_at is not None
            and self._last_seen_at > self._first_seen_at
        ):
            report.steps_per_s = round(
                (report.last_step_seen - report.first_step_seen) / (self._last_seen_at - self._first_seen_at), 3
            )
        returncode = self.tree.returncode
        status = status_to_exit_code(returncode) if returncode is not None else None
        if self._stop_requested:
            report.exit_code = self._stop_exit_code
            if report.killed and report.exit_code == 0:
                report.exit_code = EXIT_KILLED
        else:
            report.reason = reasons.PROCESS_EXITED
            report.exit_code = status if status is not None else 125
            if status == 0 and self.require_target and not self._target_reached():
                report.exit_code = EXIT_TARGET_NOT_REACHED
        if self.progress is not None:
            self.progress.clear()
        self._say_why(status)
        if self._hook_error is None and (
            (self._stop_requested and report.reason != reasons.SIGNAL) or (not self._stop_requested and status == 0)
        ):
            self._call_hooks("end", lambda: self.runner.end(self.session))
            if self._hook_error is not None:
                report.exit_code = EXIT_HOOK_FAILED

    def _target_reached(self) -> bool:
        target = self.report.target_step
        return target is not None and self.report.last_step_seen is not None and self.report.last_step_seen >= target

    def _say_why(self, status: Optional[int]) -> None:
        report = self.report
        seen = "none" if report.last_step_seen is None else str(report.last_step_seen)
        if report.reason == reasons.PROCESS_EXITED:
            if report.exit_code == EXIT_TARGET_NOT_REACHED:
                self.console.error(
                    f"command exited 0 before reaching step {report.target_step} "
                    f"(last step seen: {seen}); failing as --require-target asks"
                )
            else:
                target = f" before reaching step {report.target_step}" if report.target_step is not None else ""
                self.console.info(f"command exited with status {status}{target} (last step seen: {seen})")
            return
        how = "was killed with SIGKILL after the grace period" if report.killed else "exited"
        checkpoint = ""
        if report.last_checkpoint_step is not None:
            checkpoint = f"; last complete checkpoint: step {report.last_checkpoint_step}"
        rate = f"; {report.steps_per_s:g} steps/s" if report.steps_per_s else ""
        self.console.info(
            f"stopped: {report.reason}; last step seen {seen}{checkpoint}{rate}; the command {how} "
            f"(status {status}) after {report.duration_s:.2f}s; exit {report.exit_code}"
        )
