"""Loading users' hooks: ``module:Class`` or ``path/to/file.py:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Dict, List, Sequence

from .hooks import SessionRunHook, safe_text

_LIFECYCLE = ("begin", "after_create_session", "before_run", "after_run", "end", "deadline", "on_deadline")


class HookLoadError(ValueError):
    """A hook that cannot be imported or constructed; the message names it."""


def parse_hook_args(pairs: Sequence[str]) -> Dict[str, object]:
    """``key=value`` strings -> keyword arguments; numbers, true/false and none are converted."""
    out: Dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise HookLoadError(f"--hook-arg {pair!r} is not key=value")
        out[key] = _convert(value)
    return out


def _convert(value: str) -> object:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def load_hook_class(spec: str) -> type:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise HookLoadError(f"--hook {spec!r} is not module:Class or path/to/file.py:Class")
    try:
        if where.endswith(".py") or os.sep in where:
            module = _load_file(where)
        else:
            module = _import(where)
    except HookLoadError:
        raise
    except BaseException as exc:  # noqa: B902 - the user's module raised (or exited) while importing
        raise HookLoadError(f"--hook {spec}: importing {where} failed: {type(exc).__name__}: {safe_text(exc)}") from None
    try:
        cls = getattr(module, name)
    except AttributeError:
        raise HookLoadError(f"--hook {spec}: {where} has no {name}") from None
    if not inspect.isclass(cls):
        raise HookLoadError(f"--hook {spec}: {name} is not a class")
    if not issubclass(cls, SessionRunHook) and not any(hasattr(cls, m) for m in _LIFECYCLE):
        raise HookLoadError(f"--hook {spec}: {name} has none of the hook methods ({', '.join(_LIFECYCLE[:5])})")
    return cls


def _load_file(path: str):
    if not os.path.isfile(path):
        raise HookLoadError(f"--hook {path}: no such file")
    name = "stopstep_user_hook_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import(name: str):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise HookLoadError(f"--hook {name}: no module named {exc.name}") from None
        raise


def _accepts(cls: type, key: str) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == key and p.kind is not p.POSITIONAL_ONLY) for p in params)


def load_hooks(specs: Sequence[str], args: Dict[str, object]) -> List[SessionRunHook]:
    """Construct each hook with the ``args`` its constructor accepts.

    An argument no hook accepts is an error, so that a typo is not silently dropped.
    """
    classes = [(spec, load_hook_class(spec)) for spec in specs]
    for key in args:
        if not any(_accepts(cls, key) for _spec, cls in classes):
            raise HookLoadError(f"--hook-arg {key}: no --hook takes an argument named {key!r}")
    hooks = []
    for spec, cls in classes:
        kwargs = {k: v for k, v in args.items() if _accepts(cls, k)}
        try:
            hook = cls(**kwargs)
        except BaseException as exc:  # noqa: B902 - SystemExit or KeyboardInterrupt in a constructor too
            raise HookLoadError(f"--hook {spec}: constructing it failed: {type(exc).__name__}: "
                                f"{safe_text(exc)}") from None
        for method in _LIFECYCLE:  # a duck-typed hook gets the default for what it lacks
            if not hasattr(hook, method):
                setattr(hook, method, getattr(SessionRunHook(), method))
        hooks.append(hook)
    return hooks
