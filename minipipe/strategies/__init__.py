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


def largest_run(strategy: Strategy, max_running: int = 1) -> int:
    """The most rows one micro-batch sends through the pipeline (the process runtime sizes its
    rings for it): a prefill chunk, or one decode part of every running request."""
    return max(kernels.PREFILL_CHUNK, max_running * strategy.max_part_rows())


__all__ = ["Decoder", "Strategy", "generate", "PipelineStrategy", "SpeculativeStrategy", "TreeStrategy",
           "PipeInferStrategy", "SpecPipeStrategy", "STRATEGIES", "NEEDS_DRAFT", "largest_run"]
