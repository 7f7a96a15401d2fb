"""The process tree: signals passed on, the whole tree brought down, nothing
left behind, and inherited signal state that must not break stopstep."""

from __future__ import annotations

import json
import signal
import sys

from helpers import (
    assert_all_gone,
    read_pids,
    run_stopstep,
    start_stopstep,
    trainer,
    wait_for_file,
    wait_for_output,
)


def test_a_slow_graceful_shutdown_is_waited_for(tmp_path):
    result = run_stopstep(
        "run", "--last-step", "3", "--grace-period", "30", "--",
        *trainer("--rate", "50", "--shutdown-delay", "0.5"),
    )
    assert result.returncode == 0
    assert b"trainer: stopped cleanly at step 3" in result.stderr


def test_background_processes_left_by_an_exiting_command_are_ended(pidfile):
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen({trainer('--rate', '1', '--pidfile', str(pidfile))!r})\n"
        "import time; time.sleep(0.5); sys.exit(3)\n"
    )
    result = run_stopstep("run", "--last-step", "1000", "--grace-period", "5", "--", sys.executable, "-c", code)
    assert result.returncode == 3
    assert_all_gone(read_pids(pidfile))


def test_sigterm_to_stopstep_is_passed_on_and_gives_143(tmp_path, pidfile):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100000", "--report", report_path, "--",
                          *trainer("--rate", "20", "--workers", "2", "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert b"trainer: received signal 15" in err
    report = json.loads(report_path.read_text())
    assert report["reason"] == "signal" and report["received_signal"] == "SIGTERM"
    assert report["child_returncode"] == 143 and report["killed"] is False
    assert_all_gone(read_pids(pidfile))


def test_sigint_to_stopstep_reaches_the_command_once(tmp_path):
    proc = start_stopstep("run", "--last-step", "100000", "--",
                          *trainer("--rate", "20", "--stampfile", tmp_path / "stamps"))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert (tmp_path / "stamps").read_text().count("signal") == 1


def test_usr1_is_passed_on_and_supervision_goes_on(tmp_path):
    # The trainer does not handle SIGUSR1, so it dies of it: that status comes out.
    proc = start_stopstep("run", "--last-step", "100000", "--", *trainer("--rate", "20"))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1


def test_sigint_ignored_by_the_parent_still_stops_the_command(tmp_path):
    # `cmd &` in a script starts it with SIGINT ignored; the command must still get the default.
    def ignore_int():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    result = run_stopstep("run", "--last-step", "3", "--", *trainer("--rate", "50"), preexec_fn=ignore_int)
    assert result.returncode == 0 and b"stopped cleanly at step 3" in result.stderr


def test_stopstep_killed_hard_still_brings_the_command_down(tmp_path, pidfile):
    proc = start_stopstep("run", "--last-step", "100000", "--", *trainer("--rate", "20", "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 2 ")
    wait_for_file(pidfile)
    proc.kill()
    proc.communicate(timeout=60)
    assert_all_gone(read_pids(pidfile)[:1])  # the command got the stop signal as its parent died


