"""The process runtime: one OS process per stage, linked by shared-memory rings.

    head ──ring 0──▶ stage 0 ──ring 1──▶ stage 1 ── … ──▶ stage N-1 ──ring N──▶ head
                     every stage also reads the shared cancellation map

* Stages are `spawn`ed (a clean interpreter each), load only their own layers (memory-mapped),
  pin BLAS to one thread (N stages use N cores), and then loop: read a message, process it,
  forward what it produces, consume the input (zero-copy reads stay valid until then).
* The head owns every shared-memory segment and unlinks them all in `close()`, which runs on
  normal exit, on an exception and on Ctrl-C (the `with` block). Stages ignore SIGINT (the head
  decides) and exit when their parent is gone, so no process and no /dev/shm segment outlives
  a run.
* Failures reach the user as one clear line: a stage that raises sends `StageFailed` down the
  pipe and exits; a stage that dies (SIGKILL, crash) is noticed by the head within about a
  second while it waits, and reported with its index, layers and exit status; a corrupt message
  makes the stage that read it fail with "corrupt message".
* The head never blocks on a full ring while answers wait for it: `submit` drains the return
  ring into a local queue while it waits for space, so the cycle of rings cannot deadlock.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass

from .. import blas
from ..config import load_config
from ..errors import MinipipeError
from ..trace import Tracer
from ..transport.cancel import CancelHandle, CancelMap
from ..transport.messages import (Cancelled, CorruptMessage, KVCopy, KVEdits, KVRemove, Ready, Result, Run, Shutdown,
                                  StageFailed, TraceEvents, decode, encode)
from ..transport.ring import SPIN_S, PeerDied, Ring, RingClosed, RingHandle
from .base import Pipeline, StageCrashed, split_layers

POLL_S = 0.2  # how often a waiting head checks that every stage is alive


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
    blas_threads: int
    trace: bool
    cache_cells: int


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the head's to handle
    blas.set_threads(spec.blas_threads)
    parent = os.getppid()
    inp, out = Ring.attach(spec.input), Ring.attach(spec.output)
    inp.set_reader(os.getpid())
    out.set_writer(os.getpid())
    cancels = CancelMap.attach(spec.cancels)
    events: list[dict] = []

    def fail(message: str, status: int) -> None:
        try:
            out.write(encode(StageFailed(spec.index, message)), timeout=2.0)
        except Exception:  # noqa: BLE001 - the head will report the exit status instead
            pass
        os._exit(status)

    try:
        from ..model import load_stage
        from .stage import Stage, drain

        stage = Stage(spec.index, load_stage(spec.model_dir, spec.lo, spec.hi), cancels, spec.n_seqs,
                      spec.cache_cells)
    except MinipipeError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - report anything, one line
        fail(f"could not load layers {spec.lo}-{spec.hi - 1}: {type(e).__name__}: {e}", 2)
    out.write(encode(Ready(spec.index, os.getpid())))
    track = f"stage {spec.index}"
    while True:
        try:
            payload = inp.read(timeout=1.0)
        except (RingClosed, PeerDied):
            os._exit(0)
        if payload is None:
            if os.getppid() != parent:  # the head is gone
                os._exit(0)
            continue
        try:
            msg = decode(payload)
        except CorruptMessage as e:
            fail(f"corrupt message: {e}", 3)
        try:
            start = time.monotonic()
            outputs = drain(stage.process(msg))
            end = time.monotonic()
        except Exception as e:  # noqa: BLE001 - a bug or a broken KV rule: report it, one line
            where = traceback.extract_tb(e.__traceback__)[-1]
            fail(f"{type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})", 4)
        if spec.trace:
            _record(events, track, msg, outputs, start, end)
        if isinstance(msg, Shutdown) and spec.trace:
            outputs = [TraceEvents(spec.index, events)] + outputs
        for o in outputs:
            out.write(encode(o))
        inp.consume()
        if isinstance(msg, Shutdown):
            out.close()
            os._exit(0)


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
    """Stages in their own processes. Use as a context manager: `with ProcessPipeline(...) as p:`."""

    def __init__(self, model_dir, n_stages: int | None = None, split: list[int] | None = None, n_seqs: int = 1,
                 ring_bytes: int | None = None, blas_threads: int = 1, tracer: Tracer | None = None,
                 start_timeout: float = 120.0, cache_cells: int = 256, spin: float | None = None):
        config = load_config(model_dir)
        self.splits = split_layers(config.n_layers, n_stages, split)
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        self.rings: list[Ring] = []
        self.procs: list = []
        self.cancels: CancelMap | None = None
        self.answers: deque = deque()  # Results and Cancelled stubs read ahead of `receive`
        self.closed = False
        # a run's largest message: a prefill chunk of hidden states, or rows of logits
        row_bytes = 4 * max(config.dim, config.vocab_size) + 64
        capacity = ring_bytes or max(8 << 20, 4 * 256 * row_bytes)
        ctx = mp.get_context("spawn")
        try:
            spin = SPIN_S if spin is None else spin
            self.rings = [Ring.create(capacity, ctx, tag=f"ring{i}", spin=spin) for i in range(self.n_stages + 1)]
            self.cancels = CancelMap.create()
            self.rings[0].set_writer(os.getpid())
            self.rings[-1].set_reader(os.getpid())
            for i, (lo, hi) in enumerate(self.splits):
                spec = StageSpec(i, str(model_dir), lo, hi, n_seqs, self.rings[i].handle, self.rings[i + 1].handle,
                                 self.cancels.handle, blas_threads, self.tracer.enabled, cache_cells)
                proc = ctx.Process(target=stage_main, args=(spec,), name=f"minipipe-stage{i}", daemon=True)
                proc.start()
                self.procs.append(proc)
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while ready < self.n_stages:
            msg = self._read(POLL_S)
            if msg is None:
                self._check_stages()
                if time.monotonic() > deadline:
                    raise StageCrashed(f"stages did not start within {timeout:.0f} s")
                continue
            if isinstance(msg, Ready):
                ready += 1

    # ------------------------------------------------------------------------------------------

    def submit(self, msg: Run | KVRemove | KVCopy | KVEdits) -> None:
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
        if isinstance(msg, StageFailed):
            lo, hi = self.splits[msg.stage]
            raise StageCrashed(f"stage {msg.stage} (layers {lo}-{hi - 1}) failed: {msg.message}")
        if isinstance(msg, TraceEvents):
            self.tracer.extend(msg.events)
            return self._read(timeout)
        return msg

    def _keep(self, msg) -> None:
        if isinstance(msg, (Result, Cancelled)):
            self.answers.append(msg)

    def _check_stages(self) -> None:
        """Raise StageCrashed naming the first stage process that has exited."""
        for i, proc in enumerate(self.procs):
            if proc.exitcode is not None:
                lo, hi = self.splits[i]
                code = proc.exitcode
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                raise StageCrashed(f"stage {i} (layers {lo}-{hi - 1}, pid {proc.pid}) died: {how}")

    def close(self) -> None:
        """Stop the stages (politely, then by force) and unlink every segment. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.procs and all(p.is_alive() for p in self.procs) and self.rings:
            try:  # ask for an orderly shutdown; collect trace events on the way
                self.rings[0].write(encode(Shutdown()), timeout=1.0)
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:
                    msg = self._read(0.1)
                    if isinstance(msg, Shutdown):
                        break
            except (MinipipeError, TimeoutError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for ring in self.rings:
            ring.release()
        if self.cancels is not None:
            self.cancels.release()
