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
import os
import stat
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

from .layouts import Layout, detect_layout, make_layout
from .observation import CHECKPOINT, LOG_FILE, Observation
from .patterns import StepFormat
from .scanner import LineScanner
from .waker import Waker

#: How many 1 MiB reads of a log file one wake-up may take before yielding to the loop.
LOG_READS_PER_TURN = 16
#: Seconds between the looks every source takes even when inotify tells it of changes.
SAFETY_LOOK = 2.0
#: Seconds between looks when inotify cannot be had.
FALLBACK_POLL = 1.0
#: Filesystems whose changes made elsewhere make no inotify event here.
NETWORK_FILESYSTEMS = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "lustre", "gpfs", "ceph", "beegfs", "glusterfs",
    "afs", "davfs", "sshfs", "ncpfs", "orangefs", "pvfs2",
))

#: watchdog event types that can change what a directory holds.
_CHANGES = frozenset(("created", "modified", "moved", "deleted", "closed"))


class FileWatcher:
    """watchdog's native observer (inotify on Linux), feeding paths to the loop.
    Only non-recursive watches: each one is made here, on the caller's thread."""

    def __init__(self, waker: Waker) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        self._waker = waker
        self._changed: collections.deque = collections.deque()
        watcher = self

        class _Handler(FileSystemEventHandler):
            def __init__(self, sink):
                self.sink = sink

            def on_any_event(self, event):
                if event.event_type not in _CHANGES:
                    return  # opens and reads, ours included, change nothing
                watcher._changed.append((self.sink, os.fsdecode(event.src_path)))
                dest = getattr(event, "dest_path", "")
                if dest:
                    watcher._changed.append((self.sink, os.fsdecode(dest)))
                watcher._waker.wake()

        self._handler_type = _Handler
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()

    def watch(self, path: str, sink) -> object:
        """Watch one directory (not its subdirectories); OSError when inotify cannot."""
        try:
            return self._observer.schedule(self._handler_type(sink), path, recursive=False)
        except OSError:
            raise
        except Exception as exc:  # watchdog wraps some failures in its own types
            raise OSError(str(exc)) from None

    def unwatch(self, handle) -> None:
        try:
            self._observer.unschedule(handle)
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


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def link_directories(path: str) -> Set[str]:
    """The directories holding a symlink on the way to ``path`` (a change there can re-point it)."""
    out: Set[str] = set()
    current = "/"
    for part in os.path.abspath(path).split(os.sep)[1:]:
        if not part:
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            out.add(os.path.realpath(os.path.dirname(current)))
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
        self._handles: Dict[str, object] = {}  # watched directory -> watchdog handle
        self._extra: Set[str] = set()  # more directories to watch (unfinished checkpoints)
        self._identity = None  # (path, dev, ino) of the directory watched now (or of its nearest ancestor)

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
        self.say(f"{why}; polling {self.directory} every {FALLBACK_POLL:g}s instead (--poll sets the interval)")
        if self._watcher is not None:
            for handle in self._handles.values():
                self._watcher.unwatch(handle)
        self._handles.clear()
        self._watcher = None
        self.poll = FALLBACK_POLL

    def _follow(self) -> bool:
        """Make the watches match what is on disk now; True when the directory
        watched changed (it appeared, was made again, or a link was re-pointed)."""
        real = os.path.realpath(self.directory)
        exists = os.path.isdir(real)
        target = real if exists else _nearest_existing(real)
        try:
            st = os.stat(target)
        except OSError:
            return False
        identity = (target, st.st_dev, st.st_ino)
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
            wanted = {target, os.path.dirname(target)} | link_directories(self.directory) | self._extra
            self._rewatch(wanted)
        return changed

    def _rewatch(self, wanted: Set[str]) -> None:
        for path in [p for p in self._handles if p not in wanted]:
            self._watcher.unwatch(self._handles.pop(path))
        for path in sorted(wanted - set(self._handles)):
            if not os.path.isdir(path):
                continue
            try:
                self._handles[path] = self._watcher.watch(path, self)
            except OSError as exc:
                self._fall_back(f"inotify cannot watch {path} ({exc.strerror or exc})")
                return

    def _schedule(self, now: float, soon: Optional[float] = None) -> None:
        due = now + (self.poll or SAFETY_LOOK)
        self.next_due = due if soon is None else min(due, soon)

    # -- the loop's calls -------------------------------------------------------------

    def tick(self, now: float) -> List[Observation]:
        self._schedule(now)
        return self._look((), everything=self._follow())

    def on_change(self, paths: Iterable[str]) -> List[Observation]:
        return self._look(paths, everything=self._follow())

    def _look(self, paths: Iterable[str], everything: bool) -> List[Observation]:
        raise NotImplementedError

    def missing(self) -> bool:
        """The directory never existed while the run went."""
        return not self.appeared

    def close(self) -> None:
        if self._watcher is not None:
            for handle in self._handles.values():
                self._watcher.unwatch(handle)
        self._handles.clear()


class LogFileSource(_Watched):
    """Follows a log file like ``tail -F``: it may not exist yet, may be
    truncated or rotated (or its directory made again); only what is written
    after launch counts unless ``from_start``. A FIFO is read as it comes,
    without ever blocking; a file that is neither a regular file nor a FIFO is
    not read (one line says so)."""

    kind = LOG_FILE
    option = "--log-file"

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
        self._refused: Optional[tuple] = None  # the (dev, ino) of a file not read, said once
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
            os.lseek(self._fd, self._offset, os.SEEK_SET)
        return None

    def _open(self) -> bool:
        """Open what is at the path now, never blocking (a FIFO without a writer)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # not there (yet)
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            os.close(fd)
            if self._refused != identity:
                self._refused = identity
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file or a FIFO"
                self.say(f"--log-file {self.path} is {what} now; not reading it")
            return False
        if stat.S_ISFIFO(st.st_mode):
            # Read and write: the FIFO then never reads as ended when a writer closes it.
            os.close(fd)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return False
        self._close_fd()
        self._fd, self._identity_of_file = fd, identity
        self._regular = stat.S_ISREG(st.st_mode)
        self._offset = 0
        self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)
        return True

    def start(self, watcher: Optional[FileWatcher]) -> List[Observation]:
        """After the launch: watch the file's directory and read what is new."""
        self.resume_point()
        if not os.path.isdir(os.path.realpath(self.directory)):
            self.say(f"{self.option} {self.path}: {self.directory} does not exist yet; watching for it")
        self._begin(watcher)
        return self._look((), everything=True)

    def _look(self, paths: Iterable[str], everything: bool) -> List[Observation]:
        out: List[Observation] = []
        try:
            st = os.stat(self.path)
        except OSError:
            st = None  # rotated away and not recreated yet: finish the old file
        if self._fd is not None:
            out += self._read()
        if st is not None and (st.st_dev, st.st_ino) != self._identity_of_file:
            # A new file at the path (created, rotated in, its directory made again): all of it is new.
            if self._open():
                out += self._read()
        elif st is not None and self._fd is not None and self._regular and st.st_size < self._offset:
            # Truncated in place: start over from its beginning.
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._offset = 0
            self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)
            out += self._read()
        return out

    def _read(self) -> List[Observation]:
        out: List[Observation] = []
        for _ in range(LOG_READS_PER_TURN):
            try:
                n = os.readv(self._fd, [self._buf])
            except OSError:  # EAGAIN (an empty FIFO), or gone
                return out
            if n == 0:
                return out
            self._offset += n
            out += self._scanner.feed(self._buf, n)
            if self._scanner.notes:
                for note in self._scanner.notes:
                    self.debug(note)
                self._scanner.notes.clear()
        self.next_due = time.monotonic()  # more to read: come back on the next turn
        return out

    def final(self) -> List[Observation]:
        """Once the command is gone: what is left, and a last line without a newline."""
        out = self.on_change(())
        finish = getattr(self._scanner, "end_of_stream", None)
        return out + (finish() if finish is not None else [])

    def missing(self) -> bool:
        return self._identity_of_file is None

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
        self.complete_at_launch: Dict[str, int] = {}  # name -> step, complete when the command started
        self._seen_whole: Set[str] = set()  # observed (or whole at launch): never again
        self._listed: Set[str] = set()  # the entries of the last listing
        self._listed_mtime: Optional[int] = None
        self._listed_at = 0.0  # time.time() of that listing

    # -- at launch ---------------------------------------------------------------

    def resume_point(self) -> Optional[Observation]:
        """The latest complete checkpoint now: the step a resumed run starts at."""
        self._follow()
        found = self._list(everything=True)
        self.complete_at_launch = {name: step for name, step in found.items()
                                   if self.layout is not None and self.layout.is_complete(self.root, name, step)}
        self._seen_whole = set(self.complete_at_launch)
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
            self.say(f"{self.option} {self.directory} does not exist yet; watching for it")
        self._begin(watcher)
        return self._look((), everything=True)  # what appeared between the scan and the watch

    def _list(self, everything: bool = False) -> Dict[str, int]:
        """Checkpoint candidates among the directory's entries, name -> step; only the
        entries that are new since the last listing unless ``everything``."""
        found: Dict[str, int] = {}
        if self.real is None:
            return found
        try:
            self._listed_mtime = os.stat(self.real).st_mtime_ns
            self._listed_at = time.time()
            names = set(self._names())
        except OSError:
            return found
        fresh = names if everything else names - self._listed
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
            with os.scandir(self.real) as entries:
                for entry in entries:
                    yield entry.name
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
            try:
                mtime = os.stat(self.real).st_mtime_ns
            except OSError:
                return set()
            # A change made within the timestamp's granularity of the last listing
            # leaves the mtime as it was: list once more after such a listing.
            granularity = 1.0 if mtime % 1_000_000_000 == 0 else 0.05
            racy = self._listed_at - mtime / 1e9 < granularity
            return None if (mtime != self._listed_mtime or racy) else set()
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
        if name not in self._seen_whole:
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
                    self.debug(f"{self.name}: {name} was deleted before it was complete")
                    continue
                if not self.layout.is_complete(self.root, name, step):
                    self.debug(f"{self.name}: {name} (step {step}) is not complete yet ({_size(path)} bytes)")
                    continue
                del self.pending[name]
                self._seen_whole.add(name)
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
        for source in self.sources:
            source.say, source.debug = say, debug

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

    def start_over_from(self, first_step: int) -> Optional[int]:
        """The command's first step is below the checkpoints found at launch: it did not
        resume from the latest. Its start is the latest of them at or below that step (None:
        a fresh start); the checkpoint sources forget the ones above it. That start."""
        below = [step for source in self.sources for step in getattr(source, "complete_at_launch", {}).values()
                 if step <= first_step]
        start = max(below) if below else None
        for source in self.sources:
            if isinstance(source, CheckpointSource):
                source.start_over_from(start)
        return start

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
