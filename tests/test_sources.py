"""Steps from checkpoint directories and log files, end to end through the CLI."""

from __future__ import annotations

import json
import os

import pytest
from helpers import assert_all_gone, read_pids, run_stopstep, run_with_report, trainer

from stopstep_cli.layouts import make_layout

QUIET_TRAINER = ("--format", "training...")  # prints no step: checkpoints are the only source


@pytest.mark.parametrize("layout", ["hf", "lightning", "deepspeed", "tf", "megatron", "torchtitan",
                                    "orbax", "fairseq", "mmengine", "composer"])
def test_stops_at_the_step_of_a_finished_checkpoint(tmp_path, pidfile, layout):
    ckpt = tmp_path / "ckpt"
    result, report = run_with_report(
        tmp_path, "--last-step", "20", "--checkpoint-dir", ckpt, "--layout", layout, "--",
        *trainer("--rate", "100", *QUIET_TRAINER, "--checkpoint-dir", ckpt, "--layout", layout,
                 "--save-every", "10", "--save-seconds", "0.05", "--pidfile", pidfile),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert report["reason"] == "target_reached"
    assert report["last_checkpoint_step"] == 20
    path = report["last_checkpoint_path"]
    assert make_layout(layout).is_complete(str(ckpt), os.path.basename(path), 20)
    assert_all_gone(read_pids(pidfile))


def test_auto_layout_and_a_directory_that_does_not_exist_yet(tmp_path):
    ckpt = tmp_path / "later" / "ckpt"
    result, report = run_with_report(
        tmp_path, "--last-step", "10", "--checkpoint-dir", ckpt, "--",
        *trainer("--rate", "100", *QUIET_TRAINER, "--checkpoint-dir", ckpt, "--layout", "lightning",
                 "--save-every", "5"),
    )
    assert result.returncode == 0
    assert report["last_checkpoint_step"] == 10


def test_stop_after_checkpoint_waits_for_the_save_at_or_past_the_target(tmp_path):
    ckpt = tmp_path / "out"
    result, report = run_with_report(
        tmp_path, "--last-step", "12", "--checkpoint-dir", ckpt, "--stop-after-checkpoint", "--",
        *trainer("--rate", "50", "--checkpoint-dir", ckpt, "--layout", "hf", "--save-every", "10",
                 "--save-seconds", "0.3"),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert report["last_step_seen"] >= 20 and report["last_checkpoint_step"] == 20
    assert "waiting up to 30s for a complete checkpoint" in result.stderr.decode()
    assert make_layout("hf").is_complete(str(ckpt), "checkpoint-20", 20)


def test_stop_after_checkpoint_gives_up_after_the_grace_period(tmp_path):
    ckpt = tmp_path / "out"
    result, report = run_with_report(
        tmp_path, "--last-step", "3", "--checkpoint-dir", ckpt, "--stop-after-checkpoint",
        "--grace-period", "0.5", "--", *trainer("--rate", "50"),
    )
    assert result.returncode == 0
    assert "no complete checkpoint at or past step 3 within 0.5s; stopping anyway" in result.stderr.decode()
    assert report["last_checkpoint_step"] is None


def test_resumed_run_anchors_num_steps_at_the_latest_checkpoint(tmp_path):
    ckpt = tmp_path / "out"
    for step in (400, 500):
        (ckpt / f"checkpoint-{step}").mkdir(parents=True)
        (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    result, report = run_with_report(
        tmp_path, "--num-steps", "20", "--checkpoint-dir", ckpt, "--",
        *trainer("--start", "500", "--rate", "100"),
    )
    assert result.returncode == 0
    assert report["start_step"] == 500 and report["target_step"] == 520
    assert report["last_step_seen"] == 520
    assert "resuming from step 500" in result.stderr.decode()


def test_log_file_with_rotation(tmp_path):
    log = tmp_path / "logs" / "train.log"
    log.parent.mkdir()
    log.write_text("step 9999 from an earlier run\n")  # written before launch: does not count
    result, report = run_with_report(
        tmp_path, "--last-step", "23", "--log-file", log, "--",
        *trainer("--rate", "100", "--log-file", log, "--rotate-every", "5"),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert report["last_step_seen"] == 23 and report["first_step_seen"] == 1
    assert b"step" not in result.stdout  # the steps were only in the file


def test_log_file_in_a_directory_made_after_launch(tmp_path):
    log = tmp_path / "runs" / "today" / "train.log"
    result, report = run_with_report(tmp_path, "--last-step", "10", "--log-file", log, "--",
                               *trainer("--rate", "100", "--log-file", log))
    assert result.returncode == 0
    assert report["last_step_seen"] == 10


def test_log_file_from_start_counts_what_was_there(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 50\n")
    result, report = run_with_report(
        tmp_path, "--last-step", "40", "--log-file", log, "--log-file-from-start", "--",
        *trainer("--rate", "10", "--log-file", log),
    )
    assert result.returncode == 0
    assert report["first_step_seen"] == 50


def test_log_file_that_appears_later_and_is_truncated(tmp_path):
    log = tmp_path / "train.log"
    script = (
        "import time\n"
        f"p = {str(log)!r}\n"
        "open(p, 'w').write('step 1\\nstep 2\\n')\n"
        "time.sleep(0.3)\n"
        "open(p, 'w').write('step 3\\n')\n"  # truncated and rewritten
        "time.sleep(0.3)\n"
        "open(p, 'a').write('step 5\\n')\n"
        "time.sleep(60)\n"
    )
    import sys

    result, report = run_with_report(tmp_path, "-v", "--last-step", "5", "--log-file", log, "--",
                                     sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    assert report["last_step_seen"] == 5


def test_poll_mode(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "train.log"
    result, report = run_with_report(
        tmp_path, "--last-step", "30", "--checkpoint-dir", ckpt, "--poll", "0.05", "--log-file", log, "--",
        *trainer("--rate", "100", "--log-file", log, "--checkpoint-dir", ckpt, "--layout", "deepspeed",
                 "--save-every", "10"),
    )
    assert result.returncode == 0
    assert report["last_checkpoint_step"] >= 20 and report["last_step_seen"] >= 30


def test_several_sources_take_the_highest_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    result, report = run_with_report(
        tmp_path, "-v", "--last-step", "15", "--checkpoint-dir", ckpt, "--",
        *trainer("--rate", "100", "--checkpoint-dir", ckpt, "--layout", "torchtitan", "--save-every", "5"),
    )
    assert result.returncode == 0
    assert report["last_step_seen"] >= 15
    assert b"backwards" not in result.stderr  # a checkpoint lagging the log is not a step going back


@pytest.mark.parametrize(
    "args,says",
    [
        (["--stop-after-checkpoint"], "--stop-after-checkpoint needs --checkpoint-dir"),
        (["--layout", "hf"], "--layout needs --checkpoint-dir"),
        (["--checkpoint-dir", "d", "--layout", "hf", "--checkpoint-pattern", r"x(\d+)"], "generic layout"),
        (["--checkpoint-dir", "d", "--checkpoint-pattern", "x("], "does not compile"),
        (["--checkpoint-dir", "d", "--layout", "zarr"], "--layout"),
        (["--log-file-from-start"], "--log-file-from-start needs --log-file"),
        (["--poll", "1"], "--poll needs --log-file or --checkpoint-dir"),
        (["--log-file", "x", "--poll", "0"], "--poll"),
        (["--checkpoint-dir", __file__], "is not a directory"),
        (["--log-file", "/tmp"], "is a directory"),
    ],
)
def test_source_usage_errors(args, says):
    result = run_stopstep("run", "--last-step", "3", *args, "--", "true")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1 and says in err, err
