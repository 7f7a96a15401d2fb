"""The fault matrix: commands and environments that misbehave, on real
processes. Each case checks that nothing is lost (status, bytes, report) and
nothing is left behind (no process of the tree survives stopstep)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import psutil
import pytest
from helpers import (
    TIMEOUT,
    _env,
    assert_all_gone,
    read_pids,
    run_stopstep,
    start_stopstep,
    trainer,
    wait_for_output,
)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the command does not stop ----------------------------------------------------------------


def test_a_command_that_ignores_the_stop_signal_is_killed_after_the_grace_period(tmp_path, pidfile):
    report_path = tmp_path / "r.json"
    result = run_stopstep(
        "run", "--last-step", "3", "--grace-period", "0.5", "--report", report_path, "--",
        *trainer("--rate", "50", "--ignore", "INT", "--workers", "2", "--workers-ignore-int", "--pidfile", pidfile),
    )
    assert result.returncode == 137
    assert b"grace period of 0.5s over; killed 3 process(es) with SIGKILL" in result.stderr  # counted before the kill
    report = json.loads(report_path.read_text())
    assert report["killed"] is True and report["reason"] == "target_reached" and report["exit_code"] == 137
    assert report["child_returncode"] == -9
    assert_all_gone(read_pids(pidfile))


def test_a_shell_that_does_not_pass_signals_on():
    # sh runs background jobs with SIGINT ignored; the grace period ends all six processes.
    mark = f"{os.getpid()}-{time.monotonic_ns()}"  # only this test's processes carry it (in their environment)
    script = "yes | tail & yes | tail >&2 & echo step 1; wait"
    result = run_stopstep("run", "--last-step", "1", "--grace-period", "0.5", "--", "sh", "-c", script,
                          env={"STOPSTEP_TEST_MARK": mark})
    assert result.returncode == 137
    assert not [p for p in psutil.process_iter() if _marked(p, mark)]


def _marked(proc, mark: str) -> bool:
    try:
        return proc.environ().get("STOPSTEP_TEST_MARK") == mark
    except psutil.Error:
        return False


def test_workers_setsid_grandchild_and_double_forked_daemon_are_all_gone(pidfile):
    result = run_stopstep(
        "run", "--last-step", "5", "--",
        *trainer("--rate", "50", "--workers", "3", "--setsid-grandchild", "--double-fork", "--pidfile", pidfile),
    )
    assert result.returncode == 0, result.stderr
    pids = read_pids(pidfile)
    assert len(pids) == 7  # trainer, 3 workers, setsid grandchild, double-fork middle and daemon
    assert_all_gone(pids)


def test_a_second_signal_during_the_grace_period_is_passed_on_without_restarting_it(tmp_path, pidfile):
    # (That the grace period ends exactly 3 s after the first signal, not after the second,
    # is checked on a fake clock in test_stop_sequence.py.)
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "-v", "--last-step", "100000", "--grace-period", "3", "--report", report_path,
                          "--", *trainer("--rate", "20", "--ignore", "INT,TERM", "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGTERM)
    wait_for_output(proc.stderr, b"received SIGTERM; passed it on; waiting up to 3s")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert b"passed SIGTERM on; the grace period is not restarted" in err
    assert json.loads(report_path.read_text())["killed"] is True
    assert_all_gone(read_pids(pidfile))


# -- the command ends first ---------------------------------------------------------------------


def test_every_exit_status_before_the_target_passes_through():
    from concurrent.futures import ThreadPoolExecutor

    def status(code):
        return run_stopstep("run", "-q", "--last-step", "1000", "--", "sh", "-c", f"exit {code}").returncode

    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(range(256), pool.map(status, range(256))))
    assert {code: out for code, out in got.items() if out != code} == {}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGKILL", "SIGSEGV", "SIGABRT",
                                     "SIGUSR1", "SIGPIPE", "SIGALRM"])
def test_killed_by_a_signal_before_the_target_gives_128_plus_n(signame):
    signum = int(getattr(signal, signame))
    reset = "" if signum == signal.SIGKILL else f"signal.signal({signum}, signal.SIG_DFL); "
    code = f"import os, signal; {reset}os.kill(os.getpid(), {signum})"
    result = run_stopstep("run", "--last-step", "1000", "--", sys.executable, "-c", code)
    assert result.returncode == 128 + signum


def _hostile_parent():
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def test_inherited_ignored_sigchld_and_blocked_signals():
    # An ignored SIGCHLD would turn the command's exit 3 into 0.
    code = "import sys; sys.exit(3)"
    result = run_stopstep("run", "--last-step", "5", "--", sys.executable, "-c", code, preexec_fn=_hostile_parent)
    assert result.returncode == 3
    # The stop signal still reaches a command started under a parent that blocked it.
    result = run_stopstep("run", "--last-step", "3", "--", *trainer("--rate", "50"), preexec_fn=_hostile_parent)
    assert result.returncode == 0 and b"trainer: stopped cleanly at step 3" in result.stderr


def test_nested_stopstep(pidfile):
    inner = [sys.executable, "-m", "stopstep_cli", "run", "--last-step", "100000", "--",
             *trainer("--rate", "20", "--pidfile", pidfile)]
    proc = start_stopstep("run", "--last-step", "100000", "--", *inner)
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert b"trainer: received signal 15" in err
    assert_all_gone(read_pids(pidfile))


def test_nested_stopstep_inner_target_first(pidfile):
    inner = [sys.executable, "-m", "stopstep_cli", "run", "--last-step", "5", "--",
             *trainer("--rate", "50", "--pidfile", pidfile)]
    result = run_stopstep("run", "--last-step", "100000", "--", *inner)
    assert result.returncode == 0  # the inner one stopped cleanly at its target; its 0 passes through
    assert_all_gone(read_pids(pidfile))


# -- output ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe invalid utf-8 \x00 NUL \x1b[31mred\x1b[0m\nstep 1\n",
        b"\rstep 1 |\rstep 2 |\rstep 3 |",  # \r-only progress, no final newline
        b"no newline at the end, step 1",
        b"x" * (100 * 1024 * 1024) + b" step 1\n" + b"y" * 1000,  # a 100 MB line
    ],
    ids=["binary", "carriage-returns", "no-final-newline", "100MB-line"],
)
def test_output_is_byte_identical(tmp_path, payload):
    data = tmp_path / "payload.bin"
    data.write_bytes(payload)
    code = f"import sys; d = open({str(data)!r}, 'rb').read(); sys.stdout.buffer.write(d); sys.stderr.buffer.write(d[::-1])"
    result = run_stopstep("run", "-q", "--last-step", "1000", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert _digest(result.stdout) == _digest(payload)
    assert _digest(result.stderr) == _digest(payload[::-1])


def test_a_command_that_closes_stdout_early_and_keeps_running(pidfile):
    code = (
        "import os, sys, time\n"
        "print('closing stdout', flush=True)\n"
        "os.close(1)\n"
        "print('step 1', file=sys.stderr, flush=True)\n"
        "time.sleep(0.2)\n"
        "print('step 2', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    result = run_stopstep("run", "--last-step", "2", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert result.stdout == b"closing stdout\n"


def test_a_reader_of_stopstep_stdout_that_goes_away(pidfile):
    # `stopstep run ... | head -1`: the command sees the broken pipe it would have seen without stopstep,
    # dies of it, and stopstep brings the rest of the tree down and exits with its status.
    proc = start_stopstep("run", "--last-step", "100000", "--",
                          *trainer("--rate", "100", "--workers", "2", "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 1 ")
    proc.stdout.close()
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode not in (0, None)
    assert b"stdout was closed by its reader; closing the command's stdout too" in err
    assert b"command exited 1 before step 100000" in err
    assert_all_gone(read_pids(pidfile))


# -- checkpoints that misbehave -----------------------------------------------------------------------


def test_checkpoints_deleted_truncated_and_replaced_while_watched(tmp_path):
    # Each unfinished state is written by the test, which waits for stopstep (-v) to say it
    # looked at exactly that state and found it unfinished before writing the next one.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = ckpt / "epoch=0-step=10.ckpt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data.pkl", os.urandom(50000))
    whole = buf.getvalue()
    report_path = tmp_path / "r.json"
    waits = "import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(0))\ntime.sleep(120)\n"
    proc = start_stopstep("run", "-v", "--last-step", "10", "--checkpoint-dir", ckpt, "--layout", "lightning",
                          "--report", report_path, "--", sys.executable, "-c", waits)
    seen = wait_for_output(proc.stderr, b"watching checkpoint:")

    def looked_at(needle: bytes) -> None:
        nonlocal seen
        seen = wait_for_output(proc.stderr, needle, already=seen)
        assert proc.poll() is None and b"is complete" not in seen

    path.write_bytes(whole[: len(whole) // 2])  # half written
    looked_at(f"(step 10) is not complete yet ({len(whole) // 2} bytes)".encode())
    path.unlink()  # deleted
    looked_at(b"was deleted before it was complete")
    path.write_bytes(whole[:-10])  # truncated
    looked_at(f"(step 10) is not complete yet ({len(whole) - 10} bytes)".encode())
    tmp = ckpt / "partial.tmp"
    tmp.write_bytes(whole[:100])
    os.replace(tmp, path)  # replaced by another unfinished one
    looked_at(b"(step 10) is not complete yet (100 bytes)")
    path.write_bytes(whole)  # finally whole
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err.decode()
    report = json.loads(report_path.read_text())
    assert report["reason"] == "target_reached" and report["last_checkpoint_step"] == 10


# -- the report cannot be written ---------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(mount / "filler", "wb") as fh:
            try:
                fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_when_writing_the_report(full_disk, pidfile):
    result = run_stopstep("run", "--last-step", "3", "--report", full_disk / "report.json", "--",
                          *trainer("--rate", "50", "--workers", "2", "--pidfile", pidfile))
    assert result.returncode == 125
    err = result.stderr.decode()
    assert "stopstep: cannot write report" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert b"trainer: stopped cleanly at step 3" in result.stderr  # the tree was stopped all the same
    assert_all_gone(read_pids(pidfile))
    assert not [p for p in os.listdir(full_disk) if p.startswith(".stopstep-report-")]  # no temporary left


def test_stdout_on_a_full_disk_drops_the_output_and_the_run_goes_on(pidfile):
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "stopstep_cli", "run", "--last-step", "5", "--",
                                 *trainer("--rate", "100", "--pidfile", pidfile)],
                                stdout=full, stderr=subprocess.PIPE, timeout=TIMEOUT, env=_env(None))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "cannot write the command's stdout (No space left on device)" in err
    assert "trainer: stopped cleanly at step 5" in err and "Traceback" not in err
    assert_all_gone(read_pids(pidfile))


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_started_without_a_standard_fd(closed, pidfile):
    # A pipe made at start-up must not land on the missing fd (and take the command's output).
    result = subprocess.run([sys.executable, "-m", "stopstep_cli", "run", "--last-step", "3", "--",
                             *trainer("--rate", "100", "--pidfile", pidfile)],
                            stdout=subprocess.PIPE if closed != 1 else None,
                            stderr=subprocess.PIPE if closed != 2 else None,
                            preexec_fn=lambda: os.close(closed), timeout=TIMEOUT, env=_env(None))
    assert result.returncode == 0
    if closed != 2:
        assert b"Traceback" not in result.stderr
    if closed == 0:
        assert result.stdout.endswith(b"step 3 loss 0.3333\n")
    assert_all_gone(read_pids(pidfile))
