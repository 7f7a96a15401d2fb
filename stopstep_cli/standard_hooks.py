"""stopstep's built-in behaviours, as hooks like any user's.

``StopAtStepHook`` (in :mod:`stopstep_cli.hooks`) stops at the target; these
stop a run that stalls, runs too long, or diverges. Stall and time limits must
act when nothing is printed at all, so they use stopstep's one extension of
the TensorFlow hook API: a hook may say when it wants to be woken
(:meth:`SessionRunHook.deadline`) and act then (:meth:`SessionRunHook.on_deadline`).
"""

from __future__ import annotations

import math
import time
from typing import Optional

from .hooks import (
    Coordinator,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    TrainingSession,
)
from .outcome import EXIT_NAN_LOSS as EXIT_NAN
from .outcome import EXIT_TIMEOUT, NAN_LOSS, STALLED, TIME_LIMIT


class StallHook(SessionRunHook):
    """Stops the run when no new step has come for ``stall_timeout`` seconds
    (reason ``stalled``, exit 124). ``first_step_timeout`` allows a longer wait
    for the first step of each process (data loading, compilation)."""

    def __init__(self, stall_timeout: Optional[float] = None, first_step_timeout: Optional[float] = None):
        if stall_timeout is None and first_step_timeout is None:
            raise ValueError("One of stall_timeout or first_step_timeout must be specified.")
        self.stall_timeout = stall_timeout
        self.first_step_timeout = first_step_timeout if first_step_timeout is not None else stall_timeout
        self._since: Optional[float] = None
        self._stepped = False
        self._session: Optional[TrainingSession] = None

    def after_create_session(self, session: TrainingSession, coord: Coordinator) -> None:
        self._since, self._stepped = time.monotonic(), False  # each new process gets its start-up time
        self._session = session

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self._since, self._stepped = time.monotonic(), True

    def _limit(self) -> Optional[float]:
        return self.stall_timeout if self._stepped else self.first_step_timeout

    def deadline(self) -> Optional[float]:
        limit = self._limit()
        if limit is None or self._since is None or self._session is None or self._session.pid is None:
            return None  # no process to stall (a restart delay): the clock starts with the next one
        return self._since + limit

    def on_deadline(self, session: TrainingSession, coord: Coordinator) -> None:
        if self._stepped:
            what = f"no new step for {self._limit():g}s after step {session.global_step}"
        else:
            what = f"no first step within {self._limit():g}s"
        coord.request_stop(reason=STALLED, exit_code=EXIT_TIMEOUT, message=f"stalled: {what}")


class TimeLimitHook(SessionRunHook):
    """Stops the run ``seconds`` after stopstep started it (reason ``time_limit``,
    exit 124), restarts included."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._start: Optional[float] = None

    def begin(self) -> None:
        self._start = time.monotonic()

    def deadline(self) -> Optional[float]:
        return None if self._start is None else self._start + self.seconds

    def on_deadline(self, session: TrainingSession, coord: Coordinator) -> None:
        coord.request_stop(reason=TIME_LIMIT, exit_code=EXIT_TIMEOUT,
                           message=f"time limit of {self.seconds:g}s reached (last step seen: {session.global_step})")


class NanLossHook(SessionRunHook):
    """Stops the run when the loss is NaN or infinite (reason ``nan_loss``,
    exit 4), like TensorFlow's NanTensorHook (which does not catch inf).
    ``field`` is the named group of the pattern that carries the loss."""

    def __init__(self, field: str = "loss"):
        self.field = field

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        return SessionRunArgs(self.field)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        value = run_values.results
        if isinstance(value, float) and not math.isfinite(value):
            run_context.request_stop(
                reason=NAN_LOSS, exit_code=EXIT_NAN,
                message=f"{self.field} is {value} at step {run_context.session.global_step}",
            )
