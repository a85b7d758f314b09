"""Decoding strategies (schedulers). Each one emits exactly the tokens of greedy decoding."""

from .base import Strategy, generate, prefill_pipeline
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

__all__ = ["Strategy", "generate", "prefill_pipeline", "PipelineStrategy", "SpeculativeStrategy", "TreeStrategy",
           "PipeInferStrategy", "SpecPipeStrategy", "STRATEGIES", "NEEDS_DRAFT"]
