"""MPI as a transport: ranks, tags, frames, and a stage's end of it (`MPIStageChannel`).

Rank 0 is the head; stage i runs on rank i + 1. Four tags on MPI_COMM_WORLD:

| tag       | from -> to                   | payload                                       | when                      |
|-----------|------------------------------|-----------------------------------------------|---------------------------|
| `DATA`    | rank r -> rank r + 1,        | a frame: [due int64 ns | a `messages.py`      | every run, KV edit, stub, |
|           | last stage -> head           | message] (due 0: no link delay)               | Ready, Shutdown, trace    |
| `CANCEL`  | head -> every stage rank     | int64 [due, id, id, ...]                      | `Pipeline.cancel`         |
| `STATUS`  | stage rank -> head           | pickled ("beat", state, progress) or          | at most every half        |
|           |                              | ("failed", one-line error)                    | heartbeat; on failure     |
| `CONTROL` | both ways, at start-up       | pickled: see `runtime/mpi.py`                 | hello, clock sync, assign |

MPI keeps messages between one pair of ranks on one tag in order (non-overtaking), so every
stage sees the runs and KV edits in the order the head sent them, exactly as on a ring. There is
no order between tags, and none is needed for cancellation: see `runtime/mpi.py`.

**Waiting without burning a core.** MPI's blocking calls spin; with several ranks per core (this
development machine has two) that would starve the stages. Every wait here is a non-blocking
probe or test followed by a sleep that grows from `SLEEP_MIN_S` to `SLEEP_MAX_S` and resets when
something arrives: an idle rank costs a few percent of a core and a hop costs at most about
`SLEEP_MAX_S` more than MPI's own latency (benchmarks/bench_mpi.py measures it).

**Sends never block the sender's work.** Data goes out with `Isend`; a stage keeps computing while
up to `SEND_WINDOW` messages are on their way (as a ring holds a few records) and only then
waits, beating, for the oldest to complete.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque

import numpy as np

from ..errors import InputError
from .cancel import CancelSlots
from .channel import STAMP, ChannelClosed, LinkDelay, StageChannel
from .status import DELAYED, FAILED, LOADING, WAITING

HEAD = 0
DATA, CANCEL, STATUS, CONTROL = 11, 12, 13, 14
SEND_WINDOW = 4  # data messages a rank may have in flight before it waits
SLEEP_MIN_S, SLEEP_MAX_S = 50e-6, 500e-6
CANCEL_SLOTS = 4096  # as the shared map (runtime/sizing.py)
NO_DELAY = STAMP.pack(0)

INSTALL_HINT = "install minipipe[mpi] (pip install 'minipipe[mpi]': mpi4py and MPICH, nothing to compile)"


def import_mpi():
    """mpi4py's MPI module (initialising MPI), or a one-line error saying what to install."""
    try:
        import mpi4py

        mpi4py.rc.thread_level = "single"  # one thread talks to MPI in every rank
        from mpi4py import MPI
    except ImportError as e:
        raise InputError(f"--runtime mpi needs mpi4py and an MPI library ({e}): {INSTALL_HINT}") from None
    return MPI


class Backoff:
    """Sleeps that grow from SLEEP_MIN_S to SLEEP_MAX_S while nothing happens."""

    def __init__(self):
        self.pause = SLEEP_MIN_S

    def reset(self) -> None:
        self.pause = SLEEP_MIN_S

    def sleep(self, at_most: float = SLEEP_MAX_S) -> None:
        time.sleep(max(0.0, min(self.pause, at_most)))
        self.pause = min(2 * self.pause, SLEEP_MAX_S)


class Outbox:
    """Non-blocking sends in flight, with the buffers they must keep alive until complete."""

    def __init__(self):
        self.pending: deque = deque()  # (request, buffer)

    def add(self, request, buffer) -> None:
        self.pending.append((request, buffer))

    def progress(self) -> None:
        """Forget completed sends (and let MPI move the others)."""
        while self.pending and self.pending[0][0].Test():
            self.pending.popleft()
        if len(self.pending) > 1:  # a later one may have completed first
            self.pending = deque(p for p in self.pending if not p[0].Test())

    def __len__(self) -> int:
        return len(self.pending)


def send_frame(comm, MPI, outbox: Outbox, parts: list, dest: int, link: LinkDelay) -> None:
    """Start sending one encoded message (stamped with its delivery time) on DATA."""
    frame = b"".join([link.stamp() if link else NO_DELAY, *(bytes(p) if isinstance(p, memoryview) else p
                                                            for p in parts)])
    outbox.add(comm.Isend([frame, MPI.BYTE], dest, DATA), frame)


def receive_frames(comm, MPI, source: int, into: deque) -> int:
    """Receive every DATA frame that has arrived from `source` into `into` as (due ns, frame)."""
    status, n = MPI.Status(), 0
    while True:
        message = comm.Improbe(source, DATA, status)
        if message is None:
            return n
        frame = bytearray(status.Get_count(MPI.BYTE))
        message.Recv([frame, MPI.BYTE])
        into.append((LinkDelay.due_of(frame), frame))
        n += 1


def receive_objects(comm, MPI, source: int, tag: int) -> list:
    """Every pickled message that has arrived from `source` (or MPI.ANY_SOURCE) on `tag`, as
    (source rank, object)."""
    status, out = MPI.Status(), []
    while True:
        message = comm.improbe(source, tag, status)
        if message is None:
            return out
        out.append((status.Get_source(), message.recv()))


def pid_alive(pid: int) -> bool:
    from .shm import pid_alive as alive

    return alive(pid)


class MPIStageChannel(StageChannel):
    """Stage `index` of `n_stages` on rank index + 1: input from the rank before it (the head
    for stage 0), output to the rank after it (the head after the last stage), cancellation
    marks and status to and from the head."""

    def __init__(self, comm, MPI, index: int, n_stages: int, heartbeat_s: float, link: LinkDelay,
                 head_host: str, head_pid: int):
        self.comm, self.MPI, self.index, self.heartbeat_s, self.link = comm, MPI, index, heartbeat_s, link
        self.source = index  # rank of the stage before (rank 0, the head, for stage 0)
        self.dest = index + 2 if index + 1 < n_stages else HEAD
        self.cancels = CancelSlots(CANCEL_SLOTS)
        self.held: deque = deque()  # (due ns, frame) received, not yet delivered
        self.current = None  # the frame `receive` last returned
        self.outbox, self.status_out = Outbox(), Outbox()
        self.pending_cancels: deque = deque()  # (due ns, id) received, not yet due
        self.state, self.progress, self.last_beat = LOADING, 0, 0.0
        self.head_pid = head_pid if head_host == socket.gethostname() else None  # checkable here
        self.backoff = Backoff()

    # signs of life --------------------------------------------------------------------------

    def _send_status(self, obj) -> None:
        self.status_out.progress()
        self.status_out.add(self.comm.isend(obj, HEAD, STATUS), None)
        self.last_beat = time.monotonic()

    def set_state(self, state: int) -> None:
        self.state = state
        self.beat(progress=False)

    def beat(self, progress: bool = True) -> None:
        self.progress += bool(progress)
        if time.monotonic() - self.last_beat >= self.heartbeat_s / 2:
            self._send_status(("beat", self.state, self.progress))

    def fail(self, message: str) -> None:
        self.state = FAILED
        self._send_status(("failed", message))
        deadline = time.monotonic() + 5.0
        while len(self.status_out) and time.monotonic() < deadline:
            self.status_out.progress()
            time.sleep(1e-3)

    # messages ------------------------------------------------------------------------------

    def _head_gone(self) -> bool:
        return self.head_pid is not None and not pid_alive(self.head_pid)

    def receive(self, timeout: float):
        deadline = time.monotonic() + timeout
        self.backoff.reset()
        while True:
            if receive_frames(self.comm, self.MPI, self.source, self.held):
                self.backoff.reset()
            self.outbox.progress()
            if self.held and self.held[0][0] <= self.link.now_ns():
                self.current = self.held.popleft()[1]
                return memoryview(self.current)[STAMP.size:]
            self.state = DELAYED if self.held else WAITING
            left = deadline - time.monotonic()
            if left <= 0:
                if self._head_gone():
                    raise ChannelClosed("the head is gone")
                return None
            self.backoff.sleep(min(left, self.link.wait_s(self.held[0][0])) if self.held else left)

    def done(self) -> None:
        self.current = None

    def forward(self, parts: list) -> None:
        send_frame(self.comm, self.MPI, self.outbox, parts, self.dest, self.link)
        self.backoff.reset()
        while True:
            self.outbox.progress()
            if len(self.outbox) <= SEND_WINDOW:
                return
            self.beat(progress=False)  # waiting for the next stage is not stalling
            if self._head_gone():
                raise ChannelClosed("the head is gone")
            self.backoff.sleep()

    def poll_cancels(self) -> None:
        status = self.MPI.Status()
        while (message := self.comm.Improbe(HEAD, CANCEL, status)) is not None:
            marks = np.empty(status.Get_count(self.MPI.BYTE) // 8, dtype=np.int64)
            message.Recv([marks, self.MPI.INT64_T])
            due = int(marks[0])
            self.pending_cancels.extend((due, int(i)) for i in marks[1:])
        now = self.link.now_ns()
        while self.pending_cancels and self.pending_cancels[0][0] <= now:
            self.cancels.cancel(self.pending_cancels.popleft()[1])
        self.outbox.progress()

    def finish(self) -> None:
        """Shutdown handled: every send must complete before this rank finalizes MPI."""
        self.backoff.reset()
        while len(self.outbox) or len(self.status_out):
            self.outbox.progress()
            self.status_out.progress()
            if self._head_gone():
                raise ChannelClosed("the head is gone")
            self.backoff.sleep()

    def clock(self) -> float:
        return self.link.now_ns() / 1e9


def env_rank() -> int | None:
    """This process's rank as the MPI launcher announced it in the environment (None: not
    started by an MPI launcher). MPICH and Intel MPI set PMI_RANK, Open MPI OMPI_COMM_WORLD_RANK,
    PMIx launchers PMIX_RANK, MVAPICH MV2_COMM_WORLD_RANK."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None
