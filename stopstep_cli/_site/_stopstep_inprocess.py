"""stopstep's in-process side: the training process stops itself at exactly the target step.

``stopstep run`` puts the directory holding this file first on ``PYTHONPATH``; its
``sitecustomize.py`` imports this module and calls :func:`install` in every Python
process of the command. Standard library only, Python 3.9 to 3.13, and nothing of
stopstep needs to be installed where the command runs.

:func:`install` reads the environment and registers post-import hooks; nothing else
happens until a framework is imported or ``stopstep_cli.beacon.step`` is called:

The integrations live in ``_stopstep_frameworks.py`` beside this file, loaded when a
framework is imported:

- ``transformers.trainer``: every ``Trainer`` gets a ``TrainerCallback`` that, at the
  ``on_step_end`` where ``state.global_step`` reaches the stop step, sets
  ``control.should_save`` and ``control.should_training_stop``: the Trainer writes
  ``checkpoint-N`` and ``train()`` returns normally.
- ``lightning.pytorch`` and ``pytorch_lightning``: every ``Trainer`` gets a ``Callback``
  that sets ``trainer.should_stop`` at the stop step and, right after each
  ``ModelCheckpoint``'s own ``on_train_epoch_end`` of the epoch the stop ends, has that
  ``ModelCheckpoint`` save the stop step through its own machinery (naming, top-k,
  ``last.ckpt``) unless it saved that step itself.

A stop for a NaN or infinite loss (reason ``nan_loss``) stops without that save: a
checkpoint of broken weights would be the one a resumed run starts from.
- ``keras``: ``Model.fit`` gets a ``Callback`` that sets ``model.stop_training`` at the
  batch end where ``optimizer.iterations`` reaches the stop step.

Under ``python -S`` no ``sitecustomize`` runs, so no framework is hooked; the beacon
still imports this module from ``PYTHONPATH`` (which ``-I`` ignores too).

Nothing here may break or slow the training: any error disengages the module for
good, with one line on stderr (``stopstep: in-process stop disengaged: ...``), and
the supervisor's outside view carries on.

Environment
-----------
``STOPSTEP_INPROC_CHANNEL``  the path of the supervisor's Unix datagram socket; without it nothing happens.
``STOPSTEP_INPROC_TARGET``   the absolute target step; empty or absent when not known (yet).
``STOPSTEP_INPROC_DISABLE``  ``1`` turns the in-process side off.
``RANK`` (else ``LOCAL_RANK``, else 0) and ``WORLD_SIZE`` (else 1) name the process in its messages.

The channel (protocol 1)
------------------------
The supervisor binds a ``SOCK_DGRAM`` Unix socket at a path in a private 0700
directory. A training process, when it engages (its first framework callback or
beacon call), opens a non-blocking, close-on-exec ``SOCK_DGRAM`` socket, autobinds it
to an abstract address (so the supervisor can answer with ``sendto``) and connects it
to that path (so only the supervisor's datagrams reach it). No file descriptor is
inherited, so launchers that close inherited descriptors (torchrun, accelerate,
deepspeed) do not matter. Each datagram is one compact JSON object (``NaN`` and
``Infinity`` as Python's ``json`` writes them) with a type ``t``.

Process to supervisor::

    {"t":"hello","proto":1,"pid":P,"rank":R,"world":W,"fw":"hf","step":S,"target":T}
        on engaging; fw is hf, lightning, keras or beacon; S the step training starts
        at, from the framework (null for the beacon); T the target this process
        knows (null when none).
    {"t":"step","pid":P,"rank":R,"step":N,"skipped":K,"v":{"loss":0.5}}
        a finished step. "v" (numbers, strings, booleans) only when the step has
        values; Transformers' logged values come with the step they were logged at.
        Steps less than 20 ms after the last report are not reported on their own:
        the next report counts them in "skipped" (absent when 0). A step with a NaN
        or infinite value, the step the process stops after, and the last step when
        the interpreter exits normally are always reported.
    {"t":"stopping","pid":P,"rank":R,"step":N,"why":"target"}
    {"t":"stopping","pid":P,"rank":R,"step":N,"why":"stop_at","reason":"time_limit"}
        once, right after the report of the step N the process stops after.

Supervisor to process::

    {"t":"target","step":N}                         the target changed (N may be null)
    {"t":"stop_at","step":S,"reason":"time_limit"}  stop after the first finished step >= S

At each step end the process drains what the supervisor sent (a ``poll`` with no
timeout, then at most a bounded number of datagrams), decides, and reports: it stops
when the step is >= the target or >= the earliest ``stop_at`` it received. A stop
decided during the run is announced as a step ahead, never as "stop now", so that
all data-parallel ranks stop after the same step without talking to each other, as
long as each rank reads the announcement before it finishes that step.

Sending never blocks training: a datagram that finds the supervisor's queue full
(EAGAIN; Linux queues only ``net.unix.max_dgram_qlen`` datagrams, 10 by default) is
dropped -- the target is known in-process anyway. Only ``hello`` and ``stopping``,
sent once each, wait up to 50 ms for room. A supervisor that is gone (ECONNREFUSED)
is not an error: the process still stops at the target it knows. A supervisor that
cannot be reached when the process engages is: the module disengages. Unknown
message types are ignored by both ends.

A forked child (a DataLoader worker) is not the process that engaged: it sends
nothing unless it itself calls a callback or the beacon, and then engages on its own
socket with its own pid.
"""

import errno
import os
import sys
from _thread import allocate_lock as _allocate_lock
from time import monotonic as _monotonic

CHANNEL_ENV = "STOPSTEP_INPROC_CHANNEL"
TARGET_ENV = "STOPSTEP_INPROC_TARGET"
DISABLE_ENV = "STOPSTEP_INPROC_DISABLE"
PROTOCOL = 1

#: Post-import hooks: module name -> the function of _stopstep_frameworks that attaches to it.
FRAMEWORK_MODULES = {
    "transformers.trainer": "attach_transformers",
    "lightning.pytorch": "attach_lightning",
    "pytorch_lightning": "attach_lightning",
    "keras": "attach_keras",
}

# Seconds: steps closer together than this are reported together (the latest, and how many
# were passed over). Each report wakes the supervisor, which on a machine with few cores takes
# the CPU from the training for ~0.1 ms: 50 reports a second at most keep that out of sight.
# The step a process stops after, a NaN or inf value, and the last step at exit go out at once.
_REPORT_INTERVAL = 0.02
_IMPORTANT_SEND_WAIT = 0.05  # seconds a hello or stopping datagram may wait for room, once
_MAX_DRAIN = 64  # datagrams read per step end, so a flood can never hold training up
_MAX_STRING = 200  # characters of a string value sent
#: Stop reasons after which the integrations end training without writing a checkpoint of their own.
_NO_CHECKPOINT_REASONS = ("nan_loss",)
#: What sending or receiving fails with once the supervisor's socket is gone.
_GONE_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE)


class Client:
    """This process's end of the channel, and the stop decision: one per process."""

    def __init__(self, path, target):
        self.path = path
        self.target = target
        self.stop_at = None
        self.stop_reason = None
        self.disengaged = False
        self.dropped = 0  # datagrams dropped because the supervisor's queue was full
        self._sock = None
        self._pid = None  # the process that engaged; another pid (a fork) engages anew
        self._rank = 0
        self._readable = None
        self._next_report = 0.0  # time.monotonic() before which a step is not reported on its own
        self._skipped = 0  # steps not reported since the last report
        self._unreported = None  # (step, values) of the latest of them, sent at exit at the latest
        self._exit_flush_registered = False
        self._supervisor_gone = False
        self._stopping = None  # the stopping message, once the stop is decided
        self._stopping_sent = False
        self._step_head = ""
        self._dumps = None
        self._loads = None
        self._fd, self._ino = -1, None  # the socket's descriptor, and what it was when made
        self._framework = None  # the one that engaged
        self._lock = _allocate_lock()  # one thread at a time does the channel's work
        self._lock_pid = os.getpid()  # a fork's copy may be held by a thread it does not have
        self._said_bad_step = False

    # -- what the integrations and the beacon call --------------------------

    def begin(self, framework, start_step):
        """Training starts: engage now, so the supervisor hears of us before the first step."""
        if self.disengaged:
            return
        try:
            if self._pid != os.getpid():
                self._engage(framework, None if start_step is None else int(start_step))
        except Exception as exc:
            self.disengage("%s: %r" % (framework, exc))

    def step_end(self, framework, step, values=None, report=True):
        """A step finished: take in the supervisor's news, decide whether to stop after
        this step, and report it (unless ``report`` is False: then :meth:`report` follows
        once the step's values are known). True when the loop should stop now."""
        if self.disengaged:
            return False
        if type(step) is not int or not -_MAX_STEP <= step <= _MAX_STEP:
            whole = _whole_step(step)
            if whole is None:  # one bad call is the caller's: said once, and the stop stays on
                if not self._said_bad_step:
                    self._said_bad_step = True
                    _say("%s: step %.60r is not a whole number up to 10^18; that call is ignored"
                         % (framework, step))
                return False
            step = whole
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = _allocate_lock(), os.getpid()
        if not self._lock.acquire(False):
            # Another thread is in here (a loop stepping in several threads): decide on what
            # is known, never wait for it; its call does the channel's work.
            return self.stop_is_due(step)
        try:
            if self._pid != os.getpid():  # first call, or the first in a forked child
                self._engage(framework, None)
            if not self._supervisor_gone and self._readable(0):
                # (a closed descriptor polls as readable too: looked at before any recv)
                if self._socket_was_taken():
                    self._engage(framework, None)
                else:
                    self._drain()
            stop = self._decide(step)
            if report:
                self._report(step, values, force=stop)
                if stop:
                    self._send_stopping()
            return stop
        except Exception as exc:
            self.disengage("%s: %r" % (framework, exc))
            return False
        finally:
            self._lock.release()

    def stop_is_due(self, step):
        """Whether the loop should stop after ``step``, from what is known now (no channel work)."""
        return (self.target is not None and step >= self.target) or \
            (self.stop_at is not None and step >= self.stop_at)

    def _socket_was_taken(self):
        """The socket's descriptor was closed (a daemonising library's closerange), or
        now names another file: ours is gone, and what holds the number is not ours
        (nothing may be read from it or sent on it)."""
        try:
            return os.fstat(self._fd).st_ino != self._ino
        except OSError:
            return True

    def report(self, framework, step, values):
        """The report of a step whose :meth:`step_end` left it out, with its values."""
        if self.disengaged or self._pid != os.getpid() or not self._lock.acquire(False):
            return
        try:
            self._report(int(step), values, force=self._stopping is not None)
            self._send_stopping()
        except Exception as exc:
            self.disengage("%s: %r" % (framework, exc))
        finally:
            self._lock.release()

    def saves_at_stop(self):
        """Whether the step this process stops after should be checkpointed: yes for the
        target and for a stop announced for any other reason (a time limit, a signal: the
        preemption story), no for a NaN or infinite loss, whose weights are not worth a
        checkpoint that a resumed run would start from (or that a framework keeping only
        its last few would keep instead of a good one)."""
        stopping = self._stopping
        return stopping is None or stopping.get("reason") not in _NO_CHECKPOINT_REASONS

    def disengage(self, what):
        """Off for good in this process, with one line on stderr."""
        if self.disengaged:
            return
        self.disengaged = True
        self._close()
        _say("in-process stop disengaged: %s" % (what,))

    # -- the channel ---------------------------------------------------------

    def _engage(self, framework, start_step):
        import json
        import select
        import socket

        self._close()  # a fork's copy of its parent's socket, if any
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind("")  # Linux autobind: a fresh abstract address the supervisor can answer to
            sock.connect(self.path)  # and only the supervisor's datagrams reach it
        except OSError as exc:
            sock.close()
            raise RuntimeError("cannot reach the supervisor at %s: %s" % (self.path, exc))
        pid = os.getpid()
        rank, world = _rank_and_world()
        self._sock, self._pid, self._rank, self._framework = sock, pid, rank, framework
        self._fd = sock.fileno()
        self._ino = os.fstat(self._fd).st_ino
        self._supervisor_gone = False
        self._stopping, self._stopping_sent = None, False
        self._next_report, self._skipped, self._unreported = 0.0, 0, None
        if not self._exit_flush_registered:
            import atexit

            atexit.register(self.flush_at_exit)
            self._exit_flush_registered = True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        self._readable = poller.poll  # poll(0): far cheaper than a recv failing with EAGAIN
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode
        self._loads = json.loads
        self._step_head = '{"t":"step","pid":%d,"rank":%d,"step":' % (pid, rank)
        hello = {"t": "hello", "proto": PROTOCOL, "pid": pid, "rank": rank, "world": world,
                 "fw": framework, "step": start_step, "target": self.target}
        self._send(self._dumps(hello), important=True)

    def _report(self, step, values, force=False):
        if self._supervisor_gone:
            return
        now = _monotonic()
        if now < self._next_report and not force and not (values and _has_non_finite(values)):
            self._skipped += 1  # steps faster than the report interval go out together
            self._unreported = (step, values)
            return
        self._next_report = now + _REPORT_INTERVAL
        self._unreported = None
        text = "%s%d" % (self._step_head, step)
        if self._skipped:
            text += ',"skipped":%d' % self._skipped
            self._skipped = 0
        plain = _plain_values(values) if values else None
        if plain:
            text += ',"v":' + self._dumps(plain)
        if self._socket_was_taken():  # checked where it is used, not on every call: it costs a stat
            self._engage(self._framework, None)
        self._send(text + "}")

    def flush_at_exit(self):
        """The interpreter ends: the latest step passed over goes out, so that the supervisor
        knows where a run that finished by itself ended. Never raises."""
        try:
            if self._unreported is not None and self._pid == os.getpid() and not self.disengaged:
                (step, values), self._skipped = self._unreported, self._skipped - 1
                self._report(step, values, force=True)
        except Exception:
            pass

    def _send(self, text, important=False):
        if self._supervisor_gone:
            return
        data = text.encode()
        for attempt in (1, 2):
            try:
                self._sock.send(data)
                return
            except BlockingIOError:  # the supervisor's queue is full
                if not (important and attempt == 1 and self._wait_for_room()):
                    self.dropped += 1
                    return
            except OSError as exc:
                if exc.errno not in _GONE_ERRNOS:
                    raise
                self._supervisor_gone = True
                return

    def _wait_for_room(self):
        import select

        return bool(select.select([], [self._sock], [], _IMPORTANT_SEND_WAIT)[1])

    def _drain(self):
        recv = self._sock.recv
        for _ in range(_MAX_DRAIN):
            try:
                data = recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:  # the supervisor went away: its error is reported on receive too
                if exc.errno not in _GONE_ERRNOS:
                    raise
                self._supervisor_gone = True
                return
            self._take(data)

    def _take(self, data):
        try:
            message = self._loads(data)
            kind = message.get("t")
            if kind == "target":
                self.target = None if message.get("step") is None else int(message["step"])
            elif kind == "stop_at":
                stop_at = int(message["step"])
                if self.stop_at is None or stop_at < self.stop_at:
                    self.stop_at, self.stop_reason = stop_at, message.get("reason")
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # not ours to fail on: the supervisor's outside view still stops the run

    def _decide(self, step):
        if self.target is not None and step >= self.target:
            why = "target"
        elif self.stop_at is not None and step >= self.stop_at:
            why = "stop_at"
        else:
            return False
        if self._stopping is None:
            self._stopping = {"t": "stopping", "pid": self._pid, "rank": self._rank, "step": step, "why": why}
            if why == "stop_at" and self.stop_reason is not None:
                self._stopping["reason"] = self.stop_reason
        return True

    def _send_stopping(self):
        if self._stopping is not None and not self._stopping_sent:
            self._stopping_sent = True
            self._send(self._dumps(self._stopping), important=True)

    def _close(self):
        sock, self._sock, self._pid = self._sock, None, None
        if sock is not None:
            try:
                if self._socket_was_taken():
                    sock.detach()  # the number is someone else's now: not ours to close
                else:
                    sock.close()
            except OSError:
                pass


# -- the process's state ------------------------------------------------------

_client = None
_configured = False
_finder = None


def client():
    """This process's :class:`Client`, or None outside stopstep (no channel, or disabled)."""
    if not _configured:
        _configure()
    return _client


def _configure():
    global _client, _configured
    _configured = True
    env = os.environ
    if env.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    path = env.get(CHANNEL_ENV)
    if not path:
        return None
    target = env.get(TARGET_ENV, "").strip()
    _client = Client(path, int(target) if target else None)
    return _client


def install():
    """Read the environment and hook the frameworks; called by stopstep's sitecustomize. Never raises."""
    try:
        if client() is None:
            return
        _install_hooks()
    except Exception as exc:
        _disengage_everything("install: %r" % (exc,))


_MAX_STEP = 10 ** 18 - 1  # as the supervisor's targets and log lines: a longer number is no step


def _whole_step(value):
    """``value`` as a whole step number (a numpy or tensor integer, 12.0, "12"), or None."""
    import operator

    try:
        step = operator.index(value)
    except TypeError:
        try:
            number = float(value)
        except Exception:
            return None
        if not number.is_integer():
            return None
        step = int(number)
    except Exception:
        return None
    return step if -_MAX_STEP <= step <= _MAX_STEP else None


def prepare():
    """Import what engaging needs, now: called where the beacon is imported (most often the
    main thread, before any fork). A first call on another thread would otherwise import
    them while the main thread may fork, and the child inherit the import's lock, held."""
    import json  # noqa: F401
    import select  # noqa: F401
    import socket  # noqa: F401


def beacon_step(step, values):
    """``stopstep_cli.beacon.step``: report a finished step; True when the loop should stop after it."""
    current = _client if _configured else _client_or_none()
    if current is None:
        return False
    return current.step_end("beacon", step, values)


def _client_or_none():
    try:
        return client()
    except Exception as exc:
        _disengage_everything("beacon: %r" % (exc,))
        return None


def _disengage_everything(what):
    global _client, _configured
    current, _configured = _client, True
    if current is None:
        current = _client = Client(None, None)
    current.disengage(what)


def _say(line):
    text = "stopstep: %s\n" % (line,)
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        try:
            os.write(2, text.encode("utf-8", "replace"))
        except OSError:
            pass


def _rank_and_world():
    env = os.environ
    rank = env.get("RANK") or env.get("LOCAL_RANK") or "0"
    try:
        rank = int(rank)
    except ValueError:
        rank = 0
    try:
        world = int(env.get("WORLD_SIZE") or 1)
    except ValueError:
        world = 1
    return rank, world


def _plain_values(values):
    """The values that can be sent as they are, or turned into a number without waiting on a device."""
    plain = {}
    for key, value in values.items():
        kind = type(value)
        if kind is float or kind is int or kind is bool:
            plain[str(key)] = value
        elif kind is str:
            plain[str(key)] = value[:_MAX_STRING]
        else:
            number = host_number(value)
            if number is not None:
                plain[str(key)] = number
    return plain


def _has_non_finite(values):
    """Whether a float among the values is NaN or infinite: such a step is always reported."""
    for value in values.values():
        kind = type(value)
        if kind is float and (value != value or value in (_INF, -_INF)):
            return True
        if kind is str and value.strip().lstrip("+-").lower() in _NON_FINITE_TEXTS:
            return True  # read as a number by the supervisor, as a log line's "nan" is
    return False


_NON_FINITE_TEXTS = ("nan", "inf", "infinity")


_INF = float("inf")


def host_number(value):
    """A float for a numpy scalar or a one-element CPU tensor; None for a tensor on an
    accelerator (reading it would make training wait for the device) or a non-number."""
    device = getattr(value, "device", None)
    if device is not None and "cpu" not in str(device).lower():
        return None
    try:
        return float(value)
    except Exception:
        return None


def guarded(framework, call, *args):
    """Run an integration's own work; an error disengages instead of reaching the training code."""
    current = _client
    if current is None or current.disengaged:
        return None
    try:
        return call(*args)
    except Exception as exc:
        current.disengage("%s: %r" % (framework, exc))
        return None


# -- post-import hooks --------------------------------------------------------

class _PostImportFinder:
    """A ``sys.meta_path`` finder that runs a callback right after one of a few modules
    is executed (the pattern of ``wrapt.register_post_import_hook``). It finds nothing
    itself: it asks the other finders and wraps the loader they return."""

    def __init__(self, hooks):
        self._hooks = hooks  # module name -> callable(module)
        self._finding = set()

    def find_spec(self, fullname, path=None, target=None):
        hook = self._hooks.get(fullname)
        if hook is None or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _NotifyingLoader(spec.loader, hook)
        return spec

    def invalidate_caches(self):
        pass


class _NotifyingLoader:
    """Delegates to the real loader, puts it back on the module before executing it (so
    nothing later sees this wrapper), and calls the hook once the module is executed."""

    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None:
            spec.loader = self._loader
        self._loader.exec_module(module)  # the framework's own errors propagate as they are
        self._hook(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _BeaconFallbackFinder:
    """Last on ``sys.meta_path``: where the command's Python has no ``stopstep_cli`` of
    its own (a venv without stopstep), ``from stopstep_cli import beacon`` still works,
    from the supervisor's copy of ``beacon.py``. Asked only after every other finder
    found nothing, so an installed stopstep_cli is always the one imported."""

    _PACKAGE = "stopstep_cli"

    def __init__(self, package_dir):
        self._dir = package_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in (self._PACKAGE, self._PACKAGE + ".beacon"):
            return None
        import importlib.util

        if fullname == self._PACKAGE:
            spec = importlib.util.spec_from_loader(fullname, _BeaconOnlyPackage(), is_package=True)
            spec.submodule_search_locations = []  # finds nothing of its own but the beacon
            return spec
        return importlib.util.spec_from_file_location(fullname, os.path.join(self._dir, "beacon.py"))

    def invalidate_caches(self):
        pass


class _BeaconOnlyPackage:
    """The loader of a ``stopstep_cli`` that holds the beacon alone."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__doc__ = "stopstep's beacon, lent by the supervising stopstep (stopstep is not installed here)."


def _install_beacon_fallback():
    here = os.path.dirname(os.path.abspath(__file__))
    package_dir = os.path.dirname(here)
    if os.path.basename(here) == "_site" and os.path.isfile(os.path.join(package_dir, "beacon.py")):
        sys.meta_path.append(_BeaconFallbackFinder(package_dir))


def _install_hooks():
    global _finder
    if _finder is not None:
        return
    _install_beacon_fallback()
    hooks = {}
    for name, attach in FRAMEWORK_MODULES.items():
        hooks[name] = _hook_for(name, attach)
    _finder = _PostImportFinder(hooks)
    sys.meta_path.insert(0, _finder)
    for name, hook in hooks.items():
        module = sys.modules.get(name)
        if module is not None:  # imported before we were installed
            hook(module)


def _hook_for(name, attach):
    def hook(module):
        guarded(name, _attach, attach, module)

    return hook


def _attach(attach, module):
    # The integrations are compiled and loaded only when a framework is imported.
    import _stopstep_frameworks

    getattr(_stopstep_frameworks, attach)(module)
