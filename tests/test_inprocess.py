"""The in-process side end to end: stand-in frameworks and the beacon in real subprocesses, started
with the environment of a real InProcessChannel in the test process, stopping themselves at the target."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from inprocess_support import (
    BEACON_LOOP,
    BEACON_STEPPED,
    HF_TRAIN,
    Run,
    child_env,
    run_to_end,
    script,
)

from stopstep_cli.channel import SITE_DIR, InProcessChannel
from stopstep_cli.observation import IN_PROCESS


@pytest.fixture
def channel():
    with InProcessChannel() as channel:
        yield channel


def stopping(run: Run) -> dict:
    (message,) = run.of_type("stopping")
    return message


# -- Hugging Face Transformers -------------------------------------------------------------

def test_hf_trainer_saves_checkpoint_at_target_and_train_returns(channel, tmp_path):
    run = run_to_end(script(HF_TRAIN) + [str(tmp_path)], child_env(channel, 7), channel)

    assert run.proc.returncode == 0, run.stderr
    assert b"train returned at 7" in run.stdout
    assert run.stderr == b""
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-7"]  # save_steps=500: only the stop saved
    state = json.loads((tmp_path / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["global_step"] == 7
    (hello,) = run.of_type("hello")
    assert (hello["fw"], hello["step"], hello["target"], hello["pid"]) == ("hf", 0, 7, run.proc.pid)
    assert stopping(run) == {"t": "stopping", "pid": run.proc.pid, "rank": 0, "step": 7, "why": "target"}
    assert channel.engaged and channel.frameworks == {"hf"}


def test_hf_reports_each_step_with_the_values_logged_at_it(channel, tmp_path):
    # Steps 25 ms apart: each one is reported on its own (reports are at most one per 20 ms).
    run = run_to_end(script(HF_TRAIN) + [str(tmp_path), "0.025"], child_env(channel, 7), channel)

    assert run.proc.returncode == 0, run.stderr
    assert run.steps() == [1, 2, 3, 4, 5, 6, 7]
    losses = {m["step"]: m.get("v", {}).get("loss") for m in run.of_type("step")}
    # logging_steps=2: the loss logged at step N (of training step N-1's batch) comes with step N
    assert losses == {1: None, 2: 1 / 2, 3: None, 4: 1 / 4, 5: None, 6: 1 / 6, 7: None}
    assert run.messages[-1]["t"] == "stopping"  # after the report of its step


# -- Lightning -------------------------------------------------------------------------------

LIGHTNING_FIT = """
    import json, os, sys
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    options = json.loads(sys.argv[1])
    checkpoint = options.pop("checkpoint", None)
    callbacks = [] if checkpoint is None else [ModelCheckpoint(**checkpoint)]
    trainer = Trainer(callbacks=callbacks, max_steps=20, **options)
    trainer.fit(LightningModule(), list(range(4)))  # 4 batches an epoch
    print("fit returned at", trainer.global_step, flush=True)
    print(json.dumps([os.path.relpath(p, options.get("default_root_dir", ".")) for p in trainer.saved]))
"""


def lightning_fit(channel, target, options):
    run = run_to_end(script(LIGHTNING_FIT) + [json.dumps(options)], child_env(channel, target), channel)
    assert run.proc.returncode == 0, run.stderr
    assert run.stderr == b""
    returned, saved = run.stdout.decode().splitlines()
    return run, returned, json.loads(saved)


def test_lightning_stops_at_target_and_writes_checkpoint_named_like_model_checkpoint(channel, tmp_path):
    options = {"default_root_dir": str(tmp_path),
               "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 5}}
    run, returned, saved = lightning_fit(channel, 7, options)

    assert returned == "fit returned at 7"
    # ModelCheckpoint's own at 5; ours at 7, in its directory and naming (step 7 is in epoch 1)
    assert saved == ["ckpt/epoch=1-step=5.ckpt", "ckpt/epoch=1-step=7.ckpt"]
    assert json.loads((tmp_path / "ckpt" / "epoch=1-step=7.ckpt").read_text())["global_step"] == 7
    assert stopping(run)["step"] == 7
    assert run.of_type("hello")[0]["fw"] == "lightning"


def test_lightning_writes_no_second_checkpoint_when_model_checkpoint_saved_at_target(channel, tmp_path):
    options = {"default_root_dir": str(tmp_path),
               "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 7}}
    run, returned, saved = lightning_fit(channel, 7, options)

    assert returned == "fit returned at 7"
    assert saved == ["ckpt/epoch=1-step=7.ckpt"]  # ModelCheckpoint's own; no -v1 copy of ours


def test_lightning_adds_no_checkpoint_when_model_checkpoint_saved_the_step_under_another_name(channel, tmp_path):
    # The name depends on an epoch metric: ModelCheckpoint's at the epoch end of the stop differs
    # from the one this step had at its batch end; it is still a checkpoint at the stop step.
    options = {"default_root_dir": str(tmp_path),
               "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "filename": "{epoch}-{step}-{train_loss_epoch:.2f}"}}
    run, returned, saved = lightning_fit(channel, 6, options)

    assert returned == "fit returned at 6"
    assert saved == ["ckpt/epoch=0-step=4-train_loss_epoch=0.52.ckpt", "ckpt/epoch=1-step=6-train_loss_epoch=0.75.ckpt"]


def test_lightning_default_checkpoint_saves_at_epoch_end_of_the_stop_once(channel, tmp_path):
    # The default ModelCheckpoint saves every epoch end, under default_root_dir/checkpoints; a stop
    # mid-epoch ends the epoch, so it saves the stop step itself and ours must not add a copy.
    run, returned, saved = lightning_fit(channel, 6, {"default_root_dir": str(tmp_path)})

    assert returned == "fit returned at 6"
    assert saved == ["checkpoints/epoch=0-step=4.ckpt", "checkpoints/epoch=1-step=6.ckpt"]


def test_lightning_with_gradient_accumulation_stops_at_the_optimizer_step(channel, tmp_path):
    options = {"default_root_dir": str(tmp_path), "accumulate_grad_batches": 2,
               "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 100}}
    run, returned, saved = lightning_fit(channel, 3, options)

    assert returned == "fit returned at 3"
    assert saved == ["ckpt/epoch=1-step=3.ckpt"]  # 2 optimizer steps an epoch
    # only batches that finished an optimizer step count: each step reported or counted once
    reports = run.of_type("step")
    assert sum(1 + m.get("skipped", 0) for m in reports) == 3 and reports[-1]["step"] == 3


def test_lightning_leaves_an_existing_checkpoint_of_that_name_alone(channel, tmp_path):
    (tmp_path / "ckpt").mkdir()
    earlier = tmp_path / "ckpt" / "epoch=1-step=7.ckpt"
    earlier.write_text("from an earlier run")
    options = {"default_root_dir": str(tmp_path),
               "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 5}}
    run, returned, saved = lightning_fit(channel, 7, options)

    assert returned == "fit returned at 7"
    assert saved == ["ckpt/epoch=1-step=5.ckpt"]
    assert earlier.read_text() == "from an earlier run"


def test_lightning_without_checkpointing_just_stops(channel, tmp_path):
    run, returned, saved = lightning_fit(channel, 5, {"default_root_dir": str(tmp_path), "enable_checkpointing": False})

    assert returned == "fit returned at 5"
    assert saved == []


# -- Keras ---------------------------------------------------------------------------------------

KERAS_FIT = """
    import sys
    import keras

    class Counting(keras.callbacks.Callback):
        batches = 0
        def on_train_batch_end(self, batch, logs=None):
            Counting.batches += 1

    model = keras.Model()
    model.compile(optimizer=keras.optimizers.SGD())
    if sys.argv[1] == "positional":  # fit(x, y, batch_size, epochs, verbose, callbacks, ...)
        history = model.fit(None, None, None, 5, "auto", [Counting()], steps_per_epoch=4)
    else:
        history = model.fit(epochs=5, steps_per_epoch=4, callbacks=(Counting(),))
    print("fit returned at", int(model.optimizer.iterations), "epochs", history.epoch,
          "batches", Counting.batches, flush=True)
"""


@pytest.mark.parametrize("callbacks_passed", ["positional", "keyword"])
def test_keras_fit_returns_at_target(channel, callbacks_passed):
    run = run_to_end(script(KERAS_FIT) + [callbacks_passed], child_env(channel, 7), channel)

    assert run.proc.returncode == 0, run.stderr
    assert run.stderr == b""
    # 4 batches an epoch: step 7 is epoch 1's third batch; the user's callback saw every batch
    assert run.stdout.decode().strip() == "fit returned at 7 epochs [0, 1] batches 7"
    assert stopping(run)["step"] == 7
    assert run.of_type("hello")[0]["fw"] == "keras"


# -- the beacon ------------------------------------------------------------------------------------

def test_beacon_stops_at_exactly_the_target_at_full_speed(channel):
    run = run_to_end(script(BEACON_LOOP) + ["10000000"], child_env(channel, 100_000), channel)

    assert run.proc.returncode == 0, run.stderr
    assert run.stdout.decode().strip() == "stopped after 100000"
    assert stopping(run)["step"] == 100_000
    # reports come at most one a millisecond, each counting the steps it stands for
    reported = run.of_type("step")
    assert reported[-1]["step"] == 100_000
    assert len(reported) < 100_000


def test_beacon_under_python_dash_S_still_works(channel):
    # No sitecustomize, so nothing loaded the in-process module: the beacon imports it from the path.
    argv = script(BEACON_LOOP + """
    import os, _stopstep_inprocess
    print("loaded from the site directory:", _stopstep_inprocess.__file__.startswith(os.environ["SITE"]))
    """)
    env = child_env(channel, 50, {"SITE": SITE_DIR})
    run = run_to_end([argv[0], "-S"] + argv[1:] + ["1000"], env, channel)

    assert run.stdout.decode().splitlines() == ["stopped after 50", "loaded from the site directory: True"]
    assert stopping(run)["step"] == 50


def test_beacon_loads_its_own_copy_when_the_site_directory_is_not_on_the_path(channel):
    # A launcher rebuilt PYTHONPATH without stopstep's site directory, but the channel is in the environment.
    argv = script(BEACON_LOOP + """
    import os, _stopstep_inprocess, stopstep_cli
    site = os.path.join(os.path.dirname(stopstep_cli.__file__), "_site")
    print("own copy:", os.path.dirname(_stopstep_inprocess.__file__) == site)
    """)
    env = child_env(channel, 50)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p != SITE_DIR)
    run = run_to_end(argv + ["1000"], env, channel)

    assert run.stdout.decode().splitlines() == ["stopped after 50", "own copy: True"]
    assert stopping(run)["step"] == 50


def test_beacon_outside_stopstep_returns_false_and_sends_nothing(channel):
    run = run_to_end(script(BEACON_LOOP) + ["1000"], child_env(None, None), channel)

    assert run.stdout.decode().strip() == "ran out at 1000"
    assert run.stderr == b""
    assert run.messages == [] and not channel.engaged


def test_stop_at_announced_by_the_supervisor_is_honoured(channel):
    with Run(script(BEACON_STEPPED), child_env(channel, None), channel, stdin=subprocess.PIPE) as run:
        run.send_lines(10)
        run.wait_for_output(b"at 10\n")
        run.pump(lambda r: r.of_type("hello"))
        channel.announce_stop(25, "signal")
        channel.announce_stop(15, "time_limit")  # an earlier stop decided after: the earliest wins
        run.send_lines(20)
        run.finish()

    assert b"stopped after 15\n" in run.stdout and b"at 15" not in run.stdout
    assert stopping(run) == {"t": "stopping", "pid": run.proc.pid, "rank": 0, "step": 15, "why": "stop_at",
                             "reason": "time_limit"}


def test_target_announced_after_start_is_honoured(channel):
    # Started without a target (e.g. --num-steps before the start step is known), told it later.
    with Run(script(BEACON_STEPPED), child_env(channel, None), channel, stdin=subprocess.PIPE) as run:
        run.send_lines(3)
        run.wait_for_output(b"at 3\n")
        run.pump(lambda r: r.of_type("hello"))
        assert run.of_type("hello")[0]["target"] is None
        channel.announce_target(8)
        run.send_lines(10)
        run.finish()

    assert b"stopped after 8\n" in run.stdout
    assert stopping(run)["why"] == "target"


def test_a_process_that_engages_after_an_announcement_gets_it(channel):
    channel.announce_stop(4, "signal")
    with Run(script(BEACON_STEPPED), child_env(channel, 100), channel, stdin=subprocess.PIPE) as run:
        run.send_lines(1)
        run.wait_for_output(b"at 1\n")  # engaged; the channel answered its hello
        run.pump(lambda r: r.of_type("hello"))
        run.send_lines(10)
        run.finish()

    assert b"stopped after 4\n" in run.stdout


def test_two_ranks_stop_after_the_same_announced_step(channel):
    runs = [Run(script(BEACON_STEPPED), child_env(channel, None, {"RANK": str(rank), "WORLD_SIZE": "2"}),
                channel, stdin=subprocess.PIPE) for rank in (0, 1)]
    try:
        for run, ahead in zip(runs, (12, 9)):  # the ranks are a few steps apart
            run.send_lines(ahead)
            run.wait_for_output(b"at %d\n" % ahead)
        hellos = [m for run in runs for m in run.messages if m["t"] == "hello"]
        assert sorted((m["rank"], m["world"]) for m in hellos) == [(0, 2), (1, 2)]
        channel.announce_stop(20, "nan_loss")
        for run in runs:
            run.send_lines(30)
            run.finish()
    finally:
        for run in runs:
            run.__exit__()
    for run in runs:
        assert b"stopped after 20\n" in run.stdout


def test_step_values_arrive_and_become_observations(channel):
    code = """
        import time
        from stopstep_cli import beacon
        for step in range(1, 4):
            time.sleep(0.025)  # each step reported on its own (at most one report per 20 ms)
            beacon.step(step, loss=1.0 / step, lr=0.1, phase="warmup", note=object())
        beacon.step(4, loss=float("nan"))
        beacon.step(5, loss=float("inf"))  # at once after 4: reported because it is not finite
    """
    run = run_to_end(script(code), child_env(channel, None, {"RANK": "3"}), channel)

    assert run.proc.returncode == 0, run.stderr
    observations = [channel.to_observation(m) for m in run.of_type("step")]
    assert [o.step for o in observations] == [1, 2, 3, 4, 5]
    assert observations[1].fields == {"loss": 0.5, "lr": 0.1, "phase": "warmup"}  # object() left out
    assert math.isnan(observations[3].fields["loss"]) and observations[4].fields["loss"] == math.inf
    assert {(o.kind, o.source) for o in observations} == {(IN_PROCESS, "in-process:rank3")}
    assert channel.to_observation(run.of_type("hello")[0]) is None


def test_fast_steps_are_reported_together_with_their_count(channel):
    run = run_to_end(script(BEACON_LOOP) + ["20000"], child_env(channel, None), channel)

    reports = run.of_type("step")
    assert reports[0]["step"] == 1
    # every step is either reported or counted as skipped by a later report
    assert all(b["step"] - a["step"] - 1 == b.get("skipped", 0) for a, b in zip(reports, reports[1:]))
    assert channel.to_observation(reports[-1]).coalesced == reports[-1].get("skipped", 0)
    assert reports[-1]["step"] == 20000  # the last step, passed over in the loop, goes out at exit


# -- forks -------------------------------------------------------------------------------------------

def test_a_fork_does_not_report_as_the_process_that_engaged(channel):
    code = """
        import os, sys
        from stopstep_cli import beacon
        beacon.step(1)
        quiet = os.fork()
        if quiet == 0:  # a DataLoader worker: never calls the beacon
            os._exit(0)
        os.waitpid(quiet, 0)
        stepping = os.fork()
        if stepping == 0:  # a child that does call it engages on its own
            beacon.step(1)
            print("child", os.getpid(), flush=True)
            os._exit(0)
        os.waitpid(stepping, 0)
        import time; time.sleep(0.003)
        beacon.step(2)
    """
    run = run_to_end(script(code), child_env(channel, None), channel)

    assert run.proc.returncode == 0, run.stderr
    child = int(run.stdout.split()[1])
    hellos = run.of_type("hello")
    assert sorted(m["pid"] for m in hellos) == sorted([run.proc.pid, child])
    assert [(m["pid"], m["step"]) for m in run.of_type("step")] == [(run.proc.pid, 1), (child, 1), (run.proc.pid, 2)]
