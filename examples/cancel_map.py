"""The cancellation map, for real: a shared-memory `CancelMap` with 4 slots, a stage that reads it.

    python examples/cancel_map.py

PipeInfer's early cancellation needs every stage to learn, between two layers, that the head
has given up on a run. minipipe keeps one int64 **slot** per run id modulo the map's capacity,
in shared memory: the head writes, every stage reads (`minipipe/transport/cancel.py`).

    cancel(r):        slots[r % capacity] = r
    is_cancelled(r):  slots[r % capacity] == r

The slot holds the **whole run id**, not a flag. This script shows why, with a map of only 4
slots (the process runtime uses 4096): run 5 lands in run 1's slot. A flag would say run 5 is
cancelled because run 1 was; the stored id says "no: this slot speaks about run 1". Then a real
`Stage` (the shipped model's first 4 layers) is handed three runs: one cancelled before it
starts (skipped: a stub goes on), one cancelled between its layers (stopped), one left alone
(computed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.batch import Batch  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.runtime.stage import Stage, drain  # noqa: E402
from minipipe.transport.cancel import CancelMap  # noqa: E402
from minipipe.transport.messages import Run  # noqa: E402


def show(cmap: CancelMap) -> str:
    return "  ".join(f"slot {i}: {'-' if s < 0 else int(s)}" for i, s in enumerate(cmap.slots))


def main() -> None:
    head = CancelMap.create(capacity=4)  # the head creates (and owns) the segment
    stage_view = CancelMap.attach(head.handle)  # a stage attaches by name (here: the same process)
    try:
        print(f"a cancellation map of {head.capacity} slots in shared memory ({head.handle.name.split('_')[0]}_...)")
        print(f"  {show(head)}   (-1: never written)\n")

        for run in (1, 2):
            head.cancel(run)
            print(f"head: cancel({run})  -> slot {run % head.capacity} = {run}")
        print(f"  {show(head)}")
        for run in (1, 2, 3, 5):
            slot = run % head.capacity
            print(f"stage: is_cancelled({run})? slot {slot} holds {int(stage_view.slots[slot])} -> "
                  f"{stage_view.is_cancelled(run)}")
        print(f"\nrun 5 reuses slot 1 (5 % {head.capacity} = 1). The slot holds 1, not 'yes', so run 5 is not "
              "taken for cancelled;\na map of flags would have skipped run 5 because run 1 was cancelled.")
        head.cancel(5)
        print("head: cancel(5)  -> slot 1 = 5 (run 1 is long answered: the head never has more runs in flight "
              "than slots)")
        print(f"  {show(head)}")
        print(f"stage: is_cancelled(5)? {stage_view.is_cancelled(5)}   is_cancelled(1)? {stage_view.is_cancelled(1)}\n")

        model = load_stage(resolve_model(None), 0, 4)  # layers 0-3 of the shipped tinybard
        stage = Stage(0, model, stage_view)
        prompt = Batch.chain([1, 1889, 28, 201], 0, want_logits="none", prefill=True)

        print(f"a real stage (layers {model.lo}-{model.hi - 1}) reading the same map:")
        out = drain(stage.process(Run(6, prompt)))
        print(f"  run 6 (not cancelled): {type(out[0]).__name__} with hidden states {list(out[0].hidden.shape)}")
        head.cancel(7)
        out = drain(stage.process(Run(7, Batch.chain([1889], 4))))
        print(f"  run 7 (cancelled before it starts): {type(out[0]).__name__} stub, "
              f"{out[0].layers_skipped} layers skipped")
        steps = stage.process(Run(8, Batch.chain([1889], 4)))
        next(steps)  # the stage computes layer 0 and yields between layers
        head.cancel(8)  # ... and the head cancels run 8 now
        out = drain(steps)
        print(f"  run 8 (cancelled after its first layer): {type(out[0]).__name__} stub, "
              f"{out[0].layers_skipped} layers skipped")
        s = stage.stats
        print(f"stage counters: {s.runs} run computed, {s.layers_computed} layers computed, "
              f"{s.layers_skipped} skipped, {s.runs_cancelled} runs cancelled ({s.cancelled_mid_run} mid-run)")
        ok = s.runs == 1 and s.runs_cancelled == 2 and s.cancelled_mid_run == 1 and not stage_view.is_cancelled(1)
        print(f"as expected: {ok}")
    finally:
        stage_view.release()
        head.release()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
