"""Cancellations across MPI ranks, timed by real link delays (run by tests/test_mpi.py):

    mpiexec -n 4 python tests/mpi_driver.py MODEL_DIR DELAY_S

Rank 0 drives an `MPIPipeline` by hand and prints one JSON object; the other ranks are stages.
With a link delay D on every hop (cancellation marks included), a run submitted at t = 0 is at
stage 0 from D, reaches stage 1 at 2D, and so on; a mark sent at t = D/2 reaches every stage at
1.5D. So each scenario lands its cancellation at a known place, with D/2 of slack either side:

| scenario | what the head does                                | expected answer                               |
|----------|---------------------------------------------------|-----------------------------------------------|
| before   | cancel run r, then submit r                       | a stub: every layer skipped                   |
| mid      | submit r, cancel r at D/2                         | a stub: stage 0 computed, the others skipped  |
| rows     | submit 3 rows (ids k1 k2 k3), cancel k2 at D/2    | a Result of rows k1 and k3 only, their tokens |
|          |                                                   | those of the same rows never cancelled        |
| plain    | submit r, nothing cancelled                       | a Result after at least (stages + 1) * D      |
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from minipipe.batch import Batch
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers
from minipipe.runtime.mpi import MPIPipeline, finish_head, is_stage_rank, stage_rank_main
from minipipe.transport.messages import Cancelled, KVRemove, Result, Run


def rows_batch(row_ids) -> Batch:
    """Three independent rows (sequences 1, 2, 3 at position 0): dropping one changes no other."""
    return Batch(tokens=np.array([5, 7, 11]), positions=np.zeros(3, dtype=np.int64), seq_ids=((1,), (2,), (3,)),
                 want_logits=np.ones(3, dtype=bool), row_ids=np.asarray(row_ids, dtype=np.int64))


def answer(msg) -> dict:
    if isinstance(msg, Cancelled):
        return {"kind": "cancelled", "layers_skipped": msg.layers_skipped}
    return {"kind": "result", "tokens": [int(t) for t in msg.tokens],
            "row_ids": None if msg.row_ids is None else [int(r) for r in msg.row_ids]}


def main(model_dir: str, delay: float) -> dict:
    out = {}
    with MPIPipeline(model_dir, n_seqs=4, link_delay=delay, stage_timeout=30) as pipe:
        out["n_stages"], out["n_layers"] = pipe.n_stages, pipe.splits[-1][1]
        out["stage0_layers"] = pipe.splits[0][1] - pipe.splits[0][0]

        r = pipe.new_run_id()  # before
        pipe.cancel(r)
        pipe.submit(Run(r, Batch.chain([3, 4], 0)))
        out["before"] = answer(pipe.receive())

        r = pipe.new_run_id()  # mid
        pipe.submit(Run(r, Batch.chain([3, 4], 0)))
        time.sleep(delay / 2)
        pipe.cancel(r)
        out["mid"] = answer(pipe.receive())

        keys = [pipe.new_run_id() for _ in range(3)]  # rows
        r = pipe.new_run_id()
        pipe.submit(Run(r, rows_batch(keys)))
        time.sleep(delay / 2)
        pipe.cancel(keys[1])
        out["rows"] = answer(pipe.receive())
        out["row_keys"] = keys
        pipe.submit(KVRemove(None))

        r = pipe.new_run_id()  # plain
        t0 = time.monotonic()
        pipe.submit(Run(r, rows_batch([pipe.new_run_id() for _ in range(3)])))
        out["plain"] = answer(pipe.receive())
        out["plain_s"] = time.monotonic() - t0
        pipe.submit(KVRemove(None))
    local = LocalPipeline(load_stage_models(model_dir, split_layers(out["n_layers"], out["n_stages"])), n_seqs=4)
    local.submit(Run(local.new_run_id(), rows_batch([1, 2, 3])))
    reference = local.receive()
    assert isinstance(reference, Result)
    out["reference_tokens"] = [int(t) for t in reference.tokens]
    return out


if __name__ == "__main__":
    if is_stage_rank():
        sys.exit(stage_rank_main())
    code = 0
    try:
        print(json.dumps(main(sys.argv[1], float(sys.argv[2]))), flush=True)
    except BaseException as e:  # noqa: BLE001 - the test reads this line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        code = 1
    sys.exit(finish_head(code))
