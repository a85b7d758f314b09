"""Draft sources side by side: what each guesses, how often it is right, and what that buys.

    python examples/drafts_compared.py [--model NAME|DIR] [--tokens 24] [--prompt TEXT]

For one prompt on the shipped tinybard target this prints, for every kind of draft minipipe has
(a draft model, prompt lookup, the target's own first layers, an oracle, and a merge of two):

1. its three best guesses for the first token after the prompt, with the probability it claims;
2. how often its first guess is the target's greedy token along the target's own continuation
   (teacher-forced: the draft always sees the target's tokens);
3. the `speculative` strategy run with it on 2 stages of the local runtime: drafted and accepted
   tokens, tokens per verification, and whether the text is greedy decoding's (it always is: a
   draft only decides how much work is speculative, never which tokens are committed).

docs/drafts.md explains each source and measures them at scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import build_draft  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.metrics import SpeculationStats  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.strategies import SpeculativeStrategy, default_settings, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

SOURCES = ["tinybard-draft", "ngram", "self:4", "oracle:0.6", "tinybard-draft+ngram"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped tinybard)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens the target continues the prompt with")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\n")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated draft spellings")
    args = parser.parse_args()
    target_dir = resolve_model(args.model)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompt = tok.encode(args.prompt)
    stages = load_stage_models(target_dir, split_layers(config.n_layers, 2))
    truth = generate_greedy(stages_as_one(target_dir), prompt, args.tokens).tokens  # the target's own text
    print(f"prompt: {args.prompt!r} ({len(prompt)} tokens)")
    print(f"target's greedy continuation: {tok.decode(truth)!r}\n")

    def truth_of(p, sampling=None):  # what an oracle draft knows: the target's continuation
        return truth + [0] * 64

    def show(t: int) -> str:
        return repr(tok.decode([t]))

    all_exact = True
    for spec in args.sources.split(","):
        source = build_draft(spec, target_dir, config, stages, truth_of)
        # 1. the first guesses
        fork = source.fork(prompt)
        guesses = fork.top(prompt, 3)
        shown = ", ".join(f"{show(t)} {p:.2f}" for t, p in guesses) or "(no guess)"
        # 2. agreement along the target's continuation, teacher-forced
        right = sum(1 for j, t in enumerate(truth)
                    if (g := fork.top(prompt + truth[:j], 1)) and g[0][0] == t)
        fork.release()
        # 3. speculative decoding with it
        strategy = SpeculativeStrategy(source, **default_settings("speculative", 2))
        stats = SpeculationStats()
        pipe = LocalPipeline(stages, n_seqs=strategy.n_seqs)
        result = generate(strategy, pipe, prompt, args.tokens, (), config.max_positions, listeners=[stats.observe])
        exact = result.tokens == truth
        all_exact &= exact
        print(f"{spec}")
        print(f"  first guesses after the prompt: {shown}   (the target says {show(truth[0])})")
        print(f"  first guess right along the continuation: {right} of {len(truth)} ({right / len(truth):.0%})")
        print(f"  speculative, 2 stages: {stats.summary()}; same as greedy: {exact}\n")
    print(f"every draft gave greedy decoding's text: {all_exact}")
    if not all_exact:
        sys.exit(1)


def stages_as_one(target_dir):
    from minipipe.model import load_stage

    return load_stage(target_dir)


if __name__ == "__main__":
    main()
