"""How much shared memory a process pipeline needs: each ring sized by what travels on it.

    ring 0        head -> stage 0      runs as token ids (no hidden states), KV edits
    ring 1..N-1   stage -> stage       runs with hidden states: `dim` floats per row
    ring N        last stage -> head   results: one token id (and row id) per wanted row;
                                       logits (`vocab` floats per row) only for `logits_rows` rows

The largest run is a prefill chunk (`kernels.PREFILL_CHUNK` rows, one sequence id each) unless a
strategy sends bigger speculative batches (`max_rows`); a row never holds more than `n_seqs`
sequence ids. A ring holds `RECORDS_PER_RING` of its largest record (a record may take at most
half a ring, and a stage that is still reading one record should find room for the next), and
never less than `RING_FLOOR` (room for KV edits, stubs, and trace events at shutdown, which
travel in chunks of at most `TEXT_CHUNK` bytes through every ring).

SmolLM2-135M (dim 576, vocab 49152) on 3 stages needs about 3 MiB (4 MiB with specpipe's 257
sequence ids) instead of the 768 MiB that vocabulary-wide rings took (`tests/test_sizing.py`
checks it fits Docker's default 64 MiB /dev/shm).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import kernels
from ..config import ModelConfig
from ..errors import InputError
from ..transport import ring as ring_mod, shm
from ..transport.messages import result_bytes, run_bytes
from ..transport.status import SLOT_BYTES

RECORDS_PER_RING = 4
RING_FLOOR = 256 << 10
TEXT_CHUNK = 64 << 10  # most bytes of trace-event JSON per message (fits every ring: RING_FLOOR / 4)
CANCEL_SLOTS = 4096  # run ids in the cancellation map (8 bytes each)


@dataclass
class RingPlan:
    """Data bytes of each ring (ring i feeds stage i; ring N feeds the head) and what they hold."""

    capacities: list[int]
    max_rows: int  # most rows in one run
    n_seqs: int  # sequence ids a row may hold, at most
    logits_rows: int  # rows of logits a result may carry

    @property
    def ring_bytes(self) -> int:
        """Shared memory of the rings, headers included."""
        return sum(ring_mod.HEADER_BYTES + c for c in self.capacities)

    @property
    def total_bytes(self) -> int:
        """Every segment a pipeline creates: rings, cancellation map, status board."""
        n_stages = len(self.capacities) - 1
        return self.ring_bytes + 8 * CANCEL_SLOTS + SLOT_BYTES * n_stages


def plan_rings(config: ModelConfig, n_stages: int, max_rows: int = kernels.PREFILL_CHUNK, n_seqs: int = 1,
               logits_rows: int = 0, stamp: bool = False) -> RingPlan:
    """Ring capacities for `config` split over `n_stages` stages (see the module docstring);
    `stamp`: records carry a delivery time (8 bytes, `--link-delay-ms`, `transport/channel.py`)."""
    max_rows = max(1, max_rows)
    seq_ids = max_rows * max(1, n_seqs)

    def capacity(largest_payload: int) -> int:
        need = RECORDS_PER_RING * ring_mod.record_size(largest_payload + (8 if stamp else 0))
        return max(RING_FLOOR, (need + 7) // 8 * 8)

    first = capacity(run_bytes(max_rows, seq_ids, sampling=True))  # rows may carry sampling settings
    between = capacity(run_bytes(max_rows, seq_ids, config.dim, sampling=True))
    last = capacity(max(result_bytes(max_rows), result_bytes(min(logits_rows, max_rows), config.vocab_size)))
    return RingPlan([first] + [between] * (n_stages - 1) + [last], max_rows, n_seqs, logits_rows)


def check_room(need: int, n_stages: int, directory: str = shm.SHM_DIR) -> None:
    """Refuse to start (one line, with the fix) when `directory` has less than `need` bytes free:
    writing past a full /dev/shm kills a process with SIGBUS instead of an error."""
    try:
        st = os.statvfs(directory)
    except OSError:  # no /dev/shm (not Linux): nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if free < need:
        mib = 1 << 20
        suggest = max(64, 2 ** (need * 2 // mib).bit_length())  # a round size with room to spare
        raise InputError(f"{directory} has {free / mib:.1f} MiB free but {n_stages} stages need "
                         f"{need / mib:.1f} MiB of shared memory; give it more (e.g. docker run "
                         f"--shm-size={suggest}m) or use fewer --stages")
