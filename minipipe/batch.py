"""A batch: the rows one forward call processes, with everything a stage needs to place them.

Terms:

* **row** — one token to run through the model: its id, its position, the sequences it belongs
  to (which decides what it attends to, see `minipipe.kvcache`), whether the last stage should
  choose the next token after it, and how (greedy, or sampled with its request's seed and
  settings: `kernels.choose_rows`).
* **prefill batch** — a chunk of the prompt (`kernels.prefill_chunks`), run with batched GEMM.
  Every other batch (a greedy step, a chain or tree of speculative rows) is a **decode batch**,
  whose rows are computed independently of each other (`kernels.linear_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # [T] int64  token ids
    positions: np.ndarray  # [T] int64  position of each row in its sequence
    seq_ids: tuple[tuple[int, ...], ...]  # per row: the sequence ids the row belongs to
    want_logits: np.ndarray  # [T] bool  rows whose logits the last stage returns
    prefill: bool = False  # True for a prompt chunk (GEMM kernels)
    row_ids: np.ndarray | None = None  # [T] int64  optional names for the rows (SpecPipe's tree nodes):
    #                                    a stage drops rows whose id is marked cancelled, and results
    #                                    say which rows they answer
    seeds: np.ndarray | None = None  # [T] uint64  each row's request seed (sampling only)
    sampling: np.ndarray | None = None  # [T, 4] float32  temperature, top_k, top_p, min_p per row
    #                                     (kernels.SAMPLING_FIELDS); None: every row is greedy

    def __post_init__(self) -> None:
        T = self.tokens.shape[0]
        assert self.tokens.shape == self.positions.shape == self.want_logits.shape == (T,), (
            f"{self.tokens.shape=} {self.positions.shape=} {self.want_logits.shape=}")
        assert len(self.seq_ids) == T, f"{len(self.seq_ids)=} != {T=}"
        assert self.row_ids is None or self.row_ids.shape == (T,), f"{self.row_ids.shape=}"
        assert (self.seeds is None) == (self.sampling is None), "seeds and sampling go together"
        assert self.sampling is None or self.sampling.shape == (T, 4), f"{self.sampling.shape=}"

    def select(self, keep: np.ndarray) -> "Batch":
        """The rows where `keep` is True (a boolean mask over rows)."""
        return Batch(tokens=self.tokens[keep], positions=self.positions[keep],
                     seq_ids=tuple(s for s, k in zip(self.seq_ids, keep) if k), want_logits=self.want_logits[keep],
                     prefill=self.prefill, row_ids=None if self.row_ids is None else self.row_ids[keep],
                     seeds=None if self.seeds is None else self.seeds[keep],
                     sampling=None if self.sampling is None else self.sampling[keep])

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def chain(cls, tokens, start_pos: int, seq_ids: tuple[int, ...] = (0,), want_logits: str = "all",
              prefill: bool = False) -> "Batch":
        """Consecutive tokens of one sequence set starting at `start_pos`.

        want_logits: "all", "last" or "none".
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        want = np.zeros(T, dtype=bool)
        if want_logits == "all":
            want[:] = True
        elif want_logits == "last" and T:
            want[-1] = True
        return cls(tokens=tokens, positions=np.arange(start_pos, start_pos + T, dtype=np.int64),
                   seq_ids=(tuple(seq_ids),) * T, want_logits=want, prefill=prefill)
