"""`stopstep run` end to end through the real CLI: targets, exit statuses,
reports, bad input, and output passed through byte for byte."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from helpers import (
    FAKE_TRAINER,
    STOPSTEP,
    assert_all_gone,
    read_pids,
    run_stopstep,
    run_with_report,
    stderr_lines,
    trainer,
)

# -- reaching the target -------------------------------------------------------


def test_last_step_stops_exactly_and_cleanly(tmp_path, pidfile):
    result, report = run_with_report(
        tmp_path, "--last-step", "20", "--",
        *trainer("--rate", "20", "--workers", "2", "--pidfile", pidfile),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[-1] == "step 20 loss 0.0500"  # nothing past the target at 20 steps/s
    assert b"trainer: stopped cleanly at step 20" in result.stderr
    assert report["reason"] == "target_reached"
    assert report["target_step"] == 20 and report["last_step_seen"] == 20
    assert report["exit_code"] == 0 and report["child_returncode"] == 130
    assert report["stop_signal"] == "SIGINT" and report["killed"] is False
    assert report["steps_per_s"] > 0 and report["duration_s"] > 0
    assert report["observations"] == 20
    assert_all_gone(read_pids(pidfile))


def test_num_steps_counts_from_a_fresh_run(tmp_path):
    result, report = run_with_report(tmp_path, "--num-steps", "5", "--", *trainer("--rate", "50"))
    assert result.returncode == 0
    assert report["target_step"] == 5 and report["start_step"] is None
    assert report["last_step_seen"] >= 5


def test_target_from_the_environment(tmp_path):
    result = run_stopstep("run", "--", *trainer("--rate", "100"), env={"STOPSTEP_LAST_STEP": "7"})
    assert result.returncode == 0
    assert "step 7 reached (target 7)" in result.stderr.decode()


def test_a_command_line_target_wins_over_the_other_targets_environment_variable():
    result = run_stopstep("run", "--num-steps", "4", "--", *trainer("--rate", "100"),
                          env={"STOPSTEP_LAST_STEP": "900"})
    assert result.returncode == 0 and b"step 4 reached (target 4)" in result.stderr
    both = run_stopstep("run", "--", "true", env={"STOPSTEP_LAST_STEP": "9", "STOPSTEP_NUM_STEPS": "9"})
    assert both.returncode == 2 and b"exactly one of" in both.stderr


def test_custom_stop_signal_and_steps_on_stderr(tmp_path):
    result, report = run_with_report(
        tmp_path, "--last-step", "4", "--stop-signal", "TERM", "--preset", "hf", "--",
        *trainer("--rate", "50", "--stderr", "--end", "\\r",
                 "--format", "{step:3d}%|#         | {step}/{total} [00:01<00:02,  4.00it/s]"),
    )
    assert result.returncode == 0
    assert report["stop_signal"] == "SIGTERM" and report["child_returncode"] == 143
    assert report["last_step_seen"] >= 4


def test_first_step_already_past_the_target():
    result = run_stopstep("run", "--last-step", "10", "--", *trainer("--start", "500", "--rate", "50"))
    assert result.returncode == 0
    assert "first step seen (501) is already past the target (10); stopping" in result.stderr.decode()


def test_quiet_and_verbose():
    quiet = run_stopstep("run", "-q", "--last-step", "2", "--", *trainer("--rate", "100"))
    assert quiet.returncode == 0 and stderr_lines(quiet) == []
    verbose = run_stopstep("run", "-v", "--last-step", "2", "--", *trainer("--rate", "100"))
    assert any("started pid" in line for line in stderr_lines(verbose))


# -- the command ends first ----------------------------------------------------------


def test_process_exited_report(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--", *trainer("--crash-at", "3", "--rate", "0"))
    assert result.returncode == 1
    assert report["reason"] == "process_exited"
    assert report["child_returncode"] == 1 and report["exit_code"] == 1
    assert report["last_step_seen"] == 3 and report["stop_signal"] is None


def test_require_target_fails_an_early_clean_exit():
    result = run_stopstep("run", "--require-target", "--last-step", "100", "--", *trainer("--steps", "5", "--rate", "0"))
    assert result.returncode == 3
    assert "before reaching step 100 (last step seen: 5)" in result.stderr.decode()
    # ...and does not hide a crash
    result = run_stopstep("run", "--require-target", "--last-step", "100", "--", *trainer("--crash-at", "2", "--rate", "0"))
    assert result.returncode == 1


def test_a_last_step_line_printed_just_before_exit_counts():
    result = run_stopstep("run", "--require-target", "--last-step", "5", "--", *trainer("--steps", "5", "--rate", "0"))
    assert result.returncode == 0


def test_command_not_found_and_not_executable(tmp_path):
    empty = run_stopstep("run", "--last-step", "1", "--", "")
    assert empty.returncode == 127 and b"empty command name" in empty.stderr
    missing = run_stopstep("run", "--last-step", "1", "--", "no-such-command-xyz")
    assert missing.returncode == 127
    assert stderr_lines(missing) == ["stopstep: error: command not found: no-such-command-xyz"]
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\necho step 1\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    not_exec = run_stopstep("run", "--last-step", "1", "--", script)
    assert not_exec.returncode == 126
    directory = run_stopstep("run", "--last-step", "1", "--", tmp_path)
    assert directory.returncode == 126 and b"is a directory" in directory.stderr


# -- bad input: one line, exit 2, no traceback ------------------------------------------------


@pytest.mark.parametrize(
    "args,says",
    [
        (["run", "--", "true"], "exactly one of --last-step or --num-steps"),
        (["run", "--last-step", "3", "--num-steps", "4", "--", "true"], "exactly one of --last-step or --num-steps"),
        (["run", "--last-step", "ten", "--", "true"], "--last-step"),
        (["run", "--last-step", "-3", "--", "true"], "--last-step"),
        (["run", "--num-steps", "1.5", "--", "true"], "--num-steps"),
        (["run", "--last-step", "3", "--grace-period", "soon", "--", "true"], "--grace-period"),
        (["run", "--last-step", "3", "--pattern", "step (\\d+", "--", "true"], "'step (\\\\d+' does not compile"),
        (["run", "--last-step", "3", "--pattern", "(a)(b)", "--", "true"], "named group 'step' or exactly one group"),
        (["run", "--last-step", "3", "--preset", "pytorch", "--", "true"], "unknown preset 'pytorch'"),
        (["run", "--last-step", "3", "--stop-signal", "SIGFOO", "--", "true"], "unknown signal 'SIGFOO'"),
        (["run", "--last-step", "3", "--stop-signal", "99", "--", "true"], "no signal numbered 99"),
        (["run", "--last-step", "3"], "no command given"),
        (["run", "--last-step", "3", "--frobnicate", "--", "true"], "No such option"),
        (["run", "--last-step", "3", "--report", "/no/such/dir/r.json", "--", "true"], "does not exist"),
        (["run", "-q", "-v", "--last-step", "3", "--", "true"], "--quiet and --verbose"),
        (["walk"], "No such command"),
    ],
)
def test_bad_input_is_one_clear_line(args, says):
    result = run_stopstep(*args)
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("stopstep: error: "), err
    assert says in err
    assert "Traceback" not in err


def test_bad_environment_value_is_a_usage_error():
    result = run_stopstep("run", "--", "true", env={"STOPSTEP_NUM_STEPS": "many"})
    assert result.returncode == 2 and b"STOPSTEP_NUM_STEPS='many' is not a step" in result.stderr
    # ...and one that is not used, since the command line gives the target, is not even read
    result = run_stopstep("run", "-q", "--num-steps", "1", "--", "true", env={"STOPSTEP_LAST_STEP": "nan"})
    assert result.returncode == 0


def test_presets_lists_every_preset():
    result = run_stopstep("presets")
    assert result.returncode == 0
    for name in ("hf", "tf", "deepspeed", "megatron", "torchtitan", "nanogpt", "mmengine", "composer", "fairseq", "keras"):
        assert f"\n{name} " in "\n" + result.stdout.decode()


def test_python_dash_m_and_version():
    result = subprocess.run(STOPSTEP + ["--version"], capture_output=True, env={**os.environ, "PYTHONPATH": str(FAKE_TRAINER.parents[1])})
    assert result.returncode == 0 and result.stdout.startswith(b"stopstep, version ")


# -- output passes through untouched ----------------------------------------------------------


def test_cwd_environment_and_stdin_are_the_commands(tmp_path):
    code = (
        "import os, sys; print(os.getcwd()); print(os.environ['MY_VAR']); "
        "print(os.environ['PYTHONUNBUFFERED']); print(sys.stdin.read().strip())"
    )
    result = run_stopstep("run", "-q", "--last-step", "9", "--", sys.executable, "-c", code,
                          input=b"from stdin\n", cwd=tmp_path, env={"MY_VAR": "kept"})
    assert result.stdout.decode().split("\n")[:4] == [str(tmp_path), "kept", "1", "from stdin"]
    own = run_stopstep("run", "-q", "--last-step", "9", "--", sys.executable, "-c",
                       "import os; print(os.environ['PYTHONUNBUFFERED'])", env={"PYTHONUNBUFFERED": "x"})
    assert own.stdout == b"x\n"


def test_python_output_is_unbuffered_so_steps_arrive_live():
    # Without PYTHONUNBUFFERED the step would sit in the child's buffer and this would hang.
    code = "import time\nprint('step 3')\ntime.sleep(120)\n"
    result = run_stopstep("run", "--last-step", "3", "--", sys.executable, "-c", code, timeout=60)
    assert result.returncode == 0
