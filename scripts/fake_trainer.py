#!/usr/bin/env python3
"""A stand-in for a training script, for stopstep's examples, tests and benchmarks.

It prints its global step at a chosen rate and behaves like real trainers do
around signals and processes: DataLoader-like worker processes, a graceful
shutdown on SIGINT/SIGTERM (optionally slow, like a final checkpoint save),
signals it ignores, a grandchild that escapes with setsid or a double fork,
raw bytes on its output. Standard library only.

    python scripts/fake_trainer.py --steps 1000 --rate 50
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

STOP = []  # the signals that asked us to stop
ARGS = None
STEP = [0]  # the last step completed, for the stamp of a signal


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="last step to train to, then exit 0")
    p.add_argument("--start", type=int, default=0, help="step to resume from")
    p.add_argument("--rate", type=float, default=100.0, help="steps per second (0: as fast as possible)")
    p.add_argument("--format", default="step {step} loss {loss:.4f}",
                   help="line printed after each step; fields: step, loss, total")
    p.add_argument("--stderr", action="store_true", help="print step lines on stderr")
    p.add_argument("--end", default="\n", help="line terminator (\\r for progress bars)")
    p.add_argument("--every", type=int, default=1, help="print one step line every N steps")
    p.add_argument("--noise", type=int, default=0, help="lines without a step printed between step lines")
    p.add_argument("--workers", type=int, default=0, help="DataLoader-like worker processes to fork")
    p.add_argument("--workers-ignore-int", action="store_true",
                   help="workers ignore SIGINT and leave when the trainer is gone (like PyTorch's)")
    p.add_argument("--setsid-grandchild", action="store_true", help="fork a grandchild that calls setsid()")
    p.add_argument("--double-fork", action="store_true", help="leave a daemon behind by double-forking")
    p.add_argument("--ignore", default="", help="comma-separated signals to ignore, e.g. INT,TERM")
    p.add_argument("--shutdown-delay", type=float, default=0.0,
                   help="seconds a graceful stop takes (a final checkpoint save)")
    p.add_argument("--stop-exit", type=int, default=None,
                   help="exit status after a graceful stop (default: 128 + the signal)")
    p.add_argument("--crash-at", type=int, default=None, help="exit with --crash-code at this step")
    p.add_argument("--crash-code", type=int, default=1)
    p.add_argument("--binary", action="store_true", help="also write invalid UTF-8, NUL bytes and ANSI colour")
    p.add_argument("--pidfile", help="append the pid of every process started here to this file")
    p.add_argument("--stampfile", help="append 'wrote STEP T' and 'signal N T' lines (CLOCK_MONOTONIC)")
    p.add_argument("--stamp-step", type=int, default=None, help="only stamp the write of this step")
    p.add_argument("--stamp-saves", action="store_true", help="stamp finished checkpoints instead of lines")
    p.add_argument("--checkpoint-dir", help="save a checkpoint every --save-every steps here")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--layout", default="hf",
                   help="checkpoint layout: hf, lightning, deepspeed, tf, megatron, torchtitan, orbax, "
                        "fairseq, mmengine, composer, generic")
    p.add_argument("--save-seconds", type=float, default=0.0, help="how long writing one checkpoint takes")
    p.add_argument("--save-at-stop", action="store_true", help="save a checkpoint on a graceful stop")
    p.add_argument("--log-file", help="write step lines to this file (not to stdout)")
    p.add_argument("--agent", type=int, default=0,
                   help="be a torchrun-like agent: start N workers (each in its own session), pass signals on")
    p.add_argument("--rank", type=int, default=0, help="worker rank; only rank 0 prints and stamps")
    p.add_argument("--rotate-every", type=int, default=0, help="rotate --log-file every N lines")
    return p.parse_args(argv)


def note_pid(args, pid=None):
    if args.pidfile:
        with open(args.pidfile, "a") as fh:
            fh.write(f"{pid or os.getpid()}\n")


_STAMP_FD = []


def stamp(args, text):
    """One line with the CLOCK_MONOTONIC time, written with one write() on a file
    kept open, so that measuring barely slows the step it measures."""
    if args.stampfile:
        if not _STAMP_FD:
            _STAMP_FD.append(os.open(args.stampfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        os.write(_STAMP_FD[0], f"{text} {time.clock_gettime(time.CLOCK_MONOTONIC):.9f}\n".encode())


def worker_loop(parent, ignore_int):
    if ignore_int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while os.getppid() == parent:  # PyTorch's workers watch their parent the same way
        time.sleep(0.05)
    os._exit(0)


def fork_worker(args, target):
    pid = os.fork()
    if pid == 0:
        try:
            target()
        finally:
            os._exit(0)
    note_pid(args, pid)
    return pid


def sleep_forever():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        time.sleep(3600)


def setsid_grandchild(args):
    def child():
        os.setsid()
        note_pid(args)
        sleep_forever()

    fork_worker(args, child)


def double_fork(args):
    def middle():
        pid = os.fork()
        if pid == 0:
            os.setsid()
            note_pid(args)
            sleep_forever()
        os._exit(0)

    pid = fork_worker(args, middle)
    os.waitpid(pid, 0)


def on_stop(signum, frame):
    if not STOP:
        stamp(ARGS, f"signal {signum} at {STEP[0]}")
    STOP.append(signum)


def _zip_bytes(step):
    """A small torch.save-like zip archive."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00." + b"\0" * 4096)
        zf.writestr("archive/version", str(step))
    return buf.getvalue()


def _write(path, data, seconds=0.0):
    """Write data, in two halves ``seconds`` apart (a save that takes time)."""
    with open(path, "wb") as fh:
        if seconds:
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(seconds)
            fh.write(data[len(data) // 2:])
        else:
            fh.write(data)


def _replace(path, data, seconds=0.0):
    _write(path + ".tmp", data, seconds)
    os.replace(path + ".tmp", path)


def save_checkpoint(args, step):
    """Save the way each framework does, in its order (see frameworks.md)."""
    import json

    root, slow, layout = args.checkpoint_dir, args.save_seconds, args.layout
    os.makedirs(root, exist_ok=True)
    j = os.path.join
    if layout == "hf":
        path = j(root, f"checkpoint-{step}")
        os.makedirs(path, exist_ok=True)
        _write(j(path, "model.safetensors"), b"\x02\0\0\0\0\0\0\0{}", slow)
        _write(j(path, "optimizer.pt"), _zip_bytes(step))
        _write(j(path, "trainer_state.json"), json.dumps({"global_step": step}).encode())
    elif layout == "lightning":
        _replace(j(root, f"epoch=0-step={step}.ckpt"), _zip_bytes(step), slow)
    elif layout == "deepspeed":
        path = j(root, f"global_step{step}")
        os.makedirs(path, exist_ok=True)
        _write(j(path, "mp_rank_00_model_states.pt"), _zip_bytes(step), slow)
        _write(j(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), _zip_bytes(step))
        _write(j(root, "latest"), f"global_step{step}".encode())
    elif layout == "tf":
        _write(j(root, f"ckpt-{step}.data-00000-of-00001"), b"\0" * 4096, slow)
        _write(j(root, f"ckpt-{step}.index"), b"\0" * 64)
        _replace(j(root, "checkpoint"), f'model_checkpoint_path: "ckpt-{step}"\n'
                 f'all_model_checkpoint_paths: "ckpt-{step}"\n'.encode())
    elif layout == "megatron":
        path = j(root, f"iter_{step:07d}", "mp_rank_00")
        os.makedirs(path, exist_ok=True)
        _write(j(path, "model_optim_rng.pt"), _zip_bytes(step), slow)
        _write(j(root, "latest_checkpointed_iteration.txt"), str(step).encode())
    elif layout == "torchtitan":
        path = j(root, f"step-{step}")
        os.makedirs(path, exist_ok=True)
        _write(j(path, "__0_0.distcp"), b"\0" * 4096, slow)
        _write(j(path, ".metadata"), b"\0" * 64)
    elif layout == "orbax":
        tmp = j(root, f"{step}.orbax-checkpoint-tmp-{time.time_ns()}")
        os.makedirs(j(tmp, "default"))
        _write(j(tmp, "default", "data"), b"\0" * 4096, slow)
        os.rename(tmp, j(root, str(step)))
    elif layout == "fairseq":
        _replace(j(root, f"checkpoint_1_{step}.pt"), _zip_bytes(step), slow)
    elif layout == "mmengine":
        _write(j(root, f"iter_{step}.pth"), _zip_bytes(step), slow)
        _write(j(root, "last_checkpoint"), j(root, f"iter_{step}.pth").encode())
    elif layout == "composer":
        _write(j(root, f"ep0-ba{step}-rank0.pt"), _zip_bytes(step), slow)
        link = j(root, "latest-rank0.pt")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(f"ep0-ba{step}-rank0.pt", link)
    else:  # generic
        _write(j(root, f"model_{step}.bin"), b"\0" * 4096, slow)


class RotatingLog:
    """A log file the trainer writes itself, rotated like logging's RotatingFileHandler."""

    def __init__(self, path, rotate_every):
        self.path, self.rotate_every, self.lines = path, rotate_every, 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fh = open(path, "a")

    def write(self, line):
        if self.rotate_every and self.lines and self.lines % self.rotate_every == 0:
            self.fh.close()
            os.replace(self.path, self.path + ".1")
            self.fh = open(self.path, "a")
        self.fh.write(line + "\n")
        self.fh.flush()
        self.lines += 1


def run_agent(args, argv):
    """Like torchrun's elastic agent: workers in their own sessions, signals passed on, the worst status out."""
    import subprocess

    rest = list(argv)
    i = rest.index("--agent")
    del rest[i:i + 2]
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *rest, "--rank", str(rank)],
                                start_new_session=True) for rank in range(args.agent)]

    def forward(signum, frame):
        for proc in workers:
            proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [proc.wait() for proc in workers]
    return max((128 - c if c < 0 else c) for c in codes)


def main(argv=None):
    global ARGS
    argv = sys.argv[1:] if argv is None else argv
    args = ARGS = parse_args(argv)
    note_pid(args)
    if args.agent:
        return run_agent(args, argv)
    if args.rank:  # other ranks train in step but print nothing
        args.format, args.stampfile = "", None
    for name in filter(None, args.ignore.split(",")):
        signal.signal(getattr(signal, "SIG" + name.upper().removeprefix("SIG")), signal.SIG_IGN)
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, on_stop)

    parent = os.getpid()
    for _ in range(args.workers):
        fork_worker(args, lambda: worker_loop(parent, args.workers_ignore_int))
    if args.setsid_grandchild:
        setsid_grandchild(args)
    if args.double_fork:
        double_fork(args)

    out = sys.stderr if args.stderr else sys.stdout
    end = args.end.encode().decode("unicode_escape")
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    step = args.start
    log = RotatingLog(args.log_file, args.rotate_every) if args.log_file else None
    if args.binary:
        out.buffer.write(b"\xff\xfe invalid utf-8 \x00 nul \x1b[31mred\x1b[0m\n")
        out.flush()
    while step < args.steps and not STOP:
        if interval:
            # A step takes its time, like a compute-bound one: a step delayed (by the
            # scheduler) is not made up for by a burst of faster ones afterwards.
            next_at = max(next_at, time.monotonic() - interval) + interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if STOP:
                break
        step += 1
        STEP[0] = step
        if args.crash_at is not None and step >= args.crash_at:
            print(f"crashing at step {step}", file=sys.stderr, flush=True)
            sys.exit(args.crash_code)
        for _ in range(args.noise):
            out.write("INFO data loader queue 12 items, lr 0.0003, tokens/s 12345\n")
        if step % args.every == 0:
            line = args.format.format(step=step, loss=1.0 / step, total=args.steps)
            if not args.stamp_saves and (args.stamp_step is None or step == args.stamp_step):
                stamp(args, f"wrote {step}")
            if log is not None:
                log.write(line)
            elif line:
                out.write(line + end)
                out.flush()
        if args.checkpoint_dir and args.save_every and step % args.save_every == 0:
            save_checkpoint(args, step)
            if args.stamp_saves and (args.stamp_step is None or step == args.stamp_step):
                stamp(args, f"wrote {step}")  # the checkpoint is complete now
            next_at = time.monotonic()  # training resumes after the save, it does not catch up
    if STOP:
        print(f"trainer: received signal {STOP[0]} at step {step}; shutting down", file=sys.stderr, flush=True)
        if args.shutdown_delay:
            time.sleep(args.shutdown_delay)
        if args.save_at_stop and args.checkpoint_dir:
            save_checkpoint(args, step)
        print(f"trainer: stopped cleanly at step {step}", file=sys.stderr, flush=True)
        sys.exit(args.stop_exit if args.stop_exit is not None else 128 + STOP[0])
    print(f"trainer: finished at step {step}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
