"""Speculative decoding on this CPU: `speculative` and `tree` next to `greedy` and `pipeline`, as the
draft's acceptance grows, and what verifying k rows costs.

    python benchmarks/bench_speculation.py [--model DIR|NAME] [--draft DIR|NAME|none] [--stages 1,2]
                                           [--p 0.2,0.4,0.6,0.8,0.95] [--tokens 64] [--runtime process|local]
    python benchmarks/bench_speculation.py --quick                      # under a minute
    python benchmarks/bench_speculation.py --runtime local --stages 1,2,4,8 --model DIR   # virtual clock

Models: the target is `--model` (default: the shipped `tinybard`, `minipipe.paths.resolve_model`),
the draft `--draft` (default: the shipped `tinybard-draft`). `--draft none` measures oracle
drafts only.

Rows, for each stage count S of `--stages`, all on the same prompt(s), every run making exactly
`--tokens` tokens (eos ignored):

* **greedy** — `greedy.generate_greedy` in this process (no pipeline): the oracle, and the
  reference every run's tokens must equal (asserted; the `exact` column).
* **pipeline** — plain pipelining over S stages: one token per trip through every stage.
* **speculative, oracle p** / **tree, oracle p** — `OracleDraft` built from greedy's own tokens,
  its first guess right with probability p (a seeded coin per position), for every p of `--p`:
  acceptance under control, drafting free in real time (on the local runtime's virtual clock an
  oracle question is charged like a draft-model row). `speculative` drafts a chain of `--k` tokens
  (default 4, the CLI's); `tree` grows SpecInfer's schedule <1,1,3,1,1,1,1,1> (`--tree-schedule`,
  `--tree-budget`).
* **speculative, draft** / **tree, draft** — the draft model (`DraftModel`, in the head process;
  its time counts). Both drafts use the defaults of `minipipe generate` (no `--p-accept` cutoff).

Runtimes: `process` (default) — real stage processes and wall-clock time; every pipeline stays
open for the whole benchmark (one per stage count and cache width). Each round runs every row
once, in an order rotated from round to round, after one warm-up run per pipeline; `--repeats`
rounds; figures are each row's best and median round. `local` — every stage in this process on
the virtual clock of a `CostModel` from `minipipe.runtime.cost.calibrate(target, draft)` (layer,
head and draft costs measured here; `--hop-us` sets the hop latency): deterministic, so one
round, and any stage count up to the model's layers (greedy is then the same cost model with one
stage and no hops).

Also measured: the **cost of verifying k rows** — one forward pass of a k-row speculative batch
through the whole target with the exact kernels (`doctor.time_forward`: a chain after a 32-token
context), against a one-row decode step, for k = 1, 2, 4, 8, 16 (`--verify-rows`) and the batch
sizes the strategies actually send (k + 1 for a chain, the tree's node count); plain batched GEMM
next to it for comparison. Each entry is the best of 2 timings per pass, in `--verify-passes`
passes before the rounds and one more after every round (other work on the machine comes in
bursts). From it, each speculative row gets a **model** of one verification:

    time per token = (verify(rows per verification) + draft time + pipeline overhead) / tokens per verification

with `verify` interpolated in the table, the pipeline overhead = ms/token of pipeline S minus
greedy's (what the hops and the stages' bookkeeping add to one trip), and the draft time = the
draft model's rows per verification (its own counter) x its one-row step. The second table puts
it next to the measured time per verification; `rest` is what the model leaves out. On the local
runtime the model uses the cost model's own charges instead.

Speculation figures per row (summed over the prompts; `SpeculationStats`): acceptance rate =
accepted / drafted (a tree drafts many nodes per depth, so its rate is low by construction),
tokens per verification = accepted / verifications + 1, rows per verification = drafted /
verifications + 1 (the root).

Progress goes to stderr (tqdm); the tables and notes, or with --json one JSON object, to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from common import cpu_name, progress  # noqa: E402
from minipipe import blas  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.doctor import time_forward  # noqa: E402
from minipipe.draft import DraftModel, OracleDraft, check_compatible  # noqa: E402
from minipipe.errors import CheckpointError, InputError, MinipipeError  # noqa: E402
from minipipe.greedy import generate_greedy, prefill  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, open_pipeline, split_layers  # noqa: E402
from minipipe.runtime.cost import calibrate  # noqa: E402
from minipipe.strategies import PipelineStrategy, SpeculativeStrategy, TreeStrategy, generate  # noqa: E402
from minipipe.runtime.process import ProcessPipeline  # noqa: E402
from minipipe.runtime.stage import Stage, drain  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.transport.cancel import LocalCancelSet  # noqa: E402
from minipipe.transport.messages import Run  # noqa: E402
from minipipe.multibuffer import KVMultiBuffer  # noqa: E402
from minipipe.tree import SPECINFER_SCHEDULE, TokenTree  # noqa: E402

CACHE_CELLS = inspect.signature(ProcessPipeline.__init__).parameters["cache_cells"].default  # a stage's KV cells



def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def resolve_pair(model_arg: str | None, draft_arg: str | None, notes: list[str]) -> tuple[Path, Path | None]:
    """Target and draft directories (the draft None: oracle drafts only)."""
    if model_arg is None:
        target = resolve_model(None)
    else:
        target = resolve_model(model_arg)
    if draft_arg is not None and draft_arg.lower() == "none":
        return target, None
    if draft_arg is not None:
        draft = resolve_model(draft_arg)
    else:
        try:
            draft = resolve_model(None, default=DEFAULT_DRAFT)
        except CheckpointError:
            draft = None
    if draft is None:
        notes.append("no draft model found; oracle drafts only")
        return target, None
    try:
        check_compatible(target, draft, load_config(target).vocab_size, load_config(draft).vocab_size)
    except InputError as e:
        if draft_arg is not None:
            raise
        notes.append(f"the default draft {draft} does not fit {target} ({e}); oracle drafts only")
        return target, None
    return target, draft


# ------------------------------------------------------------------------------------------------
# rows


class Row:
    """One configuration: a strategy (with its draft) on S stages, or greedy."""

    def __init__(self, strategy: str, n_stages: int, draft: str, p: float | None = None):
        self.strategy, self.n_stages, self.draft, self.p = strategy, n_stages, draft, p
        self.runs: list[dict] = []
        self.exact = True

    @property
    def name(self) -> str:
        where = "" if self.strategy == "greedy" else f" S={self.n_stages}"
        return f"{self.strategy}{where} {self.draft}".strip()


def make_strategy(row: Row, args, truth: list[int], vocab_size: int, draft_model):
    """A fresh strategy (with a fresh draft) for one run."""
    if row.strategy == "pipeline":
        return PipelineStrategy()
    if row.draft == "draft":
        draft = DraftModel(draft_model)
    else:
        draft = OracleDraft(truth, row.p, vocab_size, seed=args.seed)
    if row.strategy == "speculative":
        return SpeculativeStrategy(draft, k=args.k)
    return TreeStrategy(draft, schedule=args.schedule, budget=args.tree_budget)


def summarise(gens: list) -> dict:
    """A row's run: one generation per prompt; rates over all of them, speculation counters summed."""
    ds = [g.metrics.to_dict() for g in gens]
    decode_s = sum(d["total_s"] - d["time_to_first_token_s"] for d in ds)
    decode_tokens = sum(d["n_generated_tokens"] - 1 for d in ds)
    out = {"s_per_token": decode_s / decode_tokens, "decode_s": decode_s,
           "ttft_s": statistics.mean(d["time_to_first_token_s"] for d in ds)}
    specs = [d["speculation"] for d in ds if "speculation" in d]
    if specs:
        drafted, accepted = sum(s["drafted"] for s in specs), sum(s["accepted"] for s in specs)
        verifications = sum(s["verifications"] for s in specs)
        out["speculation"] = {
            "drafted": drafted, "accepted": accepted, "verifications": verifications,
            "acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_verification": accepted / verifications + 1 if verifications else None,
            "rows_per_verification": drafted / verifications + 1 if verifications else None,
            "per_prompt": specs,
        }
        if any("draft_rows" in d for d in ds) and verifications:
            out["speculation"]["draft_rows_per_verification"] = sum(d.get("draft_rows", 0) for d in ds) / verifications
    return out


# ------------------------------------------------------------------------------------------------
# the cost of verification


class VerifyCost:
    """What verification costs, the best of many timings taken in passes spread over the whole
    benchmark (other work on the machine comes in bursts; a pass after every round dodges them):

    * `exact[k]` / `gemm[k]` — one forward pass of k rows through the whole target
      (`doctor.time_forward`: a chain in sequence 0 after a 32-token context, a 64-cell cache);
    * `as_sent[shape]` — the batch a strategy really sends (its own chain or tree, drafted by an
      always-right oracle), run by a `Stage` holding the whole target with the pipeline's cache
      (`cache_cells` cells, the strategy's sequence ids, the run's mid-way context), plus the KV
      edits of one verification (view, commit, release) applied by the same stage;
    * `draft_step` — the draft model's one-row step.
    """

    def __init__(self, target, draft, row_counts: list[int], shapes: dict, context: list[int], n_prompt: int,
                 truth: list[int]):
        self.target, self.draft, self.row_counts = target, draft, row_counts
        self.shapes, self.context, self.n_prompt, self.truth = shapes, context, n_prompt, truth
        self.exact = {k: float("inf") for k in row_counts}
        self.gemm = {k: float("inf") for k in row_counts}
        self.as_sent = {name: {"forward_s": float("inf"), "edits_s": float("inf")} for name in shapes}
        self.draft_step = float("inf")
        self.n_passes = 0

    def measure_pass(self, repeats: int = 2) -> None:
        for k in self.row_counts:
            self.exact[k] = min(self.exact[k], time_forward(self.target, k, True, repeats))
            self.gemm[k] = min(self.gemm[k], time_forward(self.target, k, False, repeats))
        for name, make in self.shapes.items():
            for _ in range(repeats):
                rows, forward_s, edits_s = self._time_as_sent(make())
                best = self.as_sent[name]
                best.update(rows=rows, forward_s=min(best["forward_s"], forward_s),
                            edits_s=min(best["edits_s"], edits_s))
        if self.draft is not None:
            self.draft_step = min(self.draft_step, time_forward(self.draft, 1, True, repeats))
        self.n_passes += 1

    def _time_as_sent(self, strategy) -> tuple[int, float, float]:
        """One verification of `strategy`'s full chain or tree, as one stage holding every layer runs it."""
        context = self.context
        root_pos = len(context) - 1  # the last committed token: not in the cache yet, the batch's root
        draft = strategy.draft.fork(context[:self.n_prompt])
        tree = TokenTree(context[-1])
        strategy.grow(tree, draft, context, 64)
        stage = Stage(0, self.target, LocalCancelSet(), strategy.n_seqs, CACHE_CELLS)
        prefill(self.target, stage.cache, context[:-1])
        buffers = KVMultiBuffer(n_partitions=1, width=strategy.max_leaves)
        part = buffers.acquire()
        before = buffers.view(0, part, 0, root_pos)
        t0 = time.perf_counter()
        for edit in before:
            drain(stage.process(edit))
        t1 = time.perf_counter()
        drain(stage.process(Run(1, tree.batch(root_pos, part[0]), speculative=True)))
        t2 = time.perf_counter()
        after = buffers.commit(part[0], root_pos, root_pos + tree.depth + 1) + buffers.release(part)
        for edit in after:
            drain(stage.process(edit))
        t3 = time.perf_counter()
        return len(tree), t2 - t1, (t1 - t0) + (t3 - t2)

    def to_dict(self) -> dict:
        one = self.exact[1]
        rows = [{"rows": k, "exact_s": self.exact[k], "gemm_s": self.gemm[k], "vs_one_row": self.exact[k] / one,
                 "per_row_vs_one_row": self.exact[k] / one / k} for k in self.row_counts]
        as_sent = {}
        for name, d in self.as_sent.items():
            table = self.exact.get(d["rows"]) or verify_time({"rows": rows}, d["rows"])
            as_sent[name] = {**d, "table_s": table, "factor": d["forward_s"] / table}
        return {"rows": rows, "passes": self.n_passes, "as_sent": as_sent, "cache_cells": CACHE_CELLS,
                "draft_step_s": None if self.draft is None else self.draft_step}


def verify_time(costs: dict, rows: float) -> float:
    xs = [t["rows"] for t in costs["rows"]]
    return float(np.interp(rows, xs, [t["exact_s"] for t in costs["rows"]]))


# ------------------------------------------------------------------------------------------------
# the benchmark


def run(args) -> dict:
    notes: list[str] = []
    target_dir, draft_dir = resolve_pair(args.model, args.draft, notes)
    config = load_config(target_dir)
    tokenizer = Tokenizer(target_dir, config.eos_ids)
    prompts = [tokenizer.encode(t) for t in args.prompts]
    if max(len(p) for p in prompts) + args.tokens + 16 > config.max_positions:
        raise SystemExit(f"a prompt + --tokens {args.tokens} exceed {target_dir}'s context ({config.max_positions})")
    bad = [s for s in args.stages if not 1 <= s <= config.n_layers]
    if bad:
        raise SystemExit(f"--stages {bad[0]}: {target_dir} has {config.n_layers} layers")

    print(f"loading {target_dir} and {draft_dir or 'no draft model'} ...", file=sys.stderr)
    target = load_stage(target_dir)
    draft_model = None if draft_dir is None else load_stage(draft_dir)
    truth = [generate_greedy(target, p, args.tokens).tokens for p in prompts]  # also warms the greedy row

    # the batch sizes the strategies send: a chain of k + the root; a full tree
    probe = TreeStrategy(OracleDraft(truth[0], 1.0, config.vocab_size), schedule=args.schedule,
                         budget=args.tree_budget)
    tree = TokenTree(0)
    probe.draft.reset(prompts[0])
    probe.grow(tree, list(prompts[0]), args.tokens)
    row_counts = sorted(set(args.verify_rows) | {args.k + 1, len(tree)})
    shapes = {  # fresh strategies with an always-right oracle: their full chain and tree
        "speculative": lambda: SpeculativeStrategy(OracleDraft(truth[0], 1.0, config.vocab_size), k=args.k),
        "tree": lambda: TreeStrategy(OracleDraft(truth[0], 1.0, config.vocab_size), schedule=args.schedule,
                                     budget=args.tree_budget),
    }
    context = prompts[0] + truth[0][:max(1, args.tokens // 2)]  # the context half-way through a run
    verify = VerifyCost(target, draft_model, row_counts, shapes, context, len(prompts[0]), truth[0])
    for _ in progress(range(args.verify_passes), "verify cost (passes over k)"):
        verify.measure_pass()

    rows = [Row("greedy", 1, "")]
    for s in args.stages:
        rows.append(Row("pipeline", s, ""))
        for p in args.p:
            rows += [Row("speculative", s, f"oracle p={p:g}", p), Row("tree", s, f"oracle p={p:g}", p)]
        if draft_model is not None:
            rows += [Row("speculative", s, "draft"), Row("tree", s, "draft")]

    cost_model = None
    if args.runtime == "local":
        cost_model = calibrate(target, draft_model, hop_latency=None if args.hop_us is None else args.hop_us * 1e-6)
        stage_models = {s: load_stage_models(target_dir, split_layers(config.n_layers, s)) for s in args.stages}
        stage_models[0] = [target]  # greedy on the virtual clock: one stage, no hops
        no_hops = replace(cost_model, hop_latency=0.0, hop_bandwidth=float("inf"), submit=0.0)
    repeats = 1 if args.runtime == "local" else args.repeats

    with ExitStack() as stack:
        pipes: dict[tuple[int, int], object] = {}

        def pipe_for(row: Row, n_seqs: int):
            if args.runtime == "local":
                if row.strategy == "greedy":
                    return LocalPipeline(stage_models[0], n_seqs, cost=no_hops)
                return LocalPipeline(stage_models[row.n_stages], n_seqs, cost=cost_model)
            key = (row.n_stages, n_seqs)
            if key not in pipes:
                pipes[key] = stack.enter_context(open_pipeline(target_dir, "process", row.n_stages, n_seqs=n_seqs))
            return pipes[key]

        def run_row(row: Row, n_tokens: int) -> list:
            if row.strategy == "greedy" and args.runtime == "process":
                return [generate_greedy(target, p, n_tokens) for p in prompts]
            gens = []
            for p, t in zip(prompts, truth):
                if row.strategy == "greedy":
                    strategy = PipelineStrategy()
                else:
                    strategy = make_strategy(row, args, t, config.vocab_size, draft_model)
                gen = generate(strategy, pipe_for(row, strategy.n_seqs), p, n_tokens, (), config.max_positions)
                if row.strategy in ("speculative", "tree"):  # drafting done during decoding, in draft rows
                    gen.metrics.extra["draft_rows"] = strategy.draft.tokens_computed
                gens.append(gen)
            return gens

        if args.runtime == "process":
            warmed = set()
            for row in progress(rows, "starting pipelines, warm-up"):
                key = (row.strategy, row.n_stages, row.draft == "draft")
                if row.strategy != "greedy" and key not in warmed:
                    warmed.add(key)
                    run_row(row, min(args.tokens, 8))
        for r in progress(range(repeats), f"rounds ({len(rows)} rows each)", unit="round"):
            shift = r % len(rows)
            for row in progress(rows[shift:] + rows[:shift], f"round {r + 1}", unit="row"):
                gens = run_row(row, args.tokens)
                ok = [g.tokens for g in gens] == truth
                assert ok, f"{row.name} did not emit greedy's tokens"
                row.exact &= ok
                row.runs.append(summarise(gens))
            verify.measure_pass()  # one more pass of the verify-cost table per round

    costs = verify.to_dict()
    costs["chain_rows"], costs["tree_rows"], costs["tree_max_tokens"] = args.k + 1, len(tree), tree.depth + 1
    if cost_model is None:  # wall clock: the measured tables; the draft's measured one-row step
        def verify_fn(rows: float) -> float:
            return verify_time(costs, rows)

        def stage_extra(shape: str, rows: float) -> float:  # a real stage's cache and the KV edits
            a = costs["as_sent"][shape]
            return verify_fn(rows) * (a["factor"] - 1) + a["edits_s"]

        draft_step = costs["draft_step_s"]
    else:  # virtual clock: what the cost model charges for one pass of the whole target, and per draft row
        def verify_fn(rows: float) -> float:
            return config.n_layers * cost_model.layer(rows, False) + cost_model.head(rows)

        def stage_extra(shape: str, rows: float) -> float:
            return 0.0

        draft_step = cost_model.draft_per_token
    report_rows = finish_rows(rows, verify_fn, stage_extra, draft_step, charge_oracle=cost_model is not None)
    report = {
        "target": str(target_dir), "draft": None if draft_dir is None else str(draft_dir),
        "target_desc": describe(config), "draft_desc": None if draft_model is None else describe(draft_model.config),
        "runtime": args.runtime, "cost_model": None if cost_model is None else cost_model.describe(),
        "prompts": args.prompts, "prompt_tokens": [len(p) for p in prompts], "n_tokens": args.tokens,
        "repeats": repeats, "k": args.k, "tree_schedule": list(args.schedule), "tree_budget": args.tree_budget,
        "oracle_seed": args.seed, "stages": args.stages, "p": args.p,
        "verify_cost": costs, "rows": report_rows, "notes": notes, "target_mb": target.weights.n_bytes / 1e6,
    }
    if cost_model is not None:
        notes.append("local runtime: every time is virtual (the cost model above); greedy is the same cost model "
                     "with one stage and no hops; an oracle's guesses are charged like draft-model rows "
                     "(OracleDraft.tokens_computed), so the oracle rows model a draft of this cost with acceptance p; "
                     "the model column uses the cost model's own verify and draft costs")
    report["notes"] += explain(report)
    return report


def describe(c) -> str:
    return (f"{c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, {c.n_heads}/{c.n_kv_heads} heads, "
            f"vocab {c.vocab_size}")


def finish_rows(rows: list[Row], verify_fn, stage_extra, draft_step: float | None, charge_oracle: bool) -> list[dict]:
    out = []
    best = {}
    for row in rows:
        per_token = [x["s_per_token"] for x in row.runs]
        best_run = min(row.runs, key=lambda x: x["s_per_token"])
        d = {"name": row.name, "strategy": row.strategy, "n_stages": row.n_stages, "draft": row.draft, "p": row.p,
             "decode_tokens_per_s_best": 1 / min(per_token),
             "decode_tokens_per_s_median": 1 / statistics.median(per_token),
             "ms_per_token_best": 1e3 * min(per_token),
             "ttft_ms_best": 1e3 * min(x["ttft_s"] for x in row.runs),
             "ttft_ms_median": 1e3 * statistics.median(x["ttft_s"] for x in row.runs),
             "exact": row.exact, "speculation": best_run.get("speculation"), "best_decode_s": best_run["decode_s"],
             "runs": row.runs}
        best[(row.strategy, row.n_stages)] = d
        out.append(d)
    greedy = out[0]
    for d in out:
        d["vs_greedy"] = d["decode_tokens_per_s_best"] / greedy["decode_tokens_per_s_best"]
        pipe = best.get(("pipeline", d["n_stages"]))
        d["vs_pipeline"] = None if pipe is None or d["strategy"] == "greedy" else (
            d["decode_tokens_per_s_best"] / pipe["decode_tokens_per_s_best"])
        spec = d["speculation"]
        if spec and spec["verifications"] and pipe is not None:
            overhead = max(0.0, pipe["ms_per_token_best"] - greedy["ms_per_token_best"]) / 1e3
            draft_s = 0.0
            if (d["draft"] == "draft" or charge_oracle) and draft_step is not None:
                # the draft's own rows per verification (`tokens_computed`): for a draft model the drafted
                # chain, plus the committed tokens it has not seen, plus hopping between branches; an
                # oracle's questions cost nothing in real time but are charged like draft rows on the
                # virtual clock
                draft_s = draft_step * spec["draft_rows_per_verification"]
            verify_s = verify_fn(spec["rows_per_verification"])
            extra_s = stage_extra(d["strategy"], spec["rows_per_verification"])
            modelled = verify_s + extra_s + draft_s + overhead
            measured = d["best_decode_s"] / spec["verifications"]
            d["per_verification_ms"] = {
                "measured": 1e3 * measured, "verify": 1e3 * verify_s, "stage_extra": 1e3 * extra_s,
                "draft": 1e3 * draft_s, "pipeline_overhead": 1e3 * overhead, "rest": 1e3 * (measured - modelled)}
            d["model_tokens_per_s"] = spec["tokens_per_verification"] / modelled
    return out


def span(values, fmt: str = "{:.2f}") -> str:
    """'a-b' for a range of figures, or one figure when they agree at this precision."""
    values = list(values)
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def explain(r: dict) -> list[str]:
    """Notes that read the result through the cost of verification (all numbers from this run)."""
    cost = {t["rows"]: t for t in r["verify_cost"]["rows"]}
    chain, tree = r["verify_cost"]["chain_rows"], r["verify_cost"]["tree_rows"]
    ratio = lambda k: cost[k]["vs_one_row"]  # noqa: E731
    many = [k for k in sorted(cost) if k > 1]
    extra = lambda k: (ratio(k) - 1) / (k - 1)  # noqa: E731  (each row after the first, in one-row steps)
    notes = [
        "verify cost: a forward pass of k rows costs " + ", ".join(f"{ratio(k):.1f}x (k={k})" for k in many)
        + " one row; each row after the first adds " + ", ".join(f"{extra(k):.2f}" for k in many)
        + " of a one-row step. Verification is far from free: the exact kernels run one GEMV per row, so the rows "
          "after the first save only what the first one paid alone (streaming each layer's weights from memory "
          "into the CPU caches, the per-call overheads), and plain batched GEMM, which the exact kernels may not "
          f"use, would be at most {max(cost[k]['exact_s'] / cost[k]['gemm_s'] for k in many):.2f}x faster "
          "(last column). 'Verifying k tokens costs several times one token' holds; 'nearly k times' "
        + ("holds too." if extra(max(many)) >= 0.8 else
           f"does not: an extra row costs {span(extra(k) for k in many)} of a step here "
           f"({r['target_mb']:.1f} MB of weights)."),
        f"break-even: a chain of {chain - 1} drafted tokens is verified as {chain} rows ({ratio(chain):.1f}x one row), "
        f"so it must commit more than {ratio(chain):.1f} tokens per verification (at most {chain}) to beat one "
        f"token per step, before drafting, KV edits and hops; the tree's {tree} rows cost {ratio(tree):.1f}x one row "
        f"for at most {r['verify_cost']['tree_max_tokens']} tokens.",
    ]
    spec_rows = [d for d in r["rows"] if d.get("per_verification_ms")]
    if spec_rows:
        share = [d["per_verification_ms"]["verify"] / d["per_verification_ms"]["measured"] for d in spec_rows]
        rest = [d["per_verification_ms"]["rest"] for d in spec_rows]
        fit = [d["decode_tokens_per_s_best"] / d["model_tokens_per_s"] for d in spec_rows]
        notes.append(
            f"per verification: the target's forward pass is {min(share):.0%}-{max(share):.0%} of a verification's "
            f"measured time. What the model leaves out ('rest': the KV edits' trips through the pipeline, 3 x width "
            f"+ 2 messages per verification, each waking the stages; the head's drafting and tree bookkeeping; "
            f"and contention: the model's parts are best-of-many short timings, a decode row the best of "
            f"{r['repeats']} whole runs) is {min(rest):.2f} to {max(rest):.2f} ms. The model (verify + stage+kv + "
            f"draft + pipeline) / tokens per verification puts the measured rates at {min(fit):.2f}-{max(fit):.2f}x "
            "its prediction.")
    for s in r["stages"]:
        pipe = next((d for d in r["rows"] if d["strategy"] == "pipeline" and d["n_stages"] == s), None)
        line = []
        for strategy in ("speculative", "tree"):
            oracle = [d for d in r["rows"] if d["strategy"] == strategy and d["n_stages"] == s and d["p"] is not None]
            paying = [d["p"] for d in oracle if d["vs_pipeline"] > 1.0]
            line.append(f"{strategy} beats it from p = {min(paying):g}" if paying else f"{strategy} never beats it")
        drafted = [d for d in r["rows"] if d["draft"] == "draft" and d["n_stages"] == s]
        line += [f"{d['strategy']} with the draft model runs at {d['vs_pipeline']:.2f}x" for d in drafted]
        if pipe is not None:
            notes.append(f"S={s}: against pipeline S={s} ({pipe['decode_tokens_per_s_best']:,.0f} tok/s, "
                         f"{pipe['vs_greedy']:.2f}x greedy): " + "; ".join(line) + ".")
    return notes


# ------------------------------------------------------------------------------------------------
# output


def fmt_table(out: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in out]
    table.insert(1, "  ".join("-" * w for w in widths))
    return table


def render(r: dict) -> str:
    clock = ("process runtime, wall clock" if r["runtime"] == "process"
             else f"local runtime, virtual clock: {r['cost_model']}")
    shape = (f"tree budget {r['tree_budget']}" if r["tree_budget"] else
             f"tree schedule <{','.join(map(str, r['tree_schedule']))}>")
    vc = r["verify_cost"]
    lines = [
        f"machine {r['machine']}; BLAS {r['blas_threads']} thread(s) per process; "
        f"1-minute load average {r['load_average_before'][0]:.2f} before, {r['load_average_after'][0]:.2f} after",
        f"target  {r['target']}  ({r['target_desc']})",
        f"draft   {r['draft'] or '-'}  ({r['draft_desc'] or 'oracle drafts only'})",
        f"run     {len(r['prompts'])} prompt(s) of {', '.join(map(str, r['prompt_tokens']))} tokens, "
        f"{r['n_tokens']} new tokens each (eos ignored); {clock}; {r['repeats']} round(s), rows interleaved, "
        "order rotated each round; "
        f"chain k={r['k']}, {shape}; oracle seed {r['oracle_seed']}",
        "",
        "cost of verifying k rows: a forward pass of a k-row speculative batch through the whole target",
        f"(doctor.time_forward after a 32-token context; best of {2 * vc['passes']} timings taken in {vc['passes']} "
        "passes spread over the run), against a 1-row decode step",
    ]
    out = [("k rows", "exact ms", "x one row", "per row", "each extra row", "GEMM ms", "exact / GEMM")]
    for t in vc["rows"]:
        label = str(t["rows"]) + (" (chain)" if t["rows"] == vc["chain_rows"] else "") + (
            " (tree)" if t["rows"] == vc["tree_rows"] else "")
        extra = "-" if t["rows"] == 1 else f"{(t['vs_one_row'] - 1) / (t['rows'] - 1):.2f}"
        out.append((label, f"{t['exact_s'] * 1e3:.3f}", f"{t['vs_one_row']:.2f}", f"{t['per_row_vs_one_row']:.2f}",
                    extra, f"{t['gemm_s'] * 1e3:.3f}", f"{t['exact_s'] / t['gemm_s']:.2f}"))
    lines += fmt_table(out)
    lines += ["", "the batches the strategies send, run by one Stage holding the whole target with the pipeline's "
                  f"cache ({vc['cache_cells']} cells, the strategy's sequences, the run's mid-way context), plus one "
                  "verification's KV edits"]
    out = [("shape", "rows", "forward ms", "table ms", "forward / table", "KV edits ms")]
    for name, a in vc["as_sent"].items():
        out.append((name, str(a["rows"]), f"{a['forward_s'] * 1e3:.3f}", f"{a['table_s'] * 1e3:.3f}",
                    f"{a['factor']:.2f}", f"{a['edits_s'] * 1e3:.3f}"))
    lines += fmt_table(out)
    if vc["draft_step_s"] is not None:
        lines.append(f"draft model one-row step: {vc['draft_step_s'] * 1e3:.3f} ms")

    lines += ["", "decode speed (tok/s: best / median round; vs: best over best; accept, tok/verif and rows/verif "
                  "from SpeculationStats)"]
    out = [("row", "tok/s", "vs greedy", "vs pipeline", "ttft ms", "accept", "tok/verif", "rows/verif", "exact")]
    for d in r["rows"]:
        spec = d["speculation"] or {}
        out.append((
            d["name"], f"{d['decode_tokens_per_s_best']:,.1f} / {d['decode_tokens_per_s_median']:,.1f}",
            f"{d['vs_greedy']:.2f}", "-" if d["vs_pipeline"] is None else f"{d['vs_pipeline']:.2f}",
            f"{d['ttft_ms_best']:.1f}",
            "-" if spec.get("acceptance_rate") is None else f"{spec['acceptance_rate']:.2f}",
            "-" if spec.get("tokens_per_verification") is None else f"{spec['tokens_per_verification']:.2f}",
            "-" if spec.get("rows_per_verification") is None else f"{spec['rows_per_verification']:.1f}",
            "yes" if d["exact"] else "NO"))
    lines += fmt_table(out)

    lines += ["", "one verification, best round (ms): measured = decode time / verifications; verify = the k-row "
                  "table at rows/verif; stage+kv = what a real stage adds (its cache, the KV edits; table below); "
                  "draft = draft rows x one draft step; pipeline = pipeline S minus greedy per token; rest = measured "
                  "minus all of these; model tok/s = tok/verif / (verify + stage+kv + draft + pipeline)"]
    out = [("row", "measured", "verify", "stage+kv", "draft", "pipeline", "rest", "model tok/s", "measured tok/s")]
    for d in r["rows"]:
        pv = d.get("per_verification_ms")
        if pv:
            out.append((d["name"], f"{pv['measured']:.2f}", f"{pv['verify']:.2f}", f"{pv['stage_extra']:.2f}",
                        f"{pv['draft']:.2f}", f"{pv['pipeline_overhead']:.2f}", f"{pv['rest']:.2f}",
                        f"{d['model_tokens_per_s']:,.1f}", f"{d['decode_tokens_per_s_best']:,.1f}"))
    if len(out) > 1:
        lines += fmt_table(out)
    lines += [""] + [f"note    {n}" for n in r["notes"]]
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR|NAME",
                   help="target (default: the shipped tinybard; stories260k while it is absent)")
    p.add_argument("--draft", metavar="DIR|NAME|none",
                   help=f"draft model (default: the shipped {DEFAULT_DRAFT}); 'none': oracle drafts only")
    p.add_argument("--tokens", type=int, help="new tokens per run (default 64; --quick 32)")
    p.add_argument("--stages", default="1,2", help="stage counts (default 1,2)")
    p.add_argument("--p", default=None, help="oracle acceptance probabilities (default 0.2,0.4,0.6,0.8,0.95; "
                                             "--quick 0.4,0.95)")
    p.add_argument("--runtime", choices=("process", "local"), default="process",
                   help="process: real stage processes, wall clock (default); local: virtual clock, calibrated here")
    p.add_argument("--hop-us", type=float, help="local runtime: one-way hop latency in µs (default: the cost model's)")
    p.add_argument("--k", type=int, default=4, help="speculative: drafted tokens per verification (default 4)")
    p.add_argument("--tree-schedule", default=",".join(map(str, SPECINFER_SCHEDULE)),
                   help="tree: children per leaf at each depth (default SpecInfer's 1,1,3,1,1,1,1,1)")
    p.add_argument("--tree-budget", type=int, help="tree: best-first growth up to N nodes instead of the schedule")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several (default 'Once upon a time')")
    p.add_argument("--repeats", type=int, help="rounds on the process runtime (default 3; --quick 2)")
    p.add_argument("--verify-rows", default="1,2,4,8,16", help="k for the verify-cost table (default 1,2,4,8,16)")
    p.add_argument("--verify-passes", type=int,
                   help="passes over the verify-cost table before the rounds (2 timings each; one more pass "
                        "follows every round; default 3, --quick 2)")
    p.add_argument("--seed", type=int, default=0, help="oracle coin seed (default 0)")
    p.add_argument("--quick", action="store_true", help="fewer tokens, p values and rounds: under a minute")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.stages = parse_list(args.stages, int)
    args.p = parse_list(args.p or ("0.4,0.95" if args.quick else "0.2,0.4,0.6,0.8,0.95"))
    args.schedule = tuple(parse_list(args.tree_schedule, int))
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.verify_rows = parse_list(args.verify_rows, int)
    if 1 not in args.verify_rows:
        args.verify_rows = [1] + args.verify_rows
    args.verify_passes = args.verify_passes or (2 if args.quick else 3)
    args.prompts = args.prompt or ["Once upon a time"]
    if not all(0.0 <= x <= 1.0 for x in args.p):
        p.error("--p values must be probabilities")

    load_before = os.getloadavg()
    try:
        report = run(args)
    except MinipipeError as e:  # a missing model, a draft with another tokenizer, ...: one line
        print(f"bench_speculation: error: {e}", file=sys.stderr)
        return 1
    report.update({"machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "blas_threads": blas.get_threads(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()})
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
