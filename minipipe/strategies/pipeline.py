"""`pipeline`: plain pipeline parallelism — one token per traversal of all stages.

    per request: send the newest committed token through stage 0 -> ... -> stage N-1;
                 its greedy answer is the next committed token

A request has one run in flight at a time. With one request, every stage but one is idle at
any moment: the baseline that the speculative strategies fill with useful work. With several
requests the engine splits them into `n_stages` groups, one micro-batch each, so every stage
works on some group (continuous batching over a pipeline, as vLLM does with pipeline
parallelism): one decode row per running request per micro-batch.
"""

from __future__ import annotations

from ..batch import Batch
from .base import Decoder, Strategy


class PipelineDecoder(Decoder):
    def begin(self) -> None:
        self.launch_next()

    def on_answer(self, part, answer) -> None:
        if not self.commit([int(answer.tokens[0])], part):
            self.launch_next()

    def launch_next(self) -> None:
        """The newest committed token, at its position, into the committed sequence."""
        self.launch(Batch.chain([self.committed[-1]], len(self.committed) - 1, (self.seq,)), "plain")


class PipelineStrategy(Strategy):
    name = "pipeline"

    def decoder(self, request, seqs, head) -> PipelineDecoder:
        return PipelineDecoder(self, request, seqs, head)
