"""Production supervision: restarts, stall and time limits, NaN, user hooks,
PID 1, terminals and job control, live progress, the Dockerfile."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from helpers import (
    FAKE_TRAINER,
    ROOT,
    STOPSTEP,
    TIMEOUT,
    Terminal,
    _env,
    assert_all_gone,
    needs_pid_namespace,
    read_pids,
    run_stopstep,
    run_with_report,
    trainer,
    wait_for_output,
    wait_until,
)

# -- recovery -----------------------------------------------------------------------------


def crash_once_script(tmp_path, crash_at=7):
    """A training command that crashes once after a checkpoint, then resumes from it."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "crashed"
    return [sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, json
        ckpt, marker = {str(ckpt)!r}, {str(marker)!r}
        start = 0
        for name in os.listdir(ckpt) if os.path.isdir(ckpt) else []:
            start = max(start, json.load(open(os.path.join(ckpt, name, "trainer_state.json")))["global_step"])
        extra = [] if os.path.exists(marker) else ["--crash-at", "{crash_at}"]
        open(marker, "a").close()
        sys.exit(subprocess.call([sys.executable, {str(FAKE_TRAINER)!r}, "--rate", "100", "--start", str(start),
                                  "--checkpoint-dir", ckpt, "--save-every", "5"] + extra))
    """)], ckpt


def test_crash_and_resume_keeps_num_steps_anchored(tmp_path):
    command, ckpt = crash_once_script(tmp_path)
    result, report = run_with_report(tmp_path, "--num-steps", "12", "--checkpoint-dir", ckpt, "--max-restarts", "2",
                               "--", *command)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["restarts"] == 1
    assert report["target_step"] == 12  # anchored at the first session, not re-based at the restart from 5
    assert [a["exit_status"] for a in report["attempts"]] == [1, 130]
    assert report["attempts"][1]["start_step"] == 5
    assert report["last_step_seen"] == 12
    err = result.stderr.decode()
    assert "restarting (restart 1 of 2)" in err and "resuming from step 5" in err


def test_restarts_run_out(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--max-restarts", "2", "--",
                               *trainer("--rate", "0", "--crash-at", "2", "--crash-code", "3"))
    assert result.returncode == 3
    assert report["restarts"] == 2 and len(report["attempts"]) == 3
    assert report["reason"] == "process_exited"


def test_no_restart_after_a_clean_exit_or_a_stop(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--max-restarts", "2", "--",
                                     *trainer("--rate", "0", "--steps", "3"))
    assert result.returncode == 0 and report["restarts"] == 0
    # The stop signal makes the command exit 130, a non-zero status: still no restart.
    result, report = run_with_report(tmp_path, "--last-step", "3", "--max-restarts", "2", "--",
                                     *trainer("--rate", "50"))
    assert result.returncode == 0 and report["child_returncode"] == 130
    assert report["restarts"] == 0 and len(report["attempts"]) == 1


class LifecycleLog:
    """A hook, written to a file, that logs its lifecycle calls."""

    source = textwrap.dedent("""
        import json
        from stopstep_cli import SessionRunHook, SessionRunArgs

        class Logger(SessionRunHook):
            def __init__(self, path, every=1):
                self.path, self.every = path, every

            def _log(self, *what):
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(what) + "\\n")

            def begin(self):
                self._log("begin")

            def after_create_session(self, session, coord):
                self._log("after_create_session", session.global_step)

            def before_run(self, run_context):
                return SessionRunArgs("global_step")

            def after_run(self, run_context, run_values):
                self._log("after_run", run_values.results)

            def end(self, session):
                self._log("end", session.global_step)

        class Exploding(SessionRunHook):
            def after_run(self, run_context, run_values):
                if run_values.results is None:
                    pass
                raise RuntimeError("hook exploded at a step")

        class NeedsArg(SessionRunHook):
            def __init__(self, path, required):
                pass

        class NotAHook:
            pass

        class ExitsWhenMade(SessionRunHook):
            def __init__(self, path=None):
                raise SystemExit(7)

        class InterruptedWhenMade(SessionRunHook):
            def __init__(self, path=None):
                raise KeyboardInterrupt
    """)


def test_restart_calls_after_create_session_again_but_not_begin(tmp_path):
    hook_file = tmp_path / "myhooks.py"
    hook_file.write_text(LifecycleLog.source)
    log = tmp_path / "calls.jsonl"
    command, ckpt = crash_once_script(tmp_path, crash_at=7)
    result = run_stopstep("run", "--num-steps", "9", "--checkpoint-dir", ckpt, "--max-restarts", "1",
                          "--hook", f"{hook_file}:Logger", "--hook-arg", f"path={log}", "--", *command)
    assert result.returncode == 0, result.stderr.decode()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [c[0] for c in calls]
    assert kinds.count("begin") == 1 and kinds.count("end") == 1
    assert [c for c in calls if c[0] == "after_create_session"] == [["after_create_session", None],
                                                                    ["after_create_session", 5]]
    steps = [c[1] for c in calls if c[0] == "after_run"]
    assert steps[:7] == [1, 2, 3, 4, 5, 6, 7] and steps[7:] == [6, 7, 8, 9]  # the re-run steps count again


# -- stall, time limit, NaN -----------------------------------------------------------------


def test_stall(tmp_path, pidfile):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--stall-timeout", "0.5", "--",
                               *trainer("--rate", "100", "--steps", "1000", "--crash-at", "1000000", "--pidfile", pidfile,
                                        "--format", "step {step}", "--every", "1000000"),
                               )
    # prints no step at all: the first-step timeout (= the stall timeout) applies
    assert result.returncode == 124
    assert report["reason"] == "stalled" and report["exit_code"] == 124
    assert "stalled: no first step within 0.5s" in result.stderr.decode()
    assert_all_gone(read_pids(pidfile))


def test_stall_after_steps_and_a_longer_first_step_timeout(tmp_path):
    script = "import time\ntime.sleep(1)\nprint('step 1')\nprint('step 2')\ntime.sleep(60)\n"
    result, report = run_with_report(tmp_path, "--last-step", "100", "--stall-timeout", "0.5",
                               "--first-step-timeout", "20", "--", sys.executable, "-c", script)
    assert result.returncode == 124
    assert report["reason"] == "stalled" and report["last_step_seen"] == 2
    assert "stalled: no new step for 0.5s after step 2" in result.stderr.decode()


def test_time_limit(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--time-limit", "0.5", "--",
                               *trainer("--rate", "20"))
    assert result.returncode == 124
    assert report["reason"] == "time_limit" and report["stop_signal"] == "SIGINT"
    assert b"trainer: stopped cleanly" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_stop_on_nan(tmp_path, value):
    script = f"import time\nprint('step 1 loss 0.5')\nprint('step 2 loss {value}', flush=True)\ntime.sleep(60)\n"
    result, report = run_with_report(tmp_path, "--last-step", "100", "--stop-on-nan", "--", sys.executable, "-c", script)
    assert result.returncode == 4
    assert report["reason"] == "nan_loss" and report["last_step_seen"] == 2
    assert f"loss is {float(value)} at step 2" in result.stderr.decode()


def test_nan_field_from_a_pattern(tmp_path):
    script = "import time\nprint('it=1 gnorm=3.0')\nprint('it=2 gnorm=nan', flush=True)\ntime.sleep(60)\n"
    result = run_stopstep("run", "--last-step", "100", "--stop-on-nan", "--nan-field", "gnorm",
                          "--pattern", r"it=(?P<step>\d+) gnorm=(?P<gnorm>\S+)", "--", sys.executable, "-c", script)
    assert result.returncode == 4


# -- user hooks -----------------------------------------------------------------------------


def test_user_hook_from_a_file_and_from_a_module(tmp_path):
    (tmp_path / "myhooks.py").write_text(LifecycleLog.source)
    log = tmp_path / "calls.jsonl"
    result = run_stopstep("run", "--last-step", "3", "--hook", "myhooks:Logger", "--hook-arg", f"path={log}",
                          "--hook-arg", "every=2", "--", *trainer("--rate", "100"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    calls = [json.loads(line)[0] for line in log.read_text().splitlines()]
    assert calls == ["begin", "after_create_session", "after_run", "after_run", "after_run", "end"]


def test_a_hook_that_raises_stops_the_run_with_its_traceback(tmp_path, pidfile):
    (tmp_path / "myhooks.py").write_text(LifecycleLog.source)
    result, report = run_with_report(tmp_path, "--last-step", "1000", "--hook", f"{tmp_path / 'myhooks.py'}:Exploding",
                               "--", *trainer("--rate", "100", "--workers", "2", "--pidfile", pidfile))
    assert result.returncode == 5
    assert report["reason"] == "hook_error"
    err = result.stderr.decode()
    assert "hook Exploding.after_run raised RuntimeError: hook exploded at a step" in err
    assert "Traceback" in err and "myhooks.py" in err
    assert_all_gone(read_pids(pidfile))


@pytest.mark.parametrize(
    "hook,args,says",
    [
        ("nosuchmodule:Hook", [], "no module named nosuchmodule"),
        ("myhooks:Missing", [], "myhooks has no Missing"),
        ("myhooks.py:NeedsArg", [], "constructing it failed: TypeError"),
        ("myhooks:Logger", ["--hook-arg", "colour=red"], "no --hook takes an argument named 'colour'"),
        ("myhooks:Logger", ["--hook-arg", "nonsense"], "is not key=value"),
        ("missing_file.py:Hook", [], "no such file"),
        ("myhooks:NotAHook", [], "has none of the hook methods"),
        ("myhooks:ExitsWhenMade", [], "constructing it failed: SystemExit: 7"),
        ("myhooks:InterruptedWhenMade", [], "constructing it failed: KeyboardInterrupt"),
        ("justaword", [], "is not module:Class"),
    ],
)
def test_bad_hooks_are_usage_errors(tmp_path, hook, args, says):
    (tmp_path / "myhooks.py").write_text(LifecycleLog.source)
    result = run_stopstep("run", "--last-step", "3", "--hook", hook, *args, "--hook-arg", "path=x", "--", "true",
                          cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()
    assert err.count("\n") == 1 and says in err, err


# -- PID 1 ----------------------------------------------------------------------------------


ZOMBIE_COUNT = (
    "import os\n"
    "def read(p, name):\n"
    "    try:\n"
    "        return open(f'/proc/{p}/{name}', 'rb').read()\n"
    "    except OSError:\n"
    "        return b''\n"
    "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
    "zombies = sum(read(p, 'stat').rsplit(b')', 1)[-1].split()[:1] == [b'Z'] for p in pids)\n"
    "orphans = sum(read(p, 'cmdline') == b'sleep\\x000.2\\x00' for p in pids)\n"
    "print(f'zombies {zombies} orphans {orphans}', flush=True)\n"
)


@needs_pid_namespace
def test_pid1_reaps_100_orphans(tmp_path):
    script = tmp_path / "orphans.sh"
    (tmp_path / "count.py").write_text(ZOMBIE_COUNT)
    script.write_text(
        "(for i in $(seq 100); do sleep 0.2 & done)\n"  # the subshell exits: 100 orphans
        "echo spawned\n"
        # the orphans (which ignore SIGINT, as background jobs of sh do) have all exited, none left a zombie
        f"while ! {sys.executable} {tmp_path / 'count.py'} | grep -q 'zombies 0 orphans 0'; do sleep 0.1; done\n"
        f"{sys.executable} {tmp_path / 'count.py'}\n"
        # not `echo step 1; sleep 60`: a SIGINT landing between those two is held by sh
        # until sleep ends, and sleep, forked after the signal, never gets it
        f"exec {sys.executable} -c \"import time; print('step 1', flush=True); time.sleep(60)\"\n"
    )
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *STOPSTEP, "run", "--last-step", "1", "--", "sh", str(script)],
        capture_output=True, timeout=TIMEOUT, env=_env(None),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"zombies 0 orphans 0" in result.stdout


@needs_pid_namespace
def test_sigterm_to_pid1_brings_the_tree_down_and_gives_143(tmp_path):
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *STOPSTEP, "run", "--last-step", "100000", "--",
         *trainer("--rate", "20", "--workers", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(None),
    )
    wait_for_output(proc.stdout, b"step 2 ")
    inner = [p for p in psutil.Process(proc.pid).children(recursive=True) if "stopstep_cli" in " ".join(p.cmdline())]
    assert inner, "stopstep did not start inside the namespace"
    inner[0].send_signal(signal.SIGTERM)  # what `docker stop` does to PID 1
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err.decode()
    assert b"trainer: received signal 15" in err


# -- terminals ----------------------------------------------------------------------------------


def test_tty_always_gives_the_command_a_terminal_and_keeps_bytes(tmp_path):
    code = "import os, sys; sys.stdout.write(f'tty {os.isatty(1)} {os.isatty(2)}\\nstep 1\\n')"
    result = run_stopstep("run", "-q", "--tty", "always", "--last-step", "5", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert result.stdout == b"tty True True\nstep 1\n"  # no \r\n: output processing is off


def test_tty_never_and_auto_on_pipes_keep_pipes():
    code = "import os; print('tty', os.isatty(1))"
    for mode in ("never", "auto"):
        result = run_stopstep("run", "-q", "--tty", mode, "--last-step", "5", "--", sys.executable, "-c", code)
        assert result.stdout == b"tty False\n"


def test_the_command_can_read_the_terminal():
    code = "print('step 1', flush=True); line = input(); print('got', line, flush=True); print('step 2')"
    term = Terminal(["run", "--last-step", "2", "--", sys.executable, "-c", code])
    try:
        term.wait_for(b"step 1")
        term.type(b"hello\n")
        term.wait_for(b"got hello")
        assert term.proc.wait(timeout=TIMEOUT) == 0
    finally:
        term.close()


def test_ctrl_c_reaches_the_command_once(tmp_path):
    stamps = tmp_path / "stamps"
    term = Terminal(["run", "--last-step", "100000", "--", *trainer("--rate", "20", "--stampfile", stamps)])
    try:
        term.wait_for(b"step 2 ")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
        assert stamps.read_text().count("signal") == 1
    finally:
        term.close()


def test_ctrl_z_suspends_the_tree_and_sigcont_resumes_it(pidfile):
    term = Terminal(["run", "--last-step", "100000", "--", *trainer("--rate", "20", "--pidfile", pidfile)])
    try:
        term.wait_for(b"step 2 ")
        trainer_proc = psutil.Process(read_pids(pidfile)[0])
        supervisor = psutil.Process(term.proc.pid)
        term.type(b"\x1a")
        wait_until(lambda: supervisor.status() == psutil.STATUS_STOPPED and
                   trainer_proc.status() == psutil.STATUS_STOPPED)
        before = len(term.output)
        supervisor.send_signal(signal.SIGCONT)  # what `fg` does
        # one `fg` is enough: the tree runs and stopstep passes its output on again, and stays running
        wait_until(lambda: trainer_proc.status() != psutil.STATUS_STOPPED and term.output[before:].count(b"step ") >= 3)
        assert supervisor.status() != psutil.STATUS_STOPPED
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    assert_all_gone(read_pids(pidfile))


def test_ctrl_c_on_the_terminal_is_a_stop_not_a_crash_to_restart(tmp_path):
    report = tmp_path / "r.json"
    term = Terminal(["run", "--last-step", "100000", "--max-restarts", "3", "--report", report, "--",
                     *trainer("--rate", "20")])
    try:
        term.wait_for(b"step 2 ")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    outcome = json.loads(report.read_text())
    assert outcome["received_signal"] == "SIGINT" and outcome["restarts"] == 0
    assert b"the command got it from the terminal" in term.output


def test_ctrl_c_in_the_restart_delay_ends_the_run(tmp_path):
    report = tmp_path / "r.json"
    term = Terminal(["run", "--last-step", "100", "--max-restarts", "2", "--restart-delay", "60", "--report", report,
                     "--", "sh", "-c", "echo step 1; exit 1"])
    try:
        term.wait_for(b"restarting in 60s")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130
    finally:
        term.close()
    outcome = json.loads(report.read_text())
    assert outcome["received_signal"] == "SIGINT" and len(outcome["attempts"]) == 1


def test_a_second_ctrl_c_kills_at_once(tmp_path, pidfile):
    report = tmp_path / "r.json"
    term = Terminal(["run", "--last-step", "100000", "--grace-period", "600", "--report", report, "--",
                     *trainer("--rate", "20", "--ignore", "INT", "--pidfile", pidfile)])
    try:
        term.wait_for(b"step 2 ")
        term.type(b"\x03")
        term.wait_for(b"Ctrl-C again kills it at once")
        term.type(b"\x03")
        assert term.proc.wait(timeout=TIMEOUT) == 130  # not after the 600 s grace period
    finally:
        term.close()
    outcome = json.loads(report.read_text())
    assert outcome["killed"] is True and outcome["received_signal"] == "SIGINT"
    assert b"Ctrl-C again: killing the tree now" in term.output
    assert_all_gone(read_pids(pidfile))


# -- progress ----------------------------------------------------------------------------------


def test_status_line_never_touches_the_commands_output():
    result = run_stopstep("run", "--progress", "always", "--tty", "never", "--last-step", "30", "--",
                          *trainer("--rate", "50"))
    assert result.returncode == 0
    expected = "".join(f"step {i} loss {1.0 / i:.4f}\n" for i in range(1, 31)).encode()
    assert result.stdout == expected
    assert b"\r\x1b[Kstopstep: step " in result.stderr


def test_progress_lines_without_a_terminal():
    result = run_stopstep("run", "--status-interval", "0.2", "--last-step", "60", "--", *trainer("--rate", "50"))
    assert result.returncode == 0
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("stopstep: progress: step ")]
    assert lines and "/60 (" in lines[-1] and "steps/s" in lines[-1]


def test_github_step_summary(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier content\n")
    result = run_stopstep("run", "--last-step", "3", "--", *trainer("--rate", "100"),
                          env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 0
    text = summary.read_text()
    assert text.startswith("earlier content\n") and "| reason | target_reached |" in text


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_signal_during_the_restart_delay_ends_the_run(tmp_path):
    from helpers import start_stopstep

    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100", "--max-restarts", "1", "--restart-delay", "60",
                          "--report", report_path, "--", *trainer("--rate", "0", "--crash-at", "2"))
    wait_for_output(proc.stderr, b"restarting in 60s")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    report = json.loads(report_path.read_text())
    assert report["reason"] == "signal" and report["received_signal"] == "SIGTERM"
    # the restart never happened, and stopstep stopped nothing: the command had crashed by itself
    assert report["restarts"] == 0 and len(report["attempts"]) == 1
    assert report["stop_mode"] is None and report["stop_signal"] is None
