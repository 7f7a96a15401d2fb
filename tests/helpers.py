"""Helpers shared by the tests: run the real CLI on real processes and check
what a user would check (exit status, bytes out, steps, no process left)."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_TRAINER = ROOT / "scripts" / "fake_trainer.py"
STOPSTEP = [sys.executable, "-m", "stopstep_cli"]
TIMEOUT = 60  # generous bound for a loaded 2-core machine; tests finish far sooner


def trainer(*args: str) -> list:
    return [sys.executable, str(FAKE_TRAINER), *map(str, args)]


def run_stopstep(*args, input=None, timeout=TIMEOUT, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``stopstep ARGS`` to the end; stdout and stderr as bytes."""
    return subprocess.run(
        STOPSTEP + [str(a) for a in args],
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
        env=_env(env),
        **kwargs,
    )


def run_with_report(tmp_path, *args, **kwargs):
    """``stopstep run --report R ARGS``; (the completed process, the report as a dict)."""
    import json

    path = tmp_path / "report.json"
    result = run_stopstep("run", "--report", path, *args, **kwargs)
    assert path.exists(), result.stderr.decode()
    return result, json.loads(path.read_text())


def start_stopstep(*args, env=None, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(STOPSTEP + [str(a) for a in args], env=_env(env), **kwargs)


def _env(extra):
    env = dict(os.environ)
    env.pop("STOPSTEP_LAST_STEP", None)
    env.pop("STOPSTEP_NUM_STEPS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def wait_for_output(stream, needle: bytes, timeout: float = TIMEOUT, already: bytes = b"") -> bytes:
    """Read ``stream`` until ``needle`` shows up in what is read from now on; ``already``
    plus what was read. Fails on timeout or EOF."""
    fd = stream.fileno()
    start = len(already)
    seen = already
    deadline = time.monotonic() + timeout
    while needle not in seen[start:]:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{needle!r} did not show up within {timeout}s; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"stream closed before {needle!r} showed up; got {seen[-500:]!r}")
            seen += chunk
    return seen


def wait_for_file(path: Path, needle: str = "", timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if needle in text:
                return text
        time.sleep(0.01)
    pytest.fail(f"{path} did not get {needle!r} within {timeout}s")


def read_pids(pidfile: Path) -> list:
    """The pids a fake trainer noted, first one (the trainer itself) first, no repeats."""
    pids = [int(line) for line in pidfile.read_text().split()] if pidfile.exists() else []
    return list(dict.fromkeys(pids))


def assert_all_gone(pids, timeout: float = 10.0) -> None:
    """Every pid (of a fake_trainer process) has ended; zombies must be reaped too."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if _alive_trainer_process(pid)]
        if left:
            time.sleep(0.02)
    assert not left, f"processes left behind: {[_describe(pid) for pid in left]}"


def _alive_trainer_process(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return "fake_trainer" in " ".join(proc.cmdline()) or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{pid} {proc.status()} ppid={proc.ppid()} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return f"{pid} (gone)"


def stderr_lines(result) -> list:
    return [line for line in result.stderr.decode(errors="replace").splitlines() if line.startswith("stopstep:")]


class Terminal:
    """stopstep run on a pseudo-terminal that is its controlling terminal, as from a shell."""

    def __init__(self, args, size=(24, 80), env=None):
        self.master, slave = os.openpty()
        self.size = size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))

        def make_controlling():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(STOPSTEP + list(args), stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=make_controlling, env=_env(env))
        self.slave_name = os.ttyname(slave)
        os.close(slave)
        self.output = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.output += data

    def wait_for(self, needle: bytes, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            assert time.monotonic() < deadline, f"{needle!r} not on the terminal; got {self.output[-400:]!r}"
            time.sleep(0.01)

    def type(self, data: bytes):
        os.write(self.master, data)

    def resize(self, rows: int, cols: int):
        """As a terminal window resized: the new size, and SIGWINCH to its foreground group."""
        self.size = (rows, cols)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def screen(self):
        """The screen as a terminal would show it now (pyte renders what was written)."""
        import pyte

        screen = pyte.Screen(self.size[1], self.size[0])
        with self._lock:
            data = self.output
        pyte.ByteStream(screen).feed(data)
        return screen

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        os.close(self.master)


def wait_until(check, what: str = "condition", timeout: float = TIMEOUT):
    """Poll ``check`` until it holds; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


#: Runs stopstep as PID 1 of a new PID namespace, as a container's entrypoint is.
needs_pid_namespace = pytest.mark.skipif(not _can_unshare(), reason="needs unshare --pid (root)")
