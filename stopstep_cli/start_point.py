"""Where the run starts: the step ``--num-steps`` counts from, and the rate too.

Three witnesses, in order of trust:

1. **The framework** (its in-process side says, when training begins, the global step
   it restored): exact, and the last word.
2. **The command's own first step** (a 0, drawn before any step, says nothing): below
   the checkpoint it seemed to resume from, the run started fresh (or from an older
   checkpoint), and the checkpoints of an earlier run above it stop counting.
3. **The latest complete checkpoint at launch** in the ``--checkpoint-dir``\\ s: where a
   (re)started command resumes, until one of the above says otherwise.

A ``--num-steps`` target is anchored at the first start only; a restart resumes from
the newest checkpoint but keeps the target.
"""

from __future__ import annotations

from typing import Callable, Optional

from .hooks import StopAtStepHook, TrainingSession
from .observation import Observation
from .report import RunReport
from .sources import SourceSet
from .steps import StepLedger


class StartPoint:
    """Keeps ``session.start_step``, the report's ``start_step`` and ``target_step`` and the
    ledger's start true to the witnesses. ``say`` prints a line now; ``note`` a line the
    loop prints after the read that caused it; ``announce_target`` tells the command's
    in-process side a target that changed."""

    def __init__(self, session: TrainingSession, report: RunReport, steps: StepLedger, sources: SourceSet,
                 target: Optional[StopAtStepHook], say: Callable[[str], None], note: Callable[[str], None],
                 announce_target: Callable[[int], None]):
        self.session, self.report, self.steps, self.sources, self.target = session, report, steps, sources, target
        self.say, self.note, self.announce_target = say, note, announce_target
        self.settled = False  # a witness better than the checkpoints has spoken for this attempt

    @property
    def step(self) -> Optional[int]:
        return self.session.start_step

    def at_launch(self) -> None:
        """The latest complete checkpoint now is where the (re)started command resumes."""
        found = self.sources.resume_points()
        for point in found:
            self.steps.note_checkpoint(point)
        resumed = max((point.step for point in found), default=None)
        restarted = bool(self.report.attempts)
        self.settled = False
        if resumed is not None and (self.step is None or resumed > self.step or restarted):
            self._start_at(resumed)
            self.say(f"resuming from step {resumed} (latest complete checkpoint)")
        elif restarted:
            self._start_at(None)

    def target_for(self, start: Optional[int]) -> Optional[int]:
        """The absolute target a process started at ``start`` has (for its in-process side).
        None (told later) for a --num-steps target while nothing says where the run starts:
        a framework says its exact start step when training begins (:meth:`framework_says`),
        and a resumed run told the fresh run's target would stop at once."""
        if self.target is None:
            return None
        if self.target.last_step is not None:
            return self.target.last_step
        return None if start is None else self.target.target_from(start)

    def first_step(self, obs: Observation) -> None:
        """The command's own first step below the checkpoint it seemed to resume from."""
        if self.settled or obs.step < 1 or obs.historic:
            return
        self.settled = True
        resumed = self.step
        if resumed is None or obs.step >= resumed:
            return
        start = self.sources.start_over_from(obs.step, strictly=obs.is_checkpoint)
        how = "fresh" if start is None else f"from step {start}"
        self._start_over(start, f"the command's first step is {obs.step}, below the checkpoint at step "
                                f"{resumed}: it started {how}")

    def framework_says(self, start: int, framework: str) -> None:
        """A framework's restored global step: the run's start, whatever else seemed so
        (the first attempt only: a restart's start comes from its checkpoint)."""
        if self.settled or self.report.attempts:
            return
        self.settled = True  # the framework's word: a printed first step cannot better it
        seemed = self.step
        if start != (seemed or 0):
            how = f"resumed from step {start}" if start else "started fresh"
            below = f", below the checkpoint at step {seemed}" if seemed is not None and start < seemed else ""
            self._start_over(start or None, f"{framework} says it {how}{below}")

    def _start_at(self, step: Optional[int]) -> None:
        self.session.start_step = self.session.global_step = step
        self.steps.started_at(step)
        if not self.report.attempts:
            self.report.start_step = step

    def _start_over(self, start: Optional[int], line: str) -> None:
        """The run started at ``start`` (None: fresh), not where it seemed to: the checkpoints
        of an earlier run above it stop counting, --num-steps counts from it; ``line`` says why."""
        if self.step is not None and (start or 0) < self.step:
            self.sources.start_over_from(start or 0)
        self._start_at(start)
        # the newest checkpoint that counts is this run's (or an older one it started from)
        latest = self.sources.latest_checkpoint()
        self.report.last_checkpoint_step, self.report.last_checkpoint_path = latest or (None, None)
        if self.target is not None and not self.report.attempts:  # num_steps is anchored at the first start
            self.target.reanchor(start)
            if self.target.last_step != self.report.target_step:
                self.report.target_step = self.target.last_step
                line += f"; --num-steps counts from there: target {self.target.last_step}"
                self.announce_target(self.target.last_step)
        self.note(line)
