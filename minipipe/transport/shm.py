"""Shared-memory segments with one owner, and small helpers for processes that share them.

Ownership rule (DESIGN.md §4): the process that creates a segment is the only one that unlinks
it; others attach by name through small picklable handles and only close. Python's resource
tracker would otherwise treat every attaching process as an owner too (and unlink or warn at
its exit), so attaching bypasses the tracker (`track=False` on Python >= 3.13, a patched
`register` before).

Every segment's name starts with `minipipe_`, so a leak is easy to spot in /dev/shm.
"""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import contextmanager
from multiprocessing import resource_tracker, shared_memory

PREFIX = "minipipe_"


class Segment(shared_memory.SharedMemory):
    """A SharedMemory whose finaliser tolerates NumPy views that outlive it (they keep the
    mapping alive until they go; the name is unlinked by the owner regardless)."""

    def __del__(self):
        try:
            self.close()
        except BufferError:
            pass


def create(size: int, tag: str) -> shared_memory.SharedMemory:
    """Create (and own) a new segment of at least `size` bytes."""
    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{tag}"
    return Segment(name=name, create=True, size=max(1, size))


@contextmanager
def _untracked():
    original = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None
    try:
        yield
    finally:
        resource_tracker.register = original


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach to a segment another process owns (never unlinked from here)."""
    if sys.version_info >= (3, 13):
        return Segment(name=name, track=False)
    with _untracked():
        return Segment(name=name)


def release(segment: shared_memory.SharedMemory, owner: bool) -> None:
    """Close the mapping; the owner also unlinks the name. Safe to call twice."""
    try:
        segment.close()
    except BufferError:  # a NumPy view is still alive: the mapping goes with the last view
        pass
    if owner:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists and is not a zombie (Linux: /proc; elsewhere: kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
