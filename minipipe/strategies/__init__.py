"""Decoding strategies (schedulers). Each one emits exactly the tokens of greedy decoding."""

from .base import Strategy, generate, prefill_pipeline
from .pipeline import PipelineStrategy

STRATEGIES: dict[str, type[Strategy]] = {"pipeline": PipelineStrategy}

__all__ = ["Strategy", "generate", "prefill_pipeline", "PipelineStrategy", "STRATEGIES"]
