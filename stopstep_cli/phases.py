"""The phases of a supervised run, the moves between them, and the loop's timer table."""

from __future__ import annotations

import enum
from typing import Dict, FrozenSet, List, Optional


class Phase(enum.Enum):
    STARTING = "starting"  # hooks' begin, the resume point, the launch, after_create_session
    RUNNING = "running"  # output pumped, steps through the hooks
    WAITING_FOR_CHECKPOINT = "waiting_for_checkpoint"  # target reached; --stop-after-checkpoint waits for the save
    STOPPING = "stopping"  # the stop sequence brings the tree down; output still pumped
    DRAINING = "draining"  # the tree is down: what the pipes still hold is passed on, in bounded time
    RESTART_DELAY = "restart_delay"  # the command crashed; it starts again after --restart-delay
    DONE = "done"


#: Where each phase may go next; anything else is a bug, caught where it happens.
TRANSITIONS: Dict[Phase, FrozenSet[Phase]] = {
    Phase.STARTING: frozenset((Phase.RUNNING, Phase.DONE)),
    Phase.RUNNING: frozenset((Phase.WAITING_FOR_CHECKPOINT, Phase.STOPPING, Phase.DRAINING)),
    Phase.WAITING_FOR_CHECKPOINT: frozenset((Phase.STOPPING, Phase.DRAINING)),
    Phase.STOPPING: frozenset((Phase.DRAINING,)),
    Phase.DRAINING: frozenset((Phase.RESTART_DELAY, Phase.DONE)),
    Phase.RESTART_DELAY: frozenset((Phase.STARTING, Phase.DONE)),
    Phase.DONE: frozenset(),
}


class PhaseError(RuntimeError):
    pass


def check_move(current: Phase, new: Phase) -> None:
    if new not in TRANSITIONS[current]:
        raise PhaseError(f"no move from {current.value} to {new.value}")


class Timers:
    """Named deadlines (``time.monotonic()`` values): the one place the loop
    keeps what it must do later, and how long ``poll`` may sleep."""

    def __init__(self) -> None:
        self._due: Dict[str, float] = {}
        self._next: Optional[float] = None

    def set(self, name: str, when: Optional[float]) -> None:
        if when is None:
            self.clear(name)
            return
        self._due[name] = when
        self._next = min(self._due.values())

    def clear(self, name: str) -> None:
        if self._due.pop(name, None) is not None:
            self._next = min(self._due.values()) if self._due else None

    def get(self, name: str) -> Optional[float]:
        return self._due.get(name)

    def next(self) -> Optional[float]:
        return self._next

    def pop_due(self, now: float) -> List[str]:
        """The names whose time has come, earliest first; they are cleared."""
        if self._next is None or self._next > now:
            return []
        due = sorted((when, name) for name, when in self._due.items() if when <= now)
        for _when, name in due:
            del self._due[name]
        self._next = min(self._due.values()) if self._due else None
        return [name for _when, name in due]
