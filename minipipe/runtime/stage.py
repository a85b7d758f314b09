"""A pipeline stage: layers [lo, hi) of the target, their KV cache, and what to do with each message.

The same `Stage` object runs in both runtimes: the process runtime feeds it from a ring buffer
in its own OS process; the local runtime advances it step by step inside one process. A stage
knows nothing about transport or time.

What a stage does with each message (in arrival order, always):

| message      | action                                                         | forwards        |
|--------------|----------------------------------------------------------------|-----------------|
| `Run`        | unless cancelled: place rows in the cache, run each layer,     | `Run` with the  |
|              | checking the cancellation map before every layer: the run's    | hidden states,  |
|              | id, and each row's id (a row whose id is marked is dropped:    | or a `Result`   |
|              | a cancelled part of a shared micro-batch, a pruned tree node)  | (kept rows)     |
|              | if the run, or every row, is cancelled: stop                   | `Cancelled`     |
| `Cancelled`  | nothing to compute (adds its layers to the skipped count)      | the stub        |
| `KVRemove`,  | apply to this stage's cache, after every earlier run           | the edit (not   |
| `KVCopy`,    |                                                                | the last stage) |
| `KVEdits`    |                                                                |                 |
| `Shutdown` and the rest | nothing                                             | the message     |

`process` is a generator: it yields between layers (so a runtime can interleave other actors
there) and returns the messages to forward; the step that computes a run's last layer also
finishes it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..model import StageModel
from ..transport.messages import Cancelled, KVCopy, KVEdits, KVRemove, Message, Result, Run


@dataclass
class StageStats:
    runs: int = 0  # runs computed to the end
    layers_computed: int = 0  # stage-layers computed (one run through one layer = 1)
    layers_skipped: int = 0  # stage-layers saved by cancellation
    runs_cancelled: int = 0  # runs this stage stopped or skipped
    cancelled_mid_run: int = 0  # of those, stopped between layers (after computing some)
    kv_edits: int = 0
    rows_pruned: int = 0  # rows dropped because their row id was marked (SpecPipe pruning)


class Stage:
    def __init__(self, index: int, model: StageModel, cancels, n_seqs: int = 1, cache_cells: int = 256):
        """`cancels` has `is_cancelled(run_id)` (a shared CancelMap or a LocalCancelSet)."""
        self.index, self.model, self.cancels = index, model, cancels
        self.cache = model.new_cache(n_seqs=n_seqs, capacity=cache_cells)
        self.n_layers = model.hi - model.lo
        self.stats = StageStats()
        self.rows_in_progress = 0  # rows of the run being computed (after pruned rows are dropped)

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def process(self, msg: Message) -> Generator[None, None, list[Message]]:
        """Handle one message; yields between layers; returns the messages to forward."""
        if isinstance(msg, Run):
            return (yield from self._run(msg))
        if isinstance(msg, Cancelled):
            self.stats.layers_skipped += self.n_layers
            return [Cancelled(msg.run_id, msg.layers_skipped + self.n_layers)]
        if isinstance(msg, (KVRemove, KVCopy, KVEdits)):
            for edit in msg.edits if isinstance(msg, KVEdits) else [msg]:
                if isinstance(edit, KVRemove):
                    self.cache.seq_rm(edit.seq, edit.p0, edit.p1)
                else:
                    self.cache.seq_cp(edit.src, edit.dst, edit.p0, edit.p1)
                self.stats.kv_edits += 1
            return [] if self.is_last else [msg]
        return [msg]

    def _run(self, run: Run) -> Generator[None, None, list[Message]]:
        model = self.model
        if self.cancels.is_cancelled(run.run_id):
            return self._cancel(run, self.n_layers)
        batch, hidden = self._drop_pruned_rows(run.batch, run.hidden)
        if batch.n_rows == 0:  # every row was pruned: nothing to compute
            return self._cancel(run, self.n_layers)
        self.rows_in_progress = batch.n_rows
        state = model.start(self.cache, batch, hidden)
        while True:
            if self.cancels.is_cancelled(run.run_id):
                self.stats.cancelled_mid_run += state.layer > 0
                return self._cancel(run, state.n_layers - state.layer)
            if state.layer > 0 and state.batch.row_ids is not None:  # rows cancelled since the last layer
                keep = self._unmarked(state.batch.row_ids)
                if not keep.all():
                    self.stats.rows_pruned += int((~keep).sum())
                    if not keep.any():
                        self.stats.cancelled_mid_run += 1
                        return self._cancel(run, state.n_layers - state.layer)
                    state.keep_rows(keep)
                    self.rows_in_progress = state.batch.n_rows
            model.run_layer(state)
            self.stats.layers_computed += 1
            if state.done:
                break
            yield  # between layers
        out = model.finish(state)
        self.stats.runs += 1
        # rows cancelled while this stage computed them are not forwarded (SpecPipe's pruning)
        batch = state.batch
        batch, out = self._drop_pruned_rows(batch, out, rows_of_out=batch.want_logits if self.is_last else None)
        if batch.n_rows == 0:
            return self._cancel(run, 0)
        if not self.is_last:
            return [Run(run.run_id, batch, out, run.return_logits, run.speculative)]
        want = batch.want_logits  # the last stage chooses each wanted row's next token (no logits on the wire)
        tokens = kernels.choose_rows(out, batch.positions[want] + 1, None if batch.seeds is None else batch.seeds[want],
                                     None if batch.sampling is None else batch.sampling[want])  # [T']
        row_ids = None if batch.row_ids is None else batch.row_ids[batch.want_logits]
        return [Result(run.run_id, tokens, out if run.return_logits else None, row_ids)]

    def _drop_pruned_rows(self, batch, values, rows_of_out=None):
        """Remove rows whose row id is marked cancelled; `values` has one row per batch row
        (or, with `rows_of_out`, one per row where that mask is True)."""
        if batch.row_ids is None:
            return batch, values
        keep = self._unmarked(batch.row_ids)
        if keep.all():
            return batch, values
        if values is not None:
            values = values[keep[rows_of_out]] if rows_of_out is not None else values[keep]
        self.stats.rows_pruned += int((~keep).sum())
        return batch.select(keep), values

    def _unmarked(self, row_ids: np.ndarray) -> np.ndarray:
        """Which rows are not marked cancelled.  [T] -> [T] bool"""
        return np.array([not self.cancels.is_cancelled(int(r)) for r in row_ids], dtype=bool)

    def _cancel(self, run: Run, layers_left: int) -> list[Message]:
        self.stats.layers_skipped += layers_left
        self.stats.runs_cancelled += 1
        return [Cancelled(run.run_id, layers_left)]


def drain(steps: Generator) -> list[Message]:
    """Run a `process` generator to the end; return its messages."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
