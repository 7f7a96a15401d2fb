"""The summary of a run, and writing it to ``--report`` atomically."""

from __future__ import annotations

import os
from typing import Dict

from .errors import StopstepError, UsageError

#: Why a run ended (the report's ``reason``).
TARGET_REACHED = "target_reached"
PROCESS_EXITED = "process_exited"
SIGNAL = "signal"


class RunReport:
    """The summary of a run: what ``--report`` writes (the README's table says what each field means)."""

    #: The fields, in the order written, with their defaults.
    FIELDS = (
        ("reason", PROCESS_EXITED),
        ("target_step", None),
        ("start_step", None),
        ("first_step_seen", None),
        ("last_step_seen", None),
        ("exit_code", 0),  # stopstep's own
        ("child_returncode", None),  # Popen-style: -n when killed by signal n
        ("stop_signal", None),  # the signal stopstep sent to stop the tree, if any
        ("received_signal", None),  # the signal that stopped stopstep, if any
        ("killed", False),  # SIGKILL was needed after the grace period
        ("duration_s", 0.0),
        ("steps_per_s", None),
        ("observations", 0),  # step observations run through the hooks
        ("observations_coalesced", 0),  # step lines passed over for a later one in the same read
        ("last_checkpoint_step", None),  # the newest complete checkpoint seen (at launch or since)
        ("last_checkpoint_path", None),
        ("restarts", 0),  # times the command was started again after a crash
        ("attempts", list),  # each run of the command: pid, steps, status
        ("command", list),
        ("pid", None),
    )

    def __init__(self, **values):
        for name, default in self.FIELDS:
            setattr(self, name, default() if default is list else default)
        for name, value in values.items():
            if not any(name == field for field, _ in self.FIELDS):
                raise TypeError(f"RunReport has no field {name!r}")
            setattr(self, name, value)

    def to_dict(self) -> Dict[str, object]:
        return {name: getattr(self, name) for name, _ in self.FIELDS}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2) + "\n"

    def __repr__(self) -> str:
        return f"RunReport(reason={self.reason!r}, exit_code={self.exit_code}, last_step_seen={self.last_step_seen})"


def write_report(path: str, report: RunReport) -> None:
    """Write ``report`` to ``path`` so that readers see the old file or the whole new one."""
    import tempfile

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
