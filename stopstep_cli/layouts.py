"""Checkpoint layouts: how each framework names its checkpoints on disk, and
when one is finished.

A :class:`Layout` is data (the regex that turns an entry of the checkpoint
directory into a step, the names to ignore, the names that identify the
layout) plus one small completeness check. A checkpoint being written is
never taken as done: every check below follows the framework's own write
order (the frameworks' own save code; docs/sources.md, "Checkpoint directories").

Each check says *why* a checkpoint is not finished (a short reason, for
``stopstep scan``) and None once it is: :meth:`Layout.is_complete` is that
reason being None, so what a run counts and what ``scan`` explains are one
check, never two that could disagree.
"""

from __future__ import annotations

import os
import re
import struct
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .patterns import step_int

# -- file checks ------------------------------------------------------------------

#: the most of one small file (a state or pointer file, a safetensors header) read to check it
SMALL_FILE_LIMIT = 256 * 1024 * 1024


def _open_regular(path: str):
    """``path`` opened for reading in binary, when it is a regular file (through links).

    A FIFO would block ``open()`` for good and a device such as /dev/zero never ends:
    neither is a checkpoint file, and either, linked in, must not hold the loop."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_small(fh, size: int = -1) -> bytes:
    """Up to ``size`` bytes (all when -1), refusing what passes SMALL_FILE_LIMIT."""
    limit = SMALL_FILE_LIMIT if size < 0 else min(size, SMALL_FILE_LIMIT)
    data = fh.read(limit + (1 if size < 0 else 0))
    if len(data) > SMALL_FILE_LIMIT:
        raise OSError(0, f"over {SMALL_FILE_LIMIT >> 20} MiB")
    return data


_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def zip_problem(path: str) -> Optional[str]:
    """Why the zip archive at ``path`` (torch.save, .ckpt, .keras) is not whole, or None
    when its end record parses and its central directory ends exactly where that
    record begins."""
    try:
        with _open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 22:
                return f"{size} bytes: too short for a zip archive"
            tail_len = min(size, 22 + 65535 + 20)
            fh.seek(size - tail_len)
            tail = fh.read(tail_len)
    except OSError as exc:
        return _unreadable(exc)
    pos = tail.rfind(_EOCD)
    while pos >= 0:
        if len(tail) - pos >= 22:
            (_sig, _disk, _cd_disk, _n_disk, _n, cd_size, cd_offset, comment_len) = struct.unpack(
                "<4sHHHHIIH", tail[pos : pos + 22]
            )
            if pos + 22 + comment_len == len(tail):
                eocd_at = size - tail_len + pos
                if pos >= 20 and tail[pos - 20 : pos - 16] == _ZIP64_LOCATOR:
                    # zip64 (torch.save of large tensors): its own end record comes first
                    return _zip64_problem(tail, pos, size - tail_len)
                if cd_offset + cd_size == eocd_at:
                    return None
                return "zip central directory does not end at its end record (being rewritten?)"
        pos = tail.rfind(_EOCD, 0, pos)
    return "zip end record missing (still being written?)"


def zip_is_whole(path: str) -> bool:
    """A zip archive (torch.save, .ckpt, .keras) whose end record parses and whose
    central directory ends exactly where that record begins."""
    return zip_problem(path) is None


def _zip64_problem(tail: bytes, eocd_pos: int, tail_start: int) -> Optional[str]:
    loc = eocd_pos - 20
    if loc < 0 or tail[loc : loc + 4] != _ZIP64_LOCATOR:
        return "zip64 end record locator missing"
    (_sig, _disk, record_at, _disks) = struct.unpack("<4sIQI", tail[loc : loc + 20])
    rel = record_at - tail_start
    if rel < 0 or tail[rel : rel + 4] != _ZIP64_EOCD:
        return "zip64 end record missing"
    cd_size, cd_offset = struct.unpack("<QQ", tail[rel + 40 : rel + 56])
    if cd_offset + cd_size == record_at:
        return None
    return "zip64 central directory does not end at its end record (being rewritten?)"


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror or exc})"


def safetensors_is_whole(path: str) -> bool:
    """8 + header length + the largest data offset == file size."""
    import json

    try:
        with _open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if 8 + header_len > size:
                return False
            header = json.loads(_read_small(fh, header_len))
    except (OSError, struct.error, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0) == size


def read_pointer(path: str) -> Optional[str]:
    """The stripped text of a pointer file; None while it is missing or empty
    (pointer files are written in place, so empty means "not yet")."""
    try:
        with _open_regular(path) as fh:
            text = _read_small(fh).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return text or None


def _weights_problem(path: str) -> Optional[str]:
    """Why one weights file is not whole by the rule for its kind, or None. Raises OSError."""
    if path.endswith(".safetensors"):
        return None if safetensors_is_whole(path) else "not a whole safetensors file"
    if path.endswith((".pt", ".pth", ".ckpt", ".bin", ".keras")):
        with _open_regular(path) as fh:
            magic = fh.read(4)
        # torch.save's legacy (non-zip) format has no end record: trust it once present
        if magic == b"PK\x03\x04":
            return zip_problem(path)
        return None if magic else "empty"
    return None


def _files_problem(directory: str, names: Iterable[str]) -> Optional[str]:
    """The first of ``names`` in ``directory`` that is not whole, with why; None if all are."""
    try:
        for name in names:
            problem = _weights_problem(os.path.join(directory, name))
            if problem is not None:
                return f"{name}: {problem}"
    except OSError as exc:
        return _unreadable(exc)
    return None


# -- layouts ----------------------------------------------------------------------


class Layout:
    """How one framework lays out checkpoints in a directory.

    ``entry`` matches an entry name directly in the directory (a file or a
    directory) and gives its ``step``; ``ignore`` names entries that are never
    checkpoints (temporary ones); ``markers`` identify the layout for
    ``--layout auto``; ``problem(layout, root, name, step)`` says why that
    checkpoint is not finished yet (a short reason), or None once it is.
    ``counts`` is "steps", or what else the number counts. ``state`` is the
    little a check remembers between looks.
    """

    def __init__(self, name: str, entry: str, problem: Callable[["Layout", str, str, int], Optional[str]],
                 markers: str = "", ignore: str = r"^$", counts: str = "steps", description: str = "",
                 checkpoint_name: Callable[[str], str] = lambda name: name):
        self.name, self.problem = name, problem
        self.checkpoint_name = checkpoint_name  # the entry -> what users call the checkpoint (TF: its prefix)
        self.markers, self.ignore, self.counts = markers, ignore, counts
        self.description = description
        self.state: Dict[str, object] = {}
        self.entry = entry

    @property
    def entry(self) -> str:
        return self._entry

    @entry.setter
    def entry(self, regex: str) -> None:
        self._entry, self._entry_re = regex, None

    @property
    def entry_re(self) -> re.Pattern:
        if self._entry_re is None:
            self._entry_re = re.compile(self._entry)
        return self._entry_re

    @property
    def ignore_re(self) -> re.Pattern:
        return re.compile(self.ignore)  # re caches compiled patterns

    @property
    def markers_re(self) -> re.Pattern:
        return re.compile(self.markers or self._entry)

    def step_of(self, name: str) -> Optional[int]:
        """The step an entry name stands for, None if it is not a checkpoint."""
        if self.ignore_re.search(name):
            return None
        match = self.entry_re.search(name)
        if match is None:
            return None
        try:  # a name with more than 18 digits (a timestamp in nanoseconds) is no step
            return step_int(match.group("step") if "step" in self.entry_re.groupindex else match.group(1))
        except (IndexError, TypeError, ValueError):
            return None

    def detect(self, names: Iterable[str]) -> bool:
        return any(self.markers_re.search(name) for name in names)

    def why_incomplete(self, root: str, name: str, step: int) -> Optional[str]:
        """Why the checkpoint ``name`` (of ``step``) in ``root`` is not finished, in a few
        words; None when it is. A look, like :meth:`is_complete` (the generic rule
        remembers it)."""
        try:
            return self.problem(self, root, name, step)
        except OSError as exc:  # deleted or replaced while we looked: not finished
            return _unreadable(exc)
        except (ValueError, AttributeError, struct.error, RecursionError, MemoryError) as exc:
            # not what the framework writes (a malformed archive, a state file nested
            # too deep): not finished, and say so rather than fail the run
            return f"the check failed ({type(exc).__name__})"

    def is_complete(self, root: str, name: str, step: int) -> bool:
        return self.why_incomplete(root, name, step) is None


def _hf_problem(layout, root, name, step) -> Optional[str]:
    import json

    try:
        with _open_regular(os.path.join(root, name, "trainer_state.json")) as fh:
            state = json.loads(_read_small(fh))
    except OSError as exc:
        return "trainer_state.json missing" if isinstance(exc, FileNotFoundError) else _unreadable(exc)
    except ValueError:
        return "trainer_state.json does not parse (still being written?)"
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object"
    if state.get("global_step") == step:
        return None
    if "global_step" not in state:
        return "trainer_state.json has no global_step"
    return f"global_step is {state['global_step']!r}, not {step}"


def _lightning_problem(layout, root, name, step) -> Optional[str]:
    return zip_problem(os.path.join(root, name))


_TF_STATE_LINE = re.compile(r'^(?:model_checkpoint_path|all_model_checkpoint_paths):\s*"(?P<path>[^"]*)"', re.M)
_TF_SHARD = re.compile(r"\.data-(\d+)-of-(\d+)$")


def _tf_prefix(name: str) -> str:
    return re.sub(r"\.(?:index|meta|data-\d+-of-\d+)$", "", name)


def _tf_problem(layout, root, name, step) -> Optional[str]:
    state = read_pointer(os.path.join(root, "checkpoint"))
    if state is None:
        return "the state file `checkpoint` is missing or empty"
    prefix = _tf_prefix(name)
    named = {os.path.basename(m.group("path")) for m in _TF_STATE_LINE.finditer(state)}
    if prefix not in named:
        return "not named in the checkpoint state file"
    if not os.path.exists(os.path.join(root, prefix + ".index")):
        return f"{prefix}.index missing"
    # only finished shard names count: TF writes each under a temporary name first
    shards = [m for m in (_TF_SHARD.fullmatch(n[len(prefix):]) for n in os.listdir(root)
                          if n.startswith(prefix + ".data-")) if m]
    if not shards:
        return "no data shard"
    total = int(shards[0].group(2))
    present = len({m.group(1) for m in shards if int(m.group(2)) == total})
    return None if present == total else f"{present} of its {total} data shards"


def _deepspeed_problem(layout, root, name, step) -> Optional[str]:
    tag = read_pointer(os.path.join(root, "latest"))
    if tag is None:
        return "`latest` missing or empty"
    named = re.search(r"(\d+)$", tag)
    if named is None:
        return f"`latest` holds {tag[:40]!r}, which names no step"
    if int(named.group(1)) < step:
        return f"`latest` names {tag[:40]}"
    directory = os.path.join(root, name)
    states = [n for n in os.listdir(directory) if n.endswith("_states.pt")]
    if not states:
        return "no *_states.pt file in it"
    return _files_problem(directory, states)


def _megatron_problem(layout, root, name, step) -> Optional[str]:
    tracker = read_pointer(os.path.join(root, "latest_checkpointed_iteration.txt"))
    if tracker is None:
        return "latest_checkpointed_iteration.txt missing or empty"
    if not tracker.isdigit():
        return f"latest_checkpointed_iteration.txt says {tracker[:40]!r}, not an iteration"
    return None if int(tracker) >= step else f"latest_checkpointed_iteration.txt says {tracker}"


def _orbax_problem(layout, root, name, step) -> Optional[str]:
    # On local disk the final name appears by rename, whole. Object stores have
    # no rename: there commit_success.txt marks a finished step, and once one
    # step directory has it, every step directory must.
    if os.path.exists(os.path.join(root, name, "commit_success.txt")):
        layout.state["commit_marker"] = True
        return None
    if not os.path.isdir(os.path.join(root, name)):
        return "not a directory"
    if layout.state.get("commit_marker"):
        return "commit_success.txt missing (other step directories have one)"
    return None


def _torchtitan_problem(layout, root, name, step) -> Optional[str]:
    directory = os.path.join(root, name)
    if os.path.exists(os.path.join(directory, ".metadata")) or os.path.exists(
        os.path.join(directory, "model.safetensors.index.json")
    ):
        return None
    return ".metadata missing"


def _mmengine_problem(layout, root, name, step) -> Optional[str]:
    pointer = read_pointer(os.path.join(root, "last_checkpoint"))
    named = layout.step_of(os.path.basename(pointer or ""))
    if pointer is None:
        return "last_checkpoint missing or empty"
    if named is None:
        return f"last_checkpoint names {os.path.basename(pointer)[:60]!r}, not an iter_N.pth"
    if named < step:
        return f"last_checkpoint names {os.path.basename(pointer)}"
    return zip_problem(os.path.join(root, name))


def _composer_problem(layout, root, name, step) -> Optional[str]:
    pointed = []
    for entry in os.listdir(root):
        if entry.startswith("latest-rank0"):
            try:
                target = os.path.basename(os.readlink(os.path.join(root, entry)))
            except OSError:
                continue
            named = layout.step_of(target)
            if named is not None and named >= step:
                return zip_problem(os.path.join(root, name))
            pointed.append(f"{entry} points at {target}")
    return "; ".join(pointed) if pointed else "no latest-rank0 symlink"


def _fairseq_problem(layout, root, name, step) -> Optional[str]:
    return zip_problem(os.path.join(root, name))


def _generic_problem(layout, root, name, step) -> Optional[str]:
    """Size and modification time unchanged across two looks at least ``settle`` apart."""
    path = os.path.join(root, name)
    signature = _tree_signature(path)
    if signature is None:
        return "gone, or a file in it could not be read"
    if signature is _NOT_REGULAR:
        return "cannot be read (not a regular file)"
    looks = layout.state.setdefault("looks", {})
    now = time.monotonic()
    settle = layout.state.get("settle", 1.0)
    seen = looks.get(name)
    if seen is None and time.time() - signature[2] / 1e9 >= settle:
        return None  # untouched for longer than a look would wait
    if seen is None or seen[0] != signature:
        looks[name] = (signature, now)
        return f"changed within the last {_seconds(settle)}" if seen is None else "changed since the last look"
    if now - seen[1] >= settle:
        looks.pop(name, None)
        return None
    return f"unchanged for {now - seen[1]:.1f} s of the {_seconds(settle)} it must stay so"


def _seconds(seconds: float) -> str:
    return "second" if seconds == 1 else f"{seconds:g} s"


#: the signature of a checkpoint that is (or holds) a FIFO, a device or a socket: never complete
_NOT_REGULAR = (-1, -1, -1)


def _tree_signature(path: str) -> Optional[Tuple[int, int, int]]:
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return (1, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else _NOT_REGULAR
    count, size, mtime = 0, 0, st.st_mtime_ns
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                fst = os.stat(os.path.join(directory, name))
            except OSError:
                return None
            if not stat.S_ISREG(fst.st_mode):
                return _NOT_REGULAR
            count, size, mtime = count + 1, size + fst.st_size, max(mtime, fst.st_mtime_ns)
    return (count, size, mtime)


def _layouts() -> Dict[str, Layout]:
    # In detection order: the layouts with the most specific names first.
    return {
        layout.name: layout
        for layout in (
            Layout(
                "hf",
                r"^checkpoint-(?P<step>\d+)$",
                _hf_problem,
                markers=r"^(?:tmp-)?checkpoint-\d+$",
                ignore=r"^tmp-",
                description="Hugging Face Trainer: checkpoint-N/, done when trainer_state.json has global_step N",
            ),
            Layout(
                "lightning",
                r"(?:^|[-_])step=(?P<step>\d+)(?:-v\d+)?\.ckpt$",
                _lightning_problem,
                markers=r"(?:step=\d+.*|^last)\.ckpt$",
                description="PyTorch Lightning ModelCheckpoint: epoch=E-step=N.ckpt, done when the zip archive is whole",
            ),
            Layout(
                "tf",
                r"^(?:.*[-_.])?ckpt-(?P<step>\d+)\.index$",
                _tf_problem,
                markers=r"^checkpoint$|ckpt-\d+\.index$",
                counts="saves, unless CheckpointManager.save(checkpoint_number=step) (TF Estimator's model.ckpt-N is the step)",
                checkpoint_name=_tf_prefix,
                description="TensorFlow: the `checkpoint` state file names ckpt-N, whose .index and every data shard exist",
            ),
            Layout(
                "deepspeed",
                r"^global_step(?P<step>\d+)$",
                _deepspeed_problem,
                markers=r"^latest$|^global_step\d+$",
                description="DeepSpeed: global_stepN/, done when `latest` names it and every *_states.pt is whole",
            ),
            Layout(
                "megatron",
                r"^iter_(?P<step>\d{7})$",
                _megatron_problem,
                markers=r"^latest_checkpointed_iteration\.txt$|^iter_\d{7}$",
                description="Megatron-LM: iter_000000N/, done when latest_checkpointed_iteration.txt says N or more",
            ),
            Layout(
                "torchtitan",
                r"^step-(?P<step>\d+)$",
                _torchtitan_problem,
                description="torchtitan / torch.distributed.checkpoint: step-N/, done when its .metadata exists",
            ),
            Layout(
                "mmengine",
                r"^iter_(?P<step>\d+)\.pth$",
                _mmengine_problem,
                markers=r"^last_checkpoint$|^iter_\d+\.pth$",
                description="MMEngine: iter_N.pth, done when last_checkpoint names it (or a later one) and it is whole; epoch_N.pth counts epochs and is ignored",
            ),
            Layout(
                "composer",
                r"^ep\d+-ba(?P<step>\d+)-rank0\.pt$",
                _composer_problem,
                markers=r"^ep\d+-ba\d+-rank\d+\.pt$|^latest-rank0",
                description="MosaicML Composer: ep{E}-ba{N}-rank0.pt, done when the latest-rank0.pt symlink points at it (or later)",
            ),
            Layout(
                "fairseq",
                r"^checkpoint_\d+_(?P<step>\d+)\.pt$",
                _fairseq_problem,
                markers=r"^checkpoint_\d+_\d+\.pt$|^checkpoint_last\.pt$",
                ignore=r"\.tmp$",
                description="fairseq: checkpoint_E_N.pt (N = num_updates), never .tmp, done when the zip archive is whole",
            ),
            Layout(
                "orbax",
                r"^(?:.*_)?(?P<step>\d+)$",
                _orbax_problem,
                markers=r"^\d+$|\.orbax-checkpoint-tmp",
                ignore=r"\.orbax-checkpoint-tmp",
                description="JAX orbax CheckpointManager: step directories N (or prefix_N); never a *.orbax-checkpoint-tmp-* one; commit_success.txt where present",
            ),
            Layout(
                "generic",
                r"(?P<step>\d+)(?!.*\d)",
                _generic_problem,
                markers=r"(?!)",  # never detected: chosen with --layout generic or --checkpoint-pattern
                description="anything else: the last number in an entry's name (or --checkpoint-pattern), done when its size and mtime are unchanged over two looks",
            ),
        )
    }


#: In detection order (as _layouts() builds them); kept literal so that the CLI
#: can list them without building any.
LAYOUT_NAMES = ("hf", "lightning", "tf", "deepspeed", "megatron", "torchtitan", "mmengine", "composer",
                "fairseq", "orbax", "generic")
_PROTOTYPES: Dict[str, Layout] = {}  # read-only: for detection; runs get their own via make_layout


def _prototypes() -> Dict[str, Layout]:
    if not _PROTOTYPES:
        _PROTOTYPES.update(_layouts())
    return _PROTOTYPES


def make_layout(name: str, pattern: Optional[str] = None) -> Layout:
    """A fresh layout (layouts keep a little state per directory)."""
    layouts = _layouts()
    if pattern is not None:
        layout = layouts["generic"]
        layout.entry = pattern
        return layout
    try:
        return layouts[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose from auto, {', '.join(LAYOUT_NAMES)}") from None


def detect_layout(names: List[str]) -> Optional[Layout]:
    """The layout a directory's entries show, for ``--layout auto``; None if none yet."""
    for name, layout in _prototypes().items():
        if name != "generic" and layout.detect(names):
            return make_layout(name)
    return None
