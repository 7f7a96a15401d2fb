"""One vocabulary for how a run ends: stop reasons, exit statuses, and the pure
function from what happened to stopstep's exit status and summary line.

Everything that decides or prints an outcome uses the names here; nothing else
spells a reason or an exit status.
"""

from __future__ import annotations

import re
import signal
from typing import NamedTuple, Optional, Tuple

# -- why a run ended (the report's ``reason``) ----------------------------------------

TARGET_REACHED = "target_reached"  # the StopAtStepHook asked to stop
PROCESS_EXITED = "process_exited"  # the command ended by itself, nobody asked
SIGNAL = "signal"  # stopstep received a terminating signal (docker stop, Ctrl-C, SLURM)
STALLED = "stalled"  # --stall-timeout / --first-step-timeout
TIME_LIMIT = "time_limit"  # --time-limit
NAN_LOSS = "nan_loss"  # --stop-on-nan
HOOK_ERROR = "hook_error"  # a hook raised, overran --hook-timeout or asked for something impossible
HOOK_REQUESTED = "hook_requested"  # a hook's request_stop() without a reason of its own
CHECKPOINT_MISSING = "checkpoint_missing"  # --stop-after-checkpoint: the command exited before the checkpoint came
LAUNCH_FAILED = "launch_failed"  # the command could not be started (not found: 127, not executable: 126)
INTERNAL_ERROR = "internal_error"  # something raised outside any hook call (a hook's signal handler, a bug)

#: Reasons only stopstep itself gives; a hook's request_stop may not use them.
OWN_REASONS = frozenset((PROCESS_EXITED, SIGNAL, HOOK_ERROR, CHECKPOINT_MISSING, LAUNCH_FAILED, INTERNAL_ERROR))

# -- exit statuses ------------------------------------------------------------------------

EXIT_USAGE = 2  # bad option, value or hook
EXIT_TARGET_NOT_REACHED = 3  # --require-target and the command exited 0 before the target
EXIT_NAN_LOSS = 4
EXIT_HOOK_FAILED = 5
EXIT_TIMEOUT = 124  # stalled or time limit, as coreutils timeout
EXIT_OWN_FAILURE = 125  # stopstep's own failure
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_KILLED = 137  # 128 + SIGKILL: the tree needed SIGKILL after a stop that was otherwise a success

#: The exit status each built-in reason gives (a hook's own reason gives the status it asked for).
REASON_EXIT = {
    TARGET_REACHED: 0,
    STALLED: EXIT_TIMEOUT,
    TIME_LIMIT: EXIT_TIMEOUT,
    NAN_LOSS: EXIT_NAN_LOSS,
    HOOK_ERROR: EXIT_HOOK_FAILED,
}


class ExitStatus(NamedTuple):
    """One row of the exit-status table: ``run --help`` prints ``brief``, docs/exit-status.md
    ``detail`` (generated from here: scripts/docs_tables.py)."""

    status: str
    brief: str
    detail: str
    reasons: Tuple[str, ...] = ()  # the report's reasons that give it


#: Every exit status of ``stopstep run``, in the order a reader looks them up.
EXIT_STATUSES: Tuple[ExitStatus, ...] = (
    ExitStatus("0", "target reached and the tree down within the grace period; or the command exited 0",
               "the target was reached and the whole tree exited within the grace period, whatever status "
               "the stop gave the command (130 for SIGINT is a clean stop); or the command exited 0 by itself "
               "(without `--require-target`, or after reaching the target)", (TARGET_REACHED, PROCESS_EXITED)),
    ExitStatus("the command's", "the command exited by itself before the target (128+n: signal n killed it)",
               "the command exited by itself before the target: its exit status, or 128+n when signal n "
               "killed it", (PROCESS_EXITED,)),
    ExitStatus(str(EXIT_USAGE), "usage error (one line on stderr; nothing was started)",
               "usage error: a bad option or value, both targets or neither, a bad regex, an unknown preset, "
               "layout or signal, no command, a report path that cannot work, a `--checkpoint-dir` that is a "
               "file or a `--log-file` that is a directory, a hook that cannot be loaded. One line on stderr; "
               "nothing was started"),
    ExitStatus(str(EXIT_TARGET_NOT_REACHED), "--require-target and the command exited 0 before the target",
               "`--require-target` and the command exited 0 before reaching the target", (PROCESS_EXITED,)),
    ExitStatus(str(EXIT_NAN_LOSS), "--stop-on-nan: the loss was NaN or infinite",
               "`--stop-on-nan`: the loss was NaN or infinite", (NAN_LOSS,)),
    ExitStatus(str(EXIT_HOOK_FAILED), "a hook failed: it raised, overran --hook-timeout or asked the impossible",
               "a hook failed: it raised (anything, `SystemExit` and `KeyboardInterrupt` included), did not "
               "return within `--hook-timeout`, or asked for something impossible (`request_stop` with a "
               "reason that is not a string or an exit status outside 0-255, a `deadline()` that is not a "
               "number). Its traceback is printed and the tree brought down", (HOOK_ERROR,)),
    ExitStatus(str(EXIT_TIMEOUT), "--stall-timeout, --first-step-timeout or --time-limit",
               "`--stall-timeout` / `--first-step-timeout` (reason `stalled`) or `--time-limit` (reason "
               "`time_limit`), as coreutils `timeout`. Whether SIGKILL was needed is in the report's "
               "`killed`, not in the status", (STALLED, TIME_LIMIT)),
    ExitStatus(str(EXIT_OWN_FAILURE), "stopstep's own failure (the report could not be written; not Linux)",
               "stopstep's own failure: the report could not be written at the end (the tree is stopped all "
               "the same); something raised outside any hook call (a signal handler a hook installed, or "
               "stopstep itself: the tree is brought down, the report written, reason `internal_error`); or "
               "not on Linux", (INTERNAL_ERROR,)),
    ExitStatus(str(EXIT_NOT_EXECUTABLE), "the command is not executable",
               "the command is not executable (no permission, a directory, not a valid executable); the "
               "report says `launch_failed`", (LAUNCH_FAILED,)),
    ExitStatus(str(EXIT_NOT_FOUND), "the command was not found",
               "the command was not found (or is empty); the report says `launch_failed`", (LAUNCH_FAILED,)),
    ExitStatus("128+n", "stopstep received signal n (130 INT, 143 TERM); wins over every other status",
               "stopstep itself received terminating signal n (INT 130, HUP 129, QUIT 131, ALRM 142, TERM "
               "143: `docker stop`, Kubernetes, SLURM at the time limit) in any phase, passed it on and "
               "brought the tree down first. This wins over every other status; the report keeps the first "
               "cause as its `reason`", (SIGNAL,)),
    ExitStatus(str(EXIT_KILLED), "a stop that would have exited 0 needed SIGKILL after the grace period",
               "a stop that would otherwise have exited 0 (the target, or a hook's stop with status 0) "
               "needed SIGKILL after the grace period. Other stops keep their own status and say "
               "`killed: true` in the report", (TARGET_REACHED, HOOK_REQUESTED)),
    ExitStatus("the command's, or 1", "--stop-after-checkpoint: the command exited and no checkpoint came",
               "`--stop-after-checkpoint`: the command exited while stopstep waited for a checkpoint at or "
               "past the target, and none came; 1 if the command's own status was 0", (CHECKPOINT_MISSING,)),
    ExitStatus("a hook's own", "a hook's request_stop(exit_code=N)",
               "a hook's `request_stop(reason=..., exit_code=N)`", (HOOK_REQUESTED,)),
)


def exit_for_signal(signum: int) -> int:
    """The shell's convention: 128 + n for signal n."""
    return 128 + int(signum)


def exit_status(returncode: int) -> int:
    """A Popen-style return code (negative: killed by that signal) as a shell status."""
    return exit_for_signal(-returncode) if returncode < 0 else returncode


def signal_name(signum: Optional[int]) -> Optional[str]:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``12 s``, ``3m05s``, ``2h07m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs} s"


def format_rate(steps_per_s: float) -> str:
    """``1 step/s``, ``12.3 steps/s``, ``0.25 steps/s``."""
    text = f"{steps_per_s:.3g}" if steps_per_s < 1000 else f"{steps_per_s:,.0f}"
    return f"{text} step/s" if text == "1" else f"{text} steps/s"


# -- from what happened to how stopstep ends ----------------------------------------------------


class RunFacts(NamedTuple):
    """What happened, as the loop saw it; :func:`conclude` turns it into an outcome.

    ``stop_reason`` is the first cause of a stop stopstep made (None when the
    command ended by itself) and ``stop_exit_code`` the status that cause asks
    for; ``received_signal`` the first terminating signal stopstep itself
    received, in any phase; ``returncode`` the command's Popen-style status;
    ``killed`` whether SIGKILL was needed.
    """

    stop_reason: Optional[str] = None
    stop_exit_code: int = 0
    received_signal: Optional[int] = None
    returncode: Optional[int] = None
    killed: bool = False
    require_target: bool = False
    target_step: Optional[int] = None
    last_step_seen: Optional[int] = None
    duration_s: float = 0.0
    steps_per_s: Optional[float] = None
    stop_signal: Optional[int] = None  # the signal stopstep sent to stop the tree, if any
    stop_mode: Optional[str] = None  # "cooperative" or "signal" once stopstep stopped the command


class Outcome(NamedTuple):
    reason: str
    exit_code: int
    summary: str  # one line, at most SUMMARY_WIDTH characters
    target_not_reached: bool = False  # --require-target turned a clean early exit into a failure


SUMMARY_WIDTH = 100


def target_reached(facts: RunFacts) -> bool:
    return (facts.target_step is not None and facts.last_step_seen is not None
            and facts.last_step_seen >= facts.target_step)


def conclude(facts: RunFacts) -> Outcome:
    """stopstep's exit status, the report's reason and the summary line, from the facts alone.

    - The command ended by itself: its own status (128+n if signal n killed
      it); ``--require-target`` turns a 0 before the target into 3.
    - stopstep stopped it: the status the cause asks for (0 for the target,
      124 stalled or time limit, 4 NaN, 5 a failed hook, a hook's own); a
      success that needed SIGKILL is 137.
    - ``--stop-after-checkpoint`` and the command exited before the
      checkpoint came: its own status, or 1 if that was 0.
    - A terminating signal stopstep received, in any phase: 128+n, whatever
      else happened (the report keeps the first cause as the reason).
    """
    status = exit_status(facts.returncode) if facts.returncode is not None else None
    failed_target = False
    if facts.stop_reason is None:
        reason = PROCESS_EXITED
        code = status if status is not None else EXIT_OWN_FAILURE
        if code == 0 and facts.require_target and not target_reached(facts):
            code, failed_target = EXIT_TARGET_NOT_REACHED, True
    elif facts.stop_reason == CHECKPOINT_MISSING:
        reason = CHECKPOINT_MISSING
        code = status if status else 1
    else:
        reason = facts.stop_reason
        code = facts.stop_exit_code
        if facts.killed and code == 0:
            code = EXIT_KILLED
    if facts.received_signal is not None:
        code = exit_for_signal(facts.received_signal)
    return Outcome(reason, code, _summary(facts, reason, code, status), failed_target and code == EXIT_TARGET_NOT_REACHED)


def _summary(facts: RunFacts, reason: str, code: int, status: Optional[int]) -> str:
    seen = "none" if facts.last_step_seen is None else str(facts.last_step_seen)
    target = facts.target_step
    if reason == PROCESS_EXITED:
        if status == 0 and (target is None or target_reached(facts)):
            head = f"command finished at step {seen}"
        elif target is not None:
            head = f"command exited {status} before step {target} (last step {seen})"
        else:
            head = f"command exited {status} at step {seen}"
        parts = [head]
    else:
        if reason == TARGET_REACHED:
            head = f"reached step {seen} (target {target})"
        elif reason == SIGNAL and facts.received_signal is not None:
            head = f"stopped by {signal_name(facts.received_signal)} at step {seen}"
        elif reason == CHECKPOINT_MISSING:
            head = f"no checkpoint at or past step {target} came (last step {seen})"
        else:
            head = f"stopped ({_one_line(reason)}) at step {seen}"
        if facts.received_signal is not None and reason != SIGNAL:
            head += f", then got {signal_name(facts.received_signal)}"
        parts = [head, _how_it_ended(facts, status)]
    parts.append(f"ran {format_duration(facts.duration_s)}")
    rate = f"{format_rate(facts.steps_per_s)}" if facts.steps_per_s else None
    tail = f"exit {code}"
    line = "; ".join(parts + ([rate] if rate else []) + [tail])
    if len(line) > SUMMARY_WIDTH:
        line = "; ".join(parts + [tail])
    if len(line) > SUMMARY_WIDTH:  # a long reason: shorten the head, never the exit status
        keep = SUMMARY_WIDTH - len(tail) - 5
        line = line[:keep] + "...; " + tail
    return line


def _one_line(text: str) -> str:
    """A hook's reason on the summary line: its control characters (a newline, an escape
    sequence) shown, not obeyed."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def _how_it_ended(facts: RunFacts, status: Optional[int]) -> str:
    if facts.killed:
        return "tree killed with SIGKILL"
    if status is None:
        return "command status unknown"
    if facts.stop_mode == "cooperative":
        return f"command stopped itself, exit {status}"
    killer = -facts.returncode if facts.returncode is not None and facts.returncode < 0 else None
    if killer is not None and killer != facts.stop_signal:  # not what stopstep sent: say what it was
        return f"command killed by {signal_name(killer)} ({status})"
    if facts.stop_signal is not None:
        return f"command exited {status} on {signal_name(facts.stop_signal)}"
    return f"command exited {status}"
