"""The cooperative stop on the real frameworks: the real CLI runs a tiny model built in code (no
weights or data downloaded) and the test checks what a user would: the exit status, the exact
step, a whole checkpoint at that step, no traceback, and the report's ``stop_mode``.

Each test skips when its framework is not importable here, so CI without them passes; in a
venv with ``torch``, ``transformers`` (+ ``accelerate``), ``lightning`` and ``keras`` (3, on
TensorFlow or torch) they all run. Each takes 10-40 s on a loaded 2-core machine, most of it
importing the framework.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import run_with_report, start_stopstep, wait_for_output

TIMEOUT = 180  # a bound for a loaded machine: imports alone take seconds; runs end far sooner

# What the runs need: one thread each (two cores, other work: a framework's thread pool spinning
# against it makes a step 10x slower), nothing from the network, less noise on stderr.
QUIET = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
}


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def assert_clean(result) -> str:
    """No traceback, no interrupt, no in-process side giving up; stderr as text."""
    err = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    for bad in ("Traceback", "KeyboardInterrupt", "in-process stop disengaged"):
        assert bad not in err, err[-4000:]
    return err


def assert_stopped_itself(result, report, step, reason="target_reached", exit_code=0):
    err = assert_clean(result)
    assert result.returncode == exit_code, err[-4000:]
    assert report["reason"] == reason
    assert report["exit_code"] == exit_code
    assert report["stop_mode"] == "cooperative"
    assert report["stop_signal"] is None  # no signal was needed
    assert report["child_returncode"] == 0  # the command exited by itself, normally
    assert report["last_step_seen"] == step


# -- Hugging Face Transformers ---------------------------------------------------------------------

HF_TRAIN = """
    import sys, time
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    # train.py OUT [RESUME_FROM|- [SECONDS_A_STEP [POISON_AT_STEP]]]
    out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    pace = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    poison_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64  # 16 steps an epoch

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class Pace(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                print("training at step 5", flush=True)
            if state.global_step == poison_at:  # every loss from here on is NaN
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.fill_(float("nan"))
            time.sleep(pace)

    args = TrainingArguments(output_dir=out, max_steps=2000, per_device_train_batch_size=4, logging_steps=5,
                             save_steps=1000, report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_nan_inf_filter=False)  # with the default True, a NaN loss is logged as 0
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[Pace()])
    result = trainer.train(resume_from_checkpoint=None if resume in (None, "-") else resume)
    print("train returned at", result.global_step, flush=True)
"""


def hf_checkpoints(out):
    found = {}
    for name in sorted(os.listdir(out)):
        state = json.loads((out / name / "trainer_state.json").read_text())
        assert (out / name / "model.safetensors").stat().st_size > 0
        assert (out / name / "optimizer.pt").stat().st_size > 0
        found[name] = state["global_step"]
    return found


def test_hf_trainer_stops_at_the_target_with_checkpoint_and_resumes(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    train = write(tmp_path, "train.py", HF_TRAIN)
    out = tmp_path / "out"

    result, report = run_with_report(tmp_path, "--last-step", 30, "--", sys.executable, train, out,
                                     env=QUIET, timeout=TIMEOUT)

    assert_stopped_itself(result, report, 30)
    assert b"train returned at 30\n" in result.stdout  # train() returned normally, at the target
    assert hf_checkpoints(out) == {"checkpoint-30": 30}  # save_steps=1000: the stop's own save, whole

    # Resumed from it, --num-steps counts from the checkpoint --checkpoint-dir finds at launch.
    result, report = run_with_report(tmp_path, "--num-steps", 20, "--checkpoint-dir", out, "--",
                                     sys.executable, train, out, out / "checkpoint-30", env=QUIET, timeout=TIMEOUT)

    assert_stopped_itself(result, report, 50)
    assert (report["start_step"], report["target_step"]) == (30, 50)
    assert b"train returned at 50\n" in result.stdout
    assert hf_checkpoints(out) == {"checkpoint-30": 30, "checkpoint-50": 50}


def test_hf_trainer_sigterm_to_stopstep_saves_at_the_announced_step(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    train = write(tmp_path, "train.py", HF_TRAIN)
    out = tmp_path / "out"
    report_path = tmp_path / "report.json"
    proc = start_stopstep("run", "--last-step", 100000, "--report", report_path, "--",
                          sys.executable, train, out, "-", "0.02", env=QUIET)
    try:
        wait_for_output(proc.stdout, b"training at step 5", timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)  # docker stop, a preempting scheduler
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(report_path.read_text())
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    step = report["last_step_seen"]
    assert_stopped_itself(result, report, step, reason="signal", exit_code=143)
    assert report["received_signal"] == "SIGTERM"
    assert step > 5
    assert f"train returned at {step}\n".encode() in stdout
    assert hf_checkpoints(out) == {f"checkpoint-{step}": step}  # the preemption save, at the step it stopped after


def test_hf_trainer_nan_stop_writes_no_checkpoint_of_the_broken_weights(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    train = write(tmp_path, "train.py", HF_TRAIN)
    out = tmp_path / "out"

    # NaN weights from step 10: the loss logged at 15 is NaN; the stop is announced ahead of it
    result, report = run_with_report(tmp_path, "--last-step", 1000, "--stop-on-nan", "--",
                                     sys.executable, train, out, "-", "0.01", 10, env=QUIET, timeout=TIMEOUT)

    step = report["last_step_seen"]
    assert_stopped_itself(result, report, step, reason="nan_loss", exit_code=4)
    assert step > 15
    assert f"train returned at {step}\n".encode() in result.stdout
    assert not out.exists() or os.listdir(out) == []  # nothing a resumed run could start from


# -- Lightning -------------------------------------------------------------------------------------

LIGHTNING_FIT = """
    import sys
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    root, checkpointing = sys.argv[1], sys.argv[2] == "checkpoints"

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # 16 steps an epoch
    callbacks = [ModelCheckpoint(every_n_train_steps=7, save_last=True)] if checkpointing else []
    trainer = pl.Trainer(max_steps=2000, default_root_dir=root, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_checkpointing=checkpointing, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Regression(), loader)
    print("fit returned at", trainer.global_step, flush=True)
"""


@pytest.mark.parametrize("checkpointing", ["checkpoints", "none"])
def test_lightning_stops_at_the_target_with_model_checkpoints_own_checkpoint(tmp_path, checkpointing):
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning.pytorch")
    fit = write(tmp_path, "fit.py", LIGHTNING_FIT)
    root = tmp_path / "root"

    result, report = run_with_report(tmp_path, "--last-step", 30, "--", sys.executable, fit, root, checkpointing,
                                     env=QUIET, timeout=TIMEOUT)

    assert_stopped_itself(result, report, 30)
    assert b"fit returned at 30\n" in result.stdout
    if checkpointing == "none":
        assert not (root / "checkpoints").exists()
        return
    # every_n_train_steps=7 saves at 28; the stop adds step 30 through ModelCheckpoint itself: its
    # naming (step 30 is in epoch 1), save_top_k=1 replacing the one at 28, and last.ckpt.
    directory = root / "checkpoints"
    assert sorted(os.listdir(directory)) == ["epoch=1-step=30.ckpt", "last.ckpt"]
    for name in ("epoch=1-step=30.ckpt", "last.ckpt"):
        checkpoint = torch.load(directory / name, map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 30
        # written inside the epoch, as ModelCheckpoint writes: a run resumed from it goes on in
        # epoch 1 (one written after the epoch was counted would skip batches)
        assert checkpoint["epoch"] == 1


# -- Keras 3 ---------------------------------------------------------------------------------------

KERAS_FIT = """
    import numpy as np
    import keras

    x = np.random.RandomState(0).randn(64, 8).astype("float32")
    y = np.random.RandomState(1).randn(64, 1).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=4, epochs=100, verbose=2)  # 16 steps an epoch
    print("fit returned at", int(model.optimizer.iterations), "epochs", len(history.history["loss"]), flush=True)
"""


def test_keras_fit_stops_at_the_target(tmp_path):
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"Keras 3 wanted, not {keras.__version__}")
    fit = write(tmp_path, "fit.py", KERAS_FIT)

    result, report = run_with_report(tmp_path, "--last-step", 30, "--", sys.executable, fit, env=QUIET,
                                     timeout=TIMEOUT)

    assert_stopped_itself(result, report, 30)
    assert b"fit returned at 30 epochs 2\n" in result.stdout  # optimizer.iterations; the stop ended epoch 2


# -- torchrun: two gloo ranks and the beacon ------------------------------------------------------------

DDP_LOOP = """
    import os, sys, time
    import torch
    import torch.distributed as dist
    from stopstep_cli import beacon

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = 0
    while step < 100000:
        loss = torch.nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 1))
        optimizer.zero_grad()
        loss.backward()  # an allreduce: a rank that left the loop early would hang the other here
        optimizer.step()
        step += 1
        time.sleep(0.005)
        if beacon.step(step, loss=loss.item()):
            break
    steps = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(steps, torch.tensor([step]))
    # one write each: print writes the newline apart, and the two ranks share the pipe
    sys.stdout.write(f"rank {rank} stopped after {step}; all ranks {sorted(int(s) for s in steps)}\\n")
    sys.stdout.flush()
    # torch 2.13's gloo aborts now and then ("terminate called without an active exception",
    # 1 run in 8 by hand, stopstep or not) when one rank destroys the group while the other
    # is still on its way out; leaving together avoids it (0 in 22)
    dist.barrier()
    dist.destroy_process_group()
"""

STOP_AT_50 = """
    from stopstep_cli import SessionRunArgs, SessionRunHook

    class StopAt50(SessionRunHook):
        \"\"\"A stop decided while the run goes (as a time limit or a NaN is): announced ahead.\"\"\"

        def before_run(self, run_context):
            return SessionRunArgs("global_step")

        def after_run(self, run_context, run_values):
            if run_values.results >= 50:
                run_context.request_stop(reason="enough", exit_code=0)
"""


def ranks_stopped(stdout: bytes):
    return sorted(re.findall(r"rank \d stopped after \d+; all ranks \[[\d, ]*\]", stdout.decode()))


@pytest.mark.parametrize("stop", ["target", "decided_while_running"])
def test_torchrun_two_ranks_stop_after_the_same_step(tmp_path, stop):
    pytest.importorskip("torch.distributed")
    loop = write(tmp_path, "loop.py", DDP_LOOP)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", loop]
    if stop == "target":
        args = ["--last-step", 30]
    else:
        hook = write(tmp_path, "stop_hook.py", STOP_AT_50)
        args = ["--last-step", 100000, "--hook", f"{hook}:StopAt50"]

    result, report = run_with_report(tmp_path, *args, "--", *torchrun, env=QUIET, timeout=TIMEOUT)

    if stop == "target":
        step, reason = 30, "target_reached"
    else:
        step, reason = report["last_step_seen"], "enough"
        assert step > 50  # announced ahead of the highest step seen, so that no rank had passed it
    assert_stopped_itself(result, report, step, reason=reason)
    # both ranks left the loop after the same step (a hang in the allreduce would have timed out)
    assert ranks_stopped(result.stdout) == [f"rank {r} stopped after {step}; all ranks [{step}, {step}]"
                                            for r in (0, 1)]
