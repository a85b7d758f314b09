"""The cancellation bitmap: which runs the head has cancelled, readable by every stage.

PipeInfer's early inference cancellation: when the head learns that a speculative run can no
longer be accepted, it marks the run cancelled; a stage tests the mark before starting the run
and between layers, skips the remaining work and forwards a `Cancelled` stub so every stream
stays aligned.

Memory layout: `slots` int64[capacity] in one shared-memory segment, all -1 at creation.

    cancel(run_id):        slots[run_id % capacity] = run_id
    is_cancelled(run_id):  slots[run_id % capacity] == run_id

Storing the whole run id in its slot is the epoch: run ids grow monotonically, so when run id
r + capacity reuses r's slot, a stage asking about r + capacity never mistakes r's mark for its
own (the "epoch" of a slot is run_id // capacity). A slot is one aligned 8-byte store written
only by the head, so a reader sees either the old or the new id, never a torn value. The head
never needs more than `capacity` runs in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shm


@dataclass
class CancelHandle:
    name: str
    capacity: int


class CancelMap:
    def __init__(self, segment, capacity: int, owner: bool):
        self.segment, self.capacity, self.owner = segment, capacity, owner
        self.slots = np.ndarray((capacity,), dtype=np.int64, buffer=segment.buf)  # [capacity]

    @classmethod
    def create(cls, capacity: int = 4096, name: str | None = None) -> "CancelMap":
        segment = shm.create(8 * capacity, "cancel", name)
        cm = cls(segment, capacity, owner=True)
        cm.slots[:] = -1
        return cm

    @classmethod
    def attach(cls, handle: CancelHandle) -> "CancelMap":
        return cls(shm.attach(handle.name), handle.capacity, owner=False)

    @property
    def handle(self) -> CancelHandle:
        return CancelHandle(self.segment.name, self.capacity)

    def cancel(self, run_id: int) -> None:
        self.slots[run_id % self.capacity] = run_id

    def is_cancelled(self, run_id: int) -> bool:
        return bool(self.slots[run_id % self.capacity] == run_id)

    def release(self) -> None:
        self.slots = None
        shm.release(self.segment, self.owner)


class LocalCancelSet:
    """The same interface in one process (the local runtime): a plain set."""

    def __init__(self):
        self.cancelled: set[int] = set()

    def cancel(self, run_id: int) -> None:
        self.cancelled.add(run_id)

    def is_cancelled(self, run_id: int) -> bool:
        return run_id in self.cancelled

    def release(self) -> None:
        pass


class CancelSlots:
    """The shared map's semantics in private memory: a stage on another host keeps its own copy,
    filled from the head's cancel messages (`transport/mpi.py`). Same slots, same epochs, so a
    mark is never mistaken for another run's, whichever transport carried it."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.slots = np.full(capacity, -1, dtype=np.int64)  # [capacity]

    def cancel(self, run_id: int) -> None:
        self.slots[run_id % self.capacity] = run_id

    def is_cancelled(self, run_id: int) -> bool:
        return bool(self.slots[run_id % self.capacity] == run_id)

    def release(self) -> None:
        pass
