"""The supervisor's end of the in-process channel.

One Unix datagram socket, bound in a private 0700 directory, that the Python
processes of the command report to (through ``_site/sitecustomize.py`` and
``_site/_stopstep_inprocess.py``, whose docstring is the reference for the
protocol), and through which stop decisions reach them::

    channel = InProcessChannel()
    env.update(channel.environment(target_step))      # for the command
    poll.register(channel.fileno(), select.POLLIN)
    ...
    for message in channel.receive():                 # when readable
        observation = channel.to_observation(message) # a step: through the hooks
    channel.announce_stop(stop_at, "time_limit")      # a stop decided while running
    channel.close()

Data-parallel agreement: a stop decided while running is announced as a step
(``stop_at``): every rank stops after the first finished step >= that step, so all
ranks leave the loop after the same step, as long as the announced step is ahead
of the highest step any rank may have finished when the announcement arrives
(:func:`stop_step_ahead` chooses it).

What is announced is remembered: a process that says hello later gets the current
target and stop step at once, and an announcement that found a process's queue
full is sent again at the next :meth:`InProcessChannel.receive`.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from typing import Dict, List, Mapping, Optional, Set

from .observation import IN_PROCESS, Observation
from .patterns import number_or_text

#: The directory ``stopstep run`` puts first on the command's PYTHONPATH.
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")

CHANNEL_ENV = "STOPSTEP_INPROC_CHANNEL"
TARGET_ENV = "STOPSTEP_INPROC_TARGET"
DISABLE_ENV = "STOPSTEP_INPROC_DISABLE"

#: Message types a process sends.
HELLO, STEP, STOPPING = "hello", "step", "stopping"

_DATAGRAM_MAX = 65536
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_GONE = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE)


#: A stop decided while running is announced this much training time ahead (at least 2 steps).
STOP_AHEAD_SECONDS = 0.25


def stop_step_ahead(highest: int, steps_per_s: Optional[float]) -> int:
    """The step every rank is told to stop after, for a stop decided while several
    processes train: a quarter of a second of training (at least two steps) past the
    highest step seen, rounded up to a multiple of the power of two at or above that
    margin. The margin covers the ranks' lag behind the one that reported last (and
    their reports' 20 ms throttle); the rounding is for nodes, each with its own
    stopstep, that heard of the stop together but saw steps a little apart: without
    it, two nodes one step apart announce steps one apart every time, and the ranks
    that stop first leave the others hanging in a collective; with it, only when a
    multiple falls between what they saw (1 time in 16 for a margin of 11 steps)."""
    margin = max(2, math.ceil((steps_per_s or 0.0) * STOP_AHEAD_SECONDS))
    grid = 1 << (margin - 1).bit_length()
    return -(-(highest + margin) // grid) * grid


class Sender:
    """A process that reported, as its hello (or first message) described it."""

    __slots__ = ("address", "pid", "rank", "world", "framework", "start_step", "last_step")

    def __init__(self, address, message: dict):
        self.address = address
        self.pid = message.get("pid")
        self.rank = message.get("rank", 0)
        self.world = message.get("world")
        self.framework = message.get("fw")
        self.start_step = message.get("step") if message.get("t") == HELLO else None
        self.last_step: Optional[int] = None

    def __repr__(self) -> str:
        return f"Sender(pid={self.pid}, rank={self.rank}, framework={self.framework!r}, last_step={self.last_step})"


class InProcessChannel:
    """The bound socket, the processes that reported on it, and what was announced to them."""

    def __init__(self, directory: Optional[str] = None):
        self._dir = _private_directory(directory or _short_temp_dir())
        self.path = os.path.join(self._dir, "channel")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
        except OSError:
            self.close()
            raise
        self.senders: Dict[object, Sender] = {}
        self.frameworks: Set[str] = set()
        self.engaged = False  #: whether any process of the command engaged
        self.malformed = 0  #: datagrams ignored because they were not messages of the protocol
        self.target: Optional[int] = None  #: the last target announced
        self.stop_at: Optional[int] = None  #: the stop step announced, with its reason
        self.stop_reason: Optional[str] = None
        self._unsent: Set[object] = set()  # senders whose queue was full at an announcement
        self._announced_target = False

    # -- for the command ----------------------------------------------------------

    def environment(self, target_step: Optional[int], base_env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The variables to set for the command: the site directory first on PYTHONPATH
        (before what ``base_env``, by default ``os.environ``, has there), the channel,
        and the target (empty when not known yet, so none is inherited from outside)."""
        base = os.environ if base_env is None else base_env
        given = base.get("PYTHONPATH", "")
        # An empty entry is the working directory (`PYTHONPATH=$PYTHONPATH:/x` with none set
        # before makes one): kept as it was, only ours is put in front.
        kept = [p for p in given.split(os.pathsep) if p != SITE_DIR] if given else []
        return {
            "PYTHONPATH": os.pathsep.join([SITE_DIR] + kept),
            CHANNEL_ENV: self.path,
            TARGET_ENV: "" if target_step is None else str(int(target_step)),
        }

    def fileno(self) -> int:
        return self._sock.fileno()

    # -- from the processes ---------------------------------------------------------

    def receive(self, max_messages: int = 1024) -> List[dict]:
        """The messages waiting, parsed, oldest first; never blocks. Malformed datagrams
        are counted in :attr:`malformed` and left out."""
        if self._unsent:
            for address in list(self._unsent):
                self._send_state(address)
        messages = []
        for _ in range(max_messages):
            try:
                data, address = self._sock.recvfrom(_DATAGRAM_MAX)
            except (BlockingIOError, InterruptedError):
                break
            message = parse_message(data)
            if message is None:
                self.malformed += 1
                continue
            self._note_sender(address, message)
            messages.append(message)
        return messages

    def _note_sender(self, address, message: dict) -> None:
        key = address or ("pid", message.get("pid"))  # unbound senders cannot be answered
        sender = self.senders.get(key)
        if sender is None or message["t"] == HELLO:
            if message["t"] == HELLO and message.get("pid") is not None:
                # a process that made its socket anew (it closed its descriptors) is one process
                for old in [k for k, s in self.senders.items() if s.pid == message["pid"] and k != key]:
                    self._forget(self.senders[old].address)
                    self.senders.pop(old, None)
            sender = self.senders[key] = Sender(address or None, message)
            if address:
                self._send_state(address)  # a late joiner learns what was announced before it
        if sender.framework is None and message.get("fw"):
            sender.framework = message["fw"]
        if sender.framework:
            self.frameworks.add(sender.framework)
        if message["t"] in (STEP, STOPPING):
            sender.last_step = message["step"]
        self.engaged = True

    # -- to the processes -----------------------------------------------------------

    def announce_target(self, step: Optional[int]) -> None:
        """The target changed (re-anchored): every process stops at it instead."""
        self.target = None if step is None else int(step)
        self._announced_target = True
        self._announce()

    def announce_stop(self, stop_at: int, reason: str) -> None:
        """Stop after the first finished step >= ``stop_at``. Only an earlier step than
        one announced before changes anything (the processes keep the earliest)."""
        stop_at = int(stop_at)
        if self.stop_at is None or stop_at < self.stop_at:
            self.stop_at, self.stop_reason = stop_at, reason
        self._announce()

    def _announce(self) -> None:
        for sender in list(self.senders.values()):
            if sender.address:
                self._send_state(sender.address)

    def _send_state(self, address) -> None:
        self._unsent.discard(address)
        if self._announced_target:
            if not self._send(address, {"t": "target", "step": self.target}):
                return
        if self.stop_at is not None:
            self._send(address, {"t": "stop_at", "step": self.stop_at, "reason": self.stop_reason})

    def _send(self, address, message: dict) -> bool:
        try:
            self._sock.sendto(_json().dumps(message, separators=(",", ":")).encode(), address)
            return True
        except BlockingIOError:  # its queue is full: again at the next receive()
            self._unsent.add(address)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self._forget(address)  # the process is gone
        return False

    def _forget(self, address) -> None:
        self._unsent.discard(address)
        for key in [k for k, s in self.senders.items() if s.address == address]:
            del self.senders[key]

    # -- for the hooks ------------------------------------------------------------

    def to_observation(self, message: dict) -> Optional[Observation]:
        """A step (or stopping) message as an :class:`Observation`; None for the others.
        Steps the process did not report on their own count as ``coalesced``."""
        if message.get("t") not in (STEP, STOPPING):
            return None
        values = message.get("v") or {}
        return Observation(
            message["step"],
            # as a log line's: a value that reads as a number is one ("nan" included)
            fields={key: number_or_text(value) if isinstance(value, str) else value for key, value in values.items()},
            source=f"in-process:rank{message.get('rank', 0)}",
            kind=IN_PROCESS,
            coalesced=message.get("skipped", 0),
            time=time.monotonic(),
        )

    def close(self) -> None:
        """Close the socket and remove it and its directory; safe to call twice."""
        sock, self._sock = getattr(self, "_sock", None), None
        if sock is not None:
            sock.close()
        for remove, path in ((os.unlink, getattr(self, "path", None)), (os.rmdir, getattr(self, "_dir", None))):
            if path:
                try:
                    remove(path)
                except OSError:
                    pass

    def __enter__(self) -> "InProcessChannel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def parse_message(data: bytes) -> Optional[dict]:
    """One datagram as a message of the protocol, or None when it is not one."""
    try:
        message = _json().loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict):
        return None
    kind = message.get("t")
    if kind not in (HELLO, STEP, STOPPING):
        return None  # unknown to this version, or not ours
    if not _is_int(message.get("pid")) or not _is_int(message.get("rank", 0)):
        return None
    step = message.get("step")
    if kind == HELLO:
        if not isinstance(message.get("fw"), str) or not (step is None or _is_int(step)):
            return None
        return message
    if not _is_int(step) or not _is_int(message.get("skipped", 0)):
        return None
    values = message.get("v")
    if values is not None:
        if not isinstance(values, dict):
            return None
        message["v"] = {k: v for k, v in values.items() if isinstance(v, (int, float, str))}
    return message


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json():
    """json, imported when the first message comes or goes: a run whose command never
    engages (not Python, no framework) does not pay for it at start-up."""
    import json

    return json


def _private_directory(base: str) -> str:
    """A new directory only we can enter (what tempfile.mkdtemp does, without importing
    tempfile and what it imports: a few milliseconds of every start-up)."""
    for _ in range(100):
        path = os.path.join(base, "stopstep-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a directory in {base}")


def _short_temp_dir() -> str:
    """The temp directory, unless a socket path in it would be too long for sun_path."""
    base = _temp_dir()
    if len(os.path.join(base, "stopstep-xxxxxxxxxxxx", "channel")) <= _SUN_PATH_MAX:
        return base
    return "/tmp"


def _temp_dir() -> str:
    """tempfile.gettempdir()'s choice: $TMPDIR, $TEMP or $TMP if it is a writable directory, else /tmp."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        path = os.environ.get(name)
        if path and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return os.path.abspath(path)
    return "/tmp"
