"""The process layer: spawn, process group, signals in and out, reaping, and
bringing a whole process tree down.

Rules this module keeps, and why:

- The command runs in its own process group (pgid == its pid), so one
  ``killpg`` reaches it and every helper it forked (DataLoader workers, a
  shell's pipeline) at once.
- The command's pid is never reaped until the whole tree is down: a zombie
  keeps its pid and its process group id reserved, so signalling the group can
  never reach an unrelated process that reused the number.
- On Linux stopstep is a child subreaper: descendants whose parent exits
  (double forks, ``setsid`` daemons) are re-parented to stopstep instead of
  init, so they can still be found and ended, and are reaped as they exit.
- Signals sent to stopstep arrive as bytes on a self-pipe (``set_wakeup_fd``)
  and are handled in the main loop, never inside a signal handler.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from .errors import CommandNotExecutable, CommandNotFound, StopstepError

#: Signals passed on to the command's process group.
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
)
#: Signals never passed on: uncatchable, stopstep's own business, or faults.
_NOT_FORWARDED = frozenset(
    (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGCONT,
     signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
     signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT)
)


def all_catchable_signals() -> tuple:
    """Every standard signal stopstep can pass on (as PID 1, like tini and dumb-init)."""
    return tuple(s for s in signal.Signals if 0 < s < 32 and s not in _NOT_FORWARDED)


#: Of those, the ones after which stopstep brings the tree down and exits 128+n.
TERMINATING_SIGNALS = frozenset(
    (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM)
)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def parse_signal(value) -> signal.Signals:
    """``INT``, ``SIGINT``, ``int`` or ``2`` -> signal.SIGINT; ValueError otherwise."""
    text = str(value).strip()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise ValueError(f"no signal numbered {text}") from None
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None


def status_to_exit_code(returncode: int) -> int:
    """Popen-style return code (negative: killed by that signal) -> shell status."""
    return 128 - returncode if returncode < 0 else returncode


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


def become_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class SignalInbox:
    """Signals delivered to stopstep, read in the main loop from a pipe.

    Installing a (no-op) handler also undoes what stopstep's parent may have
    left: an ignored SIGCHLD (which would hide the command's exit status) or
    blocked signals. Handlers are reset to default in the command by exec.
    """

    def __init__(self, signals: Sequence[int] = FORWARDED_SIGNALS):
        self.signals = tuple(signals) + (signal.SIGCHLD,)
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: Dict[int, object] = {}
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, _ignore_in_python)
        # A job-control stop of a backgrounded stopstep would freeze the tree's output.
        for signum in (signal.SIGTTIN, signal.SIGTTOU):
            self._previous[signum] = signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> List[int]:
        """The signals received since the last call, in order (duplicates kept)."""
        received: List[int] = []
        while True:
            try:
                data = os.read(self._read_fd, 512)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(data)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler)
            except (TypeError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        os.close(self._read_fd)
        os.close(self._write_fd)


def _ignore_in_python(signum, frame):  # the wakeup fd carries the signal
    pass


class ProcessTree:
    """The command and every process it starts."""

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
                 death_signal: int = signal.SIGINT):
        if not argv:
            raise StopstepError("no command given")
        if not argv[0]:
            raise CommandNotFound("command not found: '' (an empty command name)")
        self.argv = list(argv)
        self.env = env
        self.death_signal = int(death_signal)
        self.pid: Optional[int] = None
        self.stdout_fd = -1
        self.stderr_fd = -1
        self.returncode: Optional[int] = None  # Popen-style, once the command exited
        self._reaped = False
        self._psutil_self = None

    # -- start ------------------------------------------------------------

    def spawn(self, stdout_pty: bool = False, stderr_pty: bool = False, child_setup=None) -> int:
        """Start the command in its own process group, its output on pipes (or on
        pseudo-terminals, for live progress bars). ``child_setup`` runs in the
        command before exec."""
        parent = os.getpid()
        death_signal = self.death_signal
        prctl = _libc().prctl if sys.platform.startswith("linux") else None

        def in_child():  # runs between fork and exec: keep it to system calls
            os.setpgid(0, 0)  # own process group (Popen's process_group= needs 3.11)
            if prctl is not None:
                prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
                if os.getppid() != parent:  # stopstep died before the prctl
                    os._exit(128 + death_signal)
            if child_setup is not None:
                child_setup()
            # stopstep ignores these for itself; ignored dispositions would survive exec
            signal.signal(signal.SIGTTIN, signal.SIG_DFL)
            signal.signal(signal.SIGTTOU, signal.SIG_DFL)

        ptys = {}
        if stdout_pty or stderr_pty:
            from .terminal import open_output_pty

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
                env=self.env,
                preexec_fn=in_child,
                close_fds=True,
            )
        except FileNotFoundError:
            raise CommandNotFound(f"command not found: {self.argv[0]}") from None
        except NotADirectoryError:
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
        return self.pid

    # -- signals out --------------------------------------------------------

    def signal_group(self, signum: int) -> bool:
        """Signal the command's process group; False if nobody is left in it."""
        if self.pid is None or self._reaped:
            return False
        try:
            os.killpg(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed credentials (setuid helper)
            return False

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
        if info.si_code == os.CLD_EXITED:
            self.returncode = info.si_status
        else:  # CLD_KILLED, CLD_DUMPED
            self.returncode = -info.si_status
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
        """Reap exited children other than the command (orphans re-parented to us)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            if info.si_pid == self.pid:
                # The command is waitable; reap the others one by one instead.
                for pid in self._child_pids():
                    if pid != self.pid:
                        try:
                            os.waitpid(pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                return
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def reap(self) -> None:
        """Reap the command itself; only once the tree is down."""
        if self.pid is not None and not self._reaped:
            self.poll_exit()
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self._reaped = True
        self.reap_orphans()

    # -- the tree ------------------------------------------------------------

    def prepare_walks(self) -> None:
        """Load what walking the tree needs (psutil), ahead of the first stop."""
        self._self()

    def _self(self):
        if self._psutil_self is None:
            import psutil  # only needed from the stop on: keep start-up light

            self._psutil_self = psutil.Process()
        return self._psutil_self

    def _child_pids(self) -> List[int]:
        try:
            return [p.pid for p in self._self().children()]
        except Exception:
            return []

    def live_descendants(self):
        """psutil.Process objects of every live process below stopstep."""
        import psutil

        alive = []
        try:
            children = self._self().children(recursive=True)
        except psutil.Error:
            return alive
        for proc in children:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

    def signal_outside_group(self, signum: int) -> int:
        """Signal live descendants that left the command's group; how many."""
        import psutil

        count = 0
        for proc in self.live_descendants():
            try:
                if os.getpgid(proc.pid) != self.pid:
                    proc.send_signal(signum)  # psutil checks the pid was not reused
                    count += 1
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return count

    def kill_all(self) -> int:
        """SIGKILL the group and every live descendant; how many were alive."""
        import psutil

        self.signal_group(signal.SIGKILL)
        alive = self.live_descendants()
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                continue
        return len(alive)


def _enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Fewer, larger reads and writes: up to 1 MiB in flight (Linux F_SETPIPE_SZ)."""
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    try:
        fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ
    except OSError:
        pass
