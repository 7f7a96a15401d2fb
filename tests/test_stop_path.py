"""The stop path on real processes: hooks that escape, block or lie; signals in
every phase; a reader that stalls; leftovers that flood or respawn; outcomes
that must be true; stopstep as a good citizen (Python API, nohup, symlinks,
kill -9). Every wait is on an event, bounded by TIMEOUT."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from helpers import (
    FAKE_TRAINER,
    STOPSTEP,
    TIMEOUT,
    _env,
    assert_all_gone,
    read_pids,
    run_stopstep,
    run_with_report,
    start_stopstep,
    trainer,
    wait_for_file,
    wait_for_output,
    wait_until,
)

HOSTILE_HOOKS = textwrap.dedent("""
    import os, sys, time
    from stopstep_cli import SessionRunHook, SessionRunArgs

    class ExitsInAfterRun(SessionRunHook):
        def after_run(self, ctx, values):
            sys.exit(7)

    class InterruptsInAfterRun(SessionRunHook):
        def after_run(self, ctx, values):
            raise KeyboardInterrupt

    class ReasonNotAString(SessionRunHook):
        def after_run(self, ctx, values):
            ctx.request_stop(reason=object())

    class BadExitCode(SessionRunHook):
        def __init__(self, code=256):
            self.code = code

        def after_run(self, ctx, values):
            ctx.request_stop(exit_code=self.code)

    class DeadlineRaises(SessionRunHook):
        def deadline(self):
            raise RuntimeError("no deadline today")

    class DeadlineIsAString(SessionRunHook):
        def deadline(self):
            return "soon"

    class Sleeps(SessionRunHook):
        '''Sleeps in after_run from step 2 on; marks when it starts and whether it came back.'''
        def __init__(self, marker, seconds=300):
            self.marker, self.seconds = marker, seconds

        def before_run(self, ctx):
            return SessionRunArgs("global_step")

        def after_run(self, ctx, values):
            if values.results >= 2:
                open(self.marker + ".sleeping", "w").close()
                time.sleep(self.seconds)
                open(self.marker + ".done", "w").close()

    class SleepsInEnd(SessionRunHook):
        def end(self, session):
            time.sleep(300)

    class SwallowsEverything(SessionRunHook):
        def after_run(self, ctx, values):
            while True:
                try:
                    time.sleep(1000)
                except BaseException:
                    pass

    class SwallowsInEnd(SwallowsEverything):
        def after_run(self, ctx, values):
            pass

        def end(self, session):
            SwallowsEverything.after_run(self, None, None)

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no words")

    class RaisesUnprintable(SessionRunHook):
        def after_run(self, ctx, values):
            raise Unprintable()

    class DeadlineUnprintable(SessionRunHook):
        def deadline(self):
            class Odd:
                def __repr__(self):
                    raise RuntimeError("no repr")
            return Odd()

    class FetchesACycle(SessionRunHook):
        def before_run(self, ctx):
            a = []
            a.append(a)
            return SessionRunArgs(a)

    class FetchesRaise(SessionRunHook):
        def before_run(self, ctx):
            class Args:
                @property
                def fetches(self):
                    raise ValueError("no fetches")
            return Args()

    class MessageThatCannotBeFormatted(SessionRunHook):
        def after_run(self, ctx, values):
            class Odd(str):
                def __format__(self, spec):
                    raise RuntimeError("no format")
                def __str__(self):
                    raise RuntimeError("no str")
            ctx.request_stop(reason=Odd("odd"), message=Odd("odd message"))

    class SignalReason(SessionRunHook):
        def after_run(self, ctx, values):
            ctx.request_stop(reason="signal")

    class RunsSubprocesses(SessionRunHook):
        # A hook with processes of its own: their statuses are its own, and they are not the tree.
        def after_create_session(self, session, coord):
            import subprocess
            self.helper = subprocess.Popen(["sleep", "300"])

        def after_run(self, ctx, values):
            import subprocess
            status = subprocess.run(["sh", "-c", "exit 3"]).returncode
            if status != 3:
                raise RuntimeError(f"my subprocess exited {status}, not 3")

        def end(self, session):
            if self.helper.poll() is not None:
                raise RuntimeError(f"my helper was ended: {self.helper.returncode}")
            self.helper.kill()
            self.helper.wait()

    class ExitCodeThatLies(SessionRunHook):
        def after_run(self, ctx, values):
            class Lies(int):
                def __int__(self):
                    return 300
            ctx.request_stop(exit_code=Lies(7))

    class DeadlineTooBigForAFloat(SessionRunHook):
        def deadline(self):
            return 10 ** 400

    class HandlerThatRaises(SessionRunHook):
        # a library's "save on SIGTERM" handler that goes wrong: it runs wherever stopstep's loop is
        def begin(self):
            import signal
            def handler(signum, frame):
                raise RuntimeError(f"handler for {signum} failed")
            signal.signal(signal.SIGTERM, handler)

    class HelperInItsOwnSession(SessionRunHook):
        # a helper of the hook's (a metrics uploader), in a session of its own: not the command's
        def after_create_session(self, session, coord):
            import subprocess
            self.helper = subprocess.Popen(["sh", "-c", "sleep 1; exit 6"], start_new_session=True)

        def end(self, session):
            status = self.helper.wait()
            if status != 6:
                raise RuntimeError(f"my helper's status is {status}, not 6")

    class Forks(SessionRunHook):
        # a hook that forks without exec (multiprocessing's fork start method)
        def after_create_session(self, session, coord):
            if os.fork() == 0:
                time.sleep(300)  # longer than the test waits
                os._exit(0)

    class SlowBegin(SessionRunHook):
        def __init__(self, marker):
            self.marker = marker

        def begin(self):
            open(self.marker, "w").close()
            time.sleep(300)
""")


@pytest.fixture
def hooks(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_HOOKS)
    return f"{path}:"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- hooks contained ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook,says", [
    ("ExitsInAfterRun", "hook ExitsInAfterRun.after_run raised SystemExit: 7"),
    ("InterruptsInAfterRun", "hook InterruptsInAfterRun.after_run raised KeyboardInterrupt"),
    ("ReasonNotAString", "request_stop(reason=...) must be a string, not object"),
    ("BadExitCode", "request_stop(exit_code=256) is not an exit status (0 to 255)"),
    ("DeadlineRaises", "hook DeadlineRaises.deadline raised RuntimeError: no deadline today"),
    ("DeadlineIsAString", "deadline() returned 'soon', not a time.monotonic() time or None"),
    ("RaisesUnprintable", "hook RaisesUnprintable.after_run raised Unprintable: <Unprintable that cannot be shown>"),
    ("DeadlineUnprintable", "deadline() returned <Odd that cannot be shown>"),
    ("FetchesACycle", "hook FetchesACycle.before_run raised RecursionError"),
    ("FetchesRaise", "hook FetchesRaise.before_run raised ValueError: no fetches"),
    ("SignalReason", "request_stop(reason='signal') is a reason only stopstep itself gives"),
    ("DeadlineTooBigForAFloat", "deadline() returned 1000000"),
])
def test_a_hook_that_escapes_or_breaks_the_contract_fails_the_run_cleanly(tmp_path, pidfile, hooks, hook, says):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook", hooks + hook, "--",
                                     *trainer("--rate", "50", "--workers", "2", "--setsid-grandchild",
                                              "--pidfile", pidfile))
    err = result.stderr.decode()
    assert result.returncode == 5, err
    assert report["reason"] == "hook_error" and report["exit_code"] == 5
    assert says in err
    assert "stopstep: error" not in err  # the hook's failure, reported; not stopstep's own crash
    assert_all_gone(read_pids(pidfile))


def test_an_exit_code_that_is_not_a_number_fails_the_hook(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook", hooks + "BadExitCode",
                                     "--hook-arg", "code=seven", "--", *trainer("--rate", "50"))
    assert result.returncode == 5 and report["reason"] == "hook_error"
    assert b"request_stop(exit_code=...) must be an int, not str" in result.stderr


def test_a_hook_that_does_not_return_is_interrupted_at_the_hook_timeout(tmp_path, pidfile, hooks):
    marker = tmp_path / "hook"
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook-timeout", "1",
                                     "--hook", hooks + "Sleeps", "--hook-arg", f"marker={marker}", "--",
                                     *trainer("--rate", "50", "--workers", "2", "--pidfile", pidfile))
    err = result.stderr.decode()
    assert result.returncode == 5, err
    assert "hook Sleeps.after_run did not return within 1s (--hook-timeout 1)" in err
    assert report["reason"] == "hook_error"
    assert (tmp_path / "hook.sleeping").exists() and not (tmp_path / "hook.done").exists()
    assert_all_gone(read_pids(pidfile))


def test_an_exit_code_whose_int_lies_is_taken_for_what_it_is(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook", hooks + "ExitCodeThatLies",
                                     "--", *trainer("--rate", "50"))
    assert result.returncode == 7 and report["exit_code"] == 7, result.stderr.decode()
    assert result.stderr.decode().rstrip().endswith("exit 7")


def test_a_signal_handler_of_a_hook_that_raises_still_brings_the_tree_down(tmp_path, pidfile, hooks):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100000", "--report", report_path, "--hook",
                          hooks + "HandlerThatRaises", "--", *trainer("--rate", "20", "--workers", "2",
                                                                      "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err.decode()  # the SIGTERM it received still decides the status
    assert b"RuntimeError: handler for 15 failed (raised outside any hook call" in err
    assert b"Traceback" not in err  # one line; the traceback is for -v
    report = json.loads(report_path.read_text())
    assert report["reason"] == "internal_error" and report["received_signal"] == "SIGTERM"
    assert_all_gone(read_pids(pidfile))


def test_a_hooks_helper_in_its_own_session_is_neither_signalled_nor_reaped(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "10", "--grace-period", "5",
                                     "--hook", hooks + "HelperInItsOwnSession", "--", *trainer("--rate", "50"))
    err = result.stderr.decode()
    assert result.returncode == 0, err  # end() saw its helper's own status, 6
    assert "outlived the command" not in err and report["killed"] is False


def test_a_message_that_cannot_be_formatted_is_taken_as_text(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook",
                                     hooks + "MessageThatCannotBeFormatted", "--", *trainer("--rate", "50"))
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "odd" and b"odd message" in result.stderr


def test_a_hooks_own_processes_are_its_own(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "30", "--grace-period", "5",
                                     "--hook", hooks + "RunsSubprocesses", "--", *trainer("--rate", "50"))
    assert result.returncode == 0, result.stderr.decode()  # every status 3 seen as 3; the helper untouched
    assert report["killed"] is False and b"outlived the command" not in result.stderr


def test_an_end_that_swallows_the_interruption_fails_the_run(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "3", "--hook-timeout", "1",
                                     "--hook", hooks + "SwallowsInEnd", "--", *trainer("--rate", "50"))
    assert result.returncode == 5 and report["reason"] == "hook_error"


def test_sigterm_while_a_hook_holds_the_start_ends_the_run_soon(tmp_path, hooks):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "3", "--report", report_path, "--hook", hooks + "SlowBegin",
                          "--hook-arg", f"marker={tmp_path / 'begun'}", "--", *trainer("--rate", "50"))
    wait_for_file(tmp_path / "begun")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)  # the hook would hold it 60 s (its timeout); the signal cuts that to 3
    assert proc.returncode == 143
    assert json.loads(report_path.read_text())["received_signal"] == "SIGTERM"


def test_a_hook_that_sleeps_in_end_is_interrupted(tmp_path, hooks):
    result, report = run_with_report(tmp_path, "--last-step", "3", "--hook-timeout", "1",
                                     "--hook", hooks + "SleepsInEnd", "--", *trainer("--rate", "50"))
    assert result.returncode == 5 and report["reason"] == "hook_error"
    assert b"hook SleepsInEnd.end did not return within 1s" in result.stderr


def test_a_hook_that_swallows_the_interruption_is_left_behind(tmp_path, pidfile, hooks):
    # The main thread never comes back: once the tree is down, stopstep ends without it.
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--hook-timeout", "1",
                                     "--grace-period", "1", "--hook", hooks + "SwallowsEverything", "--",
                                     *trainer("--rate", "50", "--workers", "2", "--pidfile", pidfile))
    assert result.returncode == 5, result.stderr.decode()
    assert report["reason"] == "hook_error"
    err = result.stderr.decode()
    # it says which hook, after how long, and where it is stuck
    assert "hook SwallowsEverything.after_run did not return within 1s and did not come back" in err
    assert "--hook-timeout 1" in err and "time.sleep(1000)" in err
    # the report says what was done: the stop signal went out, the command's status, the attempt
    assert report["stop_signal"] == "SIGINT" and report["child_returncode"] is not None
    assert len(report["attempts"]) == 1
    assert_all_gone(read_pids(pidfile))


# -- nothing holds the stop up ------------------------------------------------------------------------


def test_a_signal_is_passed_on_while_a_hook_sleeps(tmp_path, pidfile, hooks):
    marker, stamps = tmp_path / "hook", tmp_path / "stamps"
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100000", "--report", report_path,
                          "--hook", hooks + "Sleeps", "--hook-arg", f"marker={marker}", "--",
                          *trainer("--rate", "50", "--stampfile", stamps, "--pidfile", pidfile))
    wait_for_file(tmp_path / "hook.sleeping")
    proc.send_signal(signal.SIGTERM)
    wait_for_file(stamps, "signal 15")  # the command has it...
    assert not (tmp_path / "hook.done").exists()  # ...while the hook still sleeps
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    report = json.loads(report_path.read_text())
    assert report["received_signal"] == "SIGTERM" and report["reason"] == "signal"
    assert_all_gone(read_pids(pidfile))


def test_the_grace_periods_sigkill_comes_while_a_hook_sleeps(tmp_path, pidfile, hooks):
    marker = tmp_path / "hook"
    proc = start_stopstep("run", "--last-step", "100000", "--grace-period", "1",
                          "--hook", hooks + "Sleeps", "--hook-arg", f"marker={marker}", "--",
                          *trainer("--rate", "50", "--ignore", "INT,TERM", "--workers", "2",
                                   "--workers-ignore-int", "--pidfile", pidfile))
    wait_for_file(tmp_path / "hook.sleeping")
    proc.send_signal(signal.SIGTERM)
    pids = read_pids(pidfile)
    wait_until(lambda: all(gone(pid) for pid in pids), "the tree killed")
    assert not (tmp_path / "hook.done").exists()
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert b"grace period of 1s over; killed 1 process(es) with SIGKILL" in err  # its workers obeyed SIGTERM


def _blocked_writing(pid: int) -> bool:
    """Is the main thread of ``pid`` inside write(2)?"""
    number = {"x86_64": 1, "aarch64": 64}.get(platform.machine())
    try:
        with open(f"/proc/{pid}/task/{pid}/syscall") as fh:
            return fh.read().split()[0] == str(number)
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="reads the syscall number")
def test_a_signal_is_passed_on_while_the_reader_of_stdout_stalls(tmp_path, pidfile):
    stamps = tmp_path / "stamps"
    line = "x" * 100_000 + " step {step}"
    proc = start_stopstep("run", "--last-step", "100000", "--grace-period", "5", "--",
                          *trainer("--rate", "0", "--format", line, "--stampfile", stamps, "--pidfile", pidfile))
    # Nobody reads stopstep's stdout: the pipes fill and stopstep blocks in write().
    wait_until(lambda: _blocked_writing(proc.pid), "stopstep blocked in write()")
    proc.send_signal(signal.SIGTERM)
    wait_for_file(stamps, "signal 15")  # passed on without anyone reading
    proc.stdout.close()  # (the reader goes; stopstep must end either way)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert_all_gone(read_pids(pidfile))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="reads the syscall number")
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_reader_that_stops_reading_cannot_hold_the_end(tmp_path, stream):
    # Nobody reads stopstep's stdout (or stderr): once the tree is down, what is left to write,
    # stopstep's own messages and a --report to that same stream give up in bounded time.
    report = "/dev/fd/1" if stream == "stdout" else tmp_path / "r.json"
    code = ("import sys, time\nfor i in range(1, 4000):\n"
            f"    print('x' * 500 + f' step {{i}}', file=sys.{stream}, flush=True)\ntime.sleep(600)\n")
    proc = start_stopstep("run", "--last-step", "100000", "--grace-period", "1", "--report", report, "--",
                          sys.executable, "-c", code)
    stuck = proc.stdout if stream == "stdout" else proc.stderr
    other = proc.stderr if stream == "stdout" else proc.stdout
    wait_until(lambda: _blocked_writing(proc.pid), "stopstep blocked in write()")
    proc.send_signal(signal.SIGTERM)
    other.read()  # the other stream is read to its end, which comes when stopstep exits
    proc.wait(timeout=TIMEOUT)
    stuck.close()
    assert proc.returncode == 143


def test_a_leftover_that_floods_output_after_the_command_exited_cannot_hold_stopstep():
    mark = f"flood-{os.getpid()}-{time.monotonic_ns()}"  # only this test's process carries it
    script = f"(trap '' INT; exec yes {mark}) & echo step 1; exit 0"
    result = run_stopstep("run", "-q", "--last-step", "1000", "--grace-period", "1", "--", "sh", "-c", script)
    assert result.returncode == 0
    left = [p for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def test_a_helper_outside_the_group_that_keeps_respawning_is_swept(tmp_path):
    pids = tmp_path / "pids"
    helper = textwrap.dedent(f"""
        import os, signal, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()  # leaves the command's group
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:  # keeps forking children that leave its session too
                pid = os.fork()
                if pid == 0:
                    os.setsid()
                    time.sleep(1000)
                    os._exit(0)
                with open({str(pids)!r}, "a") as fh:
                    fh.write(f"{{pid}}\\n")
                time.sleep(0.002)
        print("step 1", flush=True)
        time.sleep(1000)
    """)
    result = run_stopstep("run", "--last-step", "1", "--grace-period", "0.5", "--", sys.executable, "-c", helper)
    assert result.returncode == 137, result.stderr.decode()
    assert_all_gone_pids = [int(p) for p in pids.read_text().split()]
    assert all(gone(pid) for pid in assert_all_gone_pids)


def test_a_process_that_keeps_changing_its_pid_is_still_found(tmp_path):
    # A helper that forks and exits every 2 ms: at any moment its one live process is new.
    log = tmp_path / "hops"
    hopper = textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            for _ in range(20000):
                if os.fork():
                    os._exit(0)
                with open({str(log)!r}, "a") as fh:
                    fh.write(str(os.getpid()) + "\\n")
                time.sleep(0.002)
            os._exit(0)
        print("step 1", flush=True)
    """)
    result = run_stopstep("run", "--last-step", "1000", "--grace-period", "1", "--", sys.executable, "-c", hopper)
    assert result.returncode == 0, result.stderr.decode()
    assert b"outlived the command" in result.stderr
    hops = log.read_text().split()
    assert len(hops) < 5000, "still hopping long after stopstep ended"
    assert all(gone(int(pid)) for pid in hops[-3:])


def test_sigcont_follows_the_stop_signal_so_a_stopped_command_can_act_on_it(tmp_path, pidfile):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100000", "--grace-period", "30", "--report", report_path, "--",
                          *trainer("--rate", "50", "--pidfile", pidfile))
    wait_for_output(proc.stdout, b"step 2 ")
    command = psutil.Process(read_pids(pidfile)[0])
    command.suspend()
    wait_until(lambda: command.status() == psutil.STATUS_STOPPED, "the command stopped")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=TIMEOUT)
    report = json.loads(report_path.read_text())
    assert proc.returncode == 143
    assert report["killed"] is False and report["child_returncode"] == 143  # it stopped cleanly, not by SIGKILL
    assert b"trainer: stopped cleanly" in err


def test_output_written_just_before_the_exit_is_all_passed_on():
    code = "import sys; sys.stdout.write('x' * 3_000_000 + '\\nstep 5\\n'); sys.stdout.flush()"
    result = run_stopstep("run", "-q", "--require-target", "--last-step", "5", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert result.stdout == b"x" * 3_000_000 + b"\nstep 5\n"


# -- outcomes that are true ----------------------------------------------------------------------------


def test_sigterm_while_the_tree_is_stopped_for_the_target_gives_143(tmp_path):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "3", "--report", report_path, "--",
                          *trainer("--rate", "50", "--shutdown-delay", "2"))
    wait_for_output(proc.stderr, b"trainer: received signal 2")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    report = json.loads(report_path.read_text())
    assert proc.returncode == 143
    assert report["received_signal"] == "SIGTERM" and report["reason"] == "target_reached"


def test_sigterm_before_the_command_starts_still_writes_the_report(tmp_path, hooks):
    # A hook's begin() holds the start; stopstep already listens for signals.
    path = tmp_path / "slow_begin.py"
    path.write_text("import time\nfrom stopstep_cli import SessionRunHook\n"
                    "class SlowBegin(SessionRunHook):\n    def begin(self):\n"
                    f"        open({str(tmp_path / 'begun')!r}, 'w').close()\n        time.sleep(3)\n")
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "3", "--report", report_path, "--hook", f"{path}:SlowBegin",
                          "--", *trainer("--rate", "50", "--pidfile", tmp_path / "pids"))
    wait_for_file(tmp_path / "begun")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    report = json.loads(report_path.read_text())
    assert report["reason"] == "signal" and report["pid"] is None
    assert not (tmp_path / "pids").exists()  # the command never started


def _catches(pid: int, signum: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(line for line in fh if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) & (1 << (signum - 1)))


def test_sigterm_in_the_first_milliseconds_writes_the_report(tmp_path):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "3", "--report", report_path, "--", *trainer("--rate", "50"))
    wait_until(lambda: _catches(proc.pid, signal.SIGTERM), "stopstep catching SIGTERM", timeout=TIMEOUT)
    proc.send_signal(signal.SIGTERM)  # as early as stopstep can take it
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert json.loads(report_path.read_text())["received_signal"] == "SIGTERM"


@pytest.mark.parametrize("dies,status", [("os.kill(os.getpid(), 9)", 137), ("sys.exit(0)", 1)])
def test_a_command_that_exits_while_stopstep_waits_for_the_checkpoint_is_no_success(tmp_path, dies, status):
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, sys, time
        print("step 5", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        {dies}
    """)
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "3", "--checkpoint-dir", tmp_path / "ckpt", "--stop-after-checkpoint",
                          "--report", report_path, "--", sys.executable, "-c", code)
    wait_for_output(proc.stderr, b"waiting up to 30s for a complete checkpoint")
    go.touch()
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == status, err.decode()
    report = json.loads(report_path.read_text())
    assert report["reason"] == "checkpoint_missing" and report["last_checkpoint_step"] is None
    assert report["stop_mode"] is None and report["stop_signal"] is None  # it exited by itself
    assert b"the command exited before a complete checkpoint at or past step 3 came" in err


def test_the_time_limit_holds_while_waiting_for_the_checkpoint(tmp_path):
    # the trainer trains on and never saves: the time limit, not the 60 s wait, ends it
    result, report = run_with_report(tmp_path, "--last-step", "5", "--time-limit", "2", "--grace-period", "60",
                                     "--checkpoint-dir", tmp_path, "--stop-after-checkpoint",
                                     "--", *trainer("--rate", "20"), timeout=50)
    assert result.returncode == 124, result.stderr.decode()
    assert report["reason"] == "time_limit"
    assert b"while waiting for the checkpoint" in result.stderr


def test_a_signal_while_the_report_is_written_still_gives_128_plus_n(tmp_path):
    fifo = tmp_path / "report"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that opened it and never reads
    try:
        big = "x" * 100_000  # in the report's command: more than the pipe holds
        proc = start_stopstep("run", "--last-step", "2", "--report", fifo, "--",
                              sys.executable, "-c", "print('step 2')", big)
        wait_for_output(proc.stderr, b"reached step 2")  # the summary comes just before the report
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(reader)
    assert proc.returncode == 143, err.decode()


def test_a_stall_clock_rests_in_the_restart_delay(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--stall-timeout", "1", "--restart-delay", "2",
                                     "--max-restarts", "1", "--", "sh", "-c", "echo step 1; exit 1")
    assert result.returncode == 1  # both attempts crashed; no stall in the 2 s between them
    assert report["reason"] == "process_exited" and len(report["attempts"]) == 2


def test_a_command_that_cannot_start_still_writes_the_report(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "3", "--", "no-such-command-xyz")
    assert result.returncode == 127
    assert report["reason"] == "launch_failed" and report["exit_code"] == 127 and report["pid"] is None


def test_the_commands_own_status_3_is_not_taken_for_require_target(tmp_path):
    result = run_stopstep("run", "--last-step", "100", "--", "sh", "-c", "echo step 1; exit 3")
    assert result.returncode == 3
    assert b"--require-target" not in result.stderr


def test_the_time_limit_holds_in_the_restart_delay(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--time-limit", "2", "--restart-delay", "60",
                                     "--max-restarts", "2", "--", "sh", "-c", "echo step 1; exit 3")
    assert result.returncode == 124
    assert report["reason"] == "time_limit" and len(report["attempts"]) == 1  # not started again first


# -- a good citizen -----------------------------------------------------------------------------------------


def test_the_python_api_leaves_its_host_as_it_found_it(tmp_path):
    code = textwrap.dedent(f"""
        import ctypes, gc, signal, subprocess, sys
        from stopstep_cli import Supervisor, StopAtStepHook
        libc = ctypes.CDLL(None)
        watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGCONT)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2, signal.SIGTERM])
        before = [signal.getsignal(s) for s in watched] + [signal.pthread_sigmask(signal.SIG_BLOCK, [])]
        other = subprocess.Popen(["sh", "-c", "sleep 0.5; exit 7"])
        report = Supervisor([sys.executable, {str(FAKE_TRAINER)!r}, "--rate", "20"],
                            target=StopAtStepHook(last_step=15)).run()
        assert report.reason == "target_reached", report
        flag = ctypes.c_int(-1)
        libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        after = [signal.getsignal(s) for s in watched] + [signal.pthread_sigmask(signal.SIG_BLOCK, [])]
        print("other", other.wait(), "subreaper", flag.value, "restored", before == after, "frozen",
              gc.get_freeze_count())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, env=_env(None))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[-8:] == ["other", "7", "subreaper", "0", "restored", "True", "frozen", "0"]


def test_the_python_api_from_another_thread_survives_a_hook_timeout():
    code = textwrap.dedent(f"""
        import sys, threading, time
        from stopstep_cli import Supervisor, StopAtStepHook, SessionRunHook
        class Slow(SessionRunHook):
            def after_run(self, ctx, values):
                time.sleep(3)
        out = []
        def supervise():
            out.append(Supervisor([sys.executable, {str(FAKE_TRAINER)!r}, "--rate", "20"],
                                  target=StopAtStepHook(last_step=1000), hooks=[Slow()], hook_timeout=1).run())
        worker = threading.Thread(target=supervise)
        worker.start()
        worker.join()
        print("exit", out[0].exit_code, out[0].reason)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, env=_env(None))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split()[-3:] == [b"exit", b"5", b"hook_error"]


def test_an_inherited_ignored_sighup_stays_ignored(tmp_path):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "100000", "--report", report_path, "--", *trainer("--rate", "50"),
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGHUP)
    wait_for_output(proc.stdout, b"step 20 ")  # the training goes on
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143
    assert json.loads(report_path.read_text())["received_signal"] == "SIGTERM"


def test_the_report_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "reports" / "run.json"
    real.parent.mkdir()
    real.write_text("{}")
    real.chmod(0o600)
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    result = run_stopstep("run", "--last-step", "2", "--report", link, "--", *trainer("--rate", "50"))
    assert result.returncode == 0
    assert link.is_symlink() and json.loads(real.read_text())["reason"] == "target_reached"
    assert real.stat().st_mode & 0o777 == 0o600  # the file it replaced kept its mode


def test_the_report_to_a_descriptor_is_written_in_place(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "wb") as fh:
        result = subprocess.run(STOPSTEP + ["run", "-q", "--last-step", "2", "--report", "/dev/fd/1", "--",
                                            *trainer("--rate", "50")], stdout=fh, stderr=subprocess.PIPE,
                                timeout=TIMEOUT, env=_env(None))
    assert result.returncode == 0
    text = out.read_text()
    assert text.startswith("step 1 loss 1.0000\nstep 2 loss 0.5000\n")  # the command's output is kept
    assert json.loads(text[text.index("{"):])["reason"] == "target_reached"


@pytest.mark.parametrize("hook", [None, "Forks"])
def test_kill_9_of_stopstep_brings_a_shell_wrapped_command_down(tmp_path, pidfile, hooks, hook):
    # with a hook that forked, its copy of stopstep must not keep the guardian waiting
    log = tmp_path / "train.log"
    inner = " ".join(trainer("--rate", "20", "--steps", "1000000", "--pidfile", pidfile))
    with_hook = ["--hook", hooks + hook] if hook else []
    proc = start_stopstep("run", "--last-step", "100000", "--grace-period", "2", *with_hook, "--",
                          "bash", "-c", f"{inner} > {log}; echo done")
    wait_for_file(pidfile)
    wait_for_file(log, "step 2 ")
    proc.kill()  # the OOM killer
    proc.wait(timeout=TIMEOUT)
    try:
        assert_all_gone(read_pids(pidfile), timeout=TIMEOUT)
    finally:
        # The hook's own fork is the hook's, not the tree's: it outlives stopstep by design. The test ends it.
        for leftover in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(leftover.info["cmdline"] or []) and leftover.pid != os.getpid():
                try:
                    leftover.kill()
                except psutil.NoSuchProcess:
                    pass
