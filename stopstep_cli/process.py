"""The process layer: spawn, process group, reaping, finding every process of
the tree, and signalling it.

Rules this module keeps, and why:

- The command runs in its own process group (pgid == its pid), so one
  ``killpg`` reaches it and every helper it forked (DataLoader workers, a
  shell's pipeline) at once.
- The command's pid is never reaped until the whole tree is down: a zombie
  keeps its pid and its process group id reserved, so signalling the group can
  never reach an unrelated process that reused the number.
- From the command line stopstep is a child subreaper: descendants whose
  parent exits (double forks, ``setsid`` daemons) are re-parented to stopstep
  instead of init, so they can still be found and ended, and are reaped as they
  exit. From Python it becomes one only when asked, and then leaves alone the
  children its host process already had.
- A single process outside the group is signalled through a pidfd opened after
  checking its start time, so a pid that was reused in between is never hit.
- The tree is read from ``/proc`` in one pass (pid, parent, group, state, start
  time): psutil has neither the group nor a cheap whole-table read (its
  ``process_iter`` costs ~0.1 ms a process; this costs ~0.01 ms).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence

from .errors import CommandNotExecutable, CommandNotFound, StopstepError
from .terminal import open_output_pty

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _libc():
    import ctypes

    # dlopen(NULL): the process's own symbols, libc's prctl among them.
    # (ctypes.util.find_library would run ldconfig and gcc: slow, and forks.)
    return ctypes.CDLL(None, use_errno=True)


def ensure_standard_fds() -> None:
    """Open /dev/null on any of fds 0-2 that stopstep was started without, before
    any pipe is made: a pipe landing on fd 1 would receive the command's output."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lower ones are open, so this is fd; be safe anyway
                os.dup2(null, fd)
                os.close(null)


class Subreaper:
    """``PR_SET_CHILD_SUBREAPER`` for the duration of a run, put back as it was after."""

    def __init__(self) -> None:
        self.previous: Optional[int] = None

    def enable(self) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        import ctypes

        try:
            libc = _libc()
            was = ctypes.c_int(0)
            if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0:
                self.previous = was.value
            return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            return False

    def restore(self) -> None:
        if self.previous is not None and not self.previous:
            try:
                _libc().prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            except (OSError, AttributeError):
                pass
        self.previous = None


# -- the process table --------------------------------------------------------------------


class ProcInfo(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, Z, T...
    start: int  # start time in clock ticks since boot: with the pid, names one process
    name: str


def process_table() -> Optional[Dict[int, ProcInfo]]:
    """Every process on the machine from ``/proc``, in one pass; None without a /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table: Dict[int, ProcInfo] = {}
    for name in names:
        if not name.isdigit():
            continue
        info = _read_stat(int(name))
        if info is not None:
            table[info.pid] = info
    return table or None


def _read_stat(pid: int) -> Optional[ProcInfo]:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 2048)
        finally:
            os.close(fd)
        close = data.rindex(b")")
        rest = data[close + 2:].split()
        return ProcInfo(pid, int(rest[1]), int(rest[2]), rest[0].decode(), int(rest[19]),
                        data[data.index(b"(") + 1:close].decode(errors="replace"))
    except (OSError, ValueError, IndexError):
        return None


def signal_process(info: ProcInfo, signum: int) -> bool:
    """Signal one process, never another one that reused its pid; False if it is gone."""
    try:
        pidfd = os.pidfd_open(info.pid)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ESRCH:
            return False
        pidfd = None  # no pidfd here (an old kernel): the start-time check narrows the window
    try:
        now = _read_stat(info.pid)
        if now is None or now.start != info.start:
            return False  # gone, or the pid is someone else's now
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(info.pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def describe(info: ProcInfo) -> str:
    return f"{info.pid} ({info.name}, {info.state})"


# -- the tree -----------------------------------------------------------------------------


#: Set in the command's environment to a token of its tree: an orphan re-parented to
#: stopstep is the tree's when it carries it (a process a hook or the host started
#: from stopstep's own process, in a session of its own, does not).
TREE_ENV = "STOPSTEP_TREE"


class ProcessTree:
    """The command and every process it starts.

    ``adopts_orphans``: stopstep is a subreaper, so the orphans re-parented to it
    belong to the tree too (those whose environment holds the tree's token: not the
    processes stopstep's own process starts, a hook's helper in a session of its own);
    ``foreign`` are pids that are not the tree's even if they are stopstep's children
    (its host's own children, the guardian).
    """

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 stop_signal: int = signal.SIGINT, adopts_orphans: bool = False,
                 foreign: Iterable[int] = ()):
        if not argv:
            raise StopstepError("no command given")
        if not argv[0]:
            raise CommandNotFound("command not found: '' (an empty command name)")
        self.argv = list(argv)
        self.env = env
        self.stop_signal = int(stop_signal)
        self.adopts_orphans = adopts_orphans
        self.foreign: FrozenSet[int] = frozenset(foreign)
        self.pid: Optional[int] = None
        self.pidfd: Optional[int] = None  # readable once the command exits (Linux >= 5.3)
        self.stdout_fd = -1
        self.stderr_fd = -1
        self.returncode: Optional[int] = None  # Popen-style, once the command exited
        self.reaped = False
        self.orphan_exited_at = 0.0  # time.monotonic() an adopted orphan was last reaped
        self._token = f"{TREE_ENV}={os.getpid()}-{os.urandom(6).hex()}".encode()
        self._kin: Dict[tuple, bool] = {}  # (pid, start) of stopstep's children -> the tree's?

    # -- start ------------------------------------------------------------

    def spawn(self, stdout_pty: bool = False, stderr_pty: bool = False, child_setup=None) -> int:
        """Start the command in its own process group, its output on pipes (or on
        pseudo-terminals, for live progress bars). ``child_setup`` runs in the
        command before exec."""
        parent = os.getpid()
        stop_signal = self.stop_signal
        prctl = _libc().prctl if sys.platform.startswith("linux") else None
        ignored_by_us = (signal.SIGTTIN, signal.SIGTTOU)

        def in_child():  # runs between fork and exec: system calls only, no imports
            os.setpgid(0, 0)  # own process group (Popen's process_group= needs 3.11)
            if prctl is not None:
                prctl(_PR_SET_PDEATHSIG, stop_signal, 0, 0, 0)
                if os.getppid() != parent:  # stopstep died before the prctl
                    os._exit(128 + stop_signal)
            if child_setup is not None:
                child_setup()
            # stopstep ignores these for itself; ignored dispositions would survive exec
            for signum in ignored_by_us:
                signal.signal(signum, signal.SIG_DFL)
            # The stop signal must work even where the caller ignored it (`cmd &` ignores SIGINT).
            signal.signal(stop_signal, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (stop_signal, signal.SIGTERM, signal.SIGKILL))

        ptys = {}
        if stdout_pty or stderr_pty:
            if stdout_pty:
                ptys["stdout"] = open_output_pty(1)
            if stderr_pty:
                ptys["stderr"] = open_output_pty(2)
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=None,
                stdout=ptys["stdout"][1] if stdout_pty else subprocess.PIPE,
                stderr=ptys["stderr"][1] if stderr_pty else subprocess.PIPE,
                env=dict(os.environ if self.env is None else self.env,
                         **{TREE_ENV: self._token.decode().split("=", 1)[1]}),
                preexec_fn=in_child,
                close_fds=True,
            )
        except (FileNotFoundError, NotADirectoryError):
            raise CommandNotFound(f"command not found: {self.argv[0]}") from None
        except PermissionError:
            what = "is a directory" if os.path.isdir(self.argv[0]) else "permission denied"
            raise CommandNotExecutable(f"cannot run {self.argv[0]}: {what}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOEXEC, errno.EISDIR):
                raise CommandNotExecutable(f"cannot run {self.argv[0]}: {exc.strerror}") from None
            raise StopstepError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        finally:
            for _master, slave in ptys.values():
                os.close(slave)  # the command holds its own copies
        self.pid = proc.pid
        # Own the descriptors; the Popen object must never wait() for us.
        for name in ("stdout", "stderr"):
            if name in ptys:
                fd = ptys[name][0]
            else:
                pipe = getattr(proc, name)
                fd = os.dup(pipe.fileno())
                pipe.close()
                _enlarge_pipe(fd)
            setattr(self, f"{name}_fd", fd)
        proc.returncode = 0  # keeps Popen.__del__ from reaping behind our back
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        return self.pid

    # -- signals out --------------------------------------------------------

    def signal_group(self, signum: int) -> bool:
        """Signal the command's process group; False if nobody is left in it."""
        if self.pid is None or self.reaped:
            return False
        try:
            os.killpg(self.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):  # gone; or a member changed credentials
            return False

    def signal_outside_group(self, members: Sequence[ProcInfo], signum: int) -> int:
        """Signal the members that left the command's group; how many."""
        return sum(signal_process(info, signum) for info in members if info.pgid != self.pid)

    def kill_all(self, members: Sequence[ProcInfo]) -> None:
        """SIGKILL the group and every member outside it."""
        self.signal_group(signal.SIGKILL)
        self.signal_outside_group(members, signal.SIGKILL)

    # -- exit and reaping ---------------------------------------------------

    def poll_exit(self) -> Optional[int]:
        """The command's Popen-style return code once it exited, without reaping it."""
        if self.returncode is not None or self.pid is None:
            return self.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.returncode
        if info is None or info.si_pid == 0:
            return None
        self.returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return self.returncode

    def poll_stopped(self) -> bool:
        """Was the command stopped by a job-control signal since the last call?"""
        if self.pid is None or self.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WNOHANG)
        except ChildProcessError:
            return False
        return info is not None and info.si_pid == self.pid and info.si_code == os.CLD_STOPPED

    def reap_orphans(self) -> None:
        """Reap the exited orphans re-parented to stopstep: never the command, never a
        foreign pid, never a child stopstep's own process made (a hook's subprocess is
        in stopstep's process group; its owner waits for it)."""
        if not self.adopts_orphans:
            return
        keep = self.foreign | {self.pid}
        own_group = os.getpgrp()
        for pid in own_children():
            if pid in keep:
                continue
            info = _read_stat(pid)
            if info is None or info.pgid == own_group:
                continue
            if info.state != "Z":
                self._is_kin(info)  # seen alive: known when it is a zombie, whose environment is gone
                continue
            if self._kin.get((info.pid, info.start)) is False:
                continue  # a hook's (or the host's) own: its owner waits for it
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.orphan_exited_at = time.monotonic()
            except ChildProcessError:
                pass

    def quiet(self, now: float, settle: float = 0.05) -> bool:
        """No adopted orphan exited in the last ``settle`` seconds: a process that forks
        and exits over and over (a new pid each time) leaves a trail of them."""
        return now - self.orphan_exited_at >= settle

    def reap(self) -> None:
        """Reap the command itself; only once the tree is down."""
        if self.pid is not None and not self.reaped:
            self.poll_exit()
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.reaped = True
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.reap_orphans()

    # -- who is in the tree -----------------------------------------------------

    def live_members(self) -> Optional[List[ProcInfo]]:
        """Every live process of the tree: the command's descendants, its process group
        (members re-parented away included), and the orphans adopted as subreaper.
        None when the processes cannot be listed (no /proc)."""
        if self.pid is None:
            return []
        table = process_table()
        if table is None:
            return None
        me = os.getpid()
        children: Dict[int, List[int]] = {}
        for info in table.values():
            children.setdefault(info.ppid, []).append(info.pid)
        roots = [self.pid]
        if self.adopts_orphans:  # adopted orphans; not what stopstep's own process forked (hooks)
            own_group = os.getpgrp()
            roots += [pid for pid in children.get(me, ())
                      if pid not in self.foreign and table[pid].pgid != own_group and self._is_kin(table[pid])]
        found = set()
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid in found or pid == me:
                continue
            found.add(pid)
            stack.extend(children.get(pid, ()))
        found.update(info.pid for info in table.values() if info.pgid == self.pid)
        found.discard(me)
        found.difference_update(self.foreign)
        return [table[pid] for pid in sorted(found) if pid in table and table[pid].state != "Z"]


    def _is_kin(self, info: ProcInfo) -> bool:
        """Is this child of stopstep's (an orphan it adopted, or a process of its own
        process) the tree's? Decided once per process, from its environment while it
        lives; one that cannot be read (a zombie never seen alive, another user's
        program) counts as the tree's, so that nothing of the command is left behind."""
        key = (info.pid, info.start)
        known = self._kin.get(key)
        if known is None:
            try:
                with open(f"/proc/{info.pid}/environ", "rb") as fh:
                    environ = fh.read()
            except OSError:
                return True
            if not environ:  # a zombie, or a kernel thread: nothing to go by
                return True
            known = self._kin[key] = self._token in environ.split(b"\0")
            if len(self._kin) > 4096:  # a long run adopts many: forget the oldest
                del self._kin[next(iter(self._kin))]
        return known


def own_children() -> List[int]:
    """stopstep's children, from /proc/self/task/*/children (cheap), else the whole table."""
    pids: List[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as fh:
                pids.extend(int(p) for p in fh.read().split())
        return pids
    except (OSError, ValueError):
        table = process_table() or {}
        me = os.getpid()
        return [info.pid for info in table.values() if info.ppid == me]


#: Write ends of live guardians' pipes: a process forked from stopstep without an exec
#: (a hook's os.fork, multiprocessing's fork) must not hold one, or the guardian would
#: never see stopstep die.
_GUARDIAN_FDS: set = set()


def _close_guardian_fds_in_child() -> None:
    for fd in _GUARDIAN_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _GUARDIAN_FDS.clear()


os.register_at_fork(after_in_child=_close_guardian_fds_in_child)


class Guardian:
    """A small shell that brings the command's group down if stopstep is killed outright.

    ``kill -9`` (the OOM killer) gives stopstep no chance to act; the command's
    PDEATHSIG then tells the command alone, and a shell in between
    (``bash -c 'python train.py > log'``) may keep its child running. The
    guardian holds a pipe only stopstep can write to: EOF without ``done``
    means stopstep is gone, and it sends the stop signal to the group, waits the
    grace period and SIGKILLs it. It runs in a session of its own and ignores
    the usual signals, so whatever ends stopstep does not end it first.
    """

    SCRIPT = (
        "trap '' INT HUP TERM QUIT; pg=; "
        "while IFS= read -r line; do case $line in done) exit 0;; -) pg=;; *) pg=$line;; esac; done; "
        # the terminal's status row: give the whole terminal back (the scroll region reset)
        '[ -n "$3" ] && printf \'\\033%s\\033[r\\033%s\' 7 8 > "$3" 2>/dev/null; '
        '[ -n "$pg" ] || exit 0; '
        'kill -s "$1" -- "-$pg" 2>/dev/null || exit 0; kill -s CONT -- "-$pg" 2>/dev/null; '
        'sleep "$2"; kill -s KILL -- "-$pg" 2>/dev/null; exit 0'
    )

    def __init__(self, stop_signal: int, grace_period: float, terminal: Optional[str] = None):
        self.pid: Optional[int] = None
        self._write_fd: Optional[int] = None
        self.stop_signal = signal.Signals(stop_signal).name[3:]
        self.grace = max(1, int(grace_period + 0.999))
        self.terminal = terminal or ""

    def start(self) -> Optional[int]:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(["sh", "-c", self.SCRIPT, "stopstep-guardian", self.stop_signal, str(self.grace),
                                     self.terminal],
                                    stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        except OSError:
            os.close(write_fd)
            return None
        finally:
            os.close(read_fd)
        proc.returncode = 0  # reaped by stopstep itself
        self.pid, self._write_fd = proc.pid, write_fd
        _GUARDIAN_FDS.add(write_fd)
        return self.pid

    def watch(self, pgid: int) -> None:
        self._send(f"{pgid}\n")

    def forget(self) -> None:
        """The group is about to be reaped (its id may be reused): nothing to signal any more."""
        self._send("-\n")

    def release(self) -> None:
        """stopstep is ending normally: the guardian leaves without a signal."""
        self._send("done\n")
        if self._write_fd is not None:
            _GUARDIAN_FDS.discard(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None
        if self.pid is not None:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None

    def _send(self, text: str) -> None:
        if self._write_fd is None:
            return
        try:
            os.write(self._write_fd, text.encode())
        except OSError:  # the guardian is gone: nothing to tell
            _GUARDIAN_FDS.discard(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None


def _enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Fewer, larger reads and writes: up to 1 MiB in flight (Linux F_SETPIPE_SZ)."""
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    try:
        fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ
    except OSError:
        pass
