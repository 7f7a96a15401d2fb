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
    p.add_argument("--checkpoint-dir", help="save a checkpoint every --save-every steps here")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--layout", default="hf", help="checkpoint layout: hf, plain")
    return p.parse_args(argv)


def note_pid(args, pid=None):
    if args.pidfile:
        with open(args.pidfile, "a") as fh:
            fh.write(f"{pid or os.getpid()}\n")


def stamp(args, text):
    if args.stampfile:
        with open(args.stampfile, "a") as fh:
            fh.write(f"{text} {time.clock_gettime(time.CLOCK_MONOTONIC):.9f}\n")


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
        stamp(ARGS, f"signal {signum}")
    STOP.append(signum)


def save_checkpoint(args, step):
    import json

    if args.layout == "hf":
        path = os.path.join(args.checkpoint_dir, f"checkpoint-{step}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as fh:
            fh.write(b"\0" * 1024)
        tmp = os.path.join(path, "trainer_state.json.tmp")
        with open(tmp, "w") as fh:
            json.dump({"global_step": step}, fh)
        os.replace(tmp, os.path.join(path, "trainer_state.json"))
    else:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        with open(os.path.join(args.checkpoint_dir, f"step-{step}.ckpt"), "wb") as fh:
            fh.write(b"\0" * 1024)


def main(argv=None):
    global ARGS
    args = ARGS = parse_args(argv)
    note_pid(args)
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
    if args.binary:
        out.buffer.write(b"\xff\xfe invalid utf-8 \x00 nul \x1b[31mred\x1b[0m\n")
        out.flush()
    while step < args.steps and not STOP:
        if interval:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if STOP:
                break
        step += 1
        if args.crash_at is not None and step >= args.crash_at:
            print(f"crashing at step {step}", file=sys.stderr, flush=True)
            sys.exit(args.crash_code)
        for _ in range(args.noise):
            out.write("INFO data loader queue 12 items, lr 0.0003, tokens/s 12345\n")
        if step % args.every == 0:
            line = args.format.format(step=step, loss=1.0 / step, total=args.steps)
            if args.stamp_step is None or step == args.stamp_step:
                stamp(args, f"wrote {step}")
            out.write(line + end)
            out.flush()
        if args.checkpoint_dir and args.save_every and step % args.save_every == 0:
            save_checkpoint(args, step)
    if STOP:
        print(f"trainer: received signal {STOP[0]} at step {step}; shutting down", file=sys.stderr, flush=True)
        if args.shutdown_delay:
            time.sleep(args.shutdown_delay)
        print(f"trainer: stopped cleanly at step {step}", file=sys.stderr, flush=True)
        sys.exit(args.stop_exit if args.stop_exit is not None else 128 + STOP[0])
    print(f"trainer: finished at step {step}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
