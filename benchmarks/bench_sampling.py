"""Sampling: coupled vs independent drafting vs SpecInfer's MSS, and what the sampling kernel costs.

    python benchmarks/bench_sampling.py                         # shipped pair; 2 stages, process runtime
    python benchmarks/bench_sampling.py --model smollm2-135m --draft ngram
    python benchmarks/bench_sampling.py --quick

Part 1, acceptance: `speculative` (k = 4) at temperatures 0.3, 0.7 and 1.0 over a few prompts and
seeds, side by side in one run (interleaved):

* **coupled** — the draft ranks with the target's own noise; accepted iff equal to the target's
  sample (the text is sequential sampling's);
* **independent** — the draft samples with noise of its own; the same acceptance rule (same text);
* **mss** — independent drafts verified by multi-step speculative sampling (same distribution,
  other text); also reported: how many of those same drafts coupled verification would accept.
  MSS needs a draft model (its distribution q); with `--draft ngram` it is skipped.

Columns: acceptance rate (accepted / drafted), tokens per verification, tokens/s (decode).

Part 2, cost: the sampling kernel (`kernels.choose_token`: noise, filters, argmax) per token
against one greedy decode step of the model, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import cpu_name, progress  # noqa: E402
from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel, NgramDraft  # noqa: E402
from minipipe.greedy import prefill  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import open_pipeline  # noqa: E402
from minipipe.sampling import Sampling  # noqa: E402
from minipipe.strategies import SpeculativeStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "First Citizen:\n"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--draft", help="a draft model (default: the shipped draft) or 'ngram'")
    parser.add_argument("--temperatures", default="0.3,0.7,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one temperature (0.7), one seed, 24 tokens")
    args = parser.parse_args()
    if args.quick:
        args.temperatures, args.seeds, args.tokens = "0.7", 1, 24
    target_dir = resolve_model(args.model)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompts = [tok.encode(p) for p in PROMPTS]
    if args.draft == "ngram":
        draft, modes = NgramDraft(), ("coupled", "independent")
    else:
        draft = DraftModel(load_stage(resolve_model(args.draft, default=DEFAULT_DRAFT)), target_vocab=config.vocab_size)
        modes = ("coupled", "independent", "mss")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows: dict = {}
    with open_pipeline(target_dir, "process", args.stages, n_seqs=5, max_rows=128, logits_rows=8) as pipe:
        jobs = [(t, s, p) for t in temperatures for s in range(args.seeds) for p in prompts]
        for t, seed, prompt in progress(jobs, "runs"):
            for mode in modes:  # interleaved: every mode on the same request, back to back
                strategy = SpeculativeStrategy(draft, k=4, verify=mode)
                got = generate(strategy, pipe, prompt, args.tokens, (), config.max_positions,
                               sampling=Sampling(t, seed=seed))
                stats = got.metrics.extra["speculation"]
                m = got.metrics.to_dict()
                rows.setdefault((t, mode), []).append((stats.drafted, stats.accepted, stats.verifications,
                                                       stats.coupled_accepted, m["decode_tokens_per_s"] or 0))
    print(f"# {Path(target_dir).name}, draft {draft.name}, speculative k=4, {args.stages} stages (process "
          f"runtime), {args.tokens} tokens x {len(prompts)} prompts x {args.seeds} seeds; {cpu_name()}")
    print("| temperature | verification | acceptance | tokens/verification | decode tok/s | "
          "coupled acceptance of the same drafts |")
    print("|---|---|---|---|---|---|")
    for t in temperatures:
        for mode in modes:
            r = rows[(t, mode)]
            drafted, accepted, verifications = (sum(x[i] for x in r) for i in range(3))
            coupled = sum(x[3] or 0 for x in r) / drafted if mode == "mss" and drafted else None
            tps = statistics.median(x[4] for x in r)
            print(f"| {t} | {mode} | {accepted / drafted:.1%} | {(accepted + verifications) / verifications:.2f} | "
                  f"{tps:.1f} | {'' if coupled is None else f'{coupled:.1%}'} |")

    # part 2: the kernel's cost against a decode step
    model = load_stage(target_dir)
    cache = model.new_cache(capacity=256)
    logits = prefill(model, cache, prompts[0])
    step = []
    pos = len(prompts[0])
    for i in range(8):
        t0 = time.perf_counter()
        logits = model.forward(cache, Batch.chain([int(np.argmax(logits))], pos + i))[0]
        step.append(time.perf_counter() - t0)
    print(f"\nsampling kernel per token vs one greedy decode step ({Path(target_dir).name}, vocabulary "
          f"{config.vocab_size}; median of 30):")
    print("| settings | kernel ms | decode step ms | ratio |")
    print("|---|---|---|---|")
    decode_ms = statistics.median(step) * 1e3
    for label, s in (("greedy (argmax)", Sampling()), ("T=0.7", Sampling(0.7)), ("T=0.7, top-k 50", Sampling(0.7, 50)),
                     ("T=0.7, top-p 0.95", Sampling(0.7, top_p=0.95)), ("T=0.7, min-p 0.05", Sampling(0.7, min_p=0.05))):
        times = []
        for i in range(30):
            t0 = time.perf_counter()
            s.choose(logits, 100 + i)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(f"| {label} | {ms:.3f} | {decode_ms:.1f} | {ms / decode_ms:.3f} |")


if __name__ == "__main__":
    main()
