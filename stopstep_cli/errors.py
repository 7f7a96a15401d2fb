"""The errors stopstep reports as one line on stderr, each with its exit status
(the statuses themselves are defined once, in :mod:`stopstep_cli.outcome`)."""

from __future__ import annotations

from .outcome import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_OWN_FAILURE, EXIT_USAGE


class StopstepError(Exception):
    """A failure reported as one line on stderr and an exit status."""

    exit_code = EXIT_OWN_FAILURE


class UsageError(StopstepError):
    exit_code = EXIT_USAGE


class CommandNotFound(StopstepError):
    exit_code = EXIT_NOT_FOUND


class CommandNotExecutable(StopstepError):
    exit_code = EXIT_NOT_EXECUTABLE
