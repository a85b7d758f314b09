"""Runtimes: where the stages run. `process` = one OS process per stage; `local` = one process, steppable."""

from __future__ import annotations

from pathlib import Path

from .. import kernels
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
                  cost: CostModel | None = None, chooser: Chooser | None = None, max_rows: int | None = None,
                  stage_timeout: float | None = None, cache_cells: int | None = None,
                  row_seqs: int | None = None, logits_rows: int = 0, link_delay: float = 0.0,
                  models: list[StageModel] | None = None, draft_lane: bool = True,
                  gemv_threads: int = 1) -> Pipeline:
    """A pipeline over the target in `model_dir`, on the chosen runtime.

    Process runtime only: `max_rows` the most rows one run carries (default: a prefill chunk;
    see `strategies.largest_run`), `stage_timeout` seconds a stage may have work without a sign
    of life (default `process.STAGE_TIMEOUT_S`; 0: never). `cache_cells`: KV cells each stage's
    cache starts with (the engine's budget; default 256, growing when needed). `link_delay`
    (process and mpi runtimes): seconds every hop takes to deliver a message, for real.
    `gemv_threads` (process runtime): threads for each stage's decode GEMVs (`--threads`).

    Local runtime only: `models`, the stage models if already loaded (a self:K draft shares
    their weights); `draft_lane`, whether the draft runs on a lane of its own (`LocalPipeline`).

    The mpi runtime (`runtime/mpi.py`) runs on rank 0 of an MPI job whose other ranks run
    `runtime.mpi.stage_rank_main` (the command line does both)."""
    cells = 256 if cache_cells is None else cache_cells
    if runtime == "process":
        from .process import STAGE_TIMEOUT_S, ProcessPipeline

        return ProcessPipeline(model_dir, n_stages, split, n_seqs, tracer=tracer,
                               max_rows=kernels.PREFILL_CHUNK if max_rows is None else max_rows,
                               stage_timeout=STAGE_TIMEOUT_S if stage_timeout is None else stage_timeout,
                               cache_cells=cells, row_seqs=row_seqs, logits_rows=logits_rows, link_delay=link_delay,
                               gemv_threads=gemv_threads)
    if runtime == "mpi":
        from .mpi import MPIPipeline
        from .process import STAGE_TIMEOUT_S

        return MPIPipeline(model_dir, n_stages, split, n_seqs, tracer=tracer, cache_cells=cells, link_delay=link_delay,
                           stage_timeout=STAGE_TIMEOUT_S if stage_timeout is None else stage_timeout)
    if runtime == "local":
        if models is None:
            config = load_config(model_dir)
            models = load_stage_models(model_dir, split_layers(config.n_layers, n_stages, split))
        return LocalPipeline(models, n_seqs, cost=cost, chooser=chooser, tracer=tracer, cache_cells=cells,
                             draft_lane=draft_lane)
    raise ValueError(f"unknown runtime {runtime!r}")
