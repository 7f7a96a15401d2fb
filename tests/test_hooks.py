"""The hook API: TensorFlow's StopAtStepHook tests ported to stopstep's terms
(observed post-step values), and the lifecycle on a real process."""

from __future__ import annotations

import pytest
from helpers import trainer

from stopstep_cli import (
    Coordinator,
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
    StopAtStepHook,
    TrainingSession,
)
from stopstep_cli.console import QUIET, Console
from stopstep_cli.hooks import HookRunner, resolve_fetches


def make_session(start):
    return TrainingSession(["train"], pid=1, start_step=start)


def observe(hook, session, step):
    """One observation through a single hook, in a fresh context; stop requested?"""
    ctx = SessionRunContext(SessionRunArgs(["global_step"]), session)
    args = hook.before_run(ctx)
    hook.after_run(ctx, SessionRunValues(resolve_fetches(args.fetches, {"global_step": step})))
    return ctx.stop_requested


def started(hook, start):
    session = make_session(start)
    hook.begin()
    hook.after_create_session(session, Coordinator())
    return session


class TestStopAtStepHookLikeTensorFlow:
    def test_neither_or_both_raise_tf_messages(self):
        with pytest.raises(ValueError, match="^One of num_steps or last_step must be specified.$"):
            StopAtStepHook()
        with pytest.raises(ValueError, match="^Only one of num_steps or last_step can be specified.$"):
            StopAtStepHook(num_steps=10, last_step=20)

    def test_zero_and_negative_pass_like_tf(self):
        # TensorFlow validates neither: both stop at the first observation.
        hook = StopAtStepHook(num_steps=0)
        session = started(hook, 7)
        assert hook.last_step == 7 and observe(hook, session, 7)
        hook = StopAtStepHook(last_step=-1)
        session = started(hook, None)
        assert hook.last_step == -1 and observe(hook, session, 0)

    def test_stop_using_last_step(self):
        hook = StopAtStepHook(last_step=10)
        session = started(hook, 5)
        assert not observe(hook, session, 5)
        assert not observe(hook, session, 9)
        assert observe(hook, session, 10)
        assert observe(hook, session, 11)

    def test_stop_using_num_steps(self):
        hook = StopAtStepHook(num_steps=10)
        session = started(hook, 5)
        assert hook.last_step == 15
        assert not observe(hook, session, 13)
        assert not observe(hook, session, 14)
        assert observe(hook, session, 15)
        assert observe(hook, session, 16)

    def test_stop_based_on_last_step_one_at_a_time(self):
        hook = StopAtStepHook(last_step=3)
        session = started(hook, None)
        assert [observe(hook, session, s) for s in (1, 2, 3)] == [False, False, True]
        # a new hook on a run resumed at 3
        hook = StopAtStepHook(last_step=5)
        session = started(hook, 3)
        assert [observe(hook, session, s) for s in (4, 5)] == [False, True]

    def test_stop_based_on_num_steps_resumed_rebases_new_hook(self):
        hook = StopAtStepHook(num_steps=3)
        session = started(hook, None)
        assert [observe(hook, session, s) for s in (1, 2, 3)] == [False, False, True]
        hook = StopAtStepHook(num_steps=4)
        session = started(hook, 3)
        assert [observe(hook, session, s) for s in (4, 5, 6, 7)] == [False, False, False, True]

    def test_num_steps_anchored_once_not_on_recovery(self):
        hook = StopAtStepHook(num_steps=10)
        started(hook, 5)
        hook.after_create_session(make_session(12), Coordinator())  # a recovered session
        assert hook.last_step == 15

    def test_several_steps_per_observation_overshoot(self):
        hook = StopAtStepHook(last_step=12)
        session = started(hook, 0)
        assert [observe(hook, session, s) for s in (5, 10, 15)] == [False, False, True]


class Recorder(SessionRunHook):
    def __init__(self, log, name, fetches="global_step", stop_at=None):
        self.log, self.name, self.fetches, self.stop_at = log, name, fetches, stop_at

    def begin(self):
        self.log.append((self.name, "begin"))

    def after_create_session(self, session, coord):
        self.log.append((self.name, "after_create_session", session.global_step, session.pid is not None))

    def before_run(self, ctx):
        self.log.append((self.name, "before_run", ctx.stop_requested))
        return SessionRunArgs(self.fetches) if self.fetches is not None else None

    def after_run(self, ctx, values):
        self.log.append((self.name, "after_run", values.results, ctx.stop_requested))
        if self.stop_at is not None and values.results == self.stop_at:
            ctx.request_stop()

    def end(self, session):
        self.log.append((self.name, "end", session.global_step))


def test_runner_orders_hooks_and_delays_stop_until_all_after_run():
    log = []
    first = Recorder(log, "a", stop_at=2)
    second = Recorder(log, "b", fetches={"step": "global_step", "l": ["loss"]})
    runner = HookRunner([first, second])
    session = make_session(None)
    runner.begin()
    runner.after_create_session(session, Coordinator())
    ctx = runner.run(session, {"global_step": 2, "loss": 0.5})
    assert ctx.stop_requested
    assert log[-4:] == [
        ("a", "before_run", False),
        ("b", "before_run", False),
        ("a", "after_run", 2, False),
        ("b", "after_run", {"step": 2, "l": [0.5]}, True),
    ]


def test_resolve_fetches_keeps_structure():
    values = {"global_step": 7, "loss": 0.25}
    assert resolve_fetches(None, values) is None
    assert resolve_fetches("loss", values) == 0.25
    assert resolve_fetches(("global_step", "missing"), values) == (7, None)
    assert resolve_fetches({"a": ["loss", {"b": "global_step"}]}, values) == {"a": [0.25, {"b": 7}]}


def test_lifecycle_on_a_real_process():
    from stopstep_cli import Supervisor

    log = []
    supervisor = Supervisor(
        trainer("--steps", "100", "--rate", "200"),
        target=StopAtStepHook(last_step=5),
        hooks=[Recorder(log, "user", fetches=["global_step", "loss"])],
        console=Console(QUIET),
    )
    report = supervisor.run()
    assert report.reason == "target_reached" and report.exit_code == 0
    assert report.last_step_seen >= 5
    kinds = [entry[1] for entry in log]
    assert kinds[:2] == ["begin", "after_create_session"]
    assert log[1] == ("user", "after_create_session", None, True)
    assert kinds[-1] == "end" and kinds.count("end") == 1
    runs = [entry for entry in log if entry[1] == "after_run"]
    assert [r[2][0] for r in runs] == [1, 2, 3, 4, 5]  # every step, in order, none after the stop
    assert runs[0][2][1] == pytest.approx(1.0)  # the loss group of the default format
    assert runs[-1][3] is True  # the target hook (first) asked to stop before ours ran


def test_end_not_called_when_the_command_crashes():
    from stopstep_cli import Supervisor

    log = []
    report = Supervisor(
        trainer("--crash-at", "3", "--crash-code", "9", "--rate", "0"),
        target=StopAtStepHook(last_step=50),
        hooks=[Recorder(log, "user")],
        console=Console(QUIET),
    ).run()
    assert report.reason == "process_exited" and report.exit_code == 9
    assert "end" not in [entry[1] for entry in log]


def test_end_called_when_the_command_finishes_early():
    from stopstep_cli import Supervisor

    log = []
    report = Supervisor(
        trainer("--steps", "3", "--rate", "0"),
        target=StopAtStepHook(last_step=50),
        hooks=[Recorder(log, "user")],
        console=Console(QUIET),
    ).run()
    assert report.exit_code == 0 and report.last_step_seen == 3
    assert log[-1] == ("user", "end", 3)


def test_a_hook_that_raises_brings_the_tree_down(capfd):
    from stopstep_cli import Supervisor

    class Boom(SessionRunHook):
        def after_run(self, ctx, values):
            raise RuntimeError("kaboom")

    report = Supervisor(
        trainer("--steps", "100000", "--rate", "100"),
        target=StopAtStepHook(last_step=50000),
        hooks=[Boom()],
        console=Console(),
    ).run()
    assert report.reason == "hook_error" and report.exit_code == 5
    err = capfd.readouterr().err
    assert "kaboom" in err and "Traceback" in err
