"""The stage service loop: one stage serving its channel, the same on every transport.

    load the stage's layers ─▶ forward Ready ─▶ loop:
        receive (sleeping at most `heartbeat_s`; a sign of life at every wake)
        decode ─▶ compute with `Stage.process`, polling cancellation marks before every step
                   (one layer) and beating after it
        forward the outputs, then release the input (zero-copy reads stay valid until then)
        Shutdown: forward the trace events and the Shutdown, end the output stream, return

A **channel** (`transport/channel.py`) is the stage's end of a transport: shared-memory rings in
the process runtime, MPI messages in the MPI runtime. The loop knows nothing else about them.

States the loop publishes (`transport/status.py`), and what ends it:

| event                          | state / action                                | returns       |
|--------------------------------|-----------------------------------------------|---------------|
| start                          | LOADING (the channel sets it, with the pid)   |               |
| layers loaded                  | WRITING while forwarding Ready, then WAITING  |               |
| load error                     | `fail(one line)`                              | `LOAD_FAILED` |
| a message arrives              | COMPUTING, beats after every layer            |               |
| a record that does not parse   | `fail("corrupt message: ...")`                | `CORRUPT`     |
| an exception while computing   | `fail("Type: text (at file:line)")`           | `CRASHED`     |
| outputs forwarded              | WRITING, then beat, then WAITING              |               |
| Shutdown handled               | DONE, `finish()`                              | `SHUTDOWN`    |
| input closed, head gone        | —                                             | `CLOSED`      |
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable

from ..errors import MinipipeError
from ..transport.channel import ChannelClosed, StageChannel
from ..transport.messages import (Cancelled, CorruptMessage, KVCopy, KVEdits, KVRemove, Ready, Run, Shutdown,
                                  TraceEvents, decode, encode)
from ..transport.status import COMPUTING, DONE, WAITING, WRITING
from .sizing import TEXT_CHUNK

# what `serve` returns (the process runtime exits with it; 0 and -1 are not failures)
SHUTDOWN, CLOSED, LOAD_FAILED, CORRUPT, CRASHED = 0, -1, 2, 3, 4


def serve(channel: StageChannel, load: Callable, index: int, lo: int, hi: int, trace: bool = False) -> int:
    """Serve `channel` as stage `index` (layers [lo, hi)) until Shutdown or the end of its input.

    `load(cancels)` returns the `Stage` (it reads only this stage's layers). Trace events, if
    `trace`, travel to the head at Shutdown. Returns one of the codes above; a failure has been
    published with `channel.fail` first."""
    try:
        stage = load(channel.cancels)
    except MinipipeError as e:
        channel.fail(str(e))
        return LOAD_FAILED
    except Exception as e:  # noqa: BLE001 - report anything, one line
        channel.fail(f"could not load layers {lo}-{hi - 1}: {type(e).__name__}: {e}")
        return LOAD_FAILED
    channel.set_state(WRITING)
    channel.forward(encode(Ready(index, os.getpid())))
    channel.set_state(WAITING)
    events: list[dict] = []
    track = f"stage {index}"
    while True:
        try:
            payload = channel.receive(channel.heartbeat_s)
        except ChannelClosed:
            return CLOSED
        if payload is None:
            channel.beat(progress=False)  # idle, but alive
            continue
        channel.set_state(COMPUTING)
        try:
            msg = decode(payload)
        except CorruptMessage as e:
            channel.fail(f"corrupt message: {e}")
            return CORRUPT
        try:
            start = channel.clock()
            outputs = compute(stage.process(msg), channel)
            end = channel.clock()
        except Exception as e:  # noqa: BLE001 - a bug or a broken KV rule: report it, one line
            where = traceback.extract_tb(e.__traceback__)[-1]
            channel.fail(f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})")
            return CRASHED
        if trace:
            _record(events, track, msg, outputs, start, end)
        if isinstance(msg, Shutdown) and trace:
            outputs = trace_messages(index, events) + outputs
        channel.set_state(WRITING)
        for o in outputs:
            channel.forward(encode(o))
        channel.done()
        channel.beat()  # one message handled
        if isinstance(msg, Shutdown):
            channel.set_state(DONE)
            channel.finish()
            return SHUTDOWN
        channel.set_state(WAITING)


def compute(steps, channel: StageChannel) -> list:
    """Run a `Stage.process` generator to the end (like `stage.drain`): cancellation marks are
    polled before every step, and the stage beats after every layer."""
    while True:
        channel.poll_cancels()
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        channel.beat()


def trace_messages(stage: int, events: list[dict]) -> list[TraceEvents]:
    """A stage's trace events in messages of at most TEXT_CHUNK bytes (they fit every ring)."""
    messages, chunk, size = [], [], 0
    for event in events:
        n = len(json.dumps(event)) + 2
        if chunk and size + n > TEXT_CHUNK:
            messages.append(TraceEvents(stage, chunk))
            chunk, size = [], 0
        chunk.append(event)
        size += n
    if chunk:
        messages.append(TraceEvents(stage, chunk))
    return messages


def _record(events: list, track: str, msg, outputs, start: float, end: float) -> None:
    if isinstance(msg, Run):
        cancelled = bool(outputs) and isinstance(outputs[0], Cancelled)
        name = ("cancelled " if cancelled else "") + ("spec run" if msg.speculative else "run") + f" {msg.run_id}"
        events.append(dict(track=track, name=name, start=start, end=end, kind="cancel" if cancelled else "run",
                           run_id=msg.run_id, args={"rows": msg.batch.n_rows}))
    elif isinstance(msg, Cancelled):
        events.append(dict(track=track, name=f"skip cancelled {msg.run_id}", start=start, end=start, kind="cancel",
                           run_id=msg.run_id, args={}))
    elif isinstance(msg, (KVRemove, KVCopy, KVEdits)):
        events.append(dict(track=track, name=type(msg).__name__, start=start, end=start, kind="kv", run_id=None,
                           args={}))
