"""The status board: what each stage is doing and why it failed, in shared memory the head reads.

Two faults send nothing down the rings: a stage that stops making progress (SIGSTOP, a
deadlock) and a stage that fails before its neighbour could forward its message (a load error
while the next stage is still loading). So every stage publishes, in its own slot here, its
state, a heartbeat and its error text, and the head reads the slots directly while it waits.

Memory layout: one segment, `SLOT_BYTES` (512) per stage, slot i at offset 512·i:

    offset  0  state      uint64   the table below
    offset  8  progress   uint64   layers computed + messages handled, ever (monotonic)
    offset 16  heartbeat  float64  time.monotonic() when the stage last made progress or, while
                                   it waits for input, last woke up (CLOCK_MONOTONIC: one clock
                                   for every process on the machine, so the head can compare)
    offset 24  pid        uint64
    offset 32  error_len  uint64   bytes of error text (0: none)
    offset 64  error      bytes[448], UTF-8: the stage's one-line error (truncated to fit)

States (written by the stage only; the head creates every slot as LOADING):

| state       | the stage is                                   | it has work pending when       |
|-------------|------------------------------------------------|--------------------------------|
| `LOADING`   | starting: importing, mapping its layers        | — (the start timeout applies)  |
| `WAITING`   | waiting for its input ring (beats every wake)  | its input ring is not empty    |
| `COMPUTING` | handling a message (beats after every layer)   | always                         |
| `WRITING`   | forwarding outputs (beats while a full ring    | always                         |
|             | makes it wait for the next stage)              |                                |
| `FAILED`    | dying after writing its error                  | —                              |
| `DONE`      | exiting after Shutdown                         | —                              |
| `DELAYED`   | holding received messages until their delivery | always                         |
|             | time (`--link-delay-ms`; beats every wake)     |                                |

**Stalled**: a stage with work pending whose heartbeat is older than the stage timeout. A stage
busy with a long prefill beats after every layer, and one waiting for room in the next ring
beats while it waits (the stage after it, if stopped, is the stalled one), so only a stage that
shows no life at all (stopped, deadlocked, stuck in one layer for the whole timeout) is stalled.

Ordering: one writer per slot (its stage), one reader (the head); every field is one aligned
8-byte store, never torn. The error is published like a ring record: text, fence, length,
fence, then state = FAILED; the head reads state, fences, then length and text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import shm
from .ring import fence

SLOT_BYTES = 512
ERROR_OFFSET = 64
ERROR_BYTES = SLOT_BYTES - ERROR_OFFSET
_STATE, _PROGRESS, _HEARTBEAT, _PID, _ERROR_LEN = range(5)  # 8-byte word indices in a slot

LOADING, WAITING, COMPUTING, WRITING, FAILED, DONE, DELAYED = range(7)
STATE_NAMES = ("loading", "waiting", "computing", "writing", "failed", "done", "delayed")


@dataclass
class BoardHandle:
    name: str
    n_stages: int


@dataclass
class StageStatus:
    """One slot as the head read it."""

    state: int
    progress: int
    heartbeat: float  # time.monotonic() of the last sign of life
    pid: int
    error: str | None


class StatusBoard:
    """The head creates the board (`create`); each stage attaches and writes its own slot."""

    def __init__(self, segment, n_stages: int, owner: bool):
        self.segment, self.n_stages, self.owner = segment, n_stages, owner
        words = SLOT_BYTES // 8
        self._u = np.ndarray((n_stages, words), dtype=np.uint64, buffer=segment.buf)  # [S, 64]
        self._f = np.ndarray((n_stages, words), dtype=np.float64, buffer=segment.buf)  # the same bytes
        self._text = np.ndarray((n_stages, SLOT_BYTES), dtype=np.uint8, buffer=segment.buf)  # [S, 512]

    @classmethod
    def create(cls, n_stages: int, name: str | None = None) -> "StatusBoard":
        board = cls(shm.create(n_stages * SLOT_BYTES, "status", name), n_stages, owner=True)
        board._u[:] = 0  # every stage LOADING, no error
        board._f[:, _HEARTBEAT] = time.monotonic()
        return board

    @classmethod
    def attach(cls, handle: BoardHandle) -> "StatusBoard":
        return cls(shm.attach(handle.name), handle.n_stages, owner=False)

    @property
    def handle(self) -> BoardHandle:
        return BoardHandle(self.segment.name, self.n_stages)

    # ------------------------------------------------------------------------------------------
    # the stage's side (its own slot only)

    def set_state(self, stage: int, state: int, pid: int | None = None) -> None:
        """Enter `state`; counts as a sign of life."""
        if pid is not None:
            self._u[stage, _PID] = pid
        self._f[stage, _HEARTBEAT] = time.monotonic()
        self._u[stage, _STATE] = state

    def beat(self, stage: int, progress: bool = True) -> None:
        """A sign of life: progress (a layer computed, a message handled) or just awake."""
        if progress:
            self._u[stage, _PROGRESS] += 1
        self._f[stage, _HEARTBEAT] = time.monotonic()

    def fail(self, stage: int, message: str) -> None:
        """Publish the stage's one-line error (truncated to fit), then the FAILED state."""
        raw = message.encode("utf-8", errors="replace")[:ERROR_BYTES]
        raw = raw.decode("utf-8", errors="ignore").encode()  # do not cut a character in half
        self._text[stage, ERROR_OFFSET: ERROR_OFFSET + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        fence()  # text before length
        self._u[stage, _ERROR_LEN] = len(raw)
        fence()  # length before state
        self._u[stage, _STATE] = FAILED

    # ------------------------------------------------------------------------------------------
    # the head's side

    def read(self, stage: int) -> StageStatus:
        state = int(self._u[stage, _STATE])
        fence()  # state before the error it announces
        n = int(self._u[stage, _ERROR_LEN])
        error = None
        if state == FAILED and 0 < n <= ERROR_BYTES:
            error = self._text[stage, ERROR_OFFSET: ERROR_OFFSET + n].tobytes().decode("utf-8", errors="replace")
        return StageStatus(state, int(self._u[stage, _PROGRESS]), float(self._f[stage, _HEARTBEAT]),
                           int(self._u[stage, _PID]), error)

    def first_error(self) -> tuple[int, str] | None:
        """(stage, message) of the first stage that published an error, if any."""
        for i in range(self.n_stages):
            status = self.read(i)
            if status.error is not None:
                return i, status.error
        return None

    def stalled(self, input_pending: list[bool], timeout: float, now: float | None = None) -> tuple[int, float] | None:
        """(stage, seconds without a sign of life) of the first stalled stage, or None.

        `input_pending[i]`: stage i's input ring holds unread records (see "Stalled" above)."""
        now = time.monotonic() if now is None else now
        for i in range(self.n_stages):
            status = self.read(i)
            pending = status.state in (COMPUTING, WRITING, DELAYED) or (status.state == WAITING and input_pending[i])
            silent = now - status.heartbeat
            if pending and silent > timeout:
                return i, silent
        return None

    def release(self) -> None:
        self._u = self._f = self._text = None
        shm.release(self.segment, self.owner)
