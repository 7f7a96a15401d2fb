"""The hook lifecycle, modelled on TensorFlow's session-run hooks.

A *session* here is one run of the training command; a *run* is one step
observation. The supervisor calls, for every hook in order:

- ``begin()`` once, before the command is started;
- ``after_create_session(session, coord)`` once the command runs, with
  ``session.global_step`` the step it starts at (None on a fresh run);
- for each observation: ``before_run(ctx)`` on all hooks, then
  ``after_run(ctx, values)`` on all hooks, ``values.results`` holding what that
  hook's ``before_run`` asked for (fetch names: ``global_step`` and the named
  groups of the matching pattern, such as ``loss``);
- ``end(session)`` when the run ends normally or by a requested stop (not when
  the command crashed or stopstep was interrupted).

A stop requested by any hook takes effect after every hook's ``after_run``, as
in TensorFlow's ``MonitoredSession`` (``tensorflow/python/training/monitored_session.py``).
"""

from __future__ import annotations

import math
from typing import (
    Any,
    Callable,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
)

from .outcome import OWN_REASONS, TARGET_REACHED


class SessionRunArgs(NamedTuple):
    """What a hook's ``before_run`` asks for: fetch names, in any nesting of
    lists, tuples and dicts. ``feed_dict`` and ``options`` are kept for
    compatibility with TensorFlow hooks and are not used."""

    fetches: Any
    feed_dict: Any = None
    options: Any = None


class SessionRunValues(NamedTuple):
    """What ``after_run`` gets: ``results`` in the structure of the fetches."""

    results: Any
    options: Any = None
    run_metadata: Any = None


class SessionRunContext:
    """Shared by all hooks for one observation."""

    def __init__(self, original_args: SessionRunArgs, session: "TrainingSession"):
        self._original_args = original_args
        self._session = session
        self._stop_requested = False
        self.stop_reason: Optional[str] = None
        self.stop_exit_code = 0
        self.stop_message: Optional[str] = None

    @property
    def original_args(self) -> SessionRunArgs:
        return self._original_args

    @property
    def session(self) -> "TrainingSession":
        return self._session

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self, reason: Optional[str] = None, exit_code: int = 0, message: Optional[str] = None) -> None:
        """Ask the supervisor to stop the command after this observation.

        ``reason``, ``exit_code`` and ``message`` are stopstep's extension: the
        report's ``reason``, stopstep's exit status, and the line it prints.
        The first request wins. A reason that is not a string or an exit code
        outside 0-255 raises here, in the hook that asked.
        """
        check_stop_request(reason, exit_code, message)
        if not self._stop_requested:
            self.stop_reason = _plain(reason) or "hook_requested"
            self.stop_exit_code = int.__int__(exit_code)
            self.stop_message = _plain(message)
        self._stop_requested = True


def _plain(text: Optional[str]) -> Optional[str]:
    """A str subclass as a plain str (its own __str__ or __format__ may do anything)."""
    return None if text is None else str.__str__(text)


def safe_text(value: object) -> str:
    """``str(value)`` for a message, whatever the value's own __str__ does."""
    try:
        return str(value)
    except BaseException:  # noqa: B902 - a hook's object: anything can happen in there
        return f"<{type(value).__name__} that cannot be shown>"


def safe_repr(value: object) -> str:
    try:
        return repr(value)
    except BaseException:  # noqa: B902
        return f"<{type(value).__name__} that cannot be shown>"


def check_stop_request(reason: object, exit_code: object, message: object) -> None:
    """What ``request_stop`` accepts: a string reason (or None), an exit status 0-255, a string message."""
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"request_stop(reason=...) must be a string, not {type(reason).__name__}")
    if reason in OWN_REASONS:
        raise ValueError(f"request_stop(reason={str.__str__(reason)!r}) is a reason only stopstep itself gives; "
                         f"choose another")
    if isinstance(exit_code, bool) or not isinstance(exit_code, int):
        raise TypeError(f"request_stop(exit_code=...) must be an int, not {type(exit_code).__name__}")
    value = int.__int__(exit_code)  # an int subclass's own __int__ or comparisons may say anything
    if not 0 <= value <= 255:
        raise ValueError(f"request_stop(exit_code={value}) is not an exit status (0 to 255)")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"request_stop(message=...) must be a string, not {type(message).__name__}")


class TrainingSession:
    """What hooks see of the supervised command (read-only for hooks).

    ``global_step`` is the latest step observed (the step the run starts at, or
    None, in ``after_create_session``); ``start_step`` is where it started;
    ``pid`` the command's process id; ``argv`` the command.
    """

    def __init__(self, argv: Sequence[str], pid: Optional[int] = None, start_step: Optional[int] = None):
        self.argv = list(argv)
        self.pid = pid
        self.start_step = start_step
        self.global_step = start_step
        self.fields: Mapping[str, object] = {}

    def __repr__(self) -> str:
        return f"TrainingSession(pid={self.pid}, global_step={self.global_step})"


class Coordinator:
    """The ``coord`` passed to ``after_create_session``: a stop switch like
    ``tf.train.Coordinator``'s, shared by the whole supervision."""

    def __init__(self) -> None:
        self._stop = False
        self.reason: Optional[str] = None
        self.exit_code = 0
        self.message: Optional[str] = None

    def request_stop(self, reason: Optional[str] = None, exit_code: int = 0, message: Optional[str] = None) -> None:
        """Stop the run at the next chance (same arguments as SessionRunContext.request_stop)."""
        check_stop_request(reason, exit_code, message)
        if not self._stop:
            self.reason = _plain(reason) or "hook_requested"
            self.exit_code = int.__int__(exit_code)
            self.message = _plain(message)
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop


class SessionRunHook:
    """Base class for hooks; every method is optional."""

    def begin(self) -> None:
        pass

    def after_create_session(self, session: TrainingSession, coord: Coordinator) -> None:
        pass

    def before_run(self, run_context: SessionRunContext) -> Optional[SessionRunArgs]:
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        pass

    def end(self, session: TrainingSession) -> None:
        pass

    # stopstep's extension, for hooks that must act when no step comes at all

    def deadline(self) -> Optional[float]:
        """A ``time.monotonic()`` time at which to call :meth:`on_deadline`, or None."""
        return None

    def on_deadline(self, session: TrainingSession, coord: "Coordinator") -> None:
        """Called once the deadline has passed; may ``coord.request_stop(...)``."""


class StopAtStepHook(SessionRunHook):
    """Requests a stop once the global step reaches a target.

    ``last_step`` is absolute; ``num_steps`` counts from the step of the first
    session (0 on a fresh run) and is anchored once: a recovered session does
    not move the target, as in TensorFlow.
    """

    def __init__(self, num_steps: Optional[int] = None, last_step: Optional[int] = None):
        if num_steps is None and last_step is None:
            raise ValueError("One of num_steps or last_step must be specified.")
        if num_steps is not None and last_step is not None:
            raise ValueError("Only one of num_steps or last_step can be specified.")
        self._num_steps = num_steps
        self._last_step = last_step

    @property
    def last_step(self) -> Optional[int]:
        """The absolute target; None until anchored when only num_steps was given."""
        return self._last_step

    @property
    def num_steps(self) -> Optional[int]:
        """The steps to run from the start step, when the target was given that way."""
        return self._num_steps

    def after_create_session(self, session: TrainingSession, coord: Coordinator) -> None:
        if self._last_step is None:
            self._last_step = (session.global_step or 0) + self._num_steps

    def target_from(self, start_step: Optional[int]) -> Optional[int]:
        """The absolute target this hook will have once anchored at ``start_step``."""
        if self._last_step is not None:
            return self._last_step
        return (start_step or 0) + self._num_steps

    def reanchor(self, start_step: Optional[int]) -> None:
        """stopstep's extension: the step the first session started at was misread (a
        checkpoint of an earlier run looked like the resume point); count ``num_steps``
        from ``start_step`` instead. Does nothing for ``last_step``."""
        if self._num_steps is not None:
            self._last_step = (start_step or 0) + self._num_steps

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs:
        return SessionRunArgs("global_step")

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        step = run_values.results
        if step is not None and self._last_step is not None and step >= self._last_step:
            run_context.request_stop(reason=TARGET_REACHED)


def resolve_fetches(fetches: Any, values: Mapping[str, object]) -> Any:
    """The values for ``fetches`` in the same structure (None for unknown names)."""
    if fetches is None:
        return None
    if isinstance(fetches, str):
        return values.get(fetches)
    if isinstance(fetches, Mapping):
        return {key: resolve_fetches(value, values) for key, value in fetches.items()}
    if isinstance(fetches, tuple) and hasattr(fetches, "_fields"):  # namedtuple
        return type(fetches)(*(resolve_fetches(f, values) for f in fetches))
    if isinstance(fetches, (list, tuple)):
        return type(fetches)(resolve_fetches(f, values) for f in fetches)
    raise TypeError(f"fetch {fetches!r} is not a name, list, tuple or dict")


class HookFailed(Exception):
    """A hook raised (anything, SystemExit and KeyboardInterrupt included), did not
    return in time, or broke the contract (a ``deadline()`` that is not a number)."""

    def __init__(self, hook: object, method: str, error: BaseException, where: Optional[str] = None):
        self.hook, self.method, self.error = hook, method, error
        self.where = where or f"{type(hook).__name__}.{method}"
        super().__init__(f"hook {self.where} failed: {type(error).__name__}: {safe_text(error)}")

    def explain(self, hook_timeout: float) -> List[str]:
        """What to tell the user: one line saying what happened, then the hook's traceback."""
        import traceback

        error = self.error
        if getattr(error, "after_the_tree", False):  # an Overrun cut short once the tree was down
            first = f"{error}; ending without it"
        elif isinstance(error, TimeoutError) or hasattr(error, "after_the_tree"):
            first = f"{error} (--hook-timeout {hook_timeout:g}); stopping"
        else:
            first = f"hook {self.where} raised {type(error).__name__}: {safe_text(error)}"
        try:
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
        except BaseException:  # noqa: B902 - an exception that cannot even be formatted
            trace = f"(no traceback: the {type(error).__name__} cannot be shown)"
        return [first, trace.replace("\n", "\n    ")]


def call_contained(hook: object, method: str, *args: Any) -> Any:
    """Call one hook method; whatever it raises becomes :class:`HookFailed`."""
    try:
        return getattr(hook, method)(*args)
    except BaseException as exc:  # noqa: B902 - a hook must not end stopstep, whatever it raises
        raise HookFailed(hook, method, exc) from exc


class HookRunner:
    """Calls a list of hooks through the lifecycle, in order.

    Every call goes through ``call(hook, method, *args)`` (by default
    :func:`call_contained`; the supervisor adds a time bound): a failing hook
    surfaces as :class:`HookFailed`, never as the hook's own exception.
    """

    def __init__(self, hooks: Iterable[SessionRunHook], call: Callable[..., Any] = call_contained):
        self.hooks: List[SessionRunHook] = list(hooks)
        self.call = call
        self._woken: dict = {}  # hook id -> the deadline it was last woken for
        self.timed = [h for h in self.hooks if getattr(type(h), "deadline", None) is not SessionRunHook.deadline]

    def begin(self) -> None:
        for hook in self.hooks:
            self.call(hook, "begin")

    def after_create_session(self, session: TrainingSession, coord: Coordinator) -> None:
        for hook in self.hooks:
            self.call(hook, "after_create_session", session, coord)

    def run(self, session: TrainingSession, values: Mapping[str, object]) -> SessionRunContext:
        """One observation through before_run and after_run of every hook."""
        ctx = SessionRunContext(SessionRunArgs(list(values)), session)
        call = self.call
        requests = [call(hook, "before_run", ctx) for hook in self.hooks]
        for hook, args in zip(self.hooks, requests):
            try:
                if args is None:
                    fetches = None
                elif isinstance(args, SessionRunArgs) or hasattr(args, "fetches"):
                    fetches = args.fetches
                else:
                    raise TypeError(f"before_run returned {type(args).__name__}, not SessionRunArgs or None")
                results = resolve_fetches(fetches, values)
            except Exception as exc:  # a bad return value: a fetches property that raises, a cycle
                raise HookFailed(hook, "before_run", exc) from None
            call(hook, "after_run", ctx, SessionRunValues(results))
        return ctx

    def end(self, session: TrainingSession) -> None:
        for hook in self.hooks:
            self.call(hook, "end", session)

    def next_deadline(self) -> Optional[float]:
        deadlines = [d for d in (self._due(hook) for hook in self.timed) if d is not None]
        return min(deadlines) if deadlines else None

    def on_deadlines(self, session: TrainingSession, coord: Coordinator, now: float) -> None:
        """Wake every hook whose deadline has passed, in order, once per deadline."""
        for hook in self.timed:
            deadline = self._due(hook)
            if deadline is not None and deadline <= now:
                self._woken[id(hook)] = deadline
                self.call(hook, "on_deadline", session, coord)

    def _due(self, hook: SessionRunHook) -> Optional[float]:
        deadline = self.call(hook, "deadline")
        if deadline is None:
            return None
        when = None
        if not isinstance(deadline, bool) and isinstance(deadline, (int, float)):
            try:  # plain float arithmetic from here: a subclass's own methods may do anything
                when = int.__int__(deadline) if isinstance(deadline, int) else float.__float__(deadline)
                when = float(when)
            except OverflowError:  # 10**400
                when = None
        if when is None or not math.isfinite(when):
            raise HookFailed(hook, "deadline", TypeError(
                f"deadline() returned {safe_repr(deadline)}, not a time.monotonic() time or None"))
        return None if self._woken.get(id(hook)) == when else when
