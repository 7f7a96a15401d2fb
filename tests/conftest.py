"""Fixtures shared by the tests (the helpers are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from helpers import read_pids


@pytest.fixture
def pidfile(tmp_path) -> Path:
    path = tmp_path / "pids"
    yield path
    # Whatever a test did, leave no process of it behind for the next one.
    for pid in read_pids(path):
        try:
            proc = psutil.Process(pid)
            if "fake_trainer" in " ".join(proc.cmdline()):
                proc.kill()
        except psutil.Error:
            pass
