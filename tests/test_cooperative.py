"""The cooperative stop through the real CLI: the command's Python processes stop
themselves (stand-in frameworks, the beacon), the signal path as the fallback,
and every dynamic stop announced ahead so that ranks agree."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT, TIMEOUT, run_with_report, start_stopstep, wait_for_output

STANDINS = Path(__file__).resolve().parent / "standins"
WITH_STANDINS = {"PYTHONPATH": f"{STANDINS}{os.pathsep}{ROOT}"}


def python(code: str):
    return [sys.executable, "-c", textwrap.dedent(code)]


HF = """
    import sys, time
    from transformers import Trainer, TrainingArguments
    def model(step):
        time.sleep(0.01)
        return 1.0 / (1 + step)
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=1000, logging_steps=5, save_steps=500)
    out = Trainer(model=model, args=args).train()
    print("train returned at", out.global_step, flush=True)
"""

BEACON = """
    import math, sys, time
    from stopstep_cli import beacon
    pace = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    nan_at = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    hang_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    step = 0
    while True:
        step += 1
        if pace:
            time.sleep(pace)
        if step == hang_at:
            time.sleep(600)
        loss = math.nan if step >= nan_at > 0 else 1.0 / step
        if beacon.step(step, loss=loss):
            print("stopped itself after", step, flush=True)
            break
"""


def test_a_framework_stops_itself_at_exactly_the_target_and_saves(tmp_path):
    out = tmp_path / "out"
    result, report = run_with_report(tmp_path, "--last-step", "37", "--", *python(HF), out, env=WITH_STANDINS)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert b"train returned at 37" in result.stdout
    assert json.loads((out / "checkpoint-37" / "trainer_state.json").read_text())["global_step"] == 37
    assert report["stop_mode"] == "cooperative" and report["stop_signal"] is None
    assert report["reason"] == "target_reached" and report["child_returncode"] == 0
    assert "Traceback" not in err and "command stopped itself" in err


def test_the_beacon_stops_at_exactly_the_target_at_any_rate(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "50000", "--", *python(BEACON))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"stopped itself after 50000\n"
    assert report["stop_mode"] == "cooperative"


@pytest.mark.parametrize("options,args,status,reason", [
    (["--stop-on-nan"], ["0.01", "60"], 4, "nan_loss"),
    (["--time-limit", "1"], ["0.01"], 124, "time_limit"),
])
def test_a_stop_decided_while_running_is_announced_and_kept(tmp_path, options, args, status, reason):
    result, report = run_with_report(tmp_path, "--last-step", "100000", *options, "--", *python(BEACON), *args)
    err = result.stderr.decode()
    assert result.returncode == status, err
    assert report["reason"] == reason and report["stop_mode"] == "cooperative"
    stopped = int(result.stdout.split()[-1])
    # One process: asked to stop after its next step, it does; the summary says which step that was
    # (the reports come at most every 20 ms, so the step seen when deciding may lag it by a step or two).
    assert "asked the training to stop itself after its next step" in err
    assert f"stopped ({reason}) at step {stopped};" in err and report["last_step_seen"] == stopped
    seen = int(re.search(r"last step seen: (\d+)\)", err).group(1)) if reason == "time_limit" else 60
    assert seen <= stopped <= seen + 4, err  # a step (and the reports' lag) later, not a quarter second


def test_sigterm_becomes_a_save_at_the_next_step(tmp_path):
    out, report_path = tmp_path / "out", tmp_path / "r.json"
    proc = start_stopstep("run", "-v", "--last-step", "100000", "--report", report_path, "--", *python(HF), out,
                          env=WITH_STANDINS)
    wait_for_output(proc.stderr, b"in-process: hf engaged")
    proc.send_signal(signal.SIGTERM)  # docker stop, a preempting scheduler
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    report = json.loads(report_path.read_text())
    assert proc.returncode == 143, stderr.decode()
    assert report["received_signal"] == "SIGTERM" and report["stop_mode"] == "cooperative"
    step = int(stdout.split()[-1])  # "train returned at N": it returned normally
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert b"Traceback" not in stderr


SAVES_AT_THE_STOP = """
    import signal, sys, time
    from stopstep_cli import beacon
    save_takes = float(sys.argv[1])
    if len(sys.argv) > 2:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a save that a Ctrl-C cannot cut short
    step = 0
    while True:
        step += 1
        time.sleep(0.01)
        if beacon.step(step):
            break
    print("saving at", step, flush=True)
    time.sleep(save_takes)
    print("saved at", step, flush=True)
"""


def test_a_signal_while_the_command_stops_itself_does_not_cut_its_save_short(tmp_path):
    # `timeout` and a kill of stopstep's process group each deliver a SIGTERM: the second must not
    # end the cooperative stop that the first began, nor a SIGHUP the target's own
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "20", "--report", report_path, "--", *python(SAVES_AT_THE_STOP), "1")
    wait_for_output(proc.stdout, b"saving at 20")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    report = json.loads(report_path.read_text())
    assert proc.returncode == 143, stderr.decode()
    assert stdout.endswith(b"saved at 20\n") and b"Traceback" not in stderr
    assert report["stop_mode"] == "cooperative" and report["received_signal"] == "SIGTERM"
    assert b"the training is stopping itself already (not passed on)" in stderr


def test_ctrl_c_twice_while_the_command_stops_itself_kills_at_once(tmp_path):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "--last-step", "20", "--grace-period", "300", "--report", report_path, "--",
                          *python(SAVES_AT_THE_STOP), "300", "ignore-int")
    wait_for_output(proc.stdout, b"saving at 20")
    proc.send_signal(signal.SIGINT)
    wait_for_output(proc.stderr, b"Ctrl-C again kills it at once")
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=TIMEOUT)  # not the 300 s grace period nor the 300 s save
    report = json.loads(report_path.read_text())
    assert proc.returncode == 130, stderr.decode()
    assert report["killed"] is True and report["received_signal"] == "SIGINT"


def test_a_command_that_does_not_stop_itself_gets_the_signal_after_the_grace_period(tmp_path):
    ignores = """
        import time
        from stopstep_cli import beacon
        step = 0
        while True:
            step += 1
            time.sleep(0.01)
            beacon.step(step)  # asked to stop, and going on anyway
    """
    result, report = run_with_report(tmp_path, "--last-step", "20", "--grace-period", "1", "--", *python(ignores))
    assert result.returncode == 0, result.stderr.decode()
    assert report["stop_mode"] == "signal" and report["stop_signal"] == "SIGINT"
    assert b"did not stop itself within 1s; sending SIGINT" in result.stderr


def test_a_stall_with_no_step_to_stop_at_falls_back_to_the_signal(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--stall-timeout", "1", "--grace-period", "1",
                                     "--", *python(BEACON), "0.01", "-1", "10")
    assert result.returncode == 124, result.stderr.decode()
    assert report["reason"] == "stalled" and report["stop_mode"] == "signal"


def test_without_cooperation_the_signal_path_as_before(tmp_path):
    prints = """
        import time
        from stopstep_cli import beacon
        for step in range(1, 1000):
            time.sleep(0.01)
            print("step", step, flush=True)
            if beacon.step(step):
                print("stopped itself", flush=True)
                break
    """
    for how, env in ((["--no-cooperative"], {}), ([], {"STOPSTEP_COOPERATIVE": "0"})):
        result, report = run_with_report(tmp_path, "--last-step", "10", *how, "--", *python(prints), env=env)
        assert report["stop_mode"] == "signal" and report["stop_signal"] == "SIGINT", result.stderr.decode()
        assert b"stopped itself" not in result.stdout and b"KeyboardInterrupt" in result.stderr


def test_a_command_that_is_not_python_is_stopped_with_signals(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "3", "--", "sh", "-c",
                                     "for i in 1 2 3 4 5; do echo step $i; sleep 0.1; done; sleep 60")
    assert result.returncode == 0
    assert report["stop_mode"] == "signal"


def test_an_existing_sitecustomize_still_runs(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("print('their sitecustomize ran', flush=True)\n")
    result, report = run_with_report(tmp_path, "--last-step", "30", "--", *python(BEACON),
                                     env={"PYTHONPATH": f"{own}{os.pathsep}{ROOT}"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"their sitecustomize ran\n")
    assert result.stdout.endswith(b"stopped itself after 30\n") and report["stop_mode"] == "cooperative"


def test_a_launcher_that_closes_inherited_descriptors(tmp_path):
    launcher = f"""
        import os, sys
        os.closerange(3, 4096)  # as torchrun, accelerate and deepspeed do
        os.execv(sys.executable, [sys.executable, "-c", {textwrap.dedent(BEACON)!r}])
    """
    result, report = run_with_report(tmp_path, "--last-step", "25", "--", *python(launcher))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"stopped itself after 25\n" and report["stop_mode"] == "cooperative"


RANKS = """
    import multiprocessing as mp, os, sys, time
    def rank(r, barrier, out):
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(r), "2"
        from stopstep_cli import beacon
        step = 0
        while True:
            step += 1
            time.sleep(0.01 * (1 + r))  # one rank slower: the barrier keeps them in step, like a collective
            barrier.wait()
            if beacon.step(step):
                out.put((r, step))
                return
    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=rank, args=(r, barrier, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        stops = sorted(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
        print("stopped after", " ".join(str(step) for _r, step in stops), flush=True)
"""


def test_two_ranks_agree_on_a_stop_decided_while_running(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "100000", "--time-limit", "1", "--", *python(RANKS))
    err = result.stderr.decode()
    assert result.returncode == 124, err
    first, second = (int(word) for word in result.stdout.split()[-2:])
    assert first == second, f"rank 0 stopped after {first}, rank 1 after {second}: the next collective would hang"
    assert f"asked the training to stop itself after step {first};" in err  # the step announced is the step kept
    assert report["stop_mode"] == "cooperative"


def test_the_beacon_outside_stopstep_does_nothing():
    code = "from stopstep_cli import beacon; print(beacon.step(1), beacon.step(2, loss=0.5))"
    outside = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert outside.stdout == b"False False\n"


HF_RESUMED = """
    import sys, time
    from transformers import Trainer, TrainingArguments
    def model(step):
        time.sleep(0.005)
        return 1.0 / (1 + step)
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=1000, logging_steps=5, save_steps=500)
    out = Trainer(model=model, args=args).train(resume_from_checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
    print("train returned at", out.global_step, flush=True)
"""


@pytest.mark.parametrize("with_checkpoint_dir", [False, True])
def test_num_steps_counts_from_where_the_framework_says_it_resumed(tmp_path, with_checkpoint_dir):
    # A first run leaves checkpoint-30; the second resumes from it with --num-steps 20. The
    # framework says at train begin that it resumed from 30, so the target is 50, with or
    # without a --checkpoint-dir to find the resume point in (without one, a target of 20
    # used to stop the resumed run at once, at 31).
    out = tmp_path / "out"
    first, _ = run_with_report(tmp_path, "--last-step", "30", "--", *python(HF_RESUMED), out, env=WITH_STANDINS)
    assert first.returncode == 0 and (out / "checkpoint-30").is_dir(), first.stderr.decode()
    watch = ["--checkpoint-dir", out] if with_checkpoint_dir else []
    result, report = run_with_report(tmp_path, "--num-steps", "20", *watch, "--",
                                     *python(HF_RESUMED), out, out / "checkpoint-30", env=WITH_STANDINS)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert b"train returned at 50" in result.stdout
    assert (report["start_step"], report["target_step"], report["last_step_seen"]) == (30, 50, 50)
    assert json.loads((out / "checkpoint-50" / "trainer_state.json").read_text())["global_step"] == 50
    if not with_checkpoint_dir:
        assert "hf says it resumed from step 30; --num-steps counts from there: target 50" in err


def test_a_fresh_framework_run_over_an_old_checkpoint_counts_from_zero(tmp_path):
    # checkpoint-30 is an earlier run's; this run starts fresh (the framework says step 0 at
    # train begin), so --num-steps 20 means step 20, not 50, and checkpoint-30 is not this run's
    out = tmp_path / "out"
    run_with_report(tmp_path, "--last-step", "30", "--", *python(HF_RESUMED), out, env=WITH_STANDINS)
    result, report = run_with_report(tmp_path, "--num-steps", "20", "--checkpoint-dir", out, "--",
                                     *python(HF_RESUMED), out, env=WITH_STANDINS)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert b"train returned at 20" in result.stdout
    assert (report["start_step"], report["target_step"]) == (None, 20)
    assert "hf says it started fresh, below the checkpoint at step 30" in err


HF_NAN = """
    import math, sys, time
    from transformers import Trainer, TrainingArguments
    def model(step):
        time.sleep(0.005)
        return math.nan if step >= 15 else 1.0 / (1 + step)
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=200, logging_steps=1, save_steps=500)
    out = Trainer(model=model, args=args).train()
    print("train returned at", out.global_step, flush=True)
"""


def test_a_nan_the_trainer_hides_in_its_loss_is_caught_in_grad_norm(tmp_path):
    # Hugging Face's logging_nan_inf_filter (on by default) logs a NaN loss as the mean so
    # far: --stop-on-nan on the loss never fires there; on grad_norm it does, from inside,
    # and the stop writes no checkpoint of NaN weights.
    out = tmp_path / "out"
    result, report = run_with_report(tmp_path, "--last-step", "200", "--stop-on-nan", "--", *python(HF_NAN), out,
                                     env=WITH_STANDINS)
    assert result.returncode == 0 and report["reason"] == "target_reached", result.stderr.decode()
    result, report = run_with_report(tmp_path, "--last-step", "200", "--stop-on-nan", "--nan-field", "grad_norm",
                                     "--", *python(HF_NAN), out, env=WITH_STANDINS)
    err = result.stderr.decode()
    assert result.returncode == 4 and report["reason"] == "nan_loss", err
    assert report["stop_mode"] == "cooperative" and "grad_norm is nan at step 16" in err
    stopped = int(result.stdout.split()[-1])
    assert stopped <= 16 + 2 and not (out / f"checkpoint-{stopped}").exists()


THREADS = """
    import threading, time
    from stopstep_cli import beacon
    stopped = []
    def loop(n):
        for step in range(1, 100000):
            time.sleep(0.001)
            if beacon.step(step):
                stopped.append(step)
                return
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("stopped after", sorted(stopped), flush=True)
"""


def test_threads_calling_the_beacon_at_once_all_stop_at_the_target(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "300", "--", *python(THREADS))
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert result.stdout == b"stopped after [300, 300, 300, 300]\n"
    assert "disengaged" not in err and report["stop_mode"] == "cooperative"


CLOSES_EVERYTHING = """
    import os
    from stopstep_cli import beacon
    for step in range(1, 1000):
        if step == 5:  # as a daemonising library does once it has started
            os.closerange(3, 65536)
            kept = [open(os.devnull) for _ in range(3)]  # the numbers taken again by other files
        if beacon.step(step, loss="nan" if step == 40 else "0.5"):
            print("stopped itself after", step, flush=True)
            break
"""


def test_a_process_that_closes_its_descriptors_and_a_loss_given_as_text(tmp_path):
    result, report = run_with_report(tmp_path, "--last-step", "20", "--", *python(CLOSES_EVERYTHING))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"stopped itself after 20\n" and "disengaged" not in result.stderr.decode()
    result, report = run_with_report(tmp_path, "--last-step", "500", "--stop-on-nan", "--",
                                     *python(CLOSES_EVERYTHING))
    assert result.returncode == 4, result.stderr.decode()  # "nan" as text is a NaN, as in a log line
    assert report["reason"] == "nan_loss" and report["stop_mode"] == "cooperative"


def test_an_empty_pythonpath_entry_still_means_the_working_directory(tmp_path):
    (tmp_path / "cwdmod.py").write_text("NAME = 'from the working directory'\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.py").write_text("import cwdmod\nprint(cwdmod.NAME)\nprint('step 1', flush=True)\n")
    # `export PYTHONPATH=$PYTHONPATH:/x` with none set before: a leading empty entry
    env = {"PYTHONPATH": f"{os.pathsep}{tmp_path / 'nowhere'}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "sub/s.py"], cwd=tmp_path, env={**os.environ, **env},
                            capture_output=True)
    assert result.returncode == 0, result.stderr  # what the user had without stopstep
    result, _ = run_with_report(tmp_path, "--last-step", "1", "--", sys.executable, "sub/s.py", cwd=tmp_path,
                                env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"from the working directory\nstep 1\n"


REOPENS_ITS_SOCKET = """
    import os, time
    from stopstep_cli import beacon
    for step in range(1, 10 ** 6):
        if step == 5:
            os.closerange(3, 65536)  # its socket is made anew at the next report
        time.sleep(0.01)
        if beacon.step(step):
            print("stopped itself after", step, flush=True)
            break
"""


def test_a_process_that_made_its_socket_anew_is_still_one_process(tmp_path):
    report_path = tmp_path / "r.json"
    proc = start_stopstep("run", "-v", "--last-step", "100000", "--report", report_path, "--",
                          *python(REOPENS_ITS_SOCKET))
    seen = wait_for_output(proc.stderr, b"in-process: beacon engaged")
    while seen.count(b"in-process: beacon engaged") < 2:  # and once more, on its new socket
        seen = wait_for_output(proc.stderr, b"\n", already=seen)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, stderr.decode()
    # one process: the next step, not the margin a data-parallel run needs
    assert b"asked the training to stop itself after its next step" in stderr, stderr.decode()


FORKS_WHILE_A_THREAD_STEPS = """
    import os, signal, threading, time
    from stopstep_cli import beacon
    def loop():
        for step in range(1, 10 ** 6):
            if beacon.step(step):
                return
            time.sleep(0.001)
    thread = threading.Thread(target=loop)
    thread.start()  # its first call engages while the main thread forks
    statuses = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a child that hangs on an inherited lock dies of this
            beacon.step(1)
            os._exit(0)
        statuses.append(os.waitpid(pid, 0)[1])
    thread.join()
    print("children", statuses, flush=True)
"""


def test_a_fork_while_another_thread_engages_does_not_hang_the_child(tmp_path):
    result, _ = run_with_report(tmp_path, "--last-step", "500", "--", *python(FORKS_WHILE_A_THREAD_STEPS))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"children [0, 0, 0, 0, 0]\n"
