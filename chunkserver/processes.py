"""Processes on this machine: whether one still runs (the outbox's and the metrics' files
name the process that wrote them)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
