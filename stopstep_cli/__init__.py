"""stopstep: supervise a training command from outside and stop it cleanly at a
global step, with a hook lifecycle modelled on TensorFlow's session-run hooks.

The public API, stable across minor versions::

    from stopstep_cli import (
        SessionRunHook, SessionRunArgs, SessionRunContext, SessionRunValues,
        StopAtStepHook, StallHook, TimeLimitHook, NanLossHook,
        TrainingSession, Coordinator, Supervisor, RunReport, Observation,
        StepFormat, PRESETS, LogFileSource, CheckpointSource,
    )
"""

__version__ = "0.1.0"

from .hooks import (  # noqa: E402
    Coordinator,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    StopAtStepHook,
    TrainingSession,
)
from .patterns import DEFAULT_FORMAT, PRESETS, StepFormat, compile_user_pattern  # noqa: E402
from .report import RunReport  # noqa: E402
from .observation import Observation  # noqa: E402
from .standard_hooks import NanLossHook, StallHook, TimeLimitHook  # noqa: E402


def __getattr__(name):
    # The supervisor and the file sources pull in more; load them only when asked for.
    if name == "Supervisor":
        from .supervisor import Supervisor

        return Supervisor
    if name in ("CheckpointSource", "LogFileSource"):
        from . import sources

        return getattr(sources, name)
    raise AttributeError(name)


__all__ = [
    "CheckpointSource",
    "Coordinator",
    "LogFileSource",
    "NanLossHook",
    "StallHook",
    "TimeLimitHook",
    "DEFAULT_FORMAT",
    "Observation",
    "PRESETS",
    "RunReport",
    "SessionRunArgs",
    "SessionRunContext",
    "SessionRunHook",
    "SessionRunValues",
    "StepFormat",
    "StopAtStepHook",
    "Supervisor",
    "TrainingSession",
    "compile_user_pattern",
]
