"""A stage's channel: everything the stage service loop needs from the transport around it.

The service loop (`minipipe/runtime/service.py`) is the same whatever carries the messages:
receive a message, compute it (checking cancellation marks before every step), forward what it
produces, show signs of life. A **channel** is one stage's end of a transport:

| operation          | shared-memory rings (`RingChannel`)      | MPI (`transport/mpi.py`)                  |
|--------------------|------------------------------------------|-------------------------------------------|
| `receive(timeout)` | read the input ring (zero-copy)          | matched probe + receive from the upstream |
|                    |                                          | rank (tag DATA)                           |
| `done()`           | consume the ring record                  | nothing (the bytes are ours)              |
| `forward(parts)`   | write the output ring (waits while full) | non-blocking send to the downstream rank, |
|                    |                                          | a few in flight                           |
| `poll_cancels()`   | nothing: the shared cancellation map is  | drain the head's cancel messages (tag     |
|                    | always current                           | CANCEL) into a private cancellation map   |
| `cancels`          | the shared `CancelMap`                   | a private `CancelSlots`, same semantics   |
| `set_state`, `beat`| the stage's slot of the status board     | a status message to the head (tag STATUS) |
|                    |                                          | at most every half heartbeat              |
| `fail(message)`    | the board's error text                   | a status message with the text            |

The wire format is `messages.py`'s in both: one encoded message per record or MPI message.

**Link delay** (`--link-delay-ms`): a real slow link, for checking the virtual clock's slow-link
predictions. Every hop (head -> stage 0 -> ... -> head) delivers a message `delay` seconds after
it was sent, and no earlier; the sender keeps working meanwhile, as on a real link (latency, not
a slower sender). The sender prefixes each record with its **delivery time** (8 bytes, int64
nanoseconds on the pipeline clock); the receiver takes records off the transport as soon as they
arrive (so a link holds any number of messages, like a real one) and hands each over once the
pipeline clock reaches its delivery time. The **pipeline clock** is `time.monotonic_ns()` minus
the rank's offset from the head's clock: 0 on one machine (CLOCK_MONOTONIC is one clock for every
process), measured by a ping-pong at start-up across machines (`runtime/mpi.py`), good to about
half a round trip.

    a delayed record:   [ due: int64 ns | message bytes ]
    delivered when:     pipeline_clock_ns() >= due            (links are FIFO: dues only grow)
"""

from __future__ import annotations

import os
import struct
import time
from abc import ABC, abstractmethod
from collections import deque

from ..errors import MinipipeError

STAMP = struct.Struct("<q")  # a record's delivery time, int64 nanoseconds on the pipeline clock


class ChannelClosed(MinipipeError):
    """The stage's input will never bring anything again (closed, or the head is gone)."""


class LinkDelay:
    """Delivery times of one link end: `delay_s` seconds after sending, on the pipeline clock
    (this process's `time.monotonic_ns()` minus `offset_ns`, its offset from the head's clock)."""

    def __init__(self, delay_s: float = 0.0, offset_ns: int = 0):
        self.delay_ns = int(round(delay_s * 1e9))
        self.offset_ns = offset_ns

    def __bool__(self) -> bool:
        return self.delay_ns > 0

    def now_ns(self) -> int:
        """The pipeline clock, in nanoseconds."""
        return time.monotonic_ns() - self.offset_ns

    def stamp(self) -> bytes:
        """The prefix of a record sent now: its delivery time."""
        return STAMP.pack(self.now_ns() + self.delay_ns)

    @staticmethod
    def due_of(frame) -> int:
        return STAMP.unpack_from(frame, 0)[0]

    def wait_s(self, due_ns: int) -> float:
        """Seconds until `due_ns` (0 if it has passed)."""
        return max(0.0, (due_ns - self.now_ns()) / 1e9)


class StageChannel(ABC):
    """One stage's end of a transport (see the module docstring's table).

    `cancels` answers `is_cancelled(id)`; it is current after `poll_cancels()`, which the service
    loop calls before every step (one layer of a run). `heartbeat_s` is the longest a waiting
    stage sleeps between two signs of life."""

    cancels: object
    heartbeat_s: float = 0.5

    @abstractmethod
    def set_state(self, state: int) -> None:
        """Enter a status-board state (`status.py`); counts as a sign of life."""

    @abstractmethod
    def beat(self, progress: bool = True) -> None:
        """A sign of life: progress (a layer computed, a message handled) or just awake."""

    @abstractmethod
    def fail(self, message: str) -> None:
        """Publish the stage's one-line error where the head reads it."""

    @abstractmethod
    def receive(self, timeout: float):
        """The next message's bytes once delivered (valid until `done()`), or None if none came
        within `timeout` seconds. Raises ChannelClosed when nothing more can come."""

    @abstractmethod
    def done(self) -> None:
        """Finished with the bytes `receive` returned (forward first: they may be views)."""

    @abstractmethod
    def forward(self, parts: list) -> None:
        """Send one encoded message (a list of bytes-like parts) to the next hop; may wait for
        room, showing signs of life meanwhile."""

    def poll_cancels(self) -> None:
        """Fold cancellation marks that have arrived into `cancels`."""

    def finish(self) -> None:
        """After Shutdown: end of this stage's output stream."""

    def clock(self) -> float:
        """Seconds on the pipeline clock (trace timestamps)."""
        return time.monotonic()


class RingChannel(StageChannel):
    """A stage of the process runtime: input and output rings, the shared cancellation map and
    the stage's slot of the status board, all in shared memory (`runtime/process.py`)."""

    def __init__(self, index: int, input, output, cancels, board, heartbeat_s: float, link_delay_s: float = 0.0):
        from .cancel import CancelMap
        from .ring import Ring
        from .status import LOADING, StatusBoard

        self.index, self.heartbeat_s = index, heartbeat_s
        self.parent = os.getppid()
        self.board = StatusBoard.attach(board)
        self.board.set_state(index, LOADING, pid=os.getpid())
        self.inp, self.out = Ring.attach(input), Ring.attach(output)
        self.inp.set_reader(os.getpid())
        self.out.set_writer(os.getpid())
        self.cancels = CancelMap.attach(cancels)
        self.link = LinkDelay(link_delay_s)
        self.held: deque = deque()  # delayed links: (due ns, record bytes) taken off the ring, not yet delivered

    def set_state(self, state: int) -> None:
        self.board.set_state(self.index, state)

    def beat(self, progress: bool = True) -> None:
        self.board.beat(self.index, progress)

    def fail(self, message: str) -> None:
        self.board.fail(self.index, message)

    def _alive(self) -> None:
        self.board.beat(self.index, progress=False)

    def _read(self, timeout: float):
        from .ring import PeerDied, RingClosed

        try:
            payload = self.inp.read(timeout=timeout)
        except (RingClosed, PeerDied) as e:
            raise ChannelClosed(str(e)) from None
        if payload is None and os.getppid() != self.parent:
            raise ChannelClosed("the head is gone")
        return payload

    def receive(self, timeout: float):
        if not self.link:
            return self._read(timeout)
        from .status import DELAYED, WAITING

        deadline = time.monotonic() + timeout
        while True:
            while self.inp.n_unread_bytes > 0:  # take everything that arrived off the ring
                record = self._read(0.0)
                if record is None:
                    break
                self.held.append((LinkDelay.due_of(record), bytes(record)))
                self.inp.consume()
            if self.held and self.held[0][0] <= self.link.now_ns():
                return memoryview(self.held.popleft()[1])[STAMP.size:]
            self.board.set_state(self.index, DELAYED if self.held else WAITING)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait = min(left, self.link.wait_s(self.held[0][0])) if self.held else left
            record = self._read(wait)  # wakes on arrival; nothing consumed here
            if record is not None:
                self.held.append((LinkDelay.due_of(record), bytes(record)))
                self.inp.consume()

    def done(self) -> None:
        if not self.link:
            self.inp.consume()

    def forward(self, parts: list) -> None:
        self.out.write([self.link.stamp(), *parts] if self.link else parts, on_wait=self._alive)

    def finish(self) -> None:
        self.out.close()
