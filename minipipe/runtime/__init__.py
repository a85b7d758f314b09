"""Runtimes: where the stages run. `process` = one OS process per stage; `local` = one process, steppable."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..model import StageModel
from ..trace import Tracer
from ..weights import Checkpoint, load_stage_weights
from .base import Pipeline, StageCrashed, split_layers
from .cost import CostModel
from .local import Chooser, LocalPipeline, RandomChooser

__all__ = ["Pipeline", "StageCrashed", "split_layers", "CostModel", "Chooser", "RandomChooser", "LocalPipeline",
           "open_pipeline", "load_stage_models"]


def load_stage_models(model_dir, splits: list[tuple[int, int]]) -> list[StageModel]:
    """One StageModel per layer range, sharing one checkpoint reader."""
    config = load_config(model_dir)
    checkpoint = Checkpoint(model_dir)
    return [StageModel(load_stage_weights(checkpoint, config, lo, hi)) for lo, hi in splits]


def open_pipeline(model_dir: str | Path, runtime: str = "process", n_stages: int | None = None,
                  split: list[int] | None = None, n_seqs: int = 1, tracer: Tracer | None = None,
                  cost: CostModel | None = None, chooser: Chooser | None = None) -> Pipeline:
    """A pipeline over the target in `model_dir`, on the chosen runtime."""
    if runtime == "process":
        from .process import ProcessPipeline

        return ProcessPipeline(model_dir, n_stages, split, n_seqs, tracer=tracer)
    if runtime == "local":
        config = load_config(model_dir)
        models = load_stage_models(model_dir, split_layers(config.n_layers, n_stages, split))
        return LocalPipeline(models, n_seqs, cost=cost, chooser=chooser, tracer=tracer)
    raise ValueError(f"unknown runtime {runtime!r}")
