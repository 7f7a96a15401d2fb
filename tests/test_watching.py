"""Step sources that cannot be fooled: symlinks, directories made again, inotify
used up, FIFOs, no /proc, checkpoints of an earlier run, values that cannot work.
Real processes through the real CLI."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time

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
    (["--log-file", "--"], "--log-file '--' looks like an option"),
    (["--checkpoint-dir", "-"], "--checkpoint-dir '-' looks like an option"),
    (["--pattern", r"(?P<loss>\d+)"], "step"),
    (["--nan-field", "nosuch", "--stop-on-nan"], "--stop-on-nan reads the value 'nosuch'"),
    (["--nan-field", "step", "--stop-on-nan"], "--stop-on-nan reads the value 'step'"),
    (["--no-cooperative", "--stop-on-nan", "--preset", "hf"], "--stop-on-nan reads the value 'loss'"),
    (["--nan-field", "loss"], "--nan-field needs --stop-on-nan"),
    (["--poll", "1e-9", "--log-file", "x"], "--poll"),
    (["--status-interval", "1e-9"], "--status-interval"),
    (["--log-file", ""], "--log-file needs a path"),
    (["--checkpoint-dir", ""], "--checkpoint-dir needs a path"),
    (["--report", "nosuchdir/"], "names a directory"),
    (["--pattern", "\udcffstep (\\d+)"], "is not valid UTF-8"),
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


@pytest.mark.parametrize("behind", [1, 64, 1000])
def test_several_steps_in_one_read_the_highest_counts(tmp_path, behind):
    # rank 0's step 100, then the other ranks' step 99, in one write
    lines = "[rank0]: step 100\\n" + "".join(f"[rank{k % 7 + 1}]: step 99\\n" for k in range(behind))
    result, report = run_with_report(tmp_path, "--last-step", "100", "--require-target", "--", "printf", lines)
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


# -- what an outside tester found: every one a test ---------------------------------------------------------


def test_a_checkpoint_pattern_with_a_directory_in_it_is_followed_while_running(tmp_path):
    ckpt = tmp_path / "ck"
    (ckpt / "sub").mkdir(parents=True)
    writer = f"for i in 1 2 3 4 5 6 7 8; do head -c 100 /dev/zero > {ckpt}/sub/model_$i.bin; sleep 0.5; done"
    result, report = run_with_report(tmp_path, "--last-step", "3", "--checkpoint-dir", ckpt, "--checkpoint-pattern",
                                     r"sub/model_(?P<step>\d+)\.bin", "--", "sh", "-c", writer)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_checkpoint_step"] in (3, 4)  # not 8, at the end


def test_a_step_line_followed_by_many_lines_holding_an_anchor_is_read():
    code = ("import sys, time\n"
            "sys.stdout.write('step 100 loss 0.5\\n' + ''.join(f'  layer {i}: parameters frozen\\n' for i in range(200)))\n"
            "sys.stdout.flush()\ntime.sleep(60)\n")
    result = run_stopstep("run", "--last-step", "100", "--", sys.executable, "-c", code)
    assert result.returncode == 0 and b"step 100 reached (target 100)" in result.stderr


def test_a_colour_code_inside_a_patterns_words():
    colour = 'for i in 1 2 3 4 5 6 7 8; do printf "\\033[1mStep\\033[0m %d\\n" $i; sleep .1; done; sleep 60'
    result = run_stopstep("run", "--last-step", "5", "--pattern", r"Step (?P<step>\d+)", "--", "sh", "-c", colour)
    assert result.returncode == 0 and b"step 5 reached (target 5)" in result.stderr


def test_an_old_log_read_from_the_start_is_not_the_commands_first_step(tmp_path):
    ckpt, log = tmp_path / "ck", tmp_path / "train.log"
    _hf_checkpoint(ckpt, 500)
    log.write_text("".join(f"step {i}\n" for i in range(1, 501)))  # the earlier run's lines
    result, report = run_with_report(tmp_path, "--num-steps", "10", "--log-file", log, "--log-file-from-start",
                                     "--checkpoint-dir", ckpt, "--",
                                     *trainer("--rate", "50", "--start", "500", "--log-file", log))
    assert result.returncode == 0, result.stderr.decode()
    assert report["start_step"] == 500 and report["target_step"] == 510 and report["last_step_seen"] == 510


def test_a_command_that_wipes_its_checkpoints_and_starts_over_is_seen_as_fresh(tmp_path):
    ckpt = tmp_path / "ck"
    subprocess.run(trainer("--steps", "5", "--rate", "0", *QUIET, "--checkpoint-dir", ckpt, "--layout", "lightning",
                           "--save-every", "1"), check=True, capture_output=True)
    again = " ".join(trainer("--rate", "5", *QUIET, "--checkpoint-dir", ckpt, "--layout", "lightning",
                             "--save-every", "1"))
    result, report = run_with_report(tmp_path, "--last-step", "3", "--checkpoint-dir", ckpt, "--",
                                     "sh", "-c", f"rm -rf {ckpt}; mkdir {ckpt}; exec {again}")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "below the checkpoint at step 5" in err and report["last_checkpoint_step"] == 3


def test_a_stale_checkpoint_above_the_target_does_not_skip_the_wait_for_this_runs(tmp_path):
    ckpt = tmp_path / "ck"
    _hf_checkpoint(ckpt, 300)
    result, report = run_with_report(tmp_path, "--last-step", "30", "--stop-after-checkpoint", "--checkpoint-dir",
                                     ckpt, "--", *trainer("--rate", "50", "--checkpoint-dir", ckpt, "--layout", "hf",
                                                          "--save-every", "30", "--save-seconds", "0.3"))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "waiting up to 30s for a complete checkpoint" in err
    assert report["last_checkpoint_step"] == 30  # this run's, not the stale 300


def test_the_end_of_a_big_log_is_read_to_its_last_line(tmp_path):
    log = tmp_path / "train.log"
    code = (f"import time\ntime.sleep(0.3)\nopen({str(log)!r}, 'w').write('x' * 40_000_000 + '\\nstep 200\\n')\n")
    result, report = run_with_report(tmp_path, "--last-step", "1000", "--poll", "30", "--log-file", log, "--",
                                     sys.executable, "-c", code)
    assert result.returncode == 0
    assert report["last_step_seen"] == 200


def test_a_log_truncated_and_written_again_between_two_looks(tmp_path):
    log = tmp_path / "train.log"
    code = textwrap.dedent(f"""
        import time
        with open({str(log)!r}, "w") as fh:
            fh.write("".join(f"noise {{i}}\\n" for i in range(10)))
        time.sleep(1.5)  # a look in between
        with open({str(log)!r}, "w") as fh:  # truncated...
            fh.write("step 50\\n" + "".join(f"noise {{i}}\\n" for i in range(20)))  # ...and longer than before
        time.sleep(60)
    """)
    result, report = run_with_report(tmp_path, "--last-step", "50", "--poll", "1", "--log-file", log, "--",
                                     sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached"


OPENED_BY_STOPSTEP = """
def opened_by_stopstep(path):
    import os, time
    fds = f"/proc/{os.getppid()}/fd"
    while not any(os.readlink(os.path.join(fds, fd)) == path for fd in os.listdir(fds)):
        time.sleep(0.01)
"""


def test_a_rotated_logs_last_line_without_a_newline_counts(tmp_path):
    log = tmp_path / "train.log"
    code = OPENED_BY_STOPSTEP + textwrap.dedent(f"""
        import os, time
        with open({str(log)!r}, "a") as fh:
            fh.write("step 1\\nstep 2\\nstep 3")  # no newline after the last
        opened_by_stopstep({str(log)!r})  # stopstep has it open: now rotate it away
        os.rename({str(log)!r}, {str(log)!r} + ".1")
        open({str(log)!r}, "w").close()
        time.sleep(60)
    """)
    result, report = run_with_report(tmp_path, "--last-step", "3", "--log-file", log, "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached" and report["last_step_seen"] == 3


@pytest.mark.parametrize("what", ["tf-temporary-shard", "cut-zip64", "deep-json"])
def test_a_checkpoint_that_breaks_a_completeness_check_is_not_complete(tmp_path, what):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    if what == "tf-temporary-shard":
        (ckpt / "ckpt-5.index").write_bytes(b"x")
        (ckpt / "ckpt-5.data-00000-of-00001.tempstate1").write_bytes(b"x")
        (ckpt / "checkpoint").write_text('model_checkpoint_path: "ckpt-5"\n')
        layout = "tf"
    elif what == "cut-zip64":
        (ckpt / "epoch=0-step=5.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 30 + b"PK\x06\x07" + b"\0" * 4 +
                                                   b"PK\x05\x06" + b"\0" * 18)
        layout = "lightning"
    else:
        (ckpt / "checkpoint-5").mkdir()
        (ckpt / "checkpoint-5" / "trainer_state.json").write_text("[" * 100000)
        layout = "hf"
    result, report = run_with_report(tmp_path, "--last-step", "3", "--checkpoint-dir", ckpt, "--layout", layout,
                                     "--", *trainer("--rate", "50"))
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr and report["last_checkpoint_step"] is None


WIPE = "import shutil, os; shutil.rmtree('out'); os.mkdir('out')"  # as a Python trainer empties its output


def test_a_directory_made_again_under_its_old_inode_number_is_watched_anew(tmp_path):
    # on ext4 the new directory gets the deleted one's inode number back: only the events tell
    (tmp_path / "out").mkdir()
    log = tmp_path / "out" / "t.log"
    command = f"{sys.executable} -c \"{WIPE}\" && exec " + " ".join(
        trainer("--rate", "20", "--steps", "100", "--log-file", log))
    result, report = run_with_report(tmp_path, "--last-step", "20", "--log-file", log, "--", "sh", "-c", command,
                                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    # within half a second (moving the watches joins a watchdog thread, slow on a loaded machine),
    # not at the 2 s safety look (step 40 or so)
    assert _stopped_near(report, 20, 10), report


def test_a_directory_made_while_its_parent_watch_is_being_made_is_followed(tmp_path):
    # The trainer's mkdir lands between stopstep's look (not there yet) and the parent's watch
    # (made after the mkdir: its event was never seen). Real inotify; the race is made certain
    # by making the directory inside the watch call.
    from stopstep_cli.patterns import DEFAULT_FORMAT
    from stopstep_cli.sources import FileWatcher, LogFileSource
    from stopstep_cli.waker import Waker

    out = tmp_path / "out"

    class MkdirFirst(FileWatcher):
        def watch(self, directory, sink):
            if directory == str(tmp_path) and not out.exists():
                out.mkdir()
            return super().watch(directory, sink)

    waker = Waker()
    watcher = MkdirFirst(waker)
    source = LogFileSource(str(out / "t.log"), [DEFAULT_FORMAT])
    try:
        assert source.start(watcher) == []
        (out / "t.log").write_text("step 5\n")
        seen = []
        deadline = time.monotonic() + 5  # an event takes milliseconds; the safety look is not run here
        while not seen and time.monotonic() < deadline:
            select.select([waker], [], [], 0.05)
            waker.clear()
            for sink, paths in watcher.changed().items():
                seen += [obs.step for obs in sink.on_change(paths)]
        assert seen == [5]
    finally:
        source.close()
        watcher.stop()
        waker.close()


def _old_run(out, steps):
    for step in steps:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@pytest.mark.parametrize("poll", [[], ["--poll", "0.2"]])
def test_checkpoints_written_again_under_an_earlier_runs_names_count(tmp_path, poll):
    out = tmp_path / "out"
    _old_run(out, range(10, 101, 10))
    command = f"{sys.executable} -c \"{WIPE}\" && exec " + " ".join(
        trainer("--rate", "10", "--steps", "200", *QUIET, "--checkpoint-dir", out, "--layout", "hf",
                "--save-every", "10"))
    result, report = run_with_report(tmp_path, "--last-step", "50", *poll, "--checkpoint-dir", out, "--layout",
                                     "hf", "--", "sh", "-c", command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert report["start_step"] is None and report["last_checkpoint_step"] == 50, report
    assert _stopped_near(report, 50, 3), report


def test_a_fresh_run_that_writes_an_old_checkpoints_step_first_started_fresh(tmp_path):
    out = tmp_path / "out"
    _old_run(out, (10, 30))
    command = f"rm -rf {out}; mkdir {out}; exec " + " ".join(
        trainer("--rate", "10", "--steps", "100", *QUIET, "--checkpoint-dir", out, "--layout", "hf",
                "--save-every", "10"))
    result, report = run_with_report(tmp_path, "--num-steps", "20", "--checkpoint-dir", out, "--layout", "hf",
                                     "--", "sh", "-c", command)
    assert result.returncode == 0, result.stderr.decode()
    # its checkpoint-10 is its own: a run resumed from the old checkpoint-10 would write 20 first
    assert report["start_step"] is None and report["target_step"] == 20, report


@pytest.mark.parametrize("layout,name", [("orbax", "10000000000000000000"), ("hf", "checkpoint-99999999999999999999")])
def test_a_checkpoint_name_with_more_than_18_digits_is_no_step(tmp_path, layout, name):
    (tmp_path / "out").mkdir()
    made = tmp_path / "out" / name
    result, report = run_with_report(tmp_path, "--last-step", "20", "--checkpoint-dir", tmp_path / "out", "--layout",
                                     layout, "--", "sh", "-c", f"mkdir {made}; echo saved; sleep 0.5")
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "process_exited" and report["last_step_seen"] is None


def test_a_log_file_that_is_not_there_at_launch_is_said_at_once(tmp_path):
    proc = start_stopstep("run", "--last-step", "1", "--log-file", tmp_path / "typo.log", "--", "sleep", "30")
    try:
        wait_for_output(proc.stderr, b"typo.log does not exist yet; watching for it")
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def _stopped_near(report, target, slack):
    return report["reason"] == "target_reached" and target <= report["last_step_seen"] <= target + slack


def test_a_checkpoint_directory_swapped_for_a_new_one_is_watched_anew(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    swap = (f"mkdir {ckpt}.new && mv -T {ckpt}.new {ckpt} && exec "
            + " ".join(trainer("--rate", "10", "--checkpoint-dir", ckpt, "--layout", "hf", "--save-every", "10")))
    result, report = run_with_report(tmp_path, "--last-step", "30", "--checkpoint-dir", ckpt, "--", "sh", "-c", swap)
    assert result.returncode == 0, result.stderr.decode()
    assert _stopped_near(report, 30, 5), report  # at once, not at the next safety look (2 s, 20 steps)


def test_a_log_file_that_is_a_link_into_another_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    real, log = tmp_path / "real" / "train.log", tmp_path / "links" / "train.log"
    log.symlink_to(real)
    result, report = run_with_report(tmp_path, "--last-step", "20", "--log-file", log, "--",
                                     *trainer("--rate", "10", "--steps", "100", "--log-file", real))
    assert result.returncode == 0, result.stderr.decode()
    assert _stopped_near(report, 20, 5), report


def test_a_fifo_is_read_as_soon_as_written(tmp_path):
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    writer = f"exec 3<>{fifo}; for i in $(seq 1 100); do echo \"step $i\" >&3; sleep 0.1; done"
    result, report = run_with_report(tmp_path, "--last-step", "5", "--log-file", fifo, "--", "sh", "-c", writer)
    assert result.returncode == 0, result.stderr.decode()
    assert _stopped_near(report, 5, 3), report


def test_the_second_link_of_a_chain_pointed_elsewhere(tmp_path):
    for name in ("a", "b", "c1", "c2"):
        (tmp_path / name).mkdir()
    (tmp_path / "b" / "ck2").symlink_to(tmp_path / "c1")
    (tmp_path / "a" / "ck").symlink_to(tmp_path / "b" / "ck2")
    given = tmp_path / "a" / "ck"
    repoint = (f"ln -sfn {tmp_path / 'c2'} {tmp_path / 'b' / 'ck2'} && exec "
               + " ".join(trainer("--rate", "10", *QUIET, "--checkpoint-dir", tmp_path / "c2", "--layout", "hf",
                                  "--save-every", "5")))
    result, report = run_with_report(tmp_path, "--last-step", "10", "--checkpoint-dir", given, "--layout", "hf",
                                     "--", "sh", "-c", repoint)
    assert result.returncode == 0, result.stderr.decode()
    assert report["last_checkpoint_step"] == 10


def test_two_sources_that_share_a_directory_keep_their_watches(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    log, ckpt = out / "train.log", out / "checkpoints" / "run1"
    result, report = run_with_report(tmp_path, "--last-step", "30", "--log-file", log, "--checkpoint-dir", ckpt,
                                     "--", *trainer("--rate", "10", "--log-file", log, "--checkpoint-dir", ckpt,
                                                    "--layout", "hf", "--save-every", "10"))
    assert result.returncode == 0, result.stderr.decode()
    assert _stopped_near(report, 30, 5), report


def test_a_directory_made_again_and_again_does_not_stop_inotify(tmp_path):
    ckpt = tmp_path / "ck"
    churn = f"for i in $(seq 1 50); do rm -rf {ckpt}; mkdir {ckpt}; done; " + " ".join(
        trainer("--rate", "10", *QUIET, "--checkpoint-dir", ckpt, "--layout", "hf", "--save-every", "5"))
    result, report = run_with_report(tmp_path, "--last-step", "10", "--checkpoint-dir", ckpt, "--", "sh", "-c", churn)
    assert result.returncode == 0, result.stderr.decode()
    assert b"polling" not in result.stderr and report["last_checkpoint_step"] == 10


def test_no_library_chatter_on_stderr(tmp_path):
    ckpt = tmp_path / "ck"
    result = run_stopstep("run", "--last-step", "20", "--checkpoint-dir", ckpt, "--pattern", r"step ([[:digit:]]+)",
                          "--", *trainer("--rate", "50", "--checkpoint-dir", ckpt, "--layout", "hf",
                                         "--save-every", "1"))
    assert result.returncode == 0, result.stderr.decode()
    foreign = [line for line in result.stderr.decode().splitlines()
               if not line.startswith(("stopstep:", "trainer:", "Traceback", "  ", "KeyboardInterrupt"))]
    assert foreign == [], foreign
