"""A single-producer single-consumer ring buffer of variable-size records in shared memory.

One ring links each pair of neighbours in the pipeline (head -> stage 0 -> ... -> head). The
writer appends records, the reader consumes them in order; payloads can be read in place
(zero-copy) until the reader consumes them.

Memory layout of the segment (integers are uint64, each on its own 64-byte cache line so the
writer's and the reader's stores never share a line):

    offset    0   write        bytes ever published by the writer (monotonic, never wraps)
    offset   64   read         bytes ever consumed by the reader (monotonic)
    offset  128   closed       1 once the writer has closed the stream (end of stream)
    offset  192   writer pid, reader pid (for detecting a dead peer)
    offset  256   data[capacity]

    a record in data:  [ length: uint64 | payload: length bytes | zero padding to 8 bytes ]
    a PAD record:      [ 2**64 - 1 | skipped to the end of data ]  (written when a record
                       does not fit before the end; the next record starts at offset 0)

    A record (length + payload + padding) may take at most half the ring, so a record and the
    PAD before it always fit once the reader has caught up; a write is all or nothing.

Offsets into data are `counter % capacity`. The ring is empty when write == read and full when
write - read == capacity: because the counters never wrap, the two are never confused.

State of each byte range of data (W = write counter, R = read counter):

    | range            | state                  | who may touch it                     |
    |------------------|------------------------|--------------------------------------|
    | [R, W)           | published, unread      | reader reads; writer must not write  |
    | [W, R + cap)     | free                   | writer fills, then publishes         |
    | being filled     | free until W moves     | writer only; invisible to the reader |
    | being read       | published until R moves| reader only; the writer cannot reuse |

Protocol (CPython promises no memory ordering between processes, so both sides fence):

    writer: wait until free >= size  ->  copy payload  ->  fence  ->  store W  ->  post `items`
    reader: wait on `items`  ->  load W  ->  fence  ->  read payload  ->  fence  ->  store R

The fence is an uncontended lock acquire + release, which executes a full memory barrier (a
locked instruction on x86; glibc's mutex barriers on Arm). Waiting does not burn a core: a
reader that finds the ring empty may first busy-wait for `spin` seconds (0 by default: on the
2-core development machine the stages need every cycle; a 50 µs spin cuts a ping-pong's
one-way latency from ~85 µs to ~8 µs on an idle machine, see benchmarks/bench_ring.py, but did
not speed up real pipelines there), then sleeps on a POSIX semaphore (`items`, one post per
record) with a timeout, checking between timeouts that the writer is alive; the writer,
when the ring is full (rings hold a few of their largest records: runtime/sizing.py), polls
with a back-off from 20 µs to 1 ms, checks the reader, and calls `on_wait` (a stage's
heartbeat: waiting for room is not stalling).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MinipipeError
from . import shm

HEADER_BYTES = 256
SPIN_S = 0.0  # default busy wait of a reader before it sleeps (see the module docstring)
PAD = np.uint64(2**64 - 1)
_W, _R, _CLOSED, _WRITER_PID, _READER_PID = 0, 8, 16, 24, 25  # uint64 indices into the header


class RingError(MinipipeError):
    """Base of the ring's errors."""


class RingClosed(RingError):
    """The writer closed the ring and every record has been read."""


class PeerDied(RingError):
    """The process at the other end of the ring is gone."""


class RecordTooLarge(RingError):
    """A record longer than the ring's capacity."""


def record_size(n_payload: int) -> int:
    """Bytes a record with an `n_payload`-byte payload takes in the data area (length + padding)."""
    return 8 + (n_payload + 7) // 8 * 8


def max_payload(capacity: int) -> int:
    """The longest payload a ring of `capacity` data bytes accepts (a record is at most half of it)."""
    return (capacity // 2 - 8) // 8 * 8


_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier (see the module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


@dataclass
class RingHandle:
    """What another process needs to attach: picklable when passed to a spawned Process."""

    name: str
    capacity: int
    items: Any  # multiprocessing semaphore: one post per published record
    spin: float = SPIN_S  # the reader's busy wait before sleeping, seconds


class Ring:
    """One end (or both, in tests) of a ring. Create with `Ring.create`, attach with `Ring.attach`."""

    def __init__(self, segment, capacity: int, items, owner: bool, spin: float = SPIN_S):
        self.segment, self.capacity, self.items, self.owner, self.spin = segment, capacity, items, owner, spin
        self._header = np.ndarray((HEADER_BYTES // 8,), dtype=np.uint64, buffer=segment.buf)
        self._data = segment.buf[HEADER_BYTES: HEADER_BYTES + capacity]
        self._reading: int | None = None  # size of the record being read, until consume()

    @classmethod
    def create(cls, capacity: int, ctx, tag: str = "ring", spin: float = SPIN_S, name: str | None = None) -> "Ring":
        """A new ring of `capacity` data bytes (rounded up to 8); `ctx` is a multiprocessing context;
        `spin` is how long its reader busy-waits before sleeping (0: never); `name` a segment name
        from `shm.new_name` that the caller recorded first (see ProcessPipeline)."""
        capacity = (capacity + 7) // 8 * 8
        segment = shm.create(HEADER_BYTES + capacity, tag, name)
        try:
            # write every page now: the kernel allocates and zeroes shared memory on first touch,
            # which would otherwise cost the first pass of records several µs per page
            np.ndarray((HEADER_BYTES + capacity,), dtype=np.uint8, buffer=segment.buf)[:] = 0
            return cls(segment, capacity, ctx.Semaphore(0), owner=True, spin=spin)
        except BaseException:  # e.g. Ctrl-C while the pages are written: do not leak the segment
            shm.release(segment, owner=True)
            raise

    @classmethod
    def attach(cls, handle: RingHandle) -> "Ring":
        return cls(shm.attach(handle.name), handle.capacity, handle.items, owner=False, spin=handle.spin)

    @property
    def handle(self) -> RingHandle:
        return RingHandle(self.segment.name, self.capacity, self.items, self.spin)

    def set_writer(self, pid: int) -> None:
        self._header[_WRITER_PID] = pid

    def set_reader(self, pid: int) -> None:
        self._header[_READER_PID] = pid

    # ------------------------------------------------------------------------------------------
    # writer side

    @property
    def max_payload(self) -> int:
        """The longest payload one record may carry (its record takes at most half the ring)."""
        return max_payload(self.capacity)

    def write(self, parts: list, timeout: float | None = None, on_wait=None) -> None:
        """Append one record made of the concatenated bytes-like `parts`; `on_wait()` is called
        between polls while the ring is full (a stage's heartbeat: waiting is not stalling)."""
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(v.nbytes for v in views)
        size = record_size(length)
        if size > self.capacity // 2:  # then padding + record always fit an empty ring
            raise RecordTooLarge(f"a {length}-byte record exceeds half of a {self.capacity}-byte ring")
        w = int(self._header[_W])
        offset = w % self.capacity
        pad = self.capacity - offset if offset + size > self.capacity else 0  # record does not fit before the end
        self._wait_for_space(w, pad + size, timeout, on_wait)  # all or nothing: a timeout writes nothing
        if pad:
            self._data[offset: offset + 8] = PAD.tobytes()
            w, offset = w + pad, 0
        self._data[offset: offset + 8] = np.uint64(length).tobytes()
        cursor = offset + 8
        for v in views:
            self._data[cursor: cursor + v.nbytes] = v
            cursor += v.nbytes
        fence()  # payload before counter
        self._header[_W] = w + size
        self.items.release()

    def _wait_for_space(self, w: int, size: int, timeout: float | None, on_wait=None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 20e-6
        while w + size - int(self._header[_R]) > self.capacity:
            if on_wait is not None:
                on_wait()
            reader = int(self._header[_READER_PID])
            if reader and not shm.pid_alive(reader):
                raise PeerDied(f"the reader of ring {self.segment.name} (pid {reader}) is gone")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("ring full")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def close(self) -> None:
        """End of stream: the reader gets RingClosed once it has read everything."""
        fence()
        self._header[_CLOSED] = 1
        self.items.release()

    # ------------------------------------------------------------------------------------------
    # reader side

    def read(self, timeout: float | None = None, poll: float = 0.1) -> memoryview | None:
        """The next record's payload, in place (valid until `consume()`); None on timeout."""
        assert self._reading is None, "consume() the previous record first"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            r = int(self._header[_R])
            if self.spin and int(self._header[_W]) == r:  # a short busy wait first
                until = time.perf_counter() + self.spin
                while int(self._header[_W]) == r and time.perf_counter() < until:
                    pass
            if int(self._header[_W]) == r:
                wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
                if self.items.acquire(timeout=wait):
                    continue  # a record (or the close) was announced: look again
                if int(self._header[_W]) != r:
                    continue  # published, but the post has not arrived yet
                if self._header[_CLOSED]:
                    raise RingClosed(f"ring {self.segment.name} is closed")
                writer = int(self._header[_WRITER_PID])
                if writer and not shm.pid_alive(writer):
                    raise PeerDied(f"the writer of ring {self.segment.name} (pid {writer}) is gone")
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            fence()  # counter before payload
            offset = r % self.capacity
            length = np.frombuffer(self._data[offset: offset + 8], dtype=np.uint64)[0]
            if length == PAD:
                self._header[_R] = r + self.capacity - offset
                continue
            length = int(length)
            self._reading = record_size(length)
            return self._data[offset + 8: offset + 8 + length]

    def consume(self) -> None:
        """Release the record returned by the last `read` (its bytes may be overwritten now)."""
        assert self._reading is not None, "nothing to consume"
        fence()  # finished reading before the writer may reuse the bytes
        self._header[_R] = int(self._header[_R]) + self._reading
        self._reading = None

    @contextmanager
    def receive(self, timeout: float | None = None):
        """`with ring.receive() as payload:` — read one record in place, consume it on exit."""
        payload = self.read(timeout)
        try:
            yield payload
        finally:
            if payload is not None:
                self.consume()

    # ------------------------------------------------------------------------------------------

    @property
    def n_unread_bytes(self) -> int:
        return int(self._header[_W]) - int(self._header[_R])

    def release(self) -> None:
        """Close this end's mapping (the owner also unlinks the segment)."""
        self._header = None
        try:
            self._data.release()
        except BufferError:  # payload views still alive: the GC releases the mapping later
            pass
        shm.release(self.segment, self.owner)
