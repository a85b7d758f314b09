"""The local runtime: every stage in one process, advanced one step at a time.

It uses the same `Stage` objects as the process runtime and computes the real arithmetic, but
decides itself which stage moves next, so it is steppable and traceable, and its schedule
depends only on its cost model (fixed costs: the same everywhere; calibrated costs: measured
anew on each run, so times differ between runs and machines):

* **clock mode** (`cost=CostModel(...)`, the default): a discrete-event simulation on a virtual
  clock. With fixed costs (`cost.fixed`, the command line's default) the same run gives the same
  times, timelines and counters on every machine. Each stage processes its input in order; a
  step (one layer of a run, or one KV edit) starts when the stage is free and the message has arrived, and lasts what the cost model says;
  a message reaches the next stage one hop later. The head's clock advances with its own work
  and when it waits for an answer. Stages are simulated lazily, up to the head's current time,
  whenever the head looks (`poll`, `receive`) or acts on timing (`cancel`).
* **the draft's lane** (`draft_lane=True`, the default): the draft runs on a processor of its
  own, a track named "draft". Drafting asked at head time t starts when the lane is free (and
  not before t) and lasts what the cost model says; the head waits for it only when it needs
  the answer (`draft_wait`), so decoders that draft ahead of need (`minipipe.drafter`) keep the
  draft off the head's critical path. With `draft_lane=False` the head drafts itself, on its own
  track and clock, as a draft in the head process would.
* **chooser mode** (`chooser=...`): no clock; a chooser picks which stage takes the next step,
  and how many steps the stages take whenever the head pauses (submit, cancel, poll). Tests drive
  it with hypothesis to explore interleavings the OS rarely produces: cancellations landing
  before, between the layers of, and after a stage's work on a run.

Step = one layer of a run (the stage checks the cancellation map before each), or the whole
handling of any other message. Every step is recorded in the tracer.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass

from ..model import StageModel
from ..transport.cancel import LocalCancelSet
from ..transport.messages import Cancelled, KVCopy, KVEdits, KVRemove, Result, Run
from ..trace import Tracer
from .base import Pipeline
from .cost import CostModel
from .stage import Stage


class Chooser:
    """Decides interleavings in chooser mode."""

    def pick(self, runnable: list[int]) -> int:
        """Which of the runnable stages steps next."""
        return runnable[0]

    def budget(self) -> int:
        """How many stage steps happen while the head pauses."""
        return 0


class RandomChooser(Chooser):
    def __init__(self, seed: int = 0, max_budget: int = 6):
        self.rng, self.max_budget = random.Random(seed), max_budget

    def pick(self, runnable: list[int]) -> int:
        return self.rng.choice(runnable)

    def budget(self) -> int:
        return self.rng.randint(0, self.max_budget)


@dataclass
class _InFlight:
    msg: object
    steps: object  # the Stage.process generator
    started: float  # when the stage started this message
    t: float  # when its next step starts
    layers_done: int = 0


def message_bytes(msg, dim: int) -> int:
    if isinstance(msg, Run):
        return 64 + msg.batch.n_rows * (32 + (4 * dim if msg.hidden is not None else 0))
    if isinstance(msg, Result):
        return 64 + 8 * msg.tokens.shape[0] + (msg.logits.nbytes if msg.logits is not None else 0)
    return 64


class LocalPipeline(Pipeline):
    def __init__(self, models: list[StageModel], n_seqs: int = 1, cost: CostModel | None = None,
                 chooser: Chooser | None = None, tracer: Tracer | None = None, cache_cells: int = 256,
                 draft_lane: bool = True):
        self.cancels = LocalCancelSet()
        self.stages = [Stage(i, m, self.cancels, n_seqs, cache_cells) for i, m in enumerate(models)]
        self.splits = [(m.lo, m.hi) for m in models]
        self.dim = models[0].config.dim
        self.chooser = chooser
        self.cost = cost if cost is not None or chooser is not None else CostModel()
        self.tracer = tracer if tracer is not None else Tracer()
        n = len(models)
        self.inbox: list[deque] = [deque() for _ in range(n)]  # per stage: (arrival time, message)
        self.head_inbox: deque = deque()  # (arrival time, Result | Cancelled)
        self.current: list[_InFlight | None] = [None] * n
        self.free_at = [0.0] * n
        self.clock = 0.0  # the head's time (virtual seconds, or steps in chooser mode)
        self.has_draft_lane = draft_lane
        self.draft_free_at = 0.0  # when the draft's lane has finished what it was given
        self.n_steps = 0
        # called as watcher(stage, message, outputs, end time) whenever a stage has finished a
        # message (walk-throughs read the stage's KV cache there: `self.stages[i].cache.cells()`)
        self.watchers: list = []

    # ------------------------------------------------------------------------------------------
    # the head's side

    def submit(self, msg: Run | KVRemove | KVCopy | KVEdits) -> None:
        arrival = self.clock
        if self.cost is not None:
            self.clock += self.cost.submit
            arrival = self.clock + self.cost.hop(message_bytes(msg, self.dim))
        self.inbox[0].append((arrival, msg))
        self.tracer.instant("head", type(msg).__name__, self.clock, "kv" if not isinstance(msg, Run) else "submit",
                            getattr(msg, "run_id", None))
        self._pause()

    def cancel(self, run_id: int) -> None:
        self._advance_to_now()
        self.cancels.cancel(run_id)
        self.tracer.instant("head", f"cancel {run_id}", self.clock, "cancel", run_id)
        self._pause()

    def poll(self) -> bool:
        self._advance_to_now()
        self._pause()
        if self.cost is None:  # chooser mode: no clock, an answer is there or not
            return bool(self.head_inbox)
        return bool(self.head_inbox) and self.head_inbox[0][0] <= self.clock

    def receive(self) -> Result | Cancelled:
        while not self.head_inbox:
            runnable = self._runnable()
            if not runnable:
                raise RuntimeError("receive() with nothing in flight: the head would wait forever")
            self._step(self._next_stage(runnable))
        arrival, msg = self.head_inbox.popleft()
        if self.cost is not None:
            self.clock = max(self.clock, arrival)
        return msg

    def wait(self, timeout: float) -> bool:
        """Clock mode: simulate the stages until the oldest answer arrives or `timeout` virtual
        seconds pass (the head's clock moves to whichever comes first). Chooser mode: the stages
        step until an answer is there (time counts steps)."""
        if self.cost is None:
            deadline = self.n_steps + timeout
            while not self.head_inbox and self._runnable() and self.n_steps < deadline:
                self._step(self._next_stage(self._runnable()))
            return bool(self.head_inbox)
        deadline = self.clock + timeout
        while not (self.head_inbox and self.head_inbox[0][0] <= deadline):
            runnable = [i for i in self._runnable() if self._start_time(i) <= deadline]
            if not runnable:
                break
            self._step(self._next_stage(runnable))
        if self.head_inbox and self.head_inbox[0][0] <= deadline:
            self.clock = max(self.clock, self.head_inbox[0][0])
            return True
        self.clock = max(self.clock, deadline)
        return False

    def idle_until(self, t: float) -> None:
        if self.cost is None:  # chooser mode: time counts stage steps
            self.n_steps = max(self.n_steps, int(t + 0.999999))
        else:
            self.clock = max(self.clock, t)

    def draft_work(self, n_rows: int, forwards: int | None = None, wait: bool = True) -> float:
        """Charge a draft forward of `n_rows` rows: on the draft's lane, from when it is free (the
        head's clock moves only if it `wait`s for the answer), or on the head's own clock when
        there is no lane. Returns when the work is done."""
        if self.cost is None or not n_rows:
            return self.clock if self.cost is not None else float(self.n_steps)
        spent = self.cost.draft(n_rows, n_rows if forwards is None else forwards)
        if not self.has_draft_lane:
            self.clock += spent
            self.tracer.record("head", f"draft {n_rows}", self.clock - spent, self.clock, "draft")
            return self.clock
        start = max(self.clock, self.draft_free_at)
        self.draft_free_at = start + spent
        self.tracer.record("draft", f"draft {n_rows}", start, self.draft_free_at, "draft")
        if wait:
            self.draft_wait(self.draft_free_at)
        return self.draft_free_at

    def draft_wait(self, t: float) -> None:
        """The head needs the draft's answer that is ready at `t`."""
        if self.cost is not None and t > self.clock:
            self.clock = t

    def draft_busy(self) -> bool:
        return self.has_draft_lane and self.cost is not None and self.draft_free_at > self.clock

    def now(self) -> float:
        """Virtual seconds (clock mode), or stage steps taken so far (chooser mode)."""
        return self.clock if self.cost is not None else float(self.n_steps)

    def stats(self) -> dict:
        return {f"stage {s.index}": asdict(s.stats) for s in self.stages}

    # ------------------------------------------------------------------------------------------
    # the stages' side

    def _runnable(self) -> list[int]:
        return [i for i in range(len(self.stages)) if self.current[i] is not None or self.inbox[i]]

    def _start_time(self, i: int) -> float:
        if self.current[i] is not None:
            return self.current[i].t
        return max(self.free_at[i], self.inbox[i][0][0])

    def _next_stage(self, runnable: list[int]) -> int:
        if self.chooser is not None:
            return self.chooser.pick(runnable)
        return min(runnable, key=lambda i: (self._start_time(i), i))

    def _advance_to_now(self) -> None:
        """Clock mode: simulate every stage step that starts before the head's current time."""
        if self.chooser is not None:
            return
        while True:
            runnable = [i for i in self._runnable() if self._start_time(i) <= self.clock]
            if not runnable:
                return
            self._step(self._next_stage(runnable))

    def _pause(self) -> None:
        """Chooser mode: let the stages take some steps while the head is between actions."""
        if self.chooser is None:
            return
        for _ in range(self.chooser.budget()):
            runnable = self._runnable()
            if not runnable:
                return
            self._step(self.chooser.pick(runnable))

    # ------------------------------------------------------------------------------------------
    # stepping by hand (examples, teaching)

    def busy_stages(self) -> list[int]:
        """Stages with a message in progress or waiting."""
        return self._runnable()

    def tick(self) -> dict[int, list]:
        """Every busy stage takes one step; returns {stage: messages it sent in this step}."""
        sent = {}
        for i in self._runnable():
            sent[i] = self.step(i)
        return sent

    def drain(self) -> None:
        """Let the stages finish everything sent so far (e.g. trailing KV edits)."""
        while runnable := self._runnable():
            self._step(self._next_stage(runnable))

    def step(self, i: int) -> list:
        """Stage i takes one step; returns the messages it sent (empty unless a message finished)."""
        return self._step(i)

    def in_progress(self, i: int):
        """The message stage i is working on (None if idle) and how many layers it has done."""
        job = self.current[i]
        return (None, 0) if job is None else (job.msg, job.layers_done)

    def _step(self, i: int) -> list:
        """Stage i takes one step: one layer of its current run, or a whole other message."""
        stage = self.stages[i]
        self.n_steps += 1
        if self.current[i] is None:
            arrival, msg = self.inbox[i].popleft()
            start = self.n_steps if self.cost is None else max(self.free_at[i], arrival)
            self.current[i] = _InFlight(msg, stage.process(msg), start, start)
        job = self.current[i]
        track, run_id = f"stage {i}", getattr(job.msg, "run_id", None)
        computed_before = stage.stats.layers_computed
        try:
            next(job.steps)  # one layer computed, more to come
            outputs = None
        except StopIteration as done:  # finished (its last layer, if any, computed in this step)
            outputs = done.value
        layers = stage.stats.layers_computed - computed_before
        end = job.t + self._step_cost(job.msg, layers, outputs, stage.rows_in_progress)
        if layers:
            self.tracer.record(track, f"layer {stage.model.lo + job.layers_done}", job.t, end, "layer", run_id,
                               rows=job.msg.batch.n_rows)
            job.layers_done += layers
        job.t = self.free_at[i] = end
        if outputs is None:
            return []
        self.current[i] = None
        self._record_finish(i, job, outputs, end)
        for watcher in self.watchers:
            watcher(i, job.msg, outputs, end)
        for out in outputs:
            arrival = end if self.cost is None else end + self.cost.hop(message_bytes(out, self.dim))
            if i + 1 < len(self.stages):
                self.inbox[i + 1].append((arrival, out))
            elif isinstance(out, (Result, Cancelled)):
                self.head_inbox.append((arrival, out))
        return outputs

    def _step_cost(self, msg, layers: int, outputs, rows: int) -> float:
        if self.cost is None:
            return 1  # chooser mode: time counts steps
        cost = self.cost.layer(rows, msg.batch.prefill) * layers if layers else 0.0
        if isinstance(msg, (KVRemove, KVCopy)):
            cost += self.cost.kv_edit
        elif isinstance(msg, KVEdits):
            cost += self.cost.kv_edit * len(msg.edits)
        elif outputs and isinstance(outputs[0], Result):
            cost += self.cost.head(outputs[0].tokens.shape[0])
        return cost

    def _record_finish(self, i: int, job: _InFlight, outputs: list, end: float) -> None:
        track, msg = f"stage {i}", job.msg
        if isinstance(msg, Run):
            cancelled = bool(outputs) and isinstance(outputs[0], Cancelled)
            kind = "cancel" if cancelled else "run"
            name = ("cancelled " if cancelled else "") + ("spec run" if msg.speculative else "run") + f" {msg.run_id}"
            self.tracer.record(track, name, job.started, max(end, job.started), kind, msg.run_id,
                               rows=msg.batch.n_rows, speculative=msg.speculative)
        elif isinstance(msg, Cancelled):
            self.tracer.instant(track, f"skip cancelled {msg.run_id}", job.started, "cancel", msg.run_id)
        elif isinstance(msg, (KVRemove, KVCopy)):
            self.tracer.instant(track, _kv_label(msg), job.started, "kv")
        elif isinstance(msg, KVEdits):
            self.tracer.instant(track, "; ".join(_kv_label(e) for e in msg.edits), job.started, "kv")


def _kv_label(msg) -> str:
    p1 = "∞" if msg.p1 is None else msg.p1
    if isinstance(msg, KVRemove):
        return f"seq_rm({'all' if msg.seq is None else msg.seq}, {msg.p0}, {p1})"
    return f"seq_cp({msg.src}->{msg.dst}, {msg.p0}, {p1})"
