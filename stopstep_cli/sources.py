"""Step sources beyond the command's own output: log files it writes and the
checkpoint directories it saves to.

Both turn what they see into :class:`~stopstep_cli.observation.Observation`s for
the supervision loop. They are driven from that one loop: with inotify,
watchdog's observer thread only queues the paths that changed and wakes the
loop through a pipe; with ``--poll`` the loop looks on a timer. watchdog is
imported only when a file source is used.

Polling is stopstep's own rather than watchdog's PollingObserver, which would
stat every file below the directory at every interval: stopstep lists the
directory only when its mtime changed and re-checks only the checkpoints not
yet finished.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence

from .layouts import Layout, detect_layout, make_layout
from .observation import CHECKPOINT, LOG_FILE, Observation
from .patterns import StepFormat
from .scanner import LineScanner
from .waker import Waker

#: How many 1 MiB reads of a log file one wake-up may take before yielding to the loop.
LOG_READS_PER_TURN = 16


#: watchdog event types that can change what a directory holds.
_CHANGES = frozenset(("created", "modified", "moved", "deleted", "closed"))


class FileWatcher:
    """watchdog's native observer (inotify on Linux), feeding paths to the loop."""

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

    def watch(self, path: str, recursive: bool, sink) -> object:
        return self._observer.schedule(self._handler_type(sink), path, recursive=recursive)

    def unwatch(self, handle) -> None:
        try:
            self._observer.unschedule(handle)
        except (KeyError, OSError):
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


class StepSource:
    """What every step source beyond the command's output does for the loop.

    - ``resume_point()`` before the launch: the latest complete checkpoint, the
      step a resumed run starts at (None for sources that have none); a log file
      opens itself here, so what the command writes from its first instant counts;
    - ``start(watcher)`` after the launch: begin watching (inotify through
      ``watcher``, or polling when it is None); the observations already due;
    - ``on_change(paths)`` when the watcher saw these paths change, and
      ``tick(now)`` when ``next_due`` has come (polling, a second look);
    - ``final()`` once the command is gone: the last lines, the last checkpoint;
    - ``close()``.
    """

    name = ""
    kind = ""
    poll: Optional[float] = None
    next_due: Optional[float] = None
    debug = staticmethod(lambda text: None)  # what -v shows of what the source sees

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
    """Shared by the file sources: where to watch, how often to poll."""

    def __init__(self, poll: Optional[float]):
        self.poll = poll
        self.next_due: Optional[float] = time.monotonic() if poll else None
        self._watcher: Optional[FileWatcher] = None
        self._handle = None
        self._watched_path: Optional[str] = None

    def _watch(self, path: str, recursive: bool) -> None:
        if self._watcher is None or self._watched_path == path:
            return
        if self._handle is not None:
            self._watcher.unwatch(self._handle)
        try:
            self._handle = self._watcher.watch(path, recursive, self)
            self._watched_path = path
        except OSError:
            self._handle, self._watched_path = None, None

    def _follow(self, directory: str, recursive: bool) -> bool:
        """Watch ``directory``, or its nearest existing ancestor until it exists
        (each directory created on the way is watched in turn); True once it does."""
        while self._watcher is not None:
            target = directory if os.path.isdir(directory) else _nearest_existing(directory)
            if target == self._watched_path:
                break
            self._watch(target, recursive if target == directory else False)
            if self._watched_path != target:
                break  # could not watch it; polling the refreshes still finds it
        return os.path.isdir(directory)

    def tick(self, now: float) -> List[Observation]:
        """Called by the loop when ``next_due`` has come."""
        if self.poll:
            self.next_due = now + self.poll
        else:
            self.next_due = None
        return self.on_change(())

    def close(self) -> None:
        if self._watcher is not None and self._handle is not None:
            self._watcher.unwatch(self._handle)
            self._handle = None


class LogFileSource(_Watched):
    """Follows a log file like ``tail -F``: it may not exist yet, may be
    truncated or rotated; only what is written after launch counts unless
    ``from_start``."""

    kind = LOG_FILE

    def __init__(self, path: str, formats: Sequence[StepFormat], from_start: bool = False,
                 poll: Optional[float] = None):
        super().__init__(poll)
        self.path = os.path.abspath(path)
        self.name = f"log:{path}"
        self.formats = tuple(formats)
        self.from_start = from_start
        self._fd: Optional[int] = None
        self._opened = False
        self._identity = None
        self._offset = 0
        self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)
        self._buf = bytearray(1 << 20)

    def resume_point(self) -> None:
        """Before the launch: open the file as it is, so that what the command
        writes from its first instant on counts, and what was there does not."""
        if self._opened:
            return None  # a restart: go on reading where we are
        self._opened = True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # not there yet: everything it will hold is written after launch
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        self._offset = 0 if self.from_start else st.st_size
        os.lseek(fd, self._offset, os.SEEK_SET)
        return None

    def start(self, watcher: Optional[FileWatcher]) -> List[Observation]:
        """After the launch: watch the file's directory and read what is new."""
        self.resume_point()
        self._watcher = watcher
        self._rewatch()
        return self.on_change(())

    def _rewatch(self) -> None:
        self._follow(os.path.dirname(self.path), False)

    def on_change(self, paths: Iterable[str]) -> List[Observation]:
        out: List[Observation] = []
        self._rewatch()  # the directory may have appeared
        try:
            st = os.stat(self.path)
        except OSError:
            st = None  # rotated away and not recreated yet: finish the old file
        if self._fd is not None:
            out += self._read()
        if st is not None and (st.st_dev, st.st_ino) != self._identity:
            # A new file at the path (created or rotated in): all of it is new.
            self._close_fd()
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return out
            st = os.fstat(self._fd)  # the file opened, even if rotated again since the stat
            self._identity, self._offset = (st.st_dev, st.st_ino), 0
            self._scanner = LineScanner(self.formats, self.name, kind=LOG_FILE)
            out += self._read()
        elif st is not None and self._fd is not None and st.st_size < self._offset:
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
            except OSError:
                return out
            if n == 0:
                return out
            self._offset += n
            out += self._scanner.feed(self._buf, n)
        self.next_due = time.monotonic()  # more to read: come back on the next turn
        return out

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

    def __init__(self, root: str, layout: str = "auto", pattern: Optional[str] = None,
                 poll: Optional[float] = None, settle: float = 1.0):
        super().__init__(poll)
        self.root = os.path.abspath(root)
        self.name = f"checkpoint:{root}"
        self.layout: Optional[Layout] = None if (layout == "auto" and pattern is None) else make_layout(layout, pattern)
        self.recursive_names = pattern is not None and "/" in pattern
        self.settle = poll if poll else settle
        if self.layout is not None:
            self.layout.state["settle"] = self.settle
        self.done_step: Optional[int] = None
        self.last_path: Optional[str] = None
        self.pending: Dict[str, int] = {}  # unfinished checkpoints newer than done_step
        self._root_mtime: Optional[int] = None
        self._root_seen = False  # the directory existed at the last look

    # -- at launch ---------------------------------------------------------------

    def resume_point(self) -> Optional[Observation]:
        """The latest complete checkpoint now: the step a resumed run starts at."""
        found = self._list()
        complete = None
        for name, step in sorted(found.items(), key=lambda item: -item[1]):
            if complete is None and self.layout.is_complete(self.root, name, step):
                complete = (name, step)
        if complete is None:
            self.pending = dict(found)
            return None
        name, step = complete
        self.pending = {n: s for n, s in found.items() if s > step}
        self.done_step, self.last_path = step, os.path.join(self.root, self.layout.checkpoint_name(name))
        return self._observation(step)

    def start(self, watcher: Optional[FileWatcher]) -> List[Observation]:
        self._watcher = watcher
        self._rewatch()  # watchdog sets up inotify before schedule() returns
        return self.on_change((), everything=True)  # what appeared between the scan and the watch

    def _rewatch(self) -> None:
        self._follow(self.root, True)

    def _list(self) -> Dict[str, int]:
        """Checkpoint candidates in the directory, name -> step (detecting the layout if needed)."""
        found: Dict[str, int] = {}
        if not os.path.isdir(self.root):
            return found
        self._root_seen = True
        try:
            self._root_mtime = os.stat(self.root).st_mtime_ns
            for name in self._names():
                if self.layout is None:
                    self._detect([name])
                    if self.layout is None:
                        continue
                step = self.layout.step_of(name)
                if step is not None:
                    found[name] = step
        except OSError:
            pass
        return found

    def _names(self):
        if not self.recursive_names:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    yield entry.name
            return
        for directory, dirs, files in os.walk(self.root):
            rel = os.path.relpath(directory, self.root)
            for name in dirs + files:
                yield name if rel == "." else os.path.join(rel, name)

    def _detect(self, names: List[str]) -> None:
        layout = detect_layout(names)
        if layout is not None:
            layout.state["settle"] = self.settle
            self.layout = layout

    # -- while running -------------------------------------------------------------

    def final(self) -> List[Observation]:
        return self.on_change((), everything=True)

    def on_change(self, paths: Iterable[str], everything: bool = False) -> List[Observation]:
        names: Optional[set]
        if not self._root_seen and self._follow(self.root, True):
            names = None  # the directory just appeared: look at all of it
        else:
            names = None if everything else self._changed_names(paths)
        if names is None:
            for name, step in self._list().items():
                self._consider(name, step)
        else:
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
        if not paths:
            if self.poll:
                try:
                    mtime = os.stat(self.root).st_mtime_ns
                except OSError:
                    return set()
                # Directory mtimes are coarse (a clock tick): one that is still
                # recent may hide a second change, so list again until it is old.
                recent = time.time() - mtime / 1e9 < 2.0
                return None if (mtime != self._root_mtime or recent) else set()
            return set()
        names = set()
        for path in paths:
            rel = os.path.relpath(path, self.root)
            if rel == "." or rel.startswith(".."):
                continue
            parts = rel.split(os.sep)
            if self.recursive_names:
                names.update(os.path.join(*parts[: i + 1]) for i in range(len(parts)))
            else:
                names.add(parts[0])
        return names

    def _consider(self, name: str, step: int) -> None:
        if self.done_step is None or step > self.done_step:
            self.pending[name] = step

    def _finish_pending(self) -> List[Observation]:
        if self.layout is None or not self.pending:
            self._plan_relook()
            return []
        out = []
        for name, step in sorted(self.pending.items(), key=lambda item: item[1]):
            if not os.path.exists(os.path.join(self.root, name)):
                del self.pending[name]
                self.debug(f"{self.name}: {name} was deleted before it was complete")
                continue
            if not self.layout.is_complete(self.root, name, step):
                self.debug(f"{self.name}: {name} (step {step}) is not complete yet "
                           f"({_size(os.path.join(self.root, name))} bytes)")
                continue
            del self.pending[name]
            if self.done_step is None or step > self.done_step:
                self.done_step, self.last_path = step, os.path.join(self.root, self.layout.checkpoint_name(name))
                out.append(self._observation(step))
        self.pending = {n: s for n, s in self.pending.items() if self.done_step is None or s > self.done_step}
        self._plan_relook()
        return out

    def _plan_relook(self) -> None:
        # "Stable over two looks" needs a second look even when nothing changes.
        if self.pending and self.layout is not None and self.layout.name == "generic" and not self.poll:
            due = time.monotonic() + self.settle / 2
            self.next_due = due if self.next_due is None else min(self.next_due, due)

    def _observation(self, step: int) -> Observation:
        return Observation(step, source=self.name, kind=CHECKPOINT, path=self.last_path,
                           line=self.last_path or "", time=time.monotonic())


class SourceSet:
    """The step sources beyond the command's output, driven as one by the loop:
    one watcher thread (inotify) for those that do not poll, one wake-up pipe."""

    def __init__(self, sources: Iterable[StepSource] = (), debug=lambda text: None):
        self.sources: List[StepSource] = list(sources)
        self.debug = debug
        self._watcher: Optional[FileWatcher] = None
        self._waker: Optional[Waker] = None
        for source in self.sources:
            source.debug = debug

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
            self._watcher = FileWatcher(self._waker)
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

    def close(self) -> None:
        for source in self.sources:
            source.close()
        if self._watcher is not None:
            self._watcher.stop()
        if self._waker is not None:
            self._waker.close()
