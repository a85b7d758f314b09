"""The process runtime: one OS process per stage, linked by shared-memory rings.

    head ──ring 0──▶ stage 0 ──ring 1──▶ stage 1 ── … ──▶ stage N-1 ──ring N──▶ head
                     every stage also reads the shared cancellation map and writes its
                     slot of the status board (state, heartbeat, error), which the head reads

* Stages are `spawn`ed (a clean interpreter each), load only their own layers (memory-mapped),
  pin BLAS to one thread (N stages use N cores), and then loop: read a message, process it,
  forward what it produces, consume the input (zero-copy reads stay valid until then).
* Shared memory is sized to need (`sizing.py`) and checked against the free room in /dev/shm
  before anything starts; segments left behind by a run that was killed whole are removed.
* The head owns every segment: it records each name before creating it and unlinks them all in
  `close()`, which runs on normal exit, on an exception and on Ctrl-C (the `with` block). Stages
  ignore SIGINT from birth (the head decides), exit when their parent is gone, and own nothing
  that needs cleaning up, so `close()` may SIGKILL them: no process and no /dev/shm segment
  outlives a run.
* Failures reach the user as one clear line naming the stage (index, layers, pid):
  - a stage that raises (a load error, a corrupt message, a bug) writes its message on the
    status board and exits; a head that finds a stage dead reports the board's message if it
    has one, so the stage's own words always win over "exited with status 2";
  - a stage that dies (SIGKILL, crash) is noticed within `POLL_S` while the head waits;
  - a stage that has work but shows no sign of life for `stage_timeout` seconds (SIGSTOP, a
    deadlock) is reported as stalled; one busy with a long prefill beats after every layer.
* The head never blocks on a full ring while answers wait for it: `submit` drains the return
  ring into a local queue while it waits for space, so the cycle of rings cannot deadlock.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from .. import blas, kernels
from ..config import load_config
from ..errors import InputError, MinipipeError
from ..trace import Tracer
from ..transport import shm
from ..transport.cancel import CancelHandle, CancelMap
from ..transport.messages import (Cancelled, CorruptMessage, KVCopy, KVEdits, KVRemove, Ready, Result, Run, Shutdown,
                                  TraceEvents, decode, encode)
from ..transport.ring import SPIN_S, PeerDied, Ring, RingClosed, RingHandle
from ..transport.status import COMPUTING, DONE, LOADING, WAITING, WRITING, BoardHandle, StatusBoard
from .base import Pipeline, StageCrashed, split_layers
from .sizing import CANCEL_SLOTS, TEXT_CHUNK, check_room, plan_rings

POLL_S = 0.2  # how often a waiting head checks the stages (alive, no error, not stalled)
STAGE_TIMEOUT_S = 60.0  # default: a stage with work and no sign of life this long is stalled
SHUTDOWN_S = 2.0  # a normal close gives the stages this long to finish and exit, then kills them
JOIN_S = 2.0  # how long to wait for a killed stage to be reaped


@dataclass
class StageSpec:
    """Everything a stage process needs (picklable: passed to `spawn`)."""

    index: int
    model_dir: str
    lo: int
    hi: int
    n_seqs: int
    input: RingHandle
    output: RingHandle
    cancels: CancelHandle
    board: BoardHandle
    blas_threads: int
    trace: bool
    cache_cells: int
    heartbeat_s: float  # longest sleep between two heartbeats while waiting for input


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited already (see `_start`); Ctrl-C is the head's
    blas.set_threads(spec.blas_threads)
    parent = os.getppid()
    board, me = StatusBoard.attach(spec.board), spec.index
    board.set_state(me, LOADING, pid=os.getpid())
    inp, out = Ring.attach(spec.input), Ring.attach(spec.output)
    inp.set_reader(os.getpid())
    out.set_writer(os.getpid())
    cancels = CancelMap.attach(spec.cancels)
    events: list[dict] = []

    def fail(message: str, status: int) -> None:
        board.fail(me, message)  # the head reads it there, whatever the neighbours are doing
        os._exit(status)

    try:
        from ..model import load_stage
        from .stage import Stage

        stage = Stage(spec.index, load_stage(spec.model_dir, spec.lo, spec.hi), cancels, spec.n_seqs,
                      spec.cache_cells)
    except MinipipeError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - report anything, one line
        fail(f"could not load layers {spec.lo}-{spec.hi - 1}: {type(e).__name__}: {e}", 2)
    alive = functools.partial(board.beat, me, progress=False)  # a sign of life while a full ring blocks us
    board.set_state(me, WRITING)
    out.write(encode(Ready(spec.index, os.getpid())), on_wait=alive)
    board.set_state(me, WAITING)
    track = f"stage {spec.index}"
    while True:
        try:
            payload = inp.read(timeout=spec.heartbeat_s)
        except (RingClosed, PeerDied):
            os._exit(0)
        if payload is None:
            if os.getppid() != parent:  # the head is gone
                os._exit(0)
            board.beat(me, progress=False)  # idle, but alive
            continue
        board.set_state(me, COMPUTING)
        try:
            msg = decode(payload)
        except CorruptMessage as e:
            fail(f"corrupt message: {e}", 3)
        try:
            start = time.monotonic()
            outputs = _compute(stage.process(msg), board, me)
            end = time.monotonic()
        except Exception as e:  # noqa: BLE001 - a bug or a broken KV rule: report it, one line
            where = traceback.extract_tb(e.__traceback__)[-1]
            fail(f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})", 4)
        if spec.trace:
            _record(events, track, msg, outputs, start, end)
        if isinstance(msg, Shutdown) and spec.trace:
            outputs = _trace_messages(spec.index, events) + outputs
        board.set_state(me, WRITING)
        for o in outputs:
            out.write(encode(o), on_wait=alive)
        inp.consume()
        board.beat(me)  # one message handled
        if isinstance(msg, Shutdown):
            board.set_state(me, DONE)
            out.close()
            os._exit(0)
        board.set_state(me, WAITING)


def _compute(steps, board: StatusBoard, index: int) -> list:
    """Run a `Stage.process` generator to the end (like `stage.drain`), beating after every layer."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        board.beat(index)


def _trace_messages(stage: int, events: list[dict]) -> list[TraceEvents]:
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


class ProcessPipeline(Pipeline):
    """Stages in their own processes. Use as a context manager: `with ProcessPipeline(...) as p:`.

    max_rows: the most rows one run may carry (default: a prefill chunk); row_seqs: the most
    sequence ids one row holds (default n_seqs); n_seqs: sequence ids
    per stage cache (a row holds at most that many); logits_rows: rows of logits a Result may
    return (Run.return_logits; 0 by default). The rings are sized for these (`sizing.py`); a run
    beyond them is refused with an InputError. stage_timeout: seconds a stage may have work
    without a sign of life before the run stops with an error naming it (None or 0: never).
    """

    def __init__(self, model_dir, n_stages: int | None = None, split: list[int] | None = None, n_seqs: int = 1,
                 max_rows: int = kernels.PREFILL_CHUNK, logits_rows: int = 0, blas_threads: int = 1,
                 tracer: Tracer | None = None, start_timeout: float = 120.0,
                 stage_timeout: float | None = STAGE_TIMEOUT_S, cache_cells: int = 256, spin: float | None = None,
                 row_seqs: int | None = None):
        self.config = config = load_config(model_dir)
        self.splits = split_layers(config.n_layers, n_stages, split)
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        self.stage_timeout = stage_timeout or None
        self.rings: list[Ring] = []
        self.procs: list = []
        self.cancels: CancelMap | None = None
        self.board: StatusBoard | None = None
        self.names: list[str] = []  # every segment's name, recorded before the segment is created
        self.answers: deque = deque()  # Results and Cancelled stubs read ahead of `receive`
        self.closed = False
        self.faulted = False  # a stage failed, died or stalled: close() does not wait for it
        self.plan = plan_rings(config, self.n_stages, max_rows, n_seqs if row_seqs is None else row_seqs, logits_rows)
        self.stale_segments = shm.remove_stale()  # left by runs that were killed whole
        check_room(self.plan.total_bytes, self.n_stages)
        ctx = mp.get_context("spawn")
        heartbeat_s = min(0.5, self.stage_timeout / 4) if self.stage_timeout else 1.0
        try:
            spin = SPIN_S if spin is None else spin
            for i, capacity in enumerate(self.plan.capacities):
                self.rings.append(Ring.create(capacity, ctx, spin=spin, name=self._new_name(f"ring{i}")))
            self.cancels = CancelMap.create(CANCEL_SLOTS, name=self._new_name("cancel"))
            self.board = StatusBoard.create(self.n_stages, name=self._new_name("status"))
            self.rings[0].set_writer(os.getpid())
            self.rings[-1].set_reader(os.getpid())
            for i, (lo, hi) in enumerate(self.splits):
                spec = StageSpec(i, str(model_dir), lo, hi, n_seqs, self.rings[i].handle, self.rings[i + 1].handle,
                                 self.cancels.handle, self.board.handle, blas_threads, self.tracer.enabled,
                                 cache_cells, heartbeat_s)
                self._start(ctx.Process(target=stage_main, args=(spec,), name=f"minipipe-stage{i}", daemon=True))
            self._wait_ready(start_timeout)
        except BaseException:
            self.close(polite=False)
            raise

    def _new_name(self, tag: str) -> str:
        """A segment name, recorded first: close() unlinks it even if its creation is interrupted."""
        name = shm.new_name(tag)
        self.names.append(name)
        return name

    def _start(self, proc) -> None:
        """Start a stage with SIGINT ignored from birth: an ignored signal stays ignored across
        exec, so a Ctrl-C during the child's start-up (imports) cannot print a traceback there.
        A Ctrl-C for the head in these few milliseconds is lost (press again)."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.procs.append(proc)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < self.n_stages:
            msg = self._read(POLL_S)
            if msg is None:
                self._check_stages()
                if time.monotonic() > deadline:
                    slow = [i for i in range(self.n_stages) if self.board.read(i).state == LOADING] or [0]
                    self.faulted = True
                    raise StageCrashed(f"{self._describe(slow[0])} did not start within {timeout:.0f} s")
                continue
            if isinstance(msg, Ready):
                ready += 1

    # ------------------------------------------------------------------------------------------

    def submit(self, msg: Run | KVRemove | KVCopy | KVEdits) -> None:
        if isinstance(msg, Run):
            self._check_fits(msg)
        parts = encode(msg)
        if isinstance(msg, Run):
            self.tracer.instant("head", f"submit {msg.run_id}", time.monotonic(), "submit", msg.run_id)
        while True:
            try:
                self.rings[0].write(parts, timeout=POLL_S)
                return
            except TimeoutError:  # ring 0 full: make room downstream by reading answers
                while (answer := self._read(0.0)) is not None:
                    self._keep(answer)
                self._check_stages()

    def _check_fits(self, run: Run) -> None:
        """Refuse a run bigger than the rings were planned for (before any stage sees it)."""
        plan, b = self.plan, run.batch
        wanted = int(b.want_logits.sum()) if run.return_logits else 0
        if b.n_rows > plan.max_rows or sum(len(s) for s in b.seq_ids) > plan.max_rows * plan.n_seqs \
                or wanted > plan.logits_rows:
            asked = f"a run of {b.n_rows} rows" + (f" returning {wanted} rows of logits" if wanted else "")
            raise InputError(f"{asked} does not fit the pipeline's rings, planned for runs of up to {plan.max_rows} "
                             f"rows of up to {plan.n_seqs} sequence ids and {plan.logits_rows} rows of logits "
                             "(ProcessPipeline's max_rows, n_seqs and logits_rows)")

    def cancel(self, run_id: int) -> None:
        self.cancels.cancel(run_id)
        self.tracer.instant("head", f"cancel {run_id}", time.monotonic(), "cancel", run_id)

    def poll(self) -> bool:
        while not self.answers and self.rings[-1].n_unread_bytes > 0:
            msg = self._read(0.0)
            if msg is None:
                break
            self._keep(msg)
        return bool(self.answers)

    def receive(self) -> Result | Cancelled:
        while not self.answers:
            msg = self._read(POLL_S)
            if msg is None:
                self._check_stages()
            else:
                self._keep(msg)
        return self.answers.popleft()

    def now(self) -> float:
        return time.monotonic()

    # ------------------------------------------------------------------------------------------

    def _read(self, timeout: float):
        """One message from the last ring (copied out of shared memory), or None."""
        try:
            payload = self.rings[-1].read(timeout=timeout)
        except PeerDied:
            self._check_stages()
            self.faulted = True
            raise StageCrashed(f"stage {self.n_stages - 1} is gone") from None
        except RingClosed:
            return None
        if payload is None:
            return None
        try:
            msg = decode(payload)
            if isinstance(msg, Result):  # copy: the ring will reuse these bytes
                msg = Result(msg.run_id, msg.tokens.copy(), None if msg.logits is None else msg.logits.copy(),
                             None if msg.row_ids is None else msg.row_ids.copy())
        finally:
            self.rings[-1].consume()
        if isinstance(msg, TraceEvents):
            self.tracer.extend(msg.events)
            return self._read(timeout)
        return msg

    def _keep(self, msg) -> None:
        if isinstance(msg, (Result, Cancelled)):
            self.answers.append(msg)

    def _describe(self, i: int) -> str:
        lo, hi = self.splits[i]
        pid = self.procs[i].pid if i < len(self.procs) else None
        return f"stage {i} (layers {lo}-{hi - 1}" + (f", pid {pid})" if pid else ")")

    def _check_stages(self) -> None:
        """Raise StageCrashed for the first stage that reported an error, died, or stalled."""
        dead = next((i for i, proc in enumerate(self.procs) if proc.exitcode is not None), None)
        error = self.board.first_error()  # read after the exit codes: a dead stage's own words win
        if error is not None:
            self.faulted = True
            raise StageCrashed(f"{self._describe(error[0])} failed: {error[1]}")
        if dead is not None:
            code = self.procs[dead].exitcode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            self.faulted = True
            raise StageCrashed(f"{self._describe(dead)} died: {how}")
        if self.stage_timeout:
            pending = [ring.n_unread_bytes > 0 for ring in self.rings[:-1]]
            stalled = self.board.stalled(pending, self.stage_timeout)
            if stalled is not None:
                self.faulted = True
                raise StageCrashed(f"{self._describe(stalled[0])} made no progress for {stalled[1]:.1f} s "
                                   f"with work waiting (stopped or deadlocked; --stage-timeout is "
                                   f"{self.stage_timeout:g} s)")

    # ------------------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(polite=exc_type is None)

    def close(self, polite: bool = True) -> None:
        """End the stages and unlink every segment. Idempotent.

        polite (the `with` block ended normally): send Shutdown, collect the stages' trace
        events on the way back, and give them SHUTDOWN_S to finish what is in flight and exit.
        Otherwise (an exception, Ctrl-C, SIGTERM, a stage that failed or stalled) skip that:
        runs in flight are worthless now, and a stopped stage would never answer. Whatever is
        still alive then is SIGKILLed (which also ends a SIGSTOPped process); stages own no
        segment, so nothing is lost.
        """
        if self.closed:
            return
        self.closed = True
        try:
            if polite and not self.faulted and self.procs and self.board is not None:
                self._shutdown(time.monotonic() + SHUTDOWN_S)
        finally:
            try:
                self._end_processes()
            finally:
                self._release_segments()

    def _shutdown(self, deadline: float) -> None:
        """Send Shutdown and wait (until `deadline`) for it to come back and the stages to exit."""
        try:
            while True:
                try:
                    self.rings[0].write(encode(Shutdown()), timeout=0.05)
                    break
                except TimeoutError:  # ring 0 full: drain answers so the stages can move
                    while self._read(0.0) is not None:
                        pass
                    if time.monotonic() > deadline:
                        return
            while time.monotonic() < deadline:
                if isinstance(self._read(min(0.1, max(0.0, deadline - time.monotonic()))), Shutdown):
                    break
        except MinipipeError:  # a stage failed on the way: it gets killed below
            return
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))

    def _end_processes(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()  # SIGKILL: works on a stopped process too
        for proc in self.procs:
            proc.join(timeout=JOIN_S)

    def _release_segments(self) -> None:
        try:
            for ring in self.rings:
                ring.release()
            if self.cancels is not None:
                self.cancels.release()
            if self.board is not None:
                self.board.release()
        finally:
            for name in self.names:  # a segment whose creation was interrupted, if any
                shm.unlink_name(name)
