"""What has been seen of the global step, from every source."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from .observation import Observation
from .report import RunReport


class StepLedger:
    """The global step (the highest any source has seen), the first and last steps
    and when they came, the newest complete checkpoint, and each source's last
    step; kept in the report as it goes."""

    def __init__(self, report: RunReport, start_step: Optional[int] = None,
                 debug: Callable[[str], None] = lambda text: None):
        self.report = report
        self.debug = debug
        self.global_step: Optional[int] = start_step
        self._per_source: Dict[str, int] = {}
        self._first_at: Optional[float] = None
        self._last_at: Optional[float] = None

    def record(self, obs: Observation) -> bool:
        """Note one observation; True when it raises the global step (the hooks run for it)."""
        report = self.report
        report.observations_coalesced += obs.coalesced
        if obs.is_checkpoint:
            self.note_checkpoint(obs)
            self.debug(f"checkpoint for step {obs.step} is complete: {obs.line}")
        if report.first_step_seen is None:
            report.first_step_seen, self._first_at = obs.step, obs.time
        last_here = self._per_source.get(obs.source)
        if last_here is not None and obs.step < last_here:
            self.debug(f"step went backwards on {obs.source}: {obs.step} after {last_here}")
        self._per_source[obs.source] = obs.step
        if self.global_step is not None and obs.step <= self.global_step:
            return False  # seen again (another rank, a checkpoint lagging the log), or backwards
        self.global_step, self._last_at = obs.step, obs.time
        if report.last_step_seen is None or obs.step > report.last_step_seen or report.restarts:
            report.last_step_seen = obs.step
        return True

    def note_checkpoint(self, obs: Observation) -> None:
        report = self.report
        if report.last_checkpoint_step is None or obs.step >= report.last_checkpoint_step:
            report.last_checkpoint_step, report.last_checkpoint_path = obs.step, obs.path

    def steps_per_s(self) -> Optional[float]:
        report = self.report
        if (report.first_step_seen is None or report.last_step_seen is None or self._first_at is None
                or self._last_at is None or self._last_at <= self._first_at):
            return None
        return round((report.last_step_seen - report.first_step_seen) / (self._last_at - self._first_at), 3)
