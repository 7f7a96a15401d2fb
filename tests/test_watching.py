"""Step sources that cannot be fooled: symlinks, directories made again, inotify
used up, FIFOs, no /proc, checkpoints of an earlier run, values that cannot work.
Real processes through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import (
    STOPSTEP,
    TIMEOUT,
    _env,
    run_stopstep,
    run_with_report,
    start_stopstep,
    trainer,
    wait_for_output,
)

QUIET = ("--format", "training...")  # the trainer prints no step: the files are the only source


def _can(argv) -> bool:
    if not shutil.which(argv[0]):
        return False
    return subprocess.run(argv + ["true"], capture_output=True).returncode == 0


needs_userns = pytest.mark.skipif(not _can(["unshare", "--user", "--map-root-user"]),
                                  reason="needs unprivileged user namespaces (unshare --user)")
needs_mount_ns = pytest.mark.skipif(not _can(["unshare", "--mount"]), reason="needs unshare --mount (root)")


# -- links and directories made again ------------------------------------------------------------------


def test_a_symlinked_checkpoint_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    link = tmp_path / "link"
    result, report = run_with_report(tmp_path, "--last-step", "20", "--checkpoint-dir", link, "--layout", "hf", "--",
                                     *trainer("--rate", "50", *QUIET, "--checkpoint-dir", link, "--layout", "hf",
                                              "--save-every", "10"))
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_checkpoint_step"] == 20


def test_a_log_file_in_a_symlinked_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "logs").symlink_to(tmp_path / "real")
    log = tmp_path / "logs" / "train.log"
    result, report = run_with_report(tmp_path, "--last-step", "20", "--log-file", log, "--",
                                     *trainer("--rate", "50", "--steps", "40", "--log-file", log))
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and 20 <= report["last_step_seen"] < 40
    assert b"trainer: stopped cleanly" in result.stderr  # stopped, not run to its end


def test_a_link_pointed_elsewhere_while_running(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "a")
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        os.symlink({str(tmp_path / "b")!r}, {str(tmp_path / "tmp-link")!r})
        os.replace({str(tmp_path / "tmp-link")!r}, {str(link)!r})  # re-pointed, atomically
        sys.exit(subprocess.call({trainer("--rate", "50", *QUIET, "--checkpoint-dir", tmp_path / "b",
                                          "--layout", "hf", "--save-every", "10")!r}))
    """)
    result, report = run_with_report(tmp_path, "--last-step", "20", "--checkpoint-dir", link, "--layout", "hf",
                                     "--", sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_checkpoint_step"] == 20


@pytest.mark.parametrize("how", ["rm -rf out && mkdir out", "mv out gone && mkdir out", "rm -rf out"])
def test_an_output_directory_made_again_at_start(tmp_path, how):
    out = tmp_path / "out"
    out.mkdir()
    command = " ".join(trainer("--rate", "50", *QUIET, "--checkpoint-dir", out, "--layout", "hf", "--save-every", "10"))
    result, report = run_with_report(tmp_path, "--last-step", "20", "--checkpoint-dir", out, "--layout", "hf", "--",
                                     "sh", "-c", f"cd {tmp_path} && {how} && {command}")
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_checkpoint_step"] == 20


def test_a_log_directory_made_again(tmp_path):
    log = tmp_path / "logs" / "train.log"
    log.parent.mkdir()
    command = " ".join(trainer("--rate", "50", "--steps", "40", "--log-file", log))
    result, report = run_with_report(tmp_path, "--last-step", "20", "--log-file", log, "--",
                                     "sh", "-c", f"rm -rf {log.parent} && {command}")
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_step_seen"] < 40


def test_a_directory_that_never_appears_is_said(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    result = run_stopstep("run", "--last-step", "3", "--checkpoint-dir", missing, "--", *trainer("--rate", "50"))
    err = result.stderr.decode()
    assert result.returncode == 0
    assert f"--checkpoint-dir {missing} does not exist yet; watching for it" in err
    assert f"--checkpoint-dir {missing} never appeared" in err


# -- inotify that cannot be had -----------------------------------------------------------------------------

EXHAUST_THEN_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
limit = int(sys.argv[1])
with open("/proc/sys/user/max_inotify_" + sys.argv[2], "w") as fh:  # this user namespace's own limit
    fh.write(str(limit))
held = []
if sys.argv[2] == "instances":
    while True:  # use every instance up
        fd = libc.inotify_init1(0)
        if fd < 0:
            break
        held.append(fd)
else:
    fd = libc.inotify_init1(0)
    held.append(fd)
    for i in range(limit + 10):  # use every watch up
        path = "/tmp/stopstep-watch-" + str(os.getpid()) + "-" + str(i)
        os.makedirs(path, exist_ok=True)
        if libc.inotify_add_watch(fd, path.encode(), 0x100) < 0:
            break
os.execv(sys.argv[3], sys.argv[3:])
"""


@needs_userns
@pytest.mark.parametrize("what,limit", [("instances", 2), ("watches", 4)])
def test_inotify_used_up_falls_back_to_polling(tmp_path, what, limit):
    ckpt, report = tmp_path / "ckpt", tmp_path / "r.json"
    argv = ["unshare", "--user", "--map-root-user", sys.executable, "-c", EXHAUST_THEN_EXEC, str(limit), what,
            *STOPSTEP, "run", "--last-step", "20", "--checkpoint-dir", str(ckpt), "--layout", "hf",
            "--report", str(report), "--",
            *trainer("--rate", "10", *QUIET, "--checkpoint-dir", ckpt, "--layout", "hf", "--save-every", "10")]
    result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=_env(None))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "Traceback" not in err
    assert "polling" in err and "every 1s instead" in err  # said once
    assert err.count("instead (--poll sets the interval)") == 1
    outcome = json.loads(report.read_text())
    assert outcome["reason"] == "target_reached" and outcome["last_checkpoint_step"] in (20, 30)  # polled every 1 s


# -- files that are not regular files --------------------------------------------------------------------------


def test_a_fifo_without_a_writer_does_not_hold_the_launch(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    result = run_stopstep("run", "--last-step", "3", "--log-file", fifo, "--", *trainer("--rate", "50"))
    assert result.returncode == 0 and b"reached step 3" in result.stderr


def test_a_fifo_as_the_log_file(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    writer = f"for i in 1 2 3 4 5 6; do echo \"step $i\" > {fifo}; sleep 0.1; done; sleep 60"
    result, report = run_with_report(tmp_path, "--last-step", "3", "--log-file", fifo, "--", "sh", "-c", writer)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached"


def test_a_log_replaced_by_a_link_to_a_fifo_does_not_freeze_the_loop(tmp_path):
    log, fifo = tmp_path / "train.log", tmp_path / "log.fifo"
    os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        import os, sys, time
        with open({str(log)!r}, "a") as fh:
            fh.write("step 1\\n")
        time.sleep(0.3)
        os.symlink({str(fifo)!r}, {str(tmp_path / "l")!r})
        os.replace({str(tmp_path / "l")!r}, {str(log)!r})  # the log is now a FIFO nobody writes
        for step in range(2, 1000):
            print(f"step {{step}}", flush=True)  # the loop must keep reading stdout
            time.sleep(0.02)
    """)
    result, report = run_with_report(tmp_path, "--last-step", "20", "--log-file", log, "--",
                                     sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached"


# -- without /proc ---------------------------------------------------------------------------------------------


@needs_mount_ns
def test_without_proc_one_warning_and_the_group_is_still_stopped(tmp_path):
    inner = " ".join([*STOPSTEP, "run", "--last-step", "5", "--", *trainer("--rate", "50", "--workers", "2")])
    result = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs none /proc && exec {inner}"],
                            capture_output=True, timeout=TIMEOUT, env=_env(None))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert err.count("no /proc here") == 1 and "Traceback" not in err
    assert "trainer: stopped cleanly at step 5" in err


# -- the start step is the command's -----------------------------------------------------------------------------


def _hf_checkpoint(root, step):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')


def test_a_stale_checkpoint_from_an_earlier_run_is_not_the_start(tmp_path):
    out = tmp_path / "out"
    _hf_checkpoint(out, 25)  # an earlier run's; this one starts fresh at 0
    result, report = run_with_report(tmp_path, "--num-steps", "10", "--checkpoint-dir", out, "--",
                                     *trainer("--rate", "50"))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert report["target_step"] == 10 and report["last_step_seen"] == 10 and report["start_step"] is None
    assert "the command's first step is 1, below the checkpoint at step 25: it started fresh" in err
    assert "target 10" in err


def test_a_run_resumed_from_an_older_checkpoint_counts_from_it(tmp_path):
    out = tmp_path / "out"
    for step in (100, 300):
        _hf_checkpoint(out, step)
    result, report = run_with_report(tmp_path, "--num-steps", "10", "--checkpoint-dir", out, "--",
                                     *trainer("--rate", "50", "--start", "100"))
    assert result.returncode == 0, result.stderr.decode()
    assert report["start_step"] == 100 and report["target_step"] == 110 and report["last_step_seen"] == 110


HF_RESUMED_BAR = textwrap.dedent("""
    import sys, time
    w = sys.stderr.write
    w("  0%|          | 0/1000 [00:00<?, ?it/s]"); sys.stderr.flush()  # drawn before any step
    time.sleep(0.5)  # skipping the batches already trained
    for step in range(501, 2000):
        w(f"\\r 50%|#####     | {step}/1000 [00:10<00:10, 20.00it/s]"); sys.stderr.flush()
        time.sleep(0.05)
""")


def test_a_resumed_progress_bar_starting_at_0_is_a_resume_and_its_rate_is_real(tmp_path):
    out = tmp_path / "out"
    _hf_checkpoint(out, 500)
    result, report = run_with_report(tmp_path, "--num-steps", "20", "--preset", "hf", "--checkpoint-dir", out,
                                     "--", sys.executable, "-c", HF_RESUMED_BAR)
    assert result.returncode == 0, result.stderr.decode()
    assert report["start_step"] == 500 and report["target_step"] == 520 and report["last_step_seen"] == 520
    assert report["steps_per_s"] < 40  # about 20 a second, not (520 - 0) / 1.5 s


# -- values that cannot work ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,says", [
    (["--grace-period", "nan"], "--grace-period"),
    (["--grace-period", "inf"], "--grace-period"),
    (["--grace-period", "1e300"], "--grace-period"),
    (["--poll", "nan", "--log-file", "x"], "--poll"),
    (["--poll", "inf", "--log-file", "x"], "--poll"),
    (["--status-interval", "nan"], "--status-interval"),
    (["--hook-timeout", "0"], "--hook-timeout"),
    (["--time-limit", "-1"], "--time-limit"),
    (["--stop-signal", "STOP"], "SIGSTOP cannot be the stop signal"),
    (["--stop-signal", "CONT"], "SIGCONT cannot be the stop signal"),
    (["--stop-signal", "KILL"], "SIGKILL cannot be the stop signal"),
    (["--report", ""], "--report needs a path"),
    (["--report", "--"], "looks like an option"),
    (["--pattern", r"(?P<loss>\d+)"], "step"),
    (["--nan-field", "nosuch", "--stop-on-nan"], "--stop-on-nan reads the named group 'nosuch'"),
    (["--stop-on-nan", "--preset", "hf"], "--stop-on-nan reads the named group 'loss'"),
    (["--log-file", "/dev/null"], "is not a regular file or a FIFO"),
    (["--max-restarts", "-1"], "--max-restarts"),
])
def test_values_that_cannot_work_are_refused(args, says):
    result = run_stopstep("run", "--last-step", "3", *args, "--", "true")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("stopstep: error: ") and says in err, err


def test_a_huge_target_is_refused_and_the_largest_is_taken():
    assert run_stopstep("run", "--last-step", "1" + "0" * 18, "--", "true").returncode == 2
    result = run_stopstep("run", "-q", "--last-step", "9" * 18, "--", "true")
    assert result.returncode == 0


def test_a_number_too_long_to_be_a_step_is_no_crash():
    code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(0))\n"
            "print('step ' + '9' * 5000, flush=True)\nprint('step 3', flush=True)\ntime.sleep(60)\n")
    result = run_stopstep("run", "--require-target", "--last-step", "3", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_several_steps_in_one_read_the_highest_counts(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100", "--require-target", "--",
                                     "printf", "[rank0]: step 100\\n[rank1]: step 99\\n")
    assert result.returncode == 0, result.stderr.decode()
    assert report["last_step_seen"] == 100


def test_a_last_line_without_a_newline_counts():
    result = run_stopstep("run", "--last-step", "100", "--require-target", "--", "printf", "step 99\\nstep 100")
    assert result.returncode == 0, result.stderr.decode()


def test_a_line_whose_newline_comes_late_is_scanned_in_linear_time():
    # "step 1 loss" + 60,000 spaces + "n/a", then the newline in a write of its own, as print() does.
    code = ("import sys, time\nsys.stdout.write('step 1 loss' + ' ' * 60000 + 'n/a'); sys.stdout.flush()\n"
            "time.sleep(0.2)\nsys.stdout.write('\\n'); sys.stdout.flush()\nprint('step 2', flush=True)\n"
            "time.sleep(60)\n")
    proc = start_stopstep("run", "--last-step", "2", "--", sys.executable, "-c", code)
    wait_for_output(proc.stdout, b"step 2", timeout=30)  # passed on without waiting for the scan
    proc.communicate(timeout=30)
    assert proc.returncode == 0
