"""The recipes of docs/deployment.md, run as written wherever this machine can run them.

Each test reads its commands out of the document (so the document cannot drift from
what was tested), puts the fake trainer in place of ``python train.py`` and paths of
the test in place of the container's, and checks what the platform would see: the
exit status it reads, the report, the summary, no process left. A container engine,
a cluster and a CI runner are not here; what they rely on is: PID 1 in a PID
namespace receiving SIGTERM and, a grace period later, SIGKILL.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from helpers import (
    ROOT,
    STOPSTEP,
    TIMEOUT,
    _env,
    assert_all_gone,
    needs_pid_namespace,
    read_pids,
    trainer,
    wait_for_output,
)

DOC = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


def code_blocks(title: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", section(title), flags=re.S)


def stopstep_argv(words: list, command: list) -> list:
    """A documented ``stopstep run ... -- CMD``: this checkout's stopstep, with ``command``
    in place of CMD."""
    assert words[0] == "stopstep" and "--" in words, words
    return STOPSTEP + words[1:words.index("--") + 1] + [str(part) for part in command]


def with_option(argv: list, option: str, value) -> list:
    """``argv`` with ``option``'s value replaced (a 50,000-step target is not for a test)."""
    argv = list(argv)
    argv[argv.index(option) + 1] = str(value)
    return argv


def run_as_pid1_and_stop(argv: list, env: dict, kill_after: float, pidfile: Path):
    """Run ``argv`` as PID 1 of a new PID namespace, as a container's entrypoint; once the
    trainer runs, SIGTERM to PID 1, and SIGKILL ``kill_after`` seconds later if it is still
    there: what `docker stop -t` and the kubelet do. Returns (status, stderr)."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env))
    try:
        wait_for_output(proc.stdout, b"step 2 ")
        inner = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "stopstep_cli" in " ".join(p.cmdline())]
        assert inner, "stopstep did not start inside the namespace"
        inner[0].send_signal(signal.SIGTERM)
        kill = threading.Timer(kill_after, lambda: inner[0].send_signal(signal.SIGKILL))
        kill.start()
        try:
            _out, err = proc.communicate(timeout=kill_after + TIMEOUT)
        finally:
            kill.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_all_gone(read_pids(pidfile))
    return proc.returncode, err.decode(errors="replace")


# -- Docker ------------------------------------------------------------------------------


def docker_entrypoint():
    """ENTRYPOINT and CMD of the documented Dockerfile, and `docker stop`'s timeout."""
    dockerfile = code_blocks("Docker", "dockerfile")[0]
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, flags=re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.M).group(1))
    shell = code_blocks("Docker", "sh")[0]
    stop_timeout = float(re.search(r"docker stop -t (\d+)", shell).group(1))
    target = re.search(r"-e STOPSTEP_LAST_STEP=(\d+)", shell).group(1)
    return entrypoint, cmd, stop_timeout, target


def test_docker_recipe_gives_docker_more_time_than_the_grace_period():
    entrypoint, cmd, stop_timeout, _target = docker_entrypoint()
    assert cmd[0] == "python" and entrypoint[-1] == "--"
    assert stop_timeout > float(entrypoint[entrypoint.index("--grace-period") + 1])


@needs_pid_namespace
def test_docker_stop_of_the_documented_entrypoint_exits_143_with_the_report(tmp_path, pidfile):
    entrypoint, _cmd, stop_timeout, target = docker_entrypoint()
    words = [word.replace("/out", str(tmp_path)) for word in entrypoint]
    argv = stopstep_argv(words, trainer("--rate", "20", "--workers", "2", "--pidfile", pidfile))
    status, err = run_as_pid1_and_stop(argv, {"STOPSTEP_LAST_STEP": target}, stop_timeout, pidfile)
    assert status == 143, err  # stopstep's own, before Docker's SIGKILL (that would be 137)
    report = json.loads((tmp_path / "stopstep.json").read_text())
    assert report["received_signal"] == "SIGTERM" and report["target_step"] == int(target)


@needs_pid_namespace
def test_the_documented_entrypoint_takes_its_target_from_the_environment(tmp_path, pidfile):
    entrypoint, _cmd, _timeout, _target = docker_entrypoint()
    words = [word.replace("/out", str(tmp_path)) for word in entrypoint]
    argv = stopstep_argv(words, trainer("--rate", "100", "--workers", "2", "--pidfile", pidfile))
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", *argv], capture_output=True,
                            timeout=TIMEOUT, env=_env({"STOPSTEP_LAST_STEP": "30"}))
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads((tmp_path / "stopstep.json").read_text())
    assert report["reason"] == "target_reached" and report["last_step_seen"] >= 30
    assert_all_gone(read_pids(pidfile))


# -- Kubernetes ---------------------------------------------------------------------------


def kubernetes_job():
    job = code_blocks("Kubernetes", "yaml")[0]
    command = json.loads(re.search(r"^\s+command: (\[.*\])$", job, flags=re.M).group(1))
    grace = float(re.search(r"terminationGracePeriodSeconds: (\d+)", job).group(1))
    target = re.search(r"name: STOPSTEP_LAST_STEP, value: \"(\d+)\"", job).group(1)
    return command, grace, target


def test_kubernetes_recipe_gives_the_pod_more_time_than_the_grace_period():
    command, grace, _target = kubernetes_job()
    assert grace > float(command[command.index("--grace-period") + 1])


@needs_pid_namespace
def test_kubernetes_pod_termination_of_the_documented_container_exits_143(tmp_path, pidfile):
    command, grace, target = kubernetes_job()
    (tmp_path / "ckpt").mkdir()
    words = [word.replace("/ckpt", str(tmp_path / "ckpt")) for word in command]
    argv = stopstep_argv(words, trainer("--rate", "20", "--workers", "2", "--pidfile", pidfile,
                                        "--checkpoint-dir", tmp_path / "ckpt", "--layout", "hf", "--save-every", "5"))
    status, err = run_as_pid1_and_stop(argv, {"STOPSTEP_LAST_STEP": target}, grace, pidfile)
    assert status == 143, err  # the kubelet's SIGKILL after the termination grace period would give 137
    report = json.loads((tmp_path / "ckpt" / "stopstep.json").read_text())
    assert report["reason"] == "signal" and report["received_signal"] == "SIGTERM"


# -- SLURM ----------------------------------------------------------------------------------


def test_the_slurm_batch_script_execs_stopstep_so_b_term_reaches_it(tmp_path, pidfile):
    script = code_blocks("SLURM", "sh")[0]
    assert "#SBATCH --signal=B:TERM@" in script and "\nexec stopstep run " in script
    stopstep = " ".join(shlex.quote(word) for word in STOPSTEP)
    command = " ".join(shlex.quote(str(word)) for word in trainer("--rate", "20", "--pidfile", pidfile))
    script = script.replace("exec stopstep run --last-step 50000 ", f"exec {stopstep} run --last-step 100000 ")
    script = script.replace("-- python train.py --output_dir out", f"-- {command}")
    assert "python train.py" not in script, "the recipe changed: update this test's substitutions"
    (tmp_path / "job.sh").write_text(script)
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env({"SLURM_JOB_ID": "42"}))
    wait_for_output(proc.stdout, b"step 2 ")
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM sends: to the batch script's process alone
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err.decode()
    report = json.loads((tmp_path / "stopstep-42.json").read_text())
    assert report["reason"] == "signal" and report["received_signal"] == "SIGTERM"
    assert_all_gone(read_pids(pidfile))


# -- torchrun across nodes ---------------------------------------------------------------------


def test_nodes_sharing_a_polled_checkpoint_directory_stop_once_the_checkpoint_is_whole(tmp_path):
    line = " ".join(code_blocks("torchrun across nodes", "sh")[0].replace("\\\n", " ").split())
    words = shlex.split(line.replace("/shared/ckpt", str(tmp_path / "ckpt")))
    words = with_option(with_option(words, "--last-step", 50), "--poll", 0.2)
    (tmp_path / "ckpt").mkdir()
    # node 0's rank 0 writes the checkpoints (each takes 0.3 s); node 1 only trains
    writes = ["--checkpoint-dir", tmp_path / "ckpt", "--layout", "hf", "--save-every", "10", "--save-seconds", "0.3"]
    nodes = []
    for node, extra in enumerate((writes, [])):
        argv = stopstep_argv(words, trainer("--rate", "50", *extra))
        argv.insert(len(STOPSTEP) + 1, f"--report={tmp_path / f'node{node}.json'}")
        nodes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(None)))
    for node, proc in enumerate(nodes):
        _out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err.decode()
        report = json.loads((tmp_path / f"node{node}.json").read_text())
        assert report["reason"] == "target_reached" and report["last_checkpoint_step"] >= 50, report
        assert (Path(report["last_checkpoint_path"]) / "trainer_state.json").exists()


# -- GitHub Actions ---------------------------------------------------------------------------


def test_the_github_actions_smoke_step_passes_and_fills_the_job_summary(tmp_path):
    workflow = code_blocks("GitHub Actions", "yaml")[0]
    run = re.search(r"name: train 50 steps\n\s+run: (.*)$", workflow, flags=re.M).group(1)
    words = shlex.split(run)
    summary = tmp_path / "summary.md"
    result = subprocess.run(stopstep_argv(words, trainer("--rate", "50")), capture_output=True,
                            timeout=TIMEOUT, cwd=tmp_path, env=_env({"GITHUB_STEP_SUMMARY": str(summary)}))
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads((tmp_path / "smoke.json").read_text())["last_step_seen"] >= 50
    assert "| reason | target_reached |" in summary.read_text()


def test_the_github_actions_smoke_step_fails_a_run_that_ends_early(tmp_path):
    workflow = code_blocks("GitHub Actions", "yaml")[0]
    words = shlex.split(re.search(r"name: train 50 steps\n\s+run: (.*)$", workflow, flags=re.M).group(1))
    result = subprocess.run(stopstep_argv(words, trainer("--rate", "100", "--steps", "20")), capture_output=True,
                            timeout=TIMEOUT, cwd=tmp_path, env=_env(None))
    assert result.returncode == 3, result.stderr.decode()  # the job fails: training ended at 20 of 50


@pytest.mark.parametrize("title", ["Docker", "Kubernetes", "SLURM", "torchrun across nodes", "GitHub Actions"])
def test_every_recipe_says_what_was_tried(title):
    assert "Tried" in section(title)
