"""How often a draft model's greedy token equals the target's, measured with minipipe (NumPy only).

    python tools/measure_agreement.py                      # the shipped pair, the model card's figures
    python tools/measure_agreement.py --json               # the same, as JSON
    python tools/measure_agreement.py --target DIR --draft DIR --prompts FILE -n 32 --new-tokens 48

Method, for each held-out prompt:

1. The target continues the prompt greedily for `--new-tokens` tokens t[0..G-1] (minipipe's greedy
   oracle; it stops early at an end-of-sequence token).
2. The draft reads the prompt and then t[0..G-2] one row at a time (teacher-forced on the
   target's own tokens: the prompt in minipipe's canonical prefill chunks, the rest as decode rows,
   whose bits do not depend on the batch), and
       match[j] = (draft's argmax after prompt + t[:j]) == t[j]          for j = 0..G-1.

`agreement` is the mean of `match` over all positions of all prompts.

Speculative chains follow from `match` alone: a chain of k draft tokens proposed at position j is
accepted in full iff match[j], ..., match[j+k-1] all hold, because as long as the draft's
proposals equal the target's tokens the draft sees exactly the target's context. So, over all
prompts and all positions j with j + k <= G,

    P(k)               = P(a chain of k proposals is accepted in full) = mean of prod(match[j:j+k])
    P(k | k-1)         = P(k) / P(k-1): the k-th proposal is accepted given the first k-1 were
    E[accepted | k]    = P(1) + ... + P(k): expected accepted draft tokens per chain of length k
                         (a verification also yields one token of its own, not counted here)

The prompts default to the held-out set written by tools/train_tinybard.py (`prepare`) and shipped
as models/tinybard/heldout_prompts.json: a speech from a play the models never saw in training,
then the next speaker's name.

Other drafts (`--draft`):

* `self:K` or a range `self:A-B` — the target's own first K layers, final norm and head
  (self-speculation). One teacher-forced pass of the target gives every K at once: its hidden
  state after layer K, through the final norm and head, is exactly what the self:K draft computes
  on the same context (its first K layers' K/V are the target's).
* `ngram` — prompt lookup (`minipipe.draft.NgramDraft`) on the same contexts.

`--chat` wraps each prompt in the target's chat template (tools/chat_prompts.json holds held-out
chat prompts): `python tools/measure_agreement.py --target smollm2-135m --draft self:2-15 --chat
--prompts tools/chat_prompts.json` makes the table in docs/drafts.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from minipipe import blas, kernels
from minipipe.batch import Batch
from minipipe.config import load_config
from minipipe.greedy import generate_greedy, prefill
from minipipe.model import StageModel, load_stage
from minipipe.tokenizer import Tokenizer

DEFAULT_TARGET = REPO / "models" / "tinybard"
DEFAULT_DRAFT = REPO / "models" / "tinybard-draft"
DEFAULT_PROMPTS = DEFAULT_TARGET / "heldout_prompts.json"
MAX_K = 8


def draft_matches(draft: StageModel, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """match[j] = draft's greedy token after prompt + tokens[:j] equals tokens[j].  -> [G] bool"""
    G = len(tokens)
    cache = draft.new_cache(capacity=len(prompt) + G)
    first = prefill(draft, cache, prompt)  # [V]: the draft's logits after the prompt
    rows = [first[None, :]]
    if G > 1:  # tokens[:-1] as decode rows: row j sees prompt + tokens[:j+1]
        rows.append(draft.forward(cache, Batch.chain(tokens[:-1], len(prompt))))  # [G-1, V]
    proposals = kernels.argmax_rows(np.concatenate(rows))  # [G]
    return proposals == np.asarray(tokens)


def self_draft_matches(target: StageModel, prompt: list[int], tokens: list[int], ks: list[int]) -> dict[int, np.ndarray]:
    """match[K][j] = self:K's greedy token after prompt + tokens[:j] equals tokens[j], for every K
    in one pass of the target: the hidden state after layer K, through the final norm and head,
    is the self:K draft's logits (the prompt in canonical prefill chunks, the rest as decode rows,
    as the draft computes them).  -> {K: [G] bool}"""
    G = len(tokens)
    cache = target.new_cache(capacity=len(prompt) + G)
    hidden: dict[int, list[np.ndarray]] = {k: [] for k in ks}  # K -> [rows, D] pieces, in context order

    def run(batch: Batch, keep: np.ndarray) -> None:
        state = target.start(cache, batch)
        while not state.done:
            target.run_layer(state)
            if state.layer in hidden:
                hidden[state.layer].append(state.x[keep].copy())

    for start, end in kernels.prefill_chunks(len(prompt)):  # the last prompt row predicts tokens[0]
        last = end == len(prompt)
        batch = Batch.chain(prompt[start:end], start, want_logits="last" if last else "none", prefill=True)
        run(batch, batch.want_logits if last else np.zeros(end - start, dtype=bool))
    if G > 1:  # tokens[:-1] as decode rows: row j predicts tokens[j + 1]
        batch = Batch.chain(tokens[:-1], len(prompt))
        run(batch, batch.want_logits)
    truth = np.asarray(tokens)
    return {k: kernels.argmax_rows(target.logits(np.concatenate(hidden[k]))) == truth for k in ks}


def ngram_matches(prompt: list[int], tokens: list[int]) -> np.ndarray:
    """match[j] = prompt lookup's first guess after prompt + tokens[:j] equals tokens[j].  -> [G] bool"""
    from minipipe.draft import NgramDraft

    draft, context, out = NgramDraft(), list(prompt), []
    for token in tokens:
        guesses = draft.top(context, 1)
        out.append(bool(guesses) and guesses[0][0] == token)
        context.append(token)
    return np.array(out, dtype=bool)


def parse_self_range(spec: str, n_layers: int) -> list[int]:
    """`self:K` or `self:A-B` -> the K values."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    try:
        lo, hi = (int(x) for x in body.split("-")) if "-" in body else (int(body), int(body))
    except ValueError:
        sys.exit(f"error: --draft {spec}: write self:K or self:A-B")
    if not 1 <= lo <= hi < n_layers:
        sys.exit(f"error: --draft {spec}: K must be between 1 and {n_layers - 1}")
    return list(range(lo, hi + 1))


def measure_many(target_dir: Path, spec: str, prompts: list[str], new_tokens: int, chat: bool) -> dict:
    """Agreement of self:K drafts (every K of the range) or prompt lookup with the target."""
    t0 = time.time()
    target = load_stage(target_dir)
    tokenizer = Tokenizer(target_dir, load_config(target_dir).eos_ids)
    ks = parse_self_range(spec, target.config.n_layers) if spec.startswith("self") else []
    per_draft: dict[str, list[np.ndarray]] = {f"self:{k}": [] for k in ks} if ks else {"ngram": []}
    for text in prompts:
        if chat:
            from minipipe.chat import chat_prompt

            text = chat_prompt(tokenizer, text)
        prompt = tokenizer.encode(text)
        tokens = generate_greedy(target, prompt, new_tokens, eos_ids=tokenizer.eos_ids).tokens
        if ks:
            for k, m in self_draft_matches(target, prompt, tokens, ks).items():
                per_draft[f"self:{k}"].append(m)
        else:
            per_draft["ngram"].append(ngram_matches(prompt, tokens))
    rows = []
    for name, matches in per_draft.items():
        flat = np.concatenate(matches)
        per_k = chain_acceptance(matches, 4)
        rows.append({"draft": name, "agreement": float(flat.mean()), "positions": int(flat.size),
                     "p_chain_4": per_k[3]["p_chain"], "expected_accepted_4": per_k[3]["expected_accepted"]})
    return {"target": str(target_dir), "n_prompts": len(prompts), "new_tokens": new_tokens, "chat": chat,
            "drafts": rows, "seconds": round(time.time() - t0, 1)}


def print_many(r: dict) -> None:
    print(f"target {r['target']}; {r['n_prompts']} prompts{' (chat template)' if r['chat'] else ''}, up to "
          f"{r['new_tokens']} greedy tokens each ({r['seconds']} s)")
    print(f"{'draft':<10} {'agreement':>9} {'positions':>9} {'P(chain of 4)':>13} {'E[accepted | 4]':>15}")
    for row in r["drafts"]:
        print(f"{row['draft']:<10} {100 * row['agreement']:>8.1f}% {row['positions']:>9} {row['p_chain_4']:>13.3f} "
              f"{row['expected_accepted_4']:>15.2f}")


def chain_acceptance(matches: list[np.ndarray], max_k: int = MAX_K) -> list[dict]:
    """Per chain length k = 1..max_k: P(k), P(k | k-1) and E[accepted | k] (see the module doc)."""
    rows, prev, expected = [], 1.0, 0.0
    for k in range(1, max_k + 1):
        full = [np.lib.stride_tricks.sliding_window_view(m, k).all(axis=1) for m in matches if len(m) >= k]
        n = int(sum(len(f) for f in full))
        p = float(sum(f.sum() for f in full) / n) if n else float("nan")
        expected += p
        rows.append({"k": k, "p_chain": p, "p_conditional": p / prev if prev > 0 else float("nan"),
                     "expected_accepted": expected, "chains": n})
        prev = p
    return rows


def measure(target_dir: Path, draft_dir: Path, prompts: list[str], new_tokens: int) -> dict:
    t0 = time.time()
    target, draft = load_stage(target_dir), load_stage(draft_dir)
    if target.config.vocab_size != draft.config.vocab_size:
        sys.exit(f"error: the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                 f"({target.config.vocab_size})")
    tokenizer = Tokenizer(target_dir, load_config(target_dir).eos_ids)
    matches, per_prompt = [], []
    for text in prompts:
        prompt = tokenizer.encode(text)
        tokens = generate_greedy(target, prompt, new_tokens, eos_ids=tokenizer.eos_ids).tokens
        m = draft_matches(draft, prompt, tokens)
        matches.append(m)
        per_prompt.append(float(m.mean()))
    all_matches = np.concatenate(matches)
    return {
        "target": str(target_dir), "draft": str(draft_dir),
        "n_prompts": len(prompts), "new_tokens": new_tokens, "positions": int(all_matches.size),
        "agreement": float(all_matches.mean()),
        "per_prompt_agreement": {"min": min(per_prompt), "median": float(np.median(per_prompt)), "max": max(per_prompt)},
        "per_k": chain_acceptance(matches),
        "seconds": round(time.time() - t0, 1),
    }


def print_table(r: dict) -> None:
    print(f"draft  {r['draft']}\ntarget {r['target']}")
    print(f"{r['n_prompts']} held-out prompts x up to {r['new_tokens']} greedy target tokens = "
          f"{r['positions']} positions ({r['seconds']} s)")
    pp = r["per_prompt_agreement"]
    print(f"agreement (draft greedy == target greedy, teacher-forced on the target's tokens): "
          f"{100 * r['agreement']:.1f}%  (per prompt: min {100 * pp['min']:.0f}%, "
          f"median {100 * pp['median']:.0f}%, max {100 * pp['max']:.0f}%)\n")
    print(" k   P(chain of k accepted)   P(k-th accepted | first k-1)   E[accepted tokens | chain of k]")
    for row in r["per_k"]:
        print(f"{row['k']:2d}   {row['p_chain']:22.3f}   {row['p_conditional']:28.3f}   {row['expected_accepted']:31.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target checkpoint directory or model name")
    p.add_argument("--draft", default=str(DEFAULT_DRAFT),
                   help="draft checkpoint directory, or self:K / self:A-B (the target's first K layers), or ngram")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the target's chat template")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                   help="JSON file with a list of prompts under 'prompts' (or a plain list)")
    p.add_argument("-n", "--n-prompts", type=int, default=128, help="use the first N prompts (the file holds 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy target tokens per prompt")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)

    raw = json.loads(args.prompts.read_text(encoding="utf-8"))
    prompts = raw["prompts"] if isinstance(raw, dict) else raw
    if not (isinstance(prompts, list) and prompts and all(isinstance(t, str) for t in prompts)):
        sys.exit(f"error: {args.prompts} holds no list of prompt strings")
    if args.n_prompts < 1 or args.new_tokens < 1:
        sys.exit("error: --n-prompts and --new-tokens must be positive")
    blas.set_threads(1)  # minipipe's default kernel configuration
    from minipipe.paths import resolve_model

    target = resolve_model(args.target)
    if args.draft.startswith("self") or args.draft == "ngram":
        result = measure_many(target, args.draft, prompts[: args.n_prompts], args.new_tokens, args.chat)
        print(json.dumps(result, indent=1)) if args.json else print_many(result)
        return 0
    if args.chat:
        sys.exit("error: --chat is for self:K and ngram drafts")
    result = measure(target, resolve_model(args.draft), prompts[: args.n_prompts], args.new_tokens)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
