"""The messages that travel along the pipeline, and their byte format on a ring.

Every stage reads its input ring strictly in order and forwards what the next stage needs, so
KV edits stay in order with the runs around them (PipeInfer's transaction ordering; never a
side channel).

| message       | from -> to                 | meaning                                               |
|---------------|----------------------------|-------------------------------------------------------|
| `Run`         | head -> stage 0 -> ...     | a batch to compute (stage > 0 also gets hidden states) |
| `Result`      | last stage -> head         | greedy token per wanted row (+ logits if asked)        |
| `Cancelled`   | any stage -> ... -> head   | stub for a run skipped by early cancellation           |
| `KVRemove`    | head -> every stage        | `seq_rm(seq, p0, p1)` on each stage's cache            |
| `KVCopy`      | head -> every stage        | `seq_cp(src, dst, p0, p1)` on each stage's cache       |
| `KVEdits`     | head -> every stage        | several of the two above, applied in order (one hop)   |
| `Ready`       | stage -> ... -> head       | a stage has loaded its weights                         |
| `Shutdown`    | head -> every stage -> head| stop after forwarding                                  |
| `TraceEvents` | stage -> ... -> head       | a stage's recorded events, sent at shutdown            |

Byte format: a 64-byte header, then the kind's arrays, each padded to 8 bytes:

    header: magic u16 | kind u16 | flags u32 | run_id i64 | n_rows u32 | width u32 |
            n_seq_ids u32 | n_bytes u32 | args i64[4] | (padding to 64)
    Run:    tokens i64[T] | positions i64[T] | want_logits u8[T] | seq counts i32[T] |
            seq ids i32[n_seq_ids] | row ids i64[T] (flag ROW_IDS) |
            seeds u64[T], sampling f32[T, 4] (flag SAMPLING) | hidden f32[T, width] (flag HIDDEN)
    Result: tokens i64[T] | row ids i64[T] (flag ROW_IDS) | logits f32[T, width] (flag LOGITS)
    KVEdits: i64[n_rows, 5] = (op 0 remove / 1 copy, seq or src, dst, p0, p1), -1 = none
    others: args in the header; text (UTF-8, n_bytes) for TraceEvents

(A stage's error does not travel on the rings: a failing stage may die before its neighbour
forwards anything, so it writes the error on the status board, `status.py`, which the head
reads directly.)

Decoding reads arrays in place (zero-copy views of the ring's memory), so a reader must finish
with them before it consumes the record. A record that does not parse raises `CorruptMessage`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch
from ..errors import MinipipeError

MAGIC = 0x4D50  # "MP"
HEADER = struct.Struct("<HHIqIIII4q")  # magic kind flags run_id n_rows width n_seq_ids n_bytes args[4]
HEADER_BYTES = 64
assert HEADER.size == HEADER_BYTES

# kinds
RUN, RESULT, CANCELLED, KV_REMOVE, KV_COPY, READY = range(1, 7)  # kind 7 (a stage's error) is retired
SHUTDOWN, TRACE, KV_EDITS = range(8, 11)
# flags
F_HIDDEN, F_LOGITS, F_PREFILL, F_RETURN_LOGITS, F_SPECULATIVE, F_ROW_IDS, F_SAMPLING = 1, 2, 4, 8, 16, 32, 64
NONE = -1  # "no value" in the header's integer args (e.g. p1 = infinity)


class CorruptMessage(MinipipeError):
    """A ring record that is not a well-formed message."""


@dataclass
class Run:
    run_id: int
    batch: Batch
    hidden: np.ndarray | None = None  # [T, D] for stages after the first
    return_logits: bool = False  # the last stage also returns the wanted rows' logits
    speculative: bool = False  # informational (traces): a speculative run


@dataclass
class Result:
    run_id: int
    tokens: np.ndarray  # [T'] greedy token (argmax) of each wanted row, in row order
    logits: np.ndarray | None = None  # [T', V] when the run asked for them
    row_ids: np.ndarray | None = None  # [T'] ids of those rows, when the run named its rows


@dataclass
class Cancelled:
    run_id: int
    layers_skipped: int = 0  # stage-layers not computed because of the cancellation, summed so far


@dataclass
class KVRemove:
    seq: int | None  # None: every sequence
    p0: int = 0
    p1: int | None = None  # None: no upper bound


@dataclass
class KVCopy:
    src: int
    dst: int
    p0: int = 0
    p1: int | None = None


@dataclass
class KVEdits:
    """KV edits applied in order by every stage: one message instead of one per edit."""

    edits: list  # of KVRemove | KVCopy


@dataclass
class Ready:
    stage: int
    pid: int


@dataclass
class Shutdown:
    pass


@dataclass
class TraceEvents:
    stage: int
    events: list = field(default_factory=list)


Message = Run | Result | Cancelled | KVRemove | KVCopy | KVEdits | Ready | Shutdown | TraceEvents


# ----------------------------------------------------------------------------------------------
# encoding

def _pad8(n_bytes: int) -> int:
    return (n_bytes + 7) // 8 * 8


def _bytes(a: np.ndarray) -> list:
    if a.size == 0:
        return []
    raw = memoryview(np.ascontiguousarray(a)).cast("B")
    pad = _pad8(raw.nbytes) - raw.nbytes
    return [raw, bytes(pad)] if pad else [raw]


def _opt(x: int | None) -> int:
    return NONE if x is None else int(x)


def encode(msg: Message) -> list:
    """The message as a list of bytes-like parts (arrays are not copied)."""
    kind, flags, run_id, n_rows, width, n_seq_ids, n_bytes = 0, 0, 0, 0, 0, 0, 0
    args = [0, 0, 0, 0]
    body: list = []
    if isinstance(msg, Run):
        b = msg.batch
        kind, run_id, n_rows = RUN, msg.run_id, b.n_rows
        counts = np.array([len(s) for s in b.seq_ids], dtype=np.int32)
        flat = np.array([s for seqs in b.seq_ids for s in seqs], dtype=np.int32)
        n_seq_ids = flat.shape[0]
        flags = ((F_HIDDEN if msg.hidden is not None else 0) | (F_PREFILL if b.prefill else 0)
                 | (F_RETURN_LOGITS if msg.return_logits else 0) | (F_SPECULATIVE if msg.speculative else 0)
                 | (F_ROW_IDS if b.row_ids is not None else 0) | (F_SAMPLING if b.sampling is not None else 0))
        body += _bytes(b.tokens.astype(np.int64)) + _bytes(b.positions.astype(np.int64))
        body += _bytes(b.want_logits.astype(np.uint8)) + _bytes(counts) + _bytes(flat)
        if b.row_ids is not None:
            body += _bytes(b.row_ids.astype(np.int64))
        if b.sampling is not None:
            body += _bytes(b.seeds.astype(np.uint64)) + _bytes(b.sampling.astype(np.float32))
        if msg.hidden is not None:
            width = msg.hidden.shape[1]
            body += _bytes(msg.hidden.astype(np.float32, copy=False))
    elif isinstance(msg, Result):
        kind, run_id, n_rows = RESULT, msg.run_id, msg.tokens.shape[0]
        body += _bytes(msg.tokens.astype(np.int64))
        if msg.row_ids is not None:
            flags |= F_ROW_IDS
            body += _bytes(msg.row_ids.astype(np.int64))
        if msg.logits is not None:
            flags |= F_LOGITS
            width = msg.logits.shape[1]
            body += _bytes(msg.logits.astype(np.float32, copy=False))
    elif isinstance(msg, Cancelled):
        kind, run_id, args[0] = CANCELLED, msg.run_id, msg.layers_skipped
    elif isinstance(msg, KVRemove):
        kind, args[:3] = KV_REMOVE, (_opt(msg.seq), msg.p0, _opt(msg.p1))
    elif isinstance(msg, KVCopy):
        kind, args = KV_COPY, [msg.src, msg.dst, msg.p0, _opt(msg.p1)]
    elif isinstance(msg, KVEdits):
        kind, n_rows = KV_EDITS, len(msg.edits)
        table = np.array([(0, _opt(e.seq), NONE, e.p0, _opt(e.p1)) if isinstance(e, KVRemove)
                          else (1, e.src, e.dst, e.p0, _opt(e.p1)) for e in msg.edits], dtype=np.int64)
        body += _bytes(table)
    elif isinstance(msg, Ready):
        kind, args[:2] = READY, (msg.stage, msg.pid)
    elif isinstance(msg, Shutdown):
        kind = SHUTDOWN
    elif isinstance(msg, TraceEvents):
        text = json.dumps(msg.events).encode()
        kind, args[0], n_bytes = TRACE, msg.stage, len(text)
        body += _bytes(np.frombuffer(text, dtype=np.uint8))
    else:
        raise TypeError(f"not a message: {msg!r}")
    header = HEADER.pack(MAGIC, kind, flags, run_id, n_rows, width, n_seq_ids, n_bytes, *args)
    return [header] + body


def run_bytes(n_rows: int, n_seq_ids: int, width: int = 0, row_ids: bool = True, sampling: bool = False) -> int:
    """Encoded size of a Run of `n_rows` rows holding `n_seq_ids` sequence ids in all, with
    hidden states of `width` floats per row (0: none), row ids if `row_ids`, and sampling
    settings if `sampling` (the format above, array by array; rings are sized by it)."""
    p = _pad8
    return (HEADER_BYTES + 2 * 8 * n_rows + p(n_rows) + p(4 * n_rows) + p(4 * n_seq_ids)
            + (8 * n_rows if row_ids else 0) + (24 * n_rows if sampling else 0) + p(4 * n_rows * width))


def result_bytes(n_rows: int, logits_width: int = 0, row_ids: bool = True) -> int:
    """Encoded size of a Result of `n_rows` wanted rows, with logits of `logits_width` (0: none)."""
    return HEADER_BYTES + 8 * n_rows + (8 * n_rows if row_ids else 0) + _pad8(4 * n_rows * logits_width)


# ----------------------------------------------------------------------------------------------
# decoding

class _Reader:
    """Reads consecutive 8-byte-aligned arrays out of a payload, checking every bound."""

    def __init__(self, payload: memoryview):
        self.payload, self.offset = payload, HEADER_BYTES

    def array(self, dtype, count: int, shape=None) -> np.ndarray:
        dtype = np.dtype(dtype)
        n_bytes = dtype.itemsize * count
        if count < 0 or self.offset + n_bytes > len(self.payload):
            raise CorruptMessage(f"message body ends early ({len(self.payload)} bytes)")
        a = np.frombuffer(self.payload, dtype=dtype, count=count, offset=self.offset)
        self.offset += _pad8(n_bytes)
        return a if shape is None else a.reshape(shape)


def decode(payload: memoryview) -> Message:
    """Parse one ring record (arrays are views of `payload`)."""
    if len(payload) < HEADER_BYTES:
        raise CorruptMessage(f"record of {len(payload)} bytes is shorter than a header")
    magic, kind, flags, run_id, T, width, n_seq_ids, n_bytes, *args = HEADER.unpack_from(payload, 0)
    if magic != MAGIC:
        raise CorruptMessage(f"bad magic 0x{magic:04x}")
    r = _Reader(payload)
    if kind == RUN:
        tokens = r.array(np.int64, T)
        positions = r.array(np.int64, T)
        want = r.array(np.uint8, T).astype(bool)
        counts = r.array(np.int32, T)
        flat = r.array(np.int32, n_seq_ids)
        if counts.sum() != flat.shape[0] or (counts < 1).any():
            raise CorruptMessage("sequence-id counts do not match the ids")
        row_ids = r.array(np.int64, T) if flags & F_ROW_IDS else None
        seeds = r.array(np.uint64, T) if flags & F_SAMPLING else None
        sampling = r.array(np.float32, 4 * T, (T, 4)) if flags & F_SAMPLING else None
        bounds = np.concatenate([[0], np.cumsum(counts)])
        seq_ids = tuple(tuple(int(s) for s in flat[bounds[i]: bounds[i + 1]]) for i in range(T))
        hidden = r.array(np.float32, T * width, (T, width)) if flags & F_HIDDEN else None
        batch = Batch(tokens=tokens, positions=positions, seq_ids=seq_ids, want_logits=want,
                      prefill=bool(flags & F_PREFILL), row_ids=row_ids, seeds=seeds, sampling=sampling)
        return Run(run_id, batch, hidden, bool(flags & F_RETURN_LOGITS), bool(flags & F_SPECULATIVE))
    if kind == RESULT:
        tokens = r.array(np.int64, T)
        row_ids = r.array(np.int64, T) if flags & F_ROW_IDS else None
        logits = r.array(np.float32, T * width, (T, width)) if flags & F_LOGITS else None
        return Result(run_id, tokens, logits, row_ids)
    if kind == CANCELLED:
        return Cancelled(run_id, args[0])
    if kind == KV_REMOVE:
        return KVRemove(None if args[0] == NONE else args[0], args[1], None if args[2] == NONE else args[2])
    if kind == KV_COPY:
        return KVCopy(args[0], args[1], args[2], None if args[3] == NONE else args[3])
    if kind == KV_EDITS:
        table = r.array(np.int64, 5 * T, (T, 5))
        edits = []
        for op, a, b, p0, p1 in table.tolist():
            if op == 0:
                edits.append(KVRemove(None if a == NONE else a, p0, None if p1 == NONE else p1))
            elif op == 1:
                edits.append(KVCopy(a, b, p0, None if p1 == NONE else p1))
            else:
                raise CorruptMessage(f"unknown KV edit {op}")
        return KVEdits(edits)
    if kind == READY:
        return Ready(args[0], args[1])
    if kind == SHUTDOWN:
        return Shutdown()
    if kind == TRACE:
        text = r.array(np.uint8, n_bytes).tobytes().decode("utf-8", errors="replace")
        try:
            return TraceEvents(args[0], json.loads(text))
        except json.JSONDecodeError:
            raise CorruptMessage("trace events are not valid JSON") from None
    raise CorruptMessage(f"unknown message kind {kind}")
