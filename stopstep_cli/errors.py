"""stopstep's exit statuses and the errors that map to them."""

from __future__ import annotations

# The exit statuses stopstep gives of its own (the README has the full table;
# the command's own status and 128+n for signals come on top of these).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TARGET_NOT_REACHED = 3
EXIT_OWN_FAILURE = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_KILLED = 137  # 128 + SIGKILL: the tree had to be killed after the grace period


class StopstepError(Exception):
    """A failure reported as one line on stderr and an exit status."""

    exit_code = EXIT_OWN_FAILURE


class UsageError(StopstepError):
    exit_code = EXIT_USAGE


class CommandNotFound(StopstepError):
    exit_code = EXIT_NOT_FOUND


class CommandNotExecutable(StopstepError):
    exit_code = EXIT_NOT_EXECUTABLE
