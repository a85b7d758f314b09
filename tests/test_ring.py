"""The shared-memory ring against a model of its own rules, with the reader in a thread or a process.

The model keeps the spec's two counters and a deque of records: a write of n payload bytes
takes 8 + pad8(n) bytes, preceded by a PAD to the end of the data area when it would not fit
before the end; it succeeds iff it fits within `capacity` of the read counter. Each scenario
runs twice (the bslatkin/ringbuffer pattern): the reader in another thread, then in another
process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
from collections import deque

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipipe.transport.ring import PeerDied, RecordTooLarge, Ring, RingClosed

CAPACITY = 256
CTX = mp.get_context("spawn")


def reader_loop(handle, commands, replies) -> None:
    """The peer: on each command, read one record (or report EOF), reply with its bytes."""
    ring = Ring.attach(handle)
    ring.set_reader(os.getpid())
    while True:
        command = commands.get()
        if command == "stop":
            break
        try:
            with ring.receive(timeout=5.0) as payload:
                replies.put(None if payload is None else bytes(payload))
        except RingClosed:
            replies.put("closed")


class Peer:
    def __init__(self, ring: Ring, kind: str):
        if kind == "thread":
            self.commands, self.replies = queue.Queue(), queue.Queue()
            self.worker = threading.Thread(target=reader_loop, args=(ring.handle, self.commands, self.replies))
        else:
            self.commands, self.replies = CTX.Queue(), CTX.Queue()
            self.worker = CTX.Process(target=reader_loop, args=(ring.handle, self.commands, self.replies))
        self.worker.start()

    def read(self):
        self.commands.put("read")
        return self.replies.get(timeout=10)

    def stop(self):
        self.commands.put("stop")
        self.worker.join(timeout=10)


class RingRules(RuleBasedStateMachine):
    peer_kind = "thread"

    def __init__(self):
        super().__init__()
        self.ring = Ring.create(CAPACITY, CTX)
        self.peer = Peer(self.ring, self.peer_kind)
        self.records: deque[bytes] = deque()
        self.w = self.r = 0  # the model's counters
        self.ends: deque[int] = deque()  # the write counter after each unread record

    def teardown(self):
        self.peer.stop()
        self.ring.release()

    @rule(data=st.binary(max_size=CAPACITY // 2 - 8))
    def write(self, data):
        size = 8 + (len(data) + 7) // 8 * 8
        offset = self.w % CAPACITY
        pad = CAPACITY - offset if offset + size > CAPACITY else 0
        if self.w + pad + size - self.r <= CAPACITY:
            self.ring.write([data], timeout=1.0)
            self.w += pad + size
            self.records.append(data)
            self.ends.append(self.w)
        else:
            with pytest.raises(TimeoutError):
                self.ring.write([data], timeout=0.01)

    @rule(data=st.binary(min_size=CAPACITY // 2 - 7, max_size=CAPACITY))
    def write_too_large(self, data):
        with pytest.raises(RecordTooLarge):
            self.ring.write([data], timeout=0.01)

    @precondition(lambda self: self.records)
    @rule()
    def read(self):
        assert self.peer.read() == self.records.popleft()
        self.r = self.ends.popleft()

    @invariant()
    def counters_agree(self):
        assert self.ring.n_unread_bytes == self.w - self.r


class TestRingWithThreadReader(RingRules.TestCase):
    settings = settings(max_examples=20, stateful_step_count=40, deadline=None)


class ProcessRingRules(RingRules):
    peer_kind = "process"


class TestRingWithProcessReader(ProcessRingRules.TestCase):
    settings = settings(max_examples=6, stateful_step_count=40, deadline=None)


def test_close_delivers_the_rest_then_eof():
    ring = Ring.create(CAPACITY, CTX)
    peer = Peer(ring, "process")
    try:
        ring.write([b"one"])
        ring.write([b"two", b"+parts"])
        ring.close()
        assert [peer.read(), peer.read(), peer.read()] == [b"one", b"two+parts", "closed"]
    finally:
        peer.stop()
        ring.release()


def _exit_now():
    os._exit(0)


def test_dead_writer_is_detected():
    ring = Ring.create(CAPACITY, CTX)
    proc = CTX.Process(target=_exit_now)
    proc.start()
    proc.join()
    ring.set_writer(proc.pid)
    try:
        with pytest.raises(PeerDied):
            ring.read(timeout=2.0, poll=0.05)
    finally:
        ring.release()


def test_dead_reader_is_detected_when_full():
    ring = Ring.create(CAPACITY, CTX)
    proc = CTX.Process(target=_exit_now)
    proc.start()
    proc.join()
    ring.set_reader(proc.pid)
    try:
        ring.write([bytes(100)])
        with pytest.raises(PeerDied):
            for _ in range(3):
                ring.write([bytes(100)], timeout=2.0)
    finally:
        ring.release()


def test_segments_are_unlinked():
    ring = Ring.create(CAPACITY, CTX)
    name = ring.segment.name
    assert os.path.exists(f"/dev/shm/{name}")
    ring.release()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_wrap_waits_when_the_record_fits_but_its_padding_does_not():
    """A fixed case the state machine does not reach: a record smaller than the free space that
    does not fit before the end of the data area needs its PAD too, so it must wait; once the
    reader frees enough, PAD + record are written and the reader skips the PAD."""
    ring = Ring.create(CAPACITY, CTX)  # 256 data bytes
    try:
        for i in range(3):  # three 64-byte records (8 length + 56 payload): write = 192
            ring.write([bytes([i]) * 56], timeout=0.1)
        with ring.receive(timeout=0.1) as payload:  # read = 64: free = 64 + 256 - 192 = 128 bytes
            assert bytes(payload) == bytes([0]) * 56
        big = b"x" * 72  # an 80-byte record: 80 <= 128 free, but it starts at offset 192 and
        with pytest.raises(TimeoutError):  # 192 + 80 > 256: PAD (64) + record (80) = 144 > 128
            ring.write([big], timeout=0.05)
        assert ring.n_unread_bytes == 128  # all or nothing: the failed write left no trace
        with ring.receive(timeout=0.1) as payload:  # read = 128: free = 192 >= 144
            assert bytes(payload) == bytes([1]) * 56
        ring.write([big], timeout=0.1)  # PAD to the end, then the record at offset 0
        assert ring.n_unread_bytes == 64 + 64 + 80
        got = []
        for _ in range(2):
            with ring.receive(timeout=0.1) as payload:
                got.append(bytes(payload))
        assert got == [bytes([2]) * 56, big]
        assert ring.n_unread_bytes == 0
        ring.write([b"y" * 120], timeout=0.1)  # write = 336 + 128: offset 208
        ring.write([b"z" * 40], timeout=0.1)  # 48 bytes end exactly at 256: no PAD
        assert ring.n_unread_bytes == 128 + 48
    finally:
        ring.release()
