"""Generation metrics, defined once and printed the same way by every strategy (docs/design.md).

Definitions (times in seconds, from the moment generation starts, tokenizer excluded):

* **time to first token (ttft)** — until the first generated token is known (prefill included).
* **inter-token latency (itl)** — the gaps between consecutive generated tokens; a step that
  yields several tokens at once (speculation) counts as one gap followed by zero gaps.
* **tokens/s (end to end)** — generated tokens / total time.
* **decode tokens/s** — (generated tokens − 1) / (total time − ttft): the steady-state rate.
* Strategies add their own counters (drafted, accepted, ...) to `extra`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationMetrics:
    n_prompt_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # seconds since start, per generated token
    total_s: float = 0.0
    extra: dict = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def token(self, n: int = 1) -> None:
        """Record that n tokens became known now."""
        now = time.perf_counter() - self._t0
        self.token_times.extend([now] * n)

    def finish(self) -> None:
        self.total_s = time.perf_counter() - self._t0

    # a virtual clock (the local runtime's) instead of wall time: times are given explicitly

    def token_at(self, t: float) -> None:
        self.token_times.append(t - self._t0)

    def finish_at(self, t: float) -> None:
        self.total_s = t - self._t0

    def start_at(self, t: float) -> None:
        self._t0 = t

    @property
    def n_generated_tokens(self) -> int:
        return len(self.token_times)

    def to_dict(self) -> dict:
        n = self.n_generated_tokens
        ttft = self.token_times[0] if n else None
        gaps = np.diff(self.token_times) if n > 1 else np.zeros(0)
        decode_s = self.total_s - (ttft or 0.0)
        out = {
            "n_prompt_tokens": self.n_prompt_tokens,
            "n_generated_tokens": n,
            "total_s": round(self.total_s, 6),
            "time_to_first_token_s": None if ttft is None else round(ttft, 6),
            "tokens_per_s": round(n / self.total_s, 3) if self.total_s > 0 else None,
            "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
            "inter_token_latency_s": {
                "mean": round(float(gaps.mean()), 6) if gaps.size else None,
                "p50": round(float(np.percentile(gaps, 50)), 6) if gaps.size else None,
                "p95": round(float(np.percentile(gaps, 95)), 6) if gaps.size else None,
            },
        }
        out.update({k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in self.extra.items()})
        return out

    def summary(self) -> str:
        """A one-line human summary (printed on stderr by the CLI)."""
        d = self.to_dict()
        parts = [f"{d['n_prompt_tokens']} prompt + {d['n_generated_tokens']} generated tokens"]
        if d["time_to_first_token_s"] is not None:
            parts.append(f"first token {d['time_to_first_token_s'] * 1000:.0f} ms")
        if d["decode_tokens_per_s"] is not None:
            parts.append(f"decode {d['decode_tokens_per_s']:.1f} tok/s")
        if d["tokens_per_s"] is not None:
            parts.append(f"overall {d['tokens_per_s']:.1f} tok/s")
        return ", ".join(parts)


@dataclass
class SpeculationStats:
    """Counters of speculative strategies (definitions shared by all of them).

    * **drafted** — speculative tokens sent for verification (every node of a tree).
    * **accepted** — drafted tokens the target confirmed (committed without a bonus).
    * **acceptance rate** — accepted / drafted.
    * **verifications** — runs whose results were checked against drafts.
    * **mean accepted per verification** — accepted / verifications; each verification also
      yields one bonus (correction) token, so tokens per verification = that + 1.
    * **per-position acceptance** — for depth d = 1, 2, ...: among verifications that drafted
      something at depth d, the fraction that accepted at least d tokens.
    """

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    drafted_at: list[int] = field(default_factory=list)  # [d-1]: verifications with a depth-d draft
    accepted_at: list[int] = field(default_factory=list)  # [d-1]: verifications accepting >= d
    coupled_accepted: int | None = None  # --verify mss: drafted tokens coupled verification would accept

    def observe(self, event) -> None:
        """Count a `Verified` event (other events are not about verification)."""
        from .events import Verified

        if isinstance(event, Verified):
            self.record(event.drafted, event.depth, event.accepted)
            if event.coupled_accepted is not None:
                self.coupled_accepted = (self.coupled_accepted or 0) + event.coupled_accepted

    def record(self, n_drafted: int, depth: int, n_accepted: int) -> None:
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.verifications += 1
        while len(self.drafted_at) < depth:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for d in range(depth):
            self.drafted_at[d] += 1
            self.accepted_at[d] += d < n_accepted

    def to_dict(self) -> dict:
        v = max(1, self.verifications)
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "verifications": self.verifications,
            "mean_accepted_per_verification": round(self.accepted / v, 4),
            "tokens_per_verification": round(self.accepted / v + 1, 4) if self.verifications else None,
            "per_position_acceptance": [round(a / d, 4) if d else None
                                        for a, d in zip(self.accepted_at, self.drafted_at)],
            **({} if self.coupled_accepted is None else {
                "coupled_acceptance_rate": round(self.coupled_accepted / self.drafted, 4) if self.drafted else None}),
        }

    def summary(self) -> str:
        d = self.to_dict()
        if not self.drafted:
            return "nothing drafted"
        coupled = (f"; coupled verification would accept {d['coupled_acceptance_rate']:.0%} of the same drafts"
                   if d.get("coupled_acceptance_rate") is not None else "")
        return (f"drafted {d['drafted']}, accepted {d['accepted']} ({d['acceptance_rate']:.0%}), "
                f"{d['tokens_per_verification']:.2f} tokens per verification{coupled}")
