"""One sighting of the global step, whatever saw it."""

from __future__ import annotations

from typing import Dict, Optional

#: What an observation came from (``Observation.kind``).
OUTPUT = "output"  # a line of the command's stdout or stderr
LOG_FILE = "log"  # a line of a --log-file
CHECKPOINT = "checkpoint"  # a checkpoint that became complete
IN_PROCESS = "in-process"  # the training process itself, through stopstep's channel

KINDS = (OUTPUT, LOG_FILE, CHECKPOINT, IN_PROCESS)


class Observation:
    """One sighting of the global step.

    ``fields`` holds the values that came with the step (a pattern's other
    named groups, such as ``loss``); ``kind`` says what saw it (one of
    :data:`KINDS`) and ``source`` which one (``stdout``, ``log:train.log``);
    ``path`` is the checkpoint's path for a checkpoint; ``coalesced`` counts the
    step lines of the same read passed over for this one; ``time`` is
    ``time.monotonic()`` when it was seen; ``historic`` marks a step read from
    what a log file already held at launch (``--log-file-from-start``).
    """

    __slots__ = ("step", "fields", "source", "kind", "path", "coalesced", "line", "time", "historic", "is_checkpoint")

    def __init__(self, step: int, fields: Optional[Dict[str, object]] = None, source: str = "",
                 kind: str = OUTPUT, path: Optional[str] = None, coalesced: int = 0, line: str = "",
                 time: float = 0.0):
        self.step = step
        self.fields = {} if fields is None else fields
        self.source = source
        self.kind = kind
        self.path = path
        self.coalesced = coalesced
        self.line = line
        self.time = time
        self.historic = False  # seen in what a log already held at launch: not the command's own step
        self.is_checkpoint = kind == CHECKPOINT  # asked several times a line: kept, not derived each time

    def __repr__(self) -> str:
        return f"Observation(step={self.step}, kind={self.kind!r}, source={self.source!r}, fields={self.fields})"
