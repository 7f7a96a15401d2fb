"""What has been seen of the global step, from every source."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from .observation import Observation
from .report import RunReport

#: Seconds of steps a rate needs.
MIN_RATE_SPAN = 0.2


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
        self._last_at: Optional[float] = None
        self.start_step = start_step  # where this process started, as far as stopstep can tell
        #: (time, step) the rate is counted from: the first step this process did (above the
        #: start), so neither a resumed bar's jump from 0/N to the checkpoint nor the loading
        #: before the first step counts as time spent training
        self.rate_anchor: Optional[tuple] = None

    def started_at(self, start_step: Optional[int]) -> None:
        """A (re)started process, or a corrected start: the global step and the rate count from here."""
        self.global_step = self.start_step = start_step
        self.rate_anchor = None

    def record(self, obs: Observation) -> bool:
        """Note one observation; True when it raises the global step (the hooks run for it)."""
        report = self.report
        report.observations_coalesced += obs.coalesced
        if obs.is_checkpoint:
            self.note_checkpoint(obs)
            self.debug(f"checkpoint for step {obs.step} is complete: {obs.line}")
        if report.first_step_seen is None:
            report.first_step_seen = obs.step
        if self.rate_anchor is None and obs.step > (self.start_step or 0):
            self.rate_anchor = (obs.time, obs.step)
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
        """Steps this process did per second: from the rate anchor to the latest step."""
        if self.rate_anchor is None or self._last_at is None or self.global_step is None:
            return None
        since, first = self.rate_anchor
        if self._last_at - since < MIN_RATE_SPAN or self.global_step <= first:
            return None  # steps seen together (checkpoints found in one look) give no rate
        return round((self.global_step - first) / (self._last_at - since), 3)
