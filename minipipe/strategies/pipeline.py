"""`pipeline`: plain pipeline parallelism — one token per traversal of all stages.

    loop: send the latest token through stage 0 -> ... -> stage N-1; its greedy answer is the next token

With one request there is only ever one run in flight, so every stage but one is idle at any
moment: this is the baseline that the speculative strategies fill with useful work.
"""

from __future__ import annotations

from ..batch import Batch
from ..generation import TokenSink
from ..runtime.base import Pipeline
from ..transport.messages import Run
from .base import Strategy


class PipelineStrategy(Strategy):
    name = "pipeline"

    def decode(self, pipe: Pipeline, prompt: list[int], first_token: int, sink: TokenSink) -> None:
        while not sink.done:
            run = Run(pipe.new_run_id(), Batch.chain([sink.tokens[-1]], sink.next_position))
            pipe.submit(run)
            sink.add([int(pipe.receive().tokens[0])])
