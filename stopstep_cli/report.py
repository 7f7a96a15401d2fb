"""The summary of a run, and writing it to ``--report`` atomically."""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Dict, Optional

from .errors import StopstepError, UsageError
from .outcome import PROCESS_EXITED


class RunReport:
    """The summary of a run: what ``--report`` writes (docs/exit-status.md says what each field means)."""

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
        ("stop_mode", None),  # "cooperative" (it stopped itself when asked), "signal", null: ended by itself
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
    """Write ``report`` where ``path`` leads, so that nothing the user owns is lost.

    - A regular file (or none yet) is replaced atomically: a temporary file in
      the same directory, then a rename. Through a symlink, the file the link
      points at is replaced and the link is kept.
    - What is not a regular file (a pipe, a terminal, ``/dev/stdout``) is written
      to as it is; and a ``/dev/fd/N`` or ``/proc/.../fd/N`` link to a regular
      file (``/dev/stdout`` redirected to a file) is appended to, not replaced:
      it is someone's output.
    """
    data = report.to_json().encode()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise StopstepError(f"cannot write report {path}: {exc.strerror}") from None
    if st is not None and (not stat.S_ISREG(st.st_mode) or _names_a_descriptor(path)):
        _write_in_place(path, data, append=stat.S_ISREG(st.st_mode))
    elif st is not None and st.st_nlink > 1:
        _write_in_place(path, data, append=False, truncate=True)  # a rename would break its other names
    else:
        _replace_atomically(os.path.realpath(path), data, path, st)


def _names_a_descriptor(path: str) -> bool:
    """/dev/stdout, /dev/fd/1, /proc/self/fd/1: an open file of some process, not a name to replace."""
    real = os.path.abspath(path)
    for _ in range(40):
        if re.match(r"^/(?:dev/(?:std(?:in|out|err)|fd/\d+)|proc/(?:self|thread-self|\d+)/fd/\d+)$", real):
            return True
        if not os.path.islink(real):
            return False
        real = os.path.join(os.path.dirname(real), os.readlink(real))
    return False


def _write_in_place(path: str, data: bytes, append: bool, truncate: bool = False) -> None:
    flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if append else 0) | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags)  # non-blocking: a FIFO nobody reads must not hang the end
    except OSError as exc:
        why = "nobody reads that pipe" if exc.errno == errno.ENXIO else exc.strerror
        raise StopstepError(f"cannot write report {path}: {why}") from None
    try:
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise StopstepError(f"cannot write report {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _replace_atomically(real: str, data: bytes, given: str, previous: Optional[os.stat_result] = None) -> None:
    import tempfile

    directory = os.path.dirname(real)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stopstep-report-", dir=directory)
    except OSError as exc:
        raise StopstepError(f"cannot write report {given}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None:  # the report it replaces keeps its mode and owner
            os.chmod(tmp, stat.S_IMODE(previous.st_mode))
            try:
                os.chown(tmp, previous.st_uid, previous.st_gid)
            except OSError:
                pass
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, real)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StopstepError(f"cannot write report {given}: {exc.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_report_path(path: str) -> None:
    """Fail before the run, not after hours of training, if the report cannot be written."""
    if not path:
        raise UsageError("--report needs a path (it was empty)")
    if path.startswith("-"):
        raise UsageError(f"--report {path!r} looks like an option; give the report's path "
                         f"(./{path} if that is really its name)")
    if path.endswith(os.sep):
        raise UsageError(f"--report {path} names a directory; give the report file's path")
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--report {path} is a directory")
    if st is not None and (not stat.S_ISREG(st.st_mode) or _names_a_descriptor(path)):
        if not os.access(path, os.W_OK):
            raise UsageError(f"--report {path} is not writable")
        return
    directory = os.path.dirname(os.path.realpath(path)) or "."
    if not os.path.isdir(directory):
        raise UsageError(f"--report directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--report directory {directory} is not writable")
