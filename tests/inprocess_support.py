"""Helpers for the in-process tests: real Python subprocesses started with the environment of a
real InProcessChannel that lives in the test process, and the messages they send it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from stopstep_cli.channel import SITE_DIR, InProcessChannel

ROOT = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "standins"
TIMEOUT = 60  # generous bound for a loaded 2-core machine; runs finish far sooner
DISENGAGED = "stopstep: in-process stop disengaged: "

# The stand-in trainings, each printing how it ended on stdout.
HF_TRAIN = """
    import sys, time
    from transformers import Trainer, TrainingArguments
    pace = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    def model(step):
        time.sleep(pace)
        return 1.0 / (1 + step)
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=20, logging_steps=2, save_steps=500)
    output = Trainer(model=model, args=args).train()
    print("train returned at", output.global_step, flush=True)
"""

BEACON_LOOP = """
    import sys
    from stopstep_cli import beacon
    last = int(sys.argv[1])
    for step in range(1, last + 1):
        if beacon.step(step):
            print("stopped after", step, flush=True)
            break
    else:
        print("ran out at", last, flush=True)
"""

# One step per line read from stdin, printing "at N" after each, so a test knows where it is.
BEACON_STEPPED = """
    import sys
    from stopstep_cli import beacon
    step = 0
    for line in sys.stdin:
        step += 1
        if beacon.step(step):
            print("stopped after", step, flush=True)
            break
        print("at", step, flush=True)
"""


def script(text: str) -> List[str]:
    return [sys.executable, "-c", textwrap.dedent(text)]


def child_env(channel: Optional[InProcessChannel], target: Optional[int], extra: Optional[dict] = None,
              path=(STANDINS, ROOT)) -> dict:
    """The environment stopstep would give the command: the stand-ins and this checkout on the
    path, then the channel's variables (the site directory first on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOPSTEP_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in path)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    if channel is not None:
        env.update(channel.environment(target, env))
    env.update(extra or {})
    return env


def site_only_env(extra: Optional[dict] = None) -> dict:
    """PYTHONPATH as under stopstep (site directory first) but no channel variable."""
    env = child_env(None, None, extra)
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, env["PYTHONPATH"]])
    return env


class Run:
    """A subprocess and the messages a channel got while it ran."""

    def __init__(self, argv, env, channel: Optional[InProcessChannel] = None, stdin=subprocess.DEVNULL, cwd=None):
        self.channel = channel
        self.messages: List[dict] = []
        self.stdout = b""
        self.stderr = b""
        self.proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd)
        self._open = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    @property
    def ended(self) -> bool:
        """The process exited and its output is all read."""
        return not self._open and self.proc.poll() is not None

    def pump(self, until: Callable[["Run"], bool], timeout: float = TIMEOUT) -> None:
        """Take messages and output as they come until ``until(self)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not until(self):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out; stdout={self.stdout[-500:]!r} stderr={self.stderr[-2000:]!r} "
                            f"last messages={self.messages[-5:]}")
            if self.ended:
                self._take_messages()
                if not until(self):
                    pytest.fail(f"the process ended first; stdout={self.stdout[-500:]!r} "
                                f"stderr={self.stderr[-2000:]!r} last messages={self.messages[-5:]}")
                return
            fds = list(self._open) + ([self.channel.fileno()] if self.channel is not None else [])
            if not self._open:  # output closed: what is left is the exit
                self.proc.wait(timeout=left)
                continue
            ready, _, _ = select.select(fds, [], [], left)
            for fd in ready:
                if fd in self._open:
                    self._read(fd)
                else:
                    self._take_messages()

    def finish(self, timeout: float = TIMEOUT) -> "Run":
        """Run to the end, with every byte of output and every message sent before the exit."""
        self.pump(lambda run: run.ended, timeout)
        self._take_messages()
        return self

    def wait_for_output(self, needle: bytes, timeout: float = TIMEOUT) -> None:
        self.pump(lambda run: needle in run.stdout, timeout)

    def send_lines(self, count: int) -> None:
        self.proc.stdin.write(b"x\n" * count)
        self.proc.stdin.flush()

    def of_type(self, kind: str) -> List[dict]:
        return [m for m in self.messages if m["t"] == kind]

    def steps(self) -> List[int]:
        return [m["step"] for m in self.of_type("step")]

    def stderr_lines(self) -> List[str]:
        return self.stderr.decode(errors="replace").splitlines()

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        if not chunk:
            del self._open[fd]
        elif self._open[fd] == "stdout":
            self.stdout += chunk
        else:
            self.stderr += chunk

    def _take_messages(self) -> None:
        if self.channel is not None:
            self.messages.extend(self.channel.receive())


def run_to_end(argv, env, channel: Optional[InProcessChannel] = None, timeout: float = TIMEOUT, cwd=None) -> Run:
    with Run(argv, env, channel, cwd=cwd) as run:
        return run.finish(timeout)
