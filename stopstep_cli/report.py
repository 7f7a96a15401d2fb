"""The summary of a run, and writing it to ``--report`` atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from .errors import StopstepError, UsageError

#: Why a run ended (the report's ``reason``).
TARGET_REACHED = "target_reached"
PROCESS_EXITED = "process_exited"
SIGNAL = "signal"


@dataclass
class RunReport:
    reason: str = PROCESS_EXITED
    target_step: Optional[int] = None
    start_step: Optional[int] = None
    first_step_seen: Optional[int] = None
    last_step_seen: Optional[int] = None
    exit_code: int = 0  # stopstep's own
    child_returncode: Optional[int] = None  # Popen-style: -n when killed by signal n
    stop_signal: Optional[str] = None  # the signal stopstep sent to stop the tree, if any
    received_signal: Optional[str] = None  # the signal that stopped stopstep, if any
    killed: bool = False  # SIGKILL was needed after the grace period
    duration_s: float = 0.0
    steps_per_s: Optional[float] = None
    observations: int = 0  # step observations run through the hooks
    observations_coalesced: int = 0  # step lines passed over for a later one in the same read
    last_checkpoint_step: Optional[int] = None  # the newest complete checkpoint seen (at launch or since)
    last_checkpoint_path: Optional[str] = None
    restarts: int = 0  # times the command was started again after a crash
    attempts: List[dict] = field(default_factory=list)  # each run of the command: pid, steps, status
    command: List[str] = field(default_factory=list)
    pid: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def write_report(path: str, report: RunReport) -> None:
    """Write ``report`` to ``path`` so that readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    data = report.to_json().encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stopstep-report-", dir=directory)
    except OSError as exc:
        raise StopstepError(f"cannot write report {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StopstepError(f"cannot write report {path}: {exc.strerror}") from None


def check_report_path(path: str) -> None:
    """Fail before the run, not after hours of training, if the report cannot be written."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"--report {path} is a directory")
    if not os.path.isdir(directory):
        raise UsageError(f"--report directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--report directory {directory} is not writable")
