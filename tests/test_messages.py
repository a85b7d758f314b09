"""Messages survive encoding exactly; garbage is refused as CorruptMessage, never anything else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minipipe.batch import Batch
from minipipe.transport.cancel import CancelMap
from minipipe.transport.messages import (Cancelled, CorruptMessage, KVCopy, KVEdits, KVRemove, Ready, Result, Run,
                                         Shutdown, TraceEvents, decode, encode, result_bytes, run_bytes)

ints = st.integers(0, 2**40)
opt_pos = st.one_of(st.none(), st.integers(0, 10**6))


@st.composite
def runs(draw):
    T = draw(st.integers(1, 6))
    seq_ids = tuple(tuple(draw(st.lists(st.integers(0, 999), min_size=1, max_size=3, unique=True))) for _ in range(T))
    batch = Batch(tokens=np.array(draw(st.lists(st.integers(0, 50000), min_size=T, max_size=T)), dtype=np.int64),
                  positions=np.array(draw(st.lists(st.integers(0, 4096), min_size=T, max_size=T)), dtype=np.int64),
                  seq_ids=seq_ids, want_logits=np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T))),
                  prefill=draw(st.booleans()),
                  row_ids=np.array(draw(st.lists(ints, min_size=T, max_size=T)), dtype=np.int64)
                  if draw(st.booleans()) else None)
    hidden = None
    if draw(st.booleans()):
        hidden = np.random.default_rng(draw(ints)).standard_normal((T, draw(st.integers(1, 9)))).astype(np.float32)
    return Run(draw(ints), batch, hidden, draw(st.booleans()), draw(st.booleans()))


@st.composite
def results(draw):
    n = draw(st.integers(0, 5))
    logits = np.random.default_rng(n).standard_normal((n, 7)).astype(np.float32) if draw(st.booleans()) else None
    row_ids = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64) if draw(st.booleans()) else None
    return Result(draw(ints), np.array(draw(st.lists(st.integers(0, 50000), min_size=n, max_size=n)), dtype=np.int64),
                  logits, row_ids)


messages = st.one_of(
    runs(), results(),
    st.builds(Cancelled, ints, st.integers(0, 1000)),
    st.builds(KVRemove, st.one_of(st.none(), st.integers(0, 999)), st.integers(0, 10**6), opt_pos),
    st.builds(KVCopy, st.integers(0, 999), st.integers(0, 999), st.integers(0, 10**6), opt_pos),
    st.builds(KVEdits, st.lists(st.one_of(
        st.builds(KVRemove, st.one_of(st.none(), st.integers(0, 999)), st.integers(0, 10**6), opt_pos),
        st.builds(KVCopy, st.integers(0, 999), st.integers(0, 999), st.integers(0, 10**6), opt_pos)), max_size=6)),
    st.builds(Ready, st.integers(0, 63), st.integers(1, 2**22)),
    st.builds(TraceEvents, st.integers(0, 63), st.lists(st.dictionaries(st.text(max_size=5), st.integers()), max_size=3)),
    st.just(Shutdown()),
)


def roundtrip(msg):
    return decode(memoryview(b"".join(bytes(p) for p in encode(msg))))


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for k, va in vars(a).items():
        vb = getattr(b, k)
        if isinstance(va, Batch):
            if not (all(np.array_equal(getattr(va, f), getattr(vb, f)) for f in ("tokens", "positions", "want_logits"))
                    and va.seq_ids == vb.seq_ids and va.prefill == vb.prefill
                    and (va.row_ids is None) == (vb.row_ids is None)
                    and (va.row_ids is None or np.array_equal(va.row_ids, vb.row_ids))):
                return False
        elif isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            if va is None or vb is None or not np.array_equal(va, vb):
                return False
        elif va != vb:
            return False
    return True


@given(messages)
def test_roundtrip(msg):
    assert same(roundtrip(msg), msg)


@given(messages, st.data())
def test_damaged_records_raise_corrupt_message(msg, data):
    raw = bytearray(b"".join(bytes(p) for p in encode(msg)))
    how = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, min(len(raw), 64) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    try:
        decode(memoryview(bytes(raw)))
    except CorruptMessage:
        pass  # the only acceptable failure; a flipped header byte may also still decode


def test_cancel_map_epochs():
    cm = CancelMap.create(capacity=8)
    try:
        cm.cancel(3)
        assert cm.is_cancelled(3) and not cm.is_cancelled(11)  # 11 shares 3's slot, later epoch
        cm.cancel(11)
        assert cm.is_cancelled(11) and not cm.is_cancelled(3) and not cm.is_cancelled(4)
    finally:
        cm.release()


def test_bad_magic():
    raw = bytearray(b"".join(bytes(p) for p in encode(Shutdown())))
    raw[0] ^= 0xFF
    with pytest.raises(CorruptMessage, match="bad magic"):
        decode(memoryview(bytes(raw)))


@given(msg=st.one_of(runs(), results()))
def test_record_sizes_are_those_of_the_encoding(msg):
    """`run_bytes` and `result_bytes` (what rings are sized by) count every encoded byte."""
    n_bytes = sum(memoryview(p).cast("B").nbytes for p in encode(msg))
    if isinstance(msg, Run):
        b = msg.batch
        width = 0 if msg.hidden is None else msg.hidden.shape[1]
        assert n_bytes == run_bytes(b.n_rows, sum(len(s) for s in b.seq_ids), width, b.row_ids is not None)
    else:
        width = 0 if msg.logits is None else msg.logits.shape[1]
        assert n_bytes == result_bytes(msg.tokens.shape[0], width, msg.row_ids is not None)
