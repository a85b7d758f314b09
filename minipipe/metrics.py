"""Generation metrics, defined once and printed the same way by every strategy (DESIGN.md §7).

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
        out.update(self.extra)
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
