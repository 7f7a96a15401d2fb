"""Pure pieces of the loop: how a run's facts become an exit status and a
summary line, the phase moves, the timer table, the restart policy."""

from __future__ import annotations

import signal

import pytest

from stopstep_cli import outcome
from stopstep_cli.outcome import RunFacts, conclude
from stopstep_cli.phases import Phase, PhaseError, Timers, check_move
from stopstep_cli.restart import RestartPolicy

TERM, INT = int(signal.SIGTERM), int(signal.SIGINT)


@pytest.mark.parametrize(
    "facts,reason,code",
    [
        # the command ended by itself: its own status
        (RunFacts(returncode=0), "process_exited", 0),
        (RunFacts(returncode=3), "process_exited", 3),
        (RunFacts(returncode=-9), "process_exited", 137),
        (RunFacts(returncode=0, require_target=True, target_step=10, last_step_seen=5), "process_exited", 3),
        (RunFacts(returncode=0, require_target=True, target_step=10, last_step_seen=10), "process_exited", 0),
        (RunFacts(returncode=1, require_target=True, target_step=10, last_step_seen=5), "process_exited", 1),
        (RunFacts(returncode=None), "process_exited", 125),
        # stopstep stopped it: what the cause asks for, whatever the stop signal did to the command
        (RunFacts(stop_reason="target_reached", returncode=130), "target_reached", 0),
        (RunFacts(stop_reason="target_reached", returncode=-9, killed=True), "target_reached", 137),
        (RunFacts(stop_reason="stalled", stop_exit_code=124, returncode=-9, killed=True), "stalled", 124),
        (RunFacts(stop_reason="nan_loss", stop_exit_code=4, returncode=130), "nan_loss", 4),
        (RunFacts(stop_reason="hook_error", stop_exit_code=5, returncode=130), "hook_error", 5),
        (RunFacts(stop_reason="converged", stop_exit_code=0, returncode=130), "converged", 0),
        # the checkpoint never came: the command's status, never 0
        (RunFacts(stop_reason="checkpoint_missing", returncode=-9), "checkpoint_missing", 137),
        (RunFacts(stop_reason="checkpoint_missing", returncode=0), "checkpoint_missing", 1),
        # a signal stopstep received: 128+n in every case, the first cause stays the reason
        (RunFacts(stop_reason="signal", stop_exit_code=143, received_signal=TERM, returncode=143), "signal", 143),
        (RunFacts(stop_reason="target_reached", received_signal=TERM, returncode=130), "target_reached", 143),
        (RunFacts(stop_reason="hook_error", stop_exit_code=5, received_signal=INT, returncode=130), "hook_error", 130),
        (RunFacts(stop_reason="stalled", stop_exit_code=124, received_signal=TERM, killed=True), "stalled", 143),
    ],
)
def test_conclude(facts, reason, code):
    result = conclude(facts)
    assert (result.reason, result.exit_code) == (reason, code)
    assert len(result.summary) <= outcome.SUMMARY_WIDTH and result.summary.endswith(f"exit {code}")


def test_the_summary_names_the_signal_that_ended_the_command_and_shows_a_reasons_control_characters():
    line = conclude(RunFacts(stop_reason="target_reached", returncode=-int(signal.SIGUSR1), target_step=5,
                             last_step_seen=5, stop_signal=INT)).summary
    assert "command killed by SIGUSR1 (138)" in line  # not "exited 138 on SIGINT": SIGINT did not end it
    line = conclude(RunFacts(stop_reason="a\nb\x1b[31m", stop_exit_code=9, returncode=130, stop_signal=INT)).summary
    assert "stopped (a\\nb\\x1b[31m)" in line and "\n" not in line and "\x1b" not in line


def test_summary_lines_say_what_each_figure_is():
    line = conclude(RunFacts(stop_reason="target_reached", returncode=130, target_step=20, last_step_seen=20,
                             duration_s=4.2, steps_per_s=1.0, stop_signal=INT)).summary
    assert line == "reached step 20 (target 20); command exited 130 on SIGINT; ran 4.2 s; 1 step/s; exit 0"
    line = conclude(RunFacts(stop_reason="target_reached", received_signal=TERM, returncode=143, target_step=9,
                             last_step_seen=9, duration_s=3725, stop_signal=INT)).summary
    assert "then got SIGTERM" in line and "ran 1h02m" in line and line.endswith("exit 143")
    line = conclude(RunFacts(returncode=1, target_step=100, last_step_seen=3, duration_s=0.5)).summary
    assert line == "command exited 1 before step 100 (last step 3); ran 0.5 s; exit 1"
    huge = conclude(RunFacts(stop_reason="x" * 200, returncode=130, duration_s=1)).summary
    assert len(huge) <= outcome.SUMMARY_WIDTH


def test_phase_moves_are_checked():
    check_move(Phase.STARTING, Phase.RUNNING)
    check_move(Phase.RUNNING, Phase.WAITING_FOR_CHECKPOINT)
    check_move(Phase.RESTART_DELAY, Phase.STARTING)
    with pytest.raises(PhaseError):
        check_move(Phase.DONE, Phase.RUNNING)
    with pytest.raises(PhaseError):
        check_move(Phase.RUNNING, Phase.RESTART_DELAY)  # an attempt ends through draining, always


def test_timers_give_the_earliest_and_pop_what_is_due():
    timers = Timers()
    assert timers.next() is None and timers.pop_due(1e9) == []
    timers.set("a", 10)
    timers.set("b", 5)
    timers.set("c", None)
    assert timers.next() == 5
    timers.set("b", 20)  # moved later
    assert timers.next() == 10
    assert timers.pop_due(15) == ["a"] and timers.next() == 20
    timers.clear("b")
    assert timers.next() is None


def test_restart_policy():
    policy = RestartPolicy(max_restarts=2, delay=1.5)
    assert not policy.should_restart(0, stopped_by_us=False)  # a clean exit
    assert not policy.should_restart(130, stopped_by_us=True)  # stopstep stopped it
    assert policy.should_restart(1, stopped_by_us=False)
    assert policy.count() == 1 and policy.count() == 2
    assert not policy.should_restart(1, stopped_by_us=False)  # none left
    with pytest.raises(ValueError):
        RestartPolicy(delay=float("nan"))
