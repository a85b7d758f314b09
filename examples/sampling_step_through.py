"""Exact sampling, step by step: drafts accepted because they equal the target's own sample; then
the same run under SpecInfer's multi-step speculative sampling (MSS), which keeps the
distribution but not the text.

    python examples/sampling_step_through.py [--temperature 0.8] [--seed 7] [--tokens 16]

The target samples the token at position p as argmax(logits / T + g), with Gumbel noise g keyed
by (seed, p). The draft ranks its guesses with the *same* noise (coupled drafting). A drafted
token is accepted exactly when it equals the target's sample, so the text is the text of
sequential sampling with that seed — the check at the end. Under MSS the draft samples with noise
of its own and each token is accepted with probability min(1, p/q): as likely, token by token, to
produce any given text, but not this one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.events import Committed, Drafted, Verified  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import CostModel, LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.sampling import Sampling  # noqa: E402
from minipipe.strategies import SpeculativeStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt", default="ROMEO:\n")
    args = parser.parse_args()
    target_dir = resolve_model(None)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompt = tok.encode(args.prompt)
    draft = load_stage(resolve_model(None, default=DEFAULT_DRAFT))
    sampling = Sampling(args.temperature, seed=args.seed)

    def show(tokens) -> str:
        return " ".join(f"{t}{tok.decode([t])!r}" for t in tokens)

    def run(verify: str):
        last_draft: list = []

        def listen(e) -> None:
            if isinstance(e, Drafted):
                last_draft[:] = e.tokens
                probs = ", ".join(f"{p:.2f}" for p in e.probs)
                print(f"  draft    {show(e.tokens)}   (draft's probabilities {probs})")
            elif isinstance(e, Verified):
                ok = last_draft[: e.accepted]
                extra = ("" if e.coupled_accepted is None
                         else f"; coupled verification would have accepted {e.coupled_accepted}")
                rule = "equal the target's own samples" if verify == "coupled" else "passed min(1, p/q)"
                print(f"  verify   accepted {e.accepted} of {e.drafted}: {show(ok) or 'none'}"
                      + (f" — they {rule}" if ok else "") + extra)
            elif isinstance(e, Committed):
                print(f"  commit   {show(e.tokens)}")

        strategy = SpeculativeStrategy(DraftModel(draft, target_vocab=config.vocab_size), k=3, verify=verify)
        pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, 2)), strategy.n_seqs,
                             cost=CostModel())
        return generate(strategy, pipe, prompt, args.tokens, tok.eos_ids, config.max_positions, listeners=[listen],
                        sampling=sampling)

    print(f"sampling at temperature {args.temperature} with seed {args.seed}; speculative, k = 3, 2 stages\n")
    print("coupled verification:")
    coupled = run("coupled")
    print(f"\n{coupled.metrics.extra['speculation'].summary()}\n\nthe same request under MSS (the draft now samples with noise of its own):")
    mss = run("mss")
    print(f"\n{mss.metrics.extra['speculation'].summary()}\n")
    sequential = generate_greedy(load_stage(target_dir), prompt, args.tokens, tok.eos_ids, sampling=sampling).tokens
    print(f"sequential sampling, seed {args.seed}: {tok.decode(sequential)!r}")
    print(f"coupled speculation:             {tok.decode(coupled.tokens)!r}")
    print(f"MSS speculation:                 {tok.decode(mss.tokens)!r}")
    same = coupled.tokens == sequential
    print(f"coupled run same as sequential sampling: {same}; MSS run the same: {mss.tokens == sequential}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
