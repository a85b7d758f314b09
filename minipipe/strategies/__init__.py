"""Decoding strategies (schedulers). Each one emits exactly the tokens of greedy decoding."""

from .base import Strategy, generate, prefill_pipeline
from .pipeinfer import PipeInferStrategy
from .pipeline import PipelineStrategy
from .speculative import SpeculativeStrategy, TreeStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "pipeline": PipelineStrategy,
    "speculative": SpeculativeStrategy,
    "tree": TreeStrategy,
    "pipeinfer": PipeInferStrategy,
}
NEEDS_DRAFT = {"speculative", "tree", "pipeinfer"}

__all__ = ["Strategy", "generate", "prefill_pipeline", "PipelineStrategy", "SpeculativeStrategy", "TreeStrategy",
           "PipeInferStrategy", "STRATEGIES", "NEEDS_DRAFT"]
