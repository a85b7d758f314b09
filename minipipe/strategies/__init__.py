"""Decoding strategies. Each one emits exactly the tokens of greedy decoding, for every request."""

from .. import kernels
from .base import Decoder, Strategy, generate
from .pipeinfer import PipeInferStrategy
from .pipeline import PipelineStrategy
from .specpipe import SpecPipeStrategy
from .speculative import SpeculativeStrategy, TreeStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "pipeline": PipelineStrategy,
    "speculative": SpeculativeStrategy,
    "tree": TreeStrategy,
    "pipeinfer": PipeInferStrategy,
    "specpipe": SpecPipeStrategy,
}
NEEDS_DRAFT = {"speculative", "tree", "pipeinfer", "specpipe"}


def default_settings(name: str, n_stages: int) -> dict:
    """The command line's defaults for strategy `name` on `n_stages` stages: the settings every
    benchmark table and figure uses (docs/benchmarks.md), measured on the virtual clock with
    fixed costs. The probability cutoffs apply to the draft's calibrated confidence
    (`minipipe.drafter`).

    * speculative: chains of up to 4, extended while the chance that the chain so far is
      accepted is at least 0.3 (an extra row costs about a third of a decode step).
    * tree: SpecInfer's expansion schedule <1,1,3,1,1,1,1,1>, no cutoff.
    * pipeinfer: runs of up to 4 drafted tokens (the original's README: 3-8), cutoff 0.3, at
      most 2 x n_stages runs in flight (the original self-regulates; fewer starve the stages,
      more queue behind each other on a fast link).
    * specpipe: tree layers of up to 4 nodes; beyond the best, a node joins only if its chance of
      becoming the tip is at least 0.3.
    """
    return {"speculative": dict(k=4, min_confidence=0.3),
            "tree": dict(min_confidence=0.0),
            "pipeinfer": dict(n_draft=4, p_accept=0.3, max_inflight=2 * n_stages),
            "specpipe": dict(width=4, min_path=0.3)}.get(name, {})


def largest_run(strategy: Strategy, max_running: int = 1) -> int:
    """The most rows one micro-batch sends through the pipeline (the process runtime sizes its
    rings for it): a prefill chunk, or one decode part of every running request."""
    return max(kernels.PREFILL_CHUNK, max_running * strategy.max_part_rows())


__all__ = ["Decoder", "Strategy", "generate", "PipelineStrategy", "SpeculativeStrategy", "TreeStrategy",
           "PipeInferStrategy", "SpecPipeStrategy", "STRATEGIES", "NEEDS_DRAFT", "largest_run", "default_settings"]
