"""stopstep: supervise a training command and stop it cleanly at a global step,
with a hook lifecycle modelled on TensorFlow's session-run hooks.

The public API, stable across minor versions::

    from stopstep_cli import (
        SessionRunHook, SessionRunArgs, SessionRunContext, SessionRunValues,
        StopAtStepHook, StallHook, TimeLimitHook, NanLossHook,
        TrainingSession, Coordinator, Supervisor, RunReport, Observation,
        StepFormat, PRESETS, DEFAULT_FORMAT, compile_user_pattern,
        LogFileSource, CheckpointSource,
    )

Names are loaded when first used, so that ``import stopstep_cli`` (and
``from stopstep_cli import beacon`` inside a training loop) costs next to nothing.
"""

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "Coordinator": "hooks",
    "SessionRunArgs": "hooks",
    "SessionRunContext": "hooks",
    "SessionRunHook": "hooks",
    "SessionRunValues": "hooks",
    "StopAtStepHook": "hooks",
    "TrainingSession": "hooks",
    "StallHook": "standard_hooks",
    "TimeLimitHook": "standard_hooks",
    "NanLossHook": "standard_hooks",
    "DEFAULT_FORMAT": "patterns",
    "PRESETS": "patterns",
    "StepFormat": "patterns",
    "compile_user_pattern": "patterns",
    "RunReport": "report",
    "Observation": "observation",
    "Supervisor": "supervisor",
    "CheckpointSource": "sources",
    "LogFileSource": "sources",
}

__all__ = sorted(_PUBLIC)

from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # what type checkers see (py.typed); at run time names load on first use
    from .hooks import (  # noqa: F401
        Coordinator,
        SessionRunArgs,
        SessionRunContext,
        SessionRunHook,
        SessionRunValues,
        StopAtStepHook,
        TrainingSession,
    )
    from .observation import Observation  # noqa: F401
    from .patterns import DEFAULT_FORMAT, PRESETS, StepFormat, compile_user_pattern  # noqa: F401
    from .report import RunReport  # noqa: F401
    from .sources import CheckpointSource, LogFileSource  # noqa: F401
    from .standard_hooks import NanLossHook, StallHook, TimeLimitHook  # noqa: F401
    from .supervisor import Supervisor  # noqa: F401


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'stopstep_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
