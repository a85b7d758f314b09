"""Shared-memory segments with one owner, and small helpers for processes that share them.

Ownership rule (docs/runtime.md): the process that creates a segment is the only one that unlinks
it; others attach by name through small picklable handles and only close. Python's resource
tracker would otherwise treat every attaching process as an owner too (and unlink or warn at
its exit), so attaching bypasses the tracker (`track=False` on Python >= 3.13, a patched
`register` before).

Names: `minipipe_<creator pid>_<random>_<tag>` (e.g. `minipipe_4242_9f3a01bc_ring1`), so a
leak is easy to spot in /dev/shm and its creator is known: a run killed whole (SIGKILL to its
process group, which takes Python's resource tracker with it) cannot unlink its segments, and
`remove_stale` lets the next run remove every segment whose creator is gone.
"""

from __future__ import annotations

import os
import re
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


SHM_DIR = "/dev/shm"  # where Linux shows POSIX shared memory as files
_NAME = re.compile(rf"^{PREFIX}(\d+)_")


def new_name(tag: str) -> str:
    """A fresh segment name owned by this process (see the module docstring)."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{tag}"


def create(size: int, tag: str, name: str | None = None) -> shared_memory.SharedMemory:
    """Create (and own) a new segment of at least `size` bytes; `name` from `new_name(tag)` when
    the caller records it before creating (so it can unlink it even if creation is interrupted)."""
    return Segment(name=name or new_name(tag), create=True, size=max(1, size))


def unlink_name(name: str) -> bool:
    """Unlink segment `name` if it exists (a leftover this process created); True if it did."""
    try:
        segment = attach(name)
    except (FileNotFoundError, ValueError):
        return False
    release(segment, owner=True)
    return True


def remove_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlink every `minipipe_<pid>_*` segment whose creating process is gone; return their names.

    A segment of a live process (another run, a test running in parallel) is never touched.
    Caveat: a process in another PID namespace sharing this /dev/shm (containers started with
    --ipc=host) looks gone from here; such setups should not share /dev/shm between runs.
    """
    try:
        names = os.listdir(directory)
    except OSError:  # no /dev/shm (not Linux): nothing to clean
        return []
    removed = []
    for name in sorted(names):
        match = _NAME.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))  # nobody tracks it: its creator is gone
            removed.append(name)
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


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
