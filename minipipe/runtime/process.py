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

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

from .. import blas, kernels
from ..config import load_config
from ..errors import InputError, MinipipeError
from ..trace import Tracer
from ..transport import shm
from ..transport.cancel import CancelHandle, CancelMap
from ..transport.channel import STAMP, LinkDelay, RingChannel
from ..transport.messages import (Cancelled, KVCopy, KVEdits, KVRemove, Ready, Result, Run, Shutdown, TraceEvents,
                                  decode, encode)
from ..transport.ring import SPIN_S, PeerDied, Ring, RingClosed, RingHandle
from ..transport.status import LOADING, BoardHandle, StatusBoard
from .base import Pipeline, StageCrashed, split_layers
from .service import serve, trace_messages as _trace_messages  # noqa: F401 - (tests import it from here)
from .sizing import CANCEL_SLOTS, check_room, plan_rings

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
    link_delay_s: float = 0.0  # --link-delay-ms: every hop delivers this long after sending
    gemv_threads: int = 1  # --threads: the stage's decode GEMVs on this many threads (one thread's bits)


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process: the service loop (`service.py`) on a `RingChannel`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited already (see `_start`); Ctrl-C is the head's
    blas.set_threads(spec.blas_threads)
    kernels.set_gemv_threads(spec.gemv_threads)
    channel = RingChannel(spec.index, spec.input, spec.output, spec.cancels, spec.board, spec.heartbeat_s,
                          spec.link_delay_s)

    def load(cancels):
        from ..model import load_stage
        from .stage import Stage

        return Stage(spec.index, load_stage(spec.model_dir, spec.lo, spec.hi), cancels, spec.n_seqs, spec.cache_cells)

    status = serve(channel, load, spec.index, spec.lo, spec.hi, spec.trace)
    os._exit(max(status, 0))  # a failure is on the board already; the head reads it there


class ProcessPipeline(Pipeline):
    """Stages in their own processes. Use as a context manager: `with ProcessPipeline(...) as p:`.

    max_rows: the most rows one run may carry (default: a prefill chunk); row_seqs: the most
    sequence ids one row holds (default n_seqs); n_seqs: sequence ids
    per stage cache (a row holds at most that many); logits_rows: rows of logits a Result may
    return (Run.return_logits; 0 by default). The rings are sized for these (`sizing.py`); a run
    beyond them is refused with an InputError. link_delay: seconds every hop takes to deliver a
    message (a real slow link, `transport/channel.py`). gemv_threads: each stage's decode GEMVs
    run on this many threads (`kernels.set_gemv_threads`: the bits of one thread; a stage's
    prefill keeps one BLAS thread), so one stage on a machine's cores uses them as greedy
    `--threads` does. stage_timeout: seconds a stage may have work
    without a sign of life before the run stops with an error naming it (None or 0: never).
    """

    def __init__(self, model_dir, n_stages: int | None = None, split: list[int] | None = None, n_seqs: int = 1,
                 max_rows: int = kernels.PREFILL_CHUNK, logits_rows: int = 0, blas_threads: int = 1,
                 tracer: Tracer | None = None, start_timeout: float = 120.0,
                 stage_timeout: float | None = STAGE_TIMEOUT_S, cache_cells: int = 256, spin: float | None = None,
                 row_seqs: int | None = None, link_delay: float = 0.0, gemv_threads: int = 1):
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
        self.link = LinkDelay(link_delay)  # --link-delay-ms: every hop delivers this long after sending
        self.held: deque = deque()  # delayed link: (due ns, message) read off the last ring, not yet delivered
        self.closed = False
        self.faulted = False  # a stage failed, died or stalled: close() does not wait for it
        self.plan = plan_rings(config, self.n_stages, max_rows, n_seqs if row_seqs is None else row_seqs, logits_rows,
                               stamp=bool(self.link))
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
                                 cache_cells, heartbeat_s, link_delay, gemv_threads)
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
        SIGINT is blocked in the head meanwhile (a blocked signal stays pending even while it is
        ignored), so a Ctrl-C in those milliseconds reaches the head's own handler once the
        handler is back and the signal unblocked: it is not lost. (The stage inherits the block
        too, harmlessly: it ignores SIGINT for good.)"""
        main = threading.current_thread() is threading.main_thread()
        block = main and hasattr(signal, "pthread_sigmask")
        if block:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if block:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C arrives now
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
        if self.link:
            parts = [self.link.stamp(), *parts]
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
        while not self.answers and (self.held or self.rings[-1].n_unread_bytes > 0):
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
        """The next message from the last ring once delivered, or None within `timeout`."""
        if not self.link:
            return self._read_ring(timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self.held and self.held[0][0] <= self.link.now_ns():
                return self.held.popleft()[1]
            left = deadline - time.monotonic()
            wait = max(0.0, min(left, self.link.wait_s(self.held[0][0])) if self.held else left)
            msg = self._read_ring(wait)
            if msg is not None:
                self.held.append(msg)
            elif left <= 0:
                return None

    def _read_ring(self, timeout: float):
        """One message from the last ring (copied out of shared memory), or None; with a
        delayed link, (its delivery time, the message)."""
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
        due = None
        try:
            if self.link:
                due, payload = LinkDelay.due_of(payload), payload[STAMP.size:]
            msg = decode(payload)
            if isinstance(msg, Result):  # copy: the ring will reuse these bytes
                msg = Result(msg.run_id, msg.tokens.copy(), None if msg.logits is None else msg.logits.copy(),
                             None if msg.row_ids is None else msg.row_ids.copy())
        finally:
            self.rings[-1].consume()
        if isinstance(msg, TraceEvents):
            self.tracer.extend(msg.events)
            return self._read_ring(timeout)
        return msg if due is None else (due, msg)

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
                    self.rings[0].write(([self.link.stamp()] if self.link else []) + encode(Shutdown()), timeout=0.05)
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
