"""When a crashed command is started again (``--max-restarts``, ``--restart-delay``),
the way TensorFlow's recoverable session recovers from a failure."""

from __future__ import annotations

from typing import Optional


class RestartPolicy:
    """Restart a command that exited non-zero before the target, and not because
    stopstep stopped it, while restarts are left."""

    def __init__(self, max_restarts: int = 0, delay: float = 0.0):
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if not delay >= 0:  # also refuses NaN
            raise ValueError("delay must be >= 0")
        self.max_restarts = max_restarts
        self.delay = float(delay)
        self.restarts = 0

    def should_restart(self, returncode: Optional[int], stopped_by_us: bool) -> bool:
        """After an attempt ended: start another one? (A clean exit, a stop by a
        hook or a signal, and a hook's failure are never restarted.)"""
        return (not stopped_by_us and returncode not in (None, 0)
                and self.restarts < self.max_restarts)

    def count(self) -> int:
        """Record one restart; its number (1-based)."""
        self.restarts += 1
        return self.restarts
