"""Step sources beyond the command's own output: log files it writes and the
checkpoint directories it saves to.

Both turn what they see into :class:`~stopstep_cli.observation.Observation`s for
the supervision loop, which drives them: inotify (watchdog's observer thread
only queues the paths that changed and wakes the loop through a pipe) or
polling on a timer.

Watching what is really there:

- A directory is watched at its real path (symlinks resolved), and so are the
  directories a change would come through: the one holding it (it can be
  deleted, renamed away or made again) and the ones holding each symlink on
  the way (a link can be pointed elsewhere). Any change there makes the source
  resolve the path again, move its watches and look at everything anew.
- A directory that does not exist yet is followed down from its nearest
  existing ancestor as it is created, level by level.
- Only non-recursive watches are made, all from the loop's thread, so a
  failure (inotify watches or instances used up) is caught where it happens:
  the source then polls every FALLBACK_POLL seconds and says so once. A
  directory on a network or FUSE filesystem (NFS, Lustre, GCS fuse: other
  machines' writes make no inotify event) is polled from the start.
- Even with inotify, every source takes a cheap look every SAFETY_LOOK seconds,
  so a lost event delays a step by at most that, never loses it.

Polling is stopstep's own rather than watchdog's PollingObserver, which would
stat every file below the directory at every interval: a look lists the
directory only when its mtime moved (and once more after a change made within
the filesystem's timestamp granularity), handles only the entries that are
new since the last listing, and re-checks only the checkpoints not yet
finished. Its cost follows what changed, not how big the directory is.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .layouts import Layout, detect_layout, make_layout
from .observation import CHECKPOINT, LOG_FILE, Observation
from .patterns import StepFormat
from .scanner import LineScanner
from .waker import Waker

#: How many 1 MiB reads of a log file one wake-up may take before yielding to the loop.
LOG_READS_PER_TURN = 16
#: Seconds between the looks every source takes even when inotify tells it of changes.
SAFETY_LOOK = 2.0
#: Seconds after the watched directory changed (made again, a link re-pointed) to look once more.
LOOK_AGAIN_AFTER_A_MOVE = 0.1
#: How many times a source re-makes its watches in one go while the directory keeps moving.
FOLLOW_ROUNDS = 3
#: Seconds between looks when inotify cannot be had.
FALLBACK_POLL = 1.0
#: The share of a core listing a polled checkpoint directory may take (a 100,000-entry
#: directory takes about 0.1 s to list: listed at most every 2 s).
LIST_BUDGET = 0.05
#: Filesystems whose changes made elsewhere make no inotify event here.
NETWORK_FILESYSTEMS = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "lustre", "gpfs", "ceph", "beegfs", "glusterfs",
    "afs", "davfs", "sshfs", "ncpfs", "orangefs", "pvfs2", "wekafs", "virtiofs", "vboxsf",
))

#: watchdog event types that can change what a directory holds.
_CHANGES = frozenset(("created", "modified", "moved", "deleted", "closed"))


class FileWatcher:
    """watchdog's native observer (inotify on Linux), feeding paths to the loop.

    Only non-recursive watches, each made here, on the caller's thread (so a
    failure is caught where it happens). One watch per directory, shared by
    every source that wants it (watchdog keeps one per path: a source dropping
    its own would drop the others'); and a directory that is no longer the one
    watched (deleted and made again, a mount over it) is watched anew.
    """

    def __init__(self, waker: Waker) -> None:
        import logging

        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        # watchdog says things like "queue_events() called when the thread is inactive"
        # on stderr through logging's last resort; they are not the user's business.
        logging.getLogger("watchdog").addHandler(logging.NullHandler())
        logging.getLogger("watchdog").propagate = False
        self._waker = waker
        self._changed: collections.deque = collections.deque()
        self._watches: Dict[str, list] = {}  # directory -> [watchdog handle, (dev, ino), set of sinks]
        # Directories whose watch died with them (deleted, moved away, made again): a new
        # directory often gets the old one's inode number back, so (dev, ino) cannot tell.
        self._dead: Set[str] = set()
        watcher = self

        class _Handler(FileSystemEventHandler):
            def __init__(self, directory):
                self.directory = directory

            def on_any_event(self, event):
                if event.event_type not in _CHANGES:
                    return  # opens and reads, ours included, change nothing
                entry = watcher._watches.get(self.directory)
                if entry is None:
                    return
                paths = [os.fsdecode(event.src_path)]
                dest = getattr(event, "dest_path", "")
                if dest:
                    paths.append(os.fsdecode(dest))
                if event.event_type in ("created", "deleted", "moved"):
                    for path in paths:
                        if path in watcher._watches:  # a watched directory itself came or went
                            watcher._dead.add(path)
                for sink in list(entry[2]):
                    for path in paths:
                        watcher._changed.append((sink, path))
                watcher._waker.wake()

        self._handler_type = _Handler
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()

    def watch(self, directory: str, sink) -> bool:
        """Watch one directory (not its subdirectories) for ``sink``; OSError when inotify
        cannot (FileNotFoundError: the directory is gone already). True when a watch that
        had died with its directory was made anew (what is in it now was not seen)."""
        identity = _identity(directory)
        if identity is None:
            raise FileNotFoundError(directory)
        entry = self._watches.get(directory)
        renewed = False
        if entry is not None and (entry[1] != identity or directory in self._dead):  # not the one watched
            self._dead.discard(directory)
            renewed = bool(entry[2])
            sinks = entry[2]
            self._drop(directory)
            entry = None
        else:
            sinks = set()
        if entry is None:
            # In the table before the watch exists: an event of the watch's first moment
            # (the directory deleted at once) must find it, to mark it dead.
            entry = self._watches[directory] = [None, identity, sinks]
            try:
                entry[0] = self._observer.schedule(self._handler_type(directory), directory, recursive=False)
            except Exception as exc:
                del self._watches[directory]
                if isinstance(exc, OSError):
                    raise
                raise OSError(str(exc)) from None  # watchdog wraps some failures in its own types
        entry[2].add(sink)
        return renewed

    def unwatch(self, directory: str, sink) -> None:
        entry = self._watches.get(directory)
        if entry is not None:
            entry[2].discard(sink)
            if not entry[2]:
                self._drop(directory)

    def _drop(self, directory: str) -> None:
        entry = self._watches.pop(directory, None)
        if entry is not None and entry[0] is not None:
            try:
                self._observer.unschedule(entry[0])
            except Exception:  # already gone (its directory was deleted)
                pass

    def changed(self) -> Dict[object, set]:
        """Paths changed since the last call, by the source that watches them."""
        out: Dict[object, set] = {}
        while self._changed:
            sink, path = self._changed.popleft()
            out.setdefault(sink, set()).add(path)
        return out

    def stop(self) -> None:
        self._observer.stop()


def _subdirectories(directory: str):
    try:
        with os.scandir(directory) as entries:
            return [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _identity(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def show(path: str) -> str:
    """A path as one printable line (a newline or a byte that is not UTF-8 in it is escaped)."""
    if path.isprintable():
        return path
    return ascii(path)[1:-1].replace("\\\\", "\\")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _where(directory: str) -> Tuple[Optional[tuple], str, bool]:
    """((path, dev, ino) of ``directory``'s real path or of its nearest existing ancestor,
    or None), the real path, whether it exists."""
    real = os.path.realpath(directory)
    exists = os.path.isdir(real)
    target = real if exists else _nearest_existing(real)
    try:
        st = os.stat(target)
    except OSError:
        return None, real, exists
    return (target, st.st_dev, st.st_ino), real, exists


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def link_directories(path: str) -> Set[str]:
    """The real directories holding a symlink on the way to ``path``, links to links
    included (a change in any of them can point the path elsewhere)."""
    out: Set[str] = set()
    todo = [os.path.abspath(path)]
    seen: Set[str] = set()
    while todo and len(seen) < 40:  # a link loop ends here
        current, parts = "/", todo.pop().split(os.sep)[1:]
        for i, part in enumerate(parts):
            if not part:
                continue
            current = os.path.join(current, part)
            if current in seen or not os.path.islink(current):
                continue
            seen.add(current)
            out.add(os.path.realpath(os.path.dirname(current)))
            try:
                target = os.path.join(os.path.dirname(current), os.readlink(current))
            except OSError:
                break
            todo.append(os.path.normpath(os.path.join(target, *parts[i + 1:])))  # the rest, through the link
            break
    return out


def filesystem_type(path: str) -> Optional[str]:
    """The type of the filesystem ``path`` is on, from /proc/self/mountinfo (None if unknown)."""
    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                try:
                    mount = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                    fstype = fields[fields.index("-") + 1]
                except (IndexError, ValueError):
                    continue
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fstype
    except OSError:
        return None
    return kind


class StepSource:
    """What every step source beyond the command's output does for the loop.

    - ``resume_point()`` before the launch: the latest complete checkpoint, the
      step a resumed run starts at (None for sources that have none); a log file
      opens itself here, so what the command writes from its first instant counts;
    - ``start(watcher)`` after the launch: begin watching (inotify through
      ``watcher``, or polling when it is None); the observations already due;
    - ``on_change(paths)`` when the watcher saw these paths change, and
      ``tick(now)`` when ``next_due`` has come (polling, a safety look, a second look);
    - ``final()`` once the command is gone: the last lines, the last checkpoint;
    - ``close()``.

    ``say`` and ``debug`` are how a source tells the user something (a line,
    or a line only with ``-v``).
    """

    name = ""
    kind = ""
    poll: Optional[float] = None
    next_due: Optional[float] = None
    say: Callable[[str], None] = staticmethod(lambda text: None)
    debug: Callable[[str], None] = staticmethod(lambda text: None)

    def resume_point(self) -> Optional[Observation]:
        return None

    def start(self, watcher: Optional["FileWatcher"]) -> List[Observation]:
        return []

    def on_change(self, paths: Iterable[str]) -> List[Observation]:
        return []

    def tick(self, now: float) -> List[Observation]:
        return []

    def final(self) -> List[Observation]:
        return self.on_change(())

    def close(self) -> None:
        pass


class _Watched(StepSource):
    """A directory a file source watches: followed through symlinks, renames and
    re-creation; watched with inotify while that can be had, polled otherwise.

    ``directory`` is the path as given; ``real`` its real path once it exists.
    Subclasses implement ``_look(paths, everything)``.
    """

    option = ""  # the command-line option it came from, for messages

    def __init__(self, directory: str, poll: Optional[float]):
        self.directory = os.path.abspath(directory)
        self.poll = poll  # seconds between looks when polling; None: inotify
        self.next_due: Optional[float] = None
        self.real: Optional[str] = None
        self.appeared = False  # the directory has existed at some point
        self._watcher: Optional[FileWatcher] = None
        self._handles: Set[str] = set()  # the directories watched for this source
        self._extra: Set[str] = set()  # more directories to watch (unfinished checkpoints)
        self._identity = None  # (path, dev, ino) of the directory watched now (or of its nearest ancestor)
        self._said: Set[str] = set()

    # -- following the directory ---------------------------------------------------

    def _begin(self, watcher: Optional[FileWatcher]) -> None:
        """Choose how to watch (after the launch)."""
        if self.poll is None:
            fstype = filesystem_type(self.directory)
            if watcher is None:
                self._fall_back("inotify is not available")
            elif fstype in NETWORK_FILESYSTEMS or (fstype or "").startswith("fuse"):
                self._fall_back(f"{self.directory} is on {fstype}: changes made on other machines make no "
                                f"inotify event here")
            else:
                self._watcher = watcher
        self._identity = None  # watch from scratch
        self._follow()
        self._schedule(time.monotonic())

    def _fall_back(self, why: str) -> None:
        self.say_once(f"{why}; polling every {FALLBACK_POLL:g}s instead (--poll sets the interval)")
        if self._watcher is not None:
            for directory in self._handles:
                self._watcher.unwatch(directory, self)
        self._handles.clear()
        self._watcher = None
        self.poll = FALLBACK_POLL

    def _follow(self) -> bool:
        """Make the watches match what is on disk now; True when the directory
        watched changed (it appeared, was made again, or a link was re-pointed)."""
        changed = False
        for _ in range(FOLLOW_ROUNDS):
            moved = self._follow_once()
            changed = changed or moved
            # A directory that appeared (or moved) between the look and its new watch made
            # its event before anyone listened: look again until the watches match the disk.
            if not moved or self._watcher is None or _where(self.directory)[0] == self._identity:
                break
        return changed

    def _follow_once(self) -> bool:
        identity, real, exists = _where(self.directory)
        if identity is None:
            return False
        target = identity[0]
        changed = identity != self._identity
        if changed:
            self._identity = identity
            self.real = real if exists else None
            if exists and not self.appeared:
                self.appeared = True
                if self.directory != real:
                    self.debug(f"{self.name}: {self.directory} is {real}")
        if self._watcher is not None:
            # the directory (or where it will appear), what holds it, what holds each link on the way
            wanted = ({target, os.path.dirname(target)} | link_directories(self.directory) | self._extra
                      | self._more_directories())
            if self._rewatch(wanted):
                changed = True  # made again under the same inode number: look at all of it
        return changed

    def _more_directories(self) -> Set[str]:
        """Directories a subclass needs watched besides its own."""
        return set()

    def _rewatch(self, wanted: Set[str]) -> bool:
        """True when the directory's own watch was made anew (it had died with it)."""
        renewed = False
        for directory in [d for d in self._handles if d not in wanted]:
            self._watcher.unwatch(directory, self)
            self._handles.discard(directory)
        for directory in sorted(wanted):
            try:
                # again: a directory made anew is watched anew
                if self._watcher.watch(directory, self) and directory == self.real:
                    renewed = True
                self._handles.add(directory)
            except FileNotFoundError:
                self._handles.discard(directory)  # gone already: the next look follows it
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue
                why = "the watch limit is used up" if exc.errno == errno.ENOSPC else \
                    "the instance limit is used up" if exc.errno == errno.EMFILE else (exc.strerror or str(exc))
                self._fall_back(f"inotify cannot watch more directories ({why})")
                return renewed
        return renewed

    def _schedule(self, now: float, soon: Optional[float] = None) -> None:
        due = now + (self.poll or SAFETY_LOOK)
        self.next_due = due if soon is None else min(due, soon)

    # -- the loop's calls -------------------------------------------------------------

    def tick(self, now: float) -> List[Observation]:
        self._schedule(now)
        return self._look((), everything=self._moved())

    def on_change(self, paths: Iterable[str]) -> List[Observation]:
        return self._look(paths, everything=self._moved())

    def _moved(self) -> bool:
        """:meth:`_follow`; when the directory watched changed, one more look soon after:
        what was written in it while the watches moved makes no event."""
        changed = self._follow()
        if changed:
            now = time.monotonic()
            self._schedule(now, soon=now + LOOK_AGAIN_AFTER_A_MOVE)
        return changed

    def _look(self, paths: Iterable[str], everything: bool) -> List[Observation]:
        raise NotImplementedError

    def missing(self) -> bool:
        """The directory never existed while the run went."""
        return not self.appeared

    def close(self) -> None:
        if self._watcher is not None:
            for directory in self._handles:
                self._watcher.unwatch(directory, self)
        self._handles.clear()

    def say_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.say(text)


class LogFileSource(_Watched):
    """Follows a log file like ``tail -F``: it may not exist yet, may be
    truncated or rotated (or its directory made again); only what is written
    after launch counts unless ``from_start``. A FIFO is read as it comes,
    without ever blocking (the loop polls its descriptor: writes to a FIFO make
    no inotify event); a file that is neither a regular file nor a FIFO is not
    read (one line says so)."""

    kind = LOG_FILE
    option = "--log-file"

    #: Bytes before the read offset kept to see a file rewritten in place between two looks.
    FINGERPRINT = 64

    def __init__(self, path: str, formats: Sequence[StepFormat], from_start: bool = False,
                 poll: Optional[float] = None):
        super().__init__(os.path.dirname(os.path.abspath(path)), poll)
        self.path = os.path.abspath(path)
        self.name = f"log:{path}"
        self.formats = tuple(formats)
        self.from_start = from_start
        self._fd: Optional[int] = None
        self._opened = False
        self._identity_of_file = None  # (dev, ino) of the file read now
        self._regular = True
        self._offset = 0
        self._history_end = 0  # with from_start: what the file held at launch ends here
        self._fingerprint = b""  # the bytes just before the offset, as last read
        self._refused: Optional[tuple] = None  # what was not read (or not readable), said once
        self._left_over: List[Observation] = []  # the last line of a file that was replaced
        self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)
        self._buf = bytearray(1 << 20)

    def resume_point(self) -> None:
        """Before the launch: open the file as it is, so that what the command
        writes from its first instant on counts, and what was there does not."""
        if self._opened:
            return None  # a restart: go on reading where we are
        self._opened = True
        if self._open() and self._regular:
            size = os.fstat(self._fd).st_size
            self._offset = 0 if self.from_start else size
            self._history_end = size if self.from_start else 0
            os.lseek(self._fd, self._offset, os.SEEK_SET)
            self._fingerprint = self._bytes_before(self._offset)
        return None

    def _open(self) -> bool:
        """Open what is at the path now, never blocking (a FIFO without a writer)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # not there (yet)
        identity = (st.st_dev, st.st_ino)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file or a FIFO"
            self._refuse(identity, f"{self.option} {show(self.path)} is {what} now; not reading it")
            return False
        # A FIFO read and write: it then never reads as ended when a writer closes it.
        mode = os.O_RDWR if stat.S_ISFIFO(st.st_mode) else os.O_RDONLY
        try:
            fd = os.open(self.path, mode | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._refuse(identity, f"{self.option} {show(self.path)} cannot be read ({exc.strerror})")
            return False
        self._finish_file()
        self._close_fd()
        self._fd, self._identity_of_file = fd, identity
        self._regular = stat.S_ISREG(st.st_mode)
        self._offset, self._fingerprint = 0, b""
        return True

    def _refuse(self, identity: tuple, why: str) -> None:
        if self._refused != identity:
            self._refused = identity
            self.say(why)

    def fileno(self) -> Optional[int]:
        """The descriptor the loop polls: a FIFO's (its writes make no inotify event)."""
        return self._fd if self._fd is not None and not self._regular else None

    def start(self, watcher: Optional[FileWatcher]) -> List[Observation]:
        """After the launch: watch the file's directory and read what is new."""
        self.resume_point()
        if not os.path.isdir(os.path.realpath(self.directory)):
            self.say(f"{self.option} {show(self.path)}: {show(self.directory)} does not exist yet; watching for it")
        elif not os.path.exists(self.path):  # a typo would otherwise say nothing until the end
            self.say(f"{self.option} {show(self.path)} does not exist yet; watching for it")
        self._begin(watcher)
        return self._look((), everything=True)

    def _more_directories(self) -> Set[str]:
        # A log that is a link into another directory: its writes are events there.
        real = os.path.dirname(os.path.realpath(self.path))
        return {real} if os.path.isdir(real) else set()

    def _look(self, paths: Iterable[str], everything: bool) -> List[Observation]:
        out: List[Observation] = []
        try:
            st = os.stat(self.path)
        except OSError:
            st = None  # rotated away and not recreated yet: finish the old file
        if self._fd is not None and self._regular and st is not None \
                and (st.st_dev, st.st_ino) == self._identity_of_file and self._rewritten(st.st_size):
            # Truncated in place, or truncated and written again past where we were: from the start.
            self._finish_file()
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._offset, self._fingerprint = 0, b""
        if self._fd is not None:
            out += self._read()
        if st is not None and (st.st_dev, st.st_ino) != self._identity_of_file:
            # A new file at the path (created, rotated in, its directory made again): all of it is new.
            if self._open():
                out += self._read()
        left_over, self._left_over = self._left_over, []
        return left_over + out

    def _rewritten(self, size: int) -> bool:
        if size < self._offset:
            return True
        return self._offset > 0 and self._bytes_before(self._offset) != self._fingerprint

    def _bytes_before(self, offset: int) -> bytes:
        start = max(0, offset - self.FINGERPRINT)
        try:
            return os.pread(self._fd, offset - start, start)
        except OSError:
            return b""

    def _read(self, reads: int = LOG_READS_PER_TURN) -> List[Observation]:
        out: List[Observation] = []
        for _ in range(reads):
            before = self._offset
            try:
                n = os.readv(self._fd, [self._buf])
            except OSError:  # EAGAIN (an empty FIFO), or gone
                break
            if n == 0:
                break
            self._offset += n
            seen = self._scanner.feed(self._buf, n)
            if before < self._history_end:  # what the file held at launch: not the command's first step
                for obs in seen:
                    obs.historic = True
            out += seen
            if self._scanner.notes:
                for note in self._scanner.notes:
                    self.debug(note)
                self._scanner.notes.clear()
        else:
            self.next_due = time.monotonic()  # more to read: come back on the next turn
        if self._regular and self._offset:
            self._fingerprint = self._bytes_before(self._offset)
        return out

    def _finish_file(self) -> None:
        """The file read so far ends (rotated away, truncated): its last line without a
        newline counts, at the next look's turn."""
        if self._fd is not None:
            self._left_over += self._scanner.end_of_stream()
        self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)

    def final(self) -> List[Observation]:
        """Once the command is gone: all that is left (not only a turn's worth), and a last
        line without a newline."""
        out = self.on_change(())
        if self._fd is not None:
            out += self._read(reads=1 << 30)
        return out + self._scanner.end_of_stream()

    def missing(self) -> bool:
        return self._identity_of_file is None and self._refused is None

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        super().close()
        self._close_fd()


class CheckpointSource(_Watched):
    """Watches a checkpoint directory; every checkpoint that becomes complete
    is an observation of its step."""

    kind = CHECKPOINT
    option = "--checkpoint-dir"

    def __init__(self, root: str, layout: str = "auto", pattern: Optional[str] = None,
                 poll: Optional[float] = None, settle: float = 1.0):
        super().__init__(root, poll)
        self.root = self.directory  # as given: the paths users see
        self.name = f"checkpoint:{root}"
        self.layout: Optional[Layout] = None if (layout == "auto" and pattern is None) else make_layout(layout, pattern)
        self.recursive_names = pattern is not None and "/" in pattern
        self.settle = poll if poll else settle
        if self.layout is not None:
            self.layout.state["settle"] = self.settle
        self.done_step: Optional[int] = None
        self.last_path: Optional[str] = None
        self.pending: Dict[str, int] = {}  # unfinished checkpoints not yet observed
        self._said_incomplete: Dict[str, tuple] = {}  # what -v last said of each pending one: (why, size)
        self.complete_at_launch: Dict[str, int] = {}  # name -> step, complete when the command started
        # observed (or whole at launch), by name: the entry's identity then. The same name
        # made again (a run that wiped the directory and started over) is a new checkpoint.
        self._seen_whole: Dict[str, Optional[tuple]] = {}
        self._depth = pattern.count("/") if self.recursive_names else 0  # levels of directories it names
        self._listed: Set[str] = set()  # the entries of the last listing
        self._listed_mtime: Optional[int] = None
        self._listed_at = 0.0  # time.time() of that listing
        self._list_cost = 0.0  # seconds the last listing took
        self._listed_mono = 0.0  # time.monotonic() of it
        self._dirty = False  # the directory changed; listing it waits for its budget

    # -- at launch ---------------------------------------------------------------

    def resume_point(self) -> Optional[Observation]:
        """The latest complete checkpoint now: the step a resumed run starts at."""
        self._follow()
        found = self._list(everything=True)
        self.complete_at_launch = {name: step for name, step in found.items()
                                   if self.layout is not None and self.layout.is_complete(self.root, name, step)}
        self._seen_whole = {name: self._entry_identity(name) for name in self.complete_at_launch}
        if not self.complete_at_launch:
            self.pending = dict(found)
            return None
        name, step = max(self.complete_at_launch.items(), key=lambda item: item[1])
        self.pending = {n: s for n, s in found.items() if n not in self.complete_at_launch}
        self.done_step, self.last_path = step, os.path.join(self.root, self.layout.checkpoint_name(name))
        return self._observation(step)

    def start_over_from(self, step: Optional[int]) -> None:
        """The command started fresh, below the checkpoints found at launch: those
        above ``step`` are an earlier run's and no longer count."""
        below = {n: s for n, s in self.complete_at_launch.items() if step is not None and s <= step}
        if below:
            name, best = max(below.items(), key=lambda item: item[1])
            self.done_step, self.last_path = best, os.path.join(self.root, self.layout.checkpoint_name(name))
        else:
            self.done_step, self.last_path = None, None


    def start(self, watcher: Optional[FileWatcher]) -> List[Observation]:
        if not os.path.isdir(os.path.realpath(self.directory)):
            self.say(f"{self.option} {show(self.directory)} does not exist yet; watching for it")
        self._begin(watcher)
        return self._look((), everything=True)  # what appeared between the scan and the watch

    def _more_directories(self) -> Set[str]:
        """A --checkpoint-pattern with directories in it (``sub/model_N.bin``): the
        directories at those levels are watched too (inotify watches one level)."""
        if not self._depth or self.real is None:
            return set()
        found, level = set(), [self.real]
        for _ in range(self._depth):
            level = [os.path.join(d, e.name) for d in level for e in _subdirectories(d)]
            found.update(level)
        return found

    def _entry_identity(self, name: str) -> Optional[tuple]:
        """What tells a checkpoint written again under the same name from the one seen."""
        try:
            st = os.stat(os.path.join(self.root, name))
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns)

    def _list(self, everything: bool = False) -> Dict[str, int]:
        """Checkpoint candidates among the directory's entries, name -> step; only the
        entries that are new since the last listing unless ``everything``."""
        found: Dict[str, int] = {}
        if self.real is None:
            return found
        began = time.monotonic()
        try:
            self._listed_mtime = os.stat(self.real).st_mtime_ns
            self._listed_at = time.time()
            names = set(self._names())
        except OSError as exc:
            self.say_once(f"{self.option} {show(self.directory)} cannot be listed ({exc.strerror})")
            return found
        self._listed_mono = time.monotonic()
        self._list_cost, self._dirty = self._listed_mono - began, False
        fresh = names if everything else names - self._listed
        if not everything:  # the same name made again (a run that wiped the directory and started over)
            fresh |= {name for name in names & self._seen_whole.keys()
                      if self._seen_whole[name] != self._entry_identity(name)}
        self._listed = names
        if self.layout is None and fresh:
            self._detect(sorted(fresh))
        if self.layout is None:
            return found
        for name in fresh:
            step = self.layout.step_of(name)
            if step is not None:
                found[name] = step
        return found

    def _names(self):
        if not self.recursive_names:
            yield from os.listdir(self.real)  # (listdir: a third cheaper than scandir for a big directory)
            return
        for directory, dirs, files in os.walk(self.real):
            rel = os.path.relpath(directory, self.real)
            for name in dirs + files:
                yield name if rel == "." else os.path.join(rel, name)

    def _detect(self, names: List[str]) -> None:
        layout = detect_layout(names)
        if layout is not None:
            layout.state["settle"] = self.settle
            self.layout = layout

    # -- while running -------------------------------------------------------------

    def final(self) -> List[Observation]:
        self._follow()
        return self._look((), everything=True)

    def _look(self, paths: Iterable[str], everything: bool) -> List[Observation]:
        names = None if everything else self._changed_names(paths)
        if names is None:
            for name, step in self._list(everything=everything).items():
                self._consider(name, step)
        elif names:
            if self.layout is None:
                self._detect(sorted(names))
            if self.layout is not None:
                for name in names:
                    step = self.layout.step_of(name)
                    if step is not None:
                        self._consider(name, step)
        return self._finish_pending()

    def _changed_names(self, paths: Iterable[str]) -> Optional[set]:
        """Entry names the changed paths belong to; None means "list the directory"."""
        paths = list(paths)
        if self.real is None:
            return set()
        if not paths:  # a poll or a safety look: list only if the directory changed
            if self.recursive_names:
                return None  # changes below the top directory do not move its mtime
            try:
                mtime = os.stat(self.real).st_mtime_ns
            except OSError:
                return set()
            # A change made within the timestamp's granularity of the last listing
            # leaves the mtime as it was: list once more after such a listing.
            granularity = 1.0 if mtime % 1_000_000_000 == 0 else 0.05
            racy = self._listed_at - mtime / 1e9 < granularity
            self._dirty = self._dirty or mtime != self._listed_mtime or racy
            # A listing costs about a microsecond an entry: a huge directory is listed at most
            # as often as keeps that under LIST_BUDGET of a core (the pending checkpoints are
            # still looked at every time).
            if self._dirty and time.monotonic() - self._listed_mono >= self._list_cost / LIST_BUDGET:
                return None
            return set()
        names = set()
        for path in paths:
            rel = os.path.relpath(path, self.real)
            if rel == "." or rel.startswith(".."):
                continue
            parts = rel.split(os.sep)
            if self.recursive_names:
                names.update(os.path.join(*parts[: i + 1]) for i in range(len(parts)))
            else:
                names.add(parts[0])
        return names

    def _consider(self, name: str, step: int) -> None:
        # Every checkpoint made while the run goes counts once it is whole, even one
        # below those found at launch (a command that started fresh over an old run's).
        if name not in self._seen_whole or self._seen_whole[name] != self._entry_identity(name):
            self.pending[name] = step

    def _finish_pending(self) -> List[Observation]:
        out = self._check_pending()
        if self._watch_pending():
            # The new watches missed whatever was written before they took hold: look again.
            out += self._check_pending()
        return out

    def _check_pending(self) -> List[Observation]:
        out: List[Observation] = []
        if self.layout is not None:
            for name, step in sorted(self.pending.items(), key=lambda item: item[1]):
                path = os.path.join(self.root, name)
                if not os.path.exists(path):
                    del self.pending[name]
                    self._said_incomplete.pop(name, None)
                    self.debug(f"{self.name}: {name} was deleted before it was complete")
                    continue
                why = self.layout.why_incomplete(self.root, name, step)
                if why is not None:
                    state = (why, _size(path))
                    if self._said_incomplete.get(name) != state:  # a save is looked at many times: say each state once
                        self._said_incomplete[name] = state
                        self.debug(f"{self.name}: {name} (step {step}) is not complete yet ({state[1]} bytes): {why}")
                    continue
                del self.pending[name]
                self._said_incomplete.pop(name, None)
                self._seen_whole[name] = self._entry_identity(name)
                checkpoint = os.path.join(self.root, self.layout.checkpoint_name(name))
                if self.done_step is None or step > self.done_step:
                    self.done_step, self.last_path = step, checkpoint
                out.append(self._observation(step, checkpoint))
        return out

    def _watch_pending(self) -> bool:
        """Unfinished checkpoints that are directories get a watch of their own (their
        last file is written inside); and the generic layout needs a second look.
        True when a directory got a new watch."""
        added = False
        if self._watcher is not None and self.real is not None:
            wanted = {os.path.join(self.real, name) for name in self.pending
                      if os.path.isdir(os.path.join(self.real, name))}
            if wanted != self._extra:
                added = bool(wanted - self._extra)
                self._extra = wanted
                self._follow()
        if self.pending and self.layout is not None and self.layout.name == "generic" and not self.poll:
            due = time.monotonic() + self.settle / 2
            self.next_due = due if self.next_due is None else min(self.next_due, due)
        return added

    def _observation(self, step: int, path: Optional[str] = None) -> Observation:
        path = path or self.last_path
        return Observation(step, source=self.name, kind=CHECKPOINT, path=path,
                           line=path or "", time=time.monotonic())


class SourceSet:
    """The step sources beyond the command's output, driven as one by the loop:
    one watcher thread (inotify) for those that do not poll, one wake-up pipe."""

    def __init__(self, sources: Iterable[StepSource] = (), say=lambda text: None, debug=lambda text: None):
        self.sources: List[StepSource] = list(sources)
        self.debug = debug
        self._watcher: Optional[FileWatcher] = None
        self._waker: Optional[Waker] = None
        said: Set[str] = set()  # one line for what several sources would say alike
        for source in self.sources:
            source.say, source.debug = say, debug
            if isinstance(source, _Watched):
                source._said = said

    def __bool__(self) -> bool:
        return bool(self.sources)

    def resume_points(self) -> List[Observation]:
        """Before each launch: the latest complete checkpoint of each source that has one."""
        found = []
        for source in self.sources:
            point = source.resume_point()  # a log file is opened here, before the command can write to it
            if point is not None:
                self.debug(f"{source.name}: latest complete checkpoint is step {point.step}")
                found.append(point)
        return found

    def start(self) -> List[Observation]:
        """After the first launch (the command is not forked from a process with the
        watcher's thread): watch, and what the sources see already."""
        if any(source.poll is None for source in self.sources):
            self._waker = Waker()
            try:
                self._watcher = FileWatcher(self._waker)
            except Exception as exc:  # watchdog cannot start (no inotify here): the sources poll
                self.debug(f"no inotify watcher: {exc}")
                self._watcher = None
        seen: List[Observation] = []
        for source in self.sources:
            seen += source.start(self._watcher)
            self.debug(f"watching {source.name}" + (f" every {source.poll:g}s" if source.poll else ""))
        return seen

    def fileno(self) -> Optional[int]:
        """What the loop polls for file events (None when every source polls)."""
        return self._waker.fileno() if self._waker is not None else None

    def on_events(self) -> List[Observation]:
        self._waker.clear()
        changed = self._watcher.changed()
        seen: List[Observation] = []
        for source in self.sources:
            if source in changed:
                seen += source.on_change(changed[source])
        return seen

    def due(self, now: float) -> List[Observation]:
        seen: List[Observation] = []
        for source in self.sources:
            if source.next_due is not None and source.next_due <= now:
                seen += source.tick(now)
        return seen

    def next_due(self) -> Optional[float]:
        dues = [source.next_due for source in self.sources if source.next_due is not None]
        return min(dues) if dues else None

    def final(self) -> List[Observation]:
        """Once the command is gone: the last lines, the final checkpoint."""
        seen: List[Observation] = []
        for source in self.sources:
            seen += source.final()
        return seen

    def start_over_from(self, first_step: int, strictly: bool = False) -> Optional[int]:
        """The command's first step is below the checkpoints found at launch: it did not
        resume from the latest. Its start is the latest of them at or below that step
        (``strictly``: below it, when the first step is a checkpoint the command wrote, which
        cannot be the one it resumed from; None: a fresh start); the checkpoint sources
        forget the ones above it. That start."""
        below = [step for source in self.sources for step in getattr(source, "complete_at_launch", {}).values()
                 if (step < first_step if strictly else step <= first_step)]
        start = max(below) if below else None
        for source in self.sources:
            if isinstance(source, CheckpointSource):
                source.start_over_from(start)
        return start

    def latest_checkpoint(self) -> Optional[tuple]:
        """(step, path) of the newest complete checkpoint the sources count now, or None."""
        found = [(s.done_step, s.last_path) for s in self.sources
                 if isinstance(s, CheckpointSource) and s.done_step is not None]
        return max(found, key=lambda item: item[0]) if found else None

    def fds(self) -> Set[int]:
        """Descriptors the loop polls for the sources (FIFOs used as log files)."""
        return {fd for fd in (getattr(s, "fileno", lambda: None)() for s in self.sources) if fd is not None}

    def on_readable(self, fd: int) -> List[Observation]:
        seen: List[Observation] = []
        for source in self.sources:
            if getattr(source, "fileno", lambda: None)() == fd:
                seen += source.on_change(())
        return seen

    def missing(self) -> List[str]:
        """What was watched for and never appeared: ``--checkpoint-dir DIR``, ``--log-file PATH``."""
        return [f"{source.option} {getattr(source, 'path', getattr(source, 'directory', ''))}"
                for source in self.sources if getattr(source, "missing", lambda: False)()]

    def close(self) -> None:
        for source in self.sources:
            source.close()
        if self._watcher is not None:
            self._watcher.stop()
        if self._waker is not None:
            self._waker.close()
