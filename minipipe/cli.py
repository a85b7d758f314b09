"""The `minipipe` command line.

    minipipe generate "Once upon a time" --model DIR --max-new-tokens 64
    minipipe generate --prompt-ids 1,403,407 --model DIR --json
    minipipe doctor
    minipipe pull smollm2-135m

Text streams to stdout; progress and the summary go to stderr. User errors print one line
(`minipipe: error: ...`) and exit with status 1; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .errors import InputError, MinipipeError

STRATEGIES = ("greedy", "sequential", "pipeline", "speculative", "tree", "pipeinfer", "specpipe")
ORACLES = ("greedy", "sequential")  # one process, one token at a time: the oracle (named "sequential" when sampling)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


class _JoinSources(argparse.Action):
    """`--draft-model` given more than once: the sources are merged (spelled A+B internally)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if given is None else f"{given}+{values}")


def add_speculation_flags(parser: argparse.ArgumentParser) -> None:
    """The draft and speculation flags (`generate` and `serve` share them)."""
    spec = parser.add_argument_group("speculation (speculative, tree, pipeinfer, specpipe)")
    spec.add_argument("--draft", metavar="N|SOURCE", action="append",
                      help="may be given more than once. A number: the most tokens drafted per verification or run "
                           "(default 4); otherwise a draft source, as for --draft-model")
    spec.add_argument("--draft-model", metavar="SOURCE", action=_JoinSources,
                      help="where drafts come from: a checkpoint directory or model name sharing the target's "
                           "tokenizer (default: the shipped tinybard-draft), 'ngram' (prompt lookup, no model), "
                           "'self:K' (the target's own first K layers, final norm and head, sharing its weights; "
                           "'self': half the layers), or 'oracle:P' (the target's own tokens, each right with "
                           "probability P: for tests and benchmarks; oracle:P:SEED draws other coins). Given more than once, the sources are merged "
                           "(SpecInfer's merge-based token trees; docs/drafts.md)")
    spec.add_argument("--draft-lane", choices=("own", "head"), default="own",
                      help="where the draft runs. own (default): on a lane of its own, so decoders draft ahead "
                           "while the head waits for the pipeline (SpecPipe's next layer, PipeInfer's next run): on "
                           "the local runtime a lane of the virtual clock, on the process runtime a draft server "
                           "process when the machine has a core to spare for it; head: in the head, on its "
                           "critical path")
    spec.add_argument("--p-accept", type=float, metavar="P",
                      help="how sure the draft must be, by its calibrated confidence (this request's measured "
                           "acceptance of guesses like it; docs/drafts.md). speculative: extend the chain while the "
                           "chance that all of it is accepted is at least P (default 0.3); tree: add children at "
                           "least this probable (default 0); pipeinfer: the drafting cutoff (default 0.3); specpipe: "
                           "beyond the best node of a layer, add nodes at least this likely to become the tip "
                           "(default 0.3). Drafts that are not accepted make speculation back off by itself")
    spec.add_argument("--p-split", type=float, default=0.1, metavar="P",
                      help="pipeinfer: an alternative above P opens a new branch, up to --branches (default 0.1)")
    spec.add_argument("--p-recovery", type=float, default=0.0, metavar="P",
                      help="pipeinfer: raise the cutoff by P per run launched in one burst, so long-diverged "
                           "speculation stops (default 0)")
    spec.add_argument("--p-decay", type=float, default=0.0, metavar="P",
                      help="pipeinfer: lower the cutoff by P per empty drafting attempt, to fill idle time (default 0)")
    spec.add_argument("--branches", type=int, default=1, metavar="N",
                      help="pipeinfer: most branches per speculative run (default 1; the original suggests 3-4 at most)")
    spec.add_argument("--max-inflight", type=int, metavar="N",
                      help="pipeinfer: most runs in flight at once (default twice the stages)")
    spec.add_argument("--width", type=int, default=4, metavar="W",
                      help="specpipe: most nodes per new tree layer, the width budget (default 4). Wider trees hit "
                           "more often but cost more rows per step")
    spec.add_argument("--tree-schedule", metavar="K1,K2,...", default="1,1,3,1,1,1,1,1",
                      help="tree: children per leaf at each depth (default SpecInfer's 1,1,3,1,1,1,1,1)")
    spec.add_argument("--tree-budget", type=int, metavar="N",
                      help="tree: grow best-first by path probability up to N nodes instead of a schedule")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Sampling flags (defaults: the checkpoint's generation_config.json, read as transformers does)."""
    group = parser.add_argument_group("sampling (exact: every strategy emits the tokens of sequential sampling "
                                      "with the same seed)")
    group.add_argument("--temperature", type=float, metavar="T",
                       help="0: greedy; above 0: sample from softmax(logits / T) (default: the checkpoint's "
                            "generation_config.json when it samples, else 0)")
    group.add_argument("--top-k", type=int, metavar="K", help="sample among the K most probable tokens (0: all)")
    group.add_argument("--top-p", type=float, metavar="P",
                       help="sample among the fewest most probable tokens holding probability P (1: all)")
    group.add_argument("--min-p", type=float, metavar="P",
                       help="sample among tokens at least P times as probable as the most probable (0: all)")
    group.add_argument("--seed", type=int, metavar="N",
                       help="the sampling seed: the same seed gives the same text with every strategy "
                            "(default: a random one, reported on stderr and in --json metrics)")
    group.add_argument("--verify", choices=("coupled", "independent", "mss"), default="coupled",
                       help="speculative and tree, when sampling: coupled (default: the draft ranks with the "
                            "target's own noise, drafts are accepted when they equal the target's sample: the "
                            "text equals sequential sampling), independent (the draft samples with noise of its "
                            "own, same acceptance rule, same text), or mss (SpecInfer's multi-step speculative "
                            "sampling on independent drafts: the same distribution, not the same text)")


def sampling_from_args(args, model_dir):
    """The run's Sampling: the checkpoint's defaults, overridden by the flags given."""
    from dataclasses import replace

    from .sampling import from_generation_config

    base = from_generation_config(model_dir)
    given = {f: getattr(args, f) for f in ("temperature", "top_k", "top_p", "min_p") if getattr(args, f) is not None}
    return replace(base, **given).with_seed(args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minipipe",
        description="A pure-NumPy Llama engine with exact pipelined speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate", help="generate text from a prompt",
        description="Generate a continuation of PROMPT with greedy decoding (or another --strategy; "
                    "every strategy emits exactly the greedy tokens). Text streams to stdout.")
    gen.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text (BOS is added if the model wants it)")
    gen.add_argument("--model", metavar="DIR|NAME",
                     help="checkpoint directory in the Hugging Face Llama layout (config.json, "
                          "*.safetensors, tokenizer.json), or the name of a shipped or pulled model "
                          "(default: the shipped tinybard model)")
    gen.add_argument("--prompt-ids", metavar="IDS", help="raw prompt token ids, e.g. 1,403,407 (no BOS is added)")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="stop after N generated tokens (default: 64); generation also stops at an "
                          "end-of-sequence token or when the context is full")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="do not stop at end-of-sequence tokens: generate --max-new-tokens tokens (unless the "
                          "context fills), as benchmarks want (llama.cpp's --ignore-eos)")
    gen.add_argument("--strategy", choices=STRATEGIES, default="greedy",
                     help="decoding strategy: greedy, or its other name sequential (single process, one token "
                          "at a time: the oracle; default), pipeline "
                          "(plain pipeline parallelism over --stages processes), speculative (draft a chain, "
                          "verify it in one pass), tree (SpecInfer: draft a token tree, verify it in one pass), pipeinfer "
                          "(asynchronous continuous speculation with early cancellation), specpipe (a token tree that "
                          "fills the pipeline one layer per step, with pruning). "
                          "Every strategy emits exactly the oracle's tokens, greedy or sampled with a seed")
    gen.add_argument("--stages", type=int, metavar="N",
                     help="pipeline stages, one OS process each (default: 2 for pipelined strategies)")
    gen.add_argument("--split", metavar="A,B,...",
                     help="layers per stage, e.g. 3,5 (default: an even split over --stages)")
    gen.add_argument("--runtime", choices=("process", "local", "mpi"), default="process",
                     help="process: one OS process per stage over shared-memory rings (default); local: "
                          "all stages in one process on a virtual clock (see --cost; reported times are simulated); "
                          "mpi: the head on MPI rank 0 and one rank per stage, on this machine or others "
                          "(--hostfile, --hosts; needs minipipe[mpi]). Started by hand it runs mpiexec itself; "
                          "under mpiexec -n S+1 every other rank is a stage (docs/multihost.md)")
    gen.add_argument("--cost", choices=("fixed", "calibrated"),
                     help="local runtime: what the virtual clock charges. fixed (default): costs computed from the "
                          "models' shapes on a nominal CPU, the same on every machine, so the same command prints "
                          "the same timeline and times everywhere; calibrated: measured on this machine at start")
    gen.add_argument("--slow-link-ms", type=float, default=0.0, metavar="MS",
                     help="local runtime: add MS milliseconds to every hop between stages, to study a slow "
                          "interconnect (default 0)")
    gen.add_argument("--link-delay-ms", type=float, default=0.0, metavar="MS",
                     help="process and mpi runtimes: every hop (head to stage 0, stage to stage, last stage to "
                          "head; on mpi also cancellations) delivers each message MS milliseconds after it was "
                          "sent, for real, to check --slow-link-ms predictions (default 0)")
    gen.add_argument("--hostfile", metavar="FILE",
                     help="mpi runtime: hosts for the stage ranks, one per line (HOST or HOST:SLOTS, as mpiexec "
                          "reads them); the head runs on this machine")
    gen.add_argument("--hosts", metavar="H1,H2,...",
                     help="mpi runtime: comma-separated hosts for the stage ranks (instead of --hostfile)")
    gen.add_argument("--stage-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="process and mpi runtimes: stop with an error naming the stage when a stage has work waiting "
                          "but shows no sign of life for SECONDS (stopped, deadlocked), ending every process "
                          "(default 60; 0: never). A stage busy with a long prompt shows progress after "
                          "every layer, so it is not mistaken for a stalled one")
    gen.add_argument("--trace", metavar="FILE",
                     help="write a Chrome trace-event JSON of every stage's work (open in ui.perfetto.dev)")
    gen.add_argument("--timeline", action="store_true",
                     help="print a text timeline of the stages' work on stderr at the end, with a legend")
    gen.add_argument("--timeline-width", type=int, default=100, metavar="N",
                     help="columns of the --timeline (default 100; at least 20)")
    gen.add_argument("--html", metavar="FILE",
                     help="write a self-contained HTML page that replays the run step by step (stages over time, "
                          "runs, hops, commits, the cancellation map, each stage's KV cells, the token tree)")
    gen.add_argument("--json", action="store_true",
                     help='print one JSON object {"tokens": [...], "text": ..., "metrics": {...}} instead of streaming')
    gen.add_argument("--threads", type=int, default=1, metavar="N",
                     help="threads for the decode steps' matrix-vector products (default 1), each splitting the "
                          "columns at places that keep the bits of one thread; prefill always uses 1 so the "
                          "prompt's K/V match every other strategy's. Greedy: in its one process; a pipelined "
                          "strategy (process runtime): in each stage process")
    gen.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    add_sampling_flags(gen)
    gen.add_argument("--requests", metavar="FILE",
                     help="serve the requests of a JSON Lines file instead of one PROMPT: one object per line, "
                          '{"id": ..., "prompt": "..."} or {"prompt_ids": [...]}, optional "max_new_tokens" and '
                          '"arrival_s" (seconds after the start). Their rows share the pipeline\'s micro-batches '
                          "(continuous batching); each request's tokens equal its greedy decoding alone. With --json, "
                          "one object per finished request, then {\"summary\": ...}")
    gen.add_argument("--max-running", type=int, metavar="N",
                     help="requests decoded at once (default 16 with --requests); the others wait")
    gen.add_argument("--kv-cells", type=int, metavar="N",
                     help="KV budget in cells per stage: a request starts only when the cells it may need "
                          "(prompt, token budget, its strategy's speculation) fit beside the running ones "
                          "(default: no limit)")

    add_speculation_flags(gen)
    gen.add_argument("--chat", action="store_true",
                     help="treat PROMPT as a user message and apply the model's chat template "
                          "(chat_template in tokenizer_config.json) before tokenizing")

    doc = sub.add_parser(
        "doctor", help="check the exact-kernel policy on this machine",
        description="Check that a token's logits do not depend on the batch it is computed in "
                    "(the exactness contract), report the kernel policy and BLAS in force, and "
                    "measure what the policy costs against plain batched BLAS.")
    doc.add_argument("--model", metavar="DIR|NAME", help="also check this checkpoint (default: random models only)")
    doc.add_argument("--quick", action="store_true", help="fewer cases, shorter timings")

    from .pull import add_pull_parser

    add_pull_parser(sub)
    from .serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values no run could use, before any work: probabilities outside [0, 1] (NaN
    included), a --slow-link-ms that is not a finite number >= 0, a --trace file that cannot be
    written (found out now rather than after the whole run)."""
    for flag, value in (("--p-accept", args.p_accept), ("--p-split", args.p_split),
                        ("--p-recovery", args.p_recovery), ("--p-decay", args.p_decay)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InputError(f"{flag} must be between 0 and 1, got {value}")
    if not (math.isfinite(args.slow_link_ms) and args.slow_link_ms >= 0):
        raise InputError(f"--slow-link-ms must be a finite number of milliseconds >= 0, got {args.slow_link_ms}")
    link_delay = getattr(args, "link_delay_ms", 0.0)
    if not (math.isfinite(link_delay) and link_delay >= 0):
        raise InputError(f"--link-delay-ms must be a finite number of milliseconds >= 0, got {link_delay}")
    if args.trace:
        _check_writable(args.trace, "--trace")
    if getattr(args, "html", None):
        _check_writable(args.html, "--html")
    if getattr(args, "timeline_width", 100) < 20:
        raise InputError(f"--timeline-width must be at least 20, got {args.timeline_width}")


def _check_writable(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, by trying: open it for appending (which
    leaves an existing file as it is; without blocking, should it be a FIFO with no reader yet),
    and remove it again if this created it."""
    existed = os.path.lexists(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666))
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if not existed:
        os.remove(path)


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .greedy import check_prompt
    from .paths import resolve_model
    from .tokenizer import Tokenizer

    if args.requests is not None:
        if args.prompt is not None or args.prompt_ids is not None or args.chat:
            raise InputError("--requests takes the prompts from the file: no PROMPT, --prompt-ids or --chat")
        return cmd_requests(args)
    if args.prompt is None and args.prompt_ids is None:
        raise InputError("give a PROMPT, --prompt-ids or --requests")
    if args.prompt is not None and args.prompt_ids is not None:
        raise InputError("give either a PROMPT or --prompt-ids, not both")
    if args.max_new_tokens < 0:
        raise InputError("--max-new-tokens must be >= 0")
    _check_flags(args)
    args.model = resolve_model(args.model)
    config = load_config(args.model)
    tokenizer = None
    try:
        tokenizer = Tokenizer(args.model, config.eos_ids)
    except MinipipeError:
        if args.prompt_ids is None:
            raise
    text = args.prompt
    if args.chat:
        if args.prompt is None or tokenizer is None:
            raise InputError("--chat needs a PROMPT and the model's tokenizer (not --prompt-ids)")
        from .chat import chat_prompt

        text = chat_prompt(tokenizer, args.prompt)
    prompt_ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else tokenizer.encode(text)
    check_prompt(prompt_ids, config.vocab_size, config.max_positions)
    show_progress = not args.quiet and sys.stderr.isatty()
    eos_ids = () if args.ignore_eos else tokenizer.eos_ids if tokenizer is not None else config.eos_ids

    stream = tokenizer.stream(prompt_ids) if tokenizer is not None and not args.json else None
    bar = None
    if show_progress and args.json:
        from tqdm import tqdm
        bar = tqdm(total=args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False)

    def on_token(token: int) -> None:
        if stream is not None:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
        elif tokenizer is None and not args.json:
            sys.stdout.write(f"{token} ")
            sys.stdout.flush()
        if bar is not None:
            bar.update(1)

    from .request import Request

    sampling = sampling_from_args(args, args.model)
    request = Request("0", prompt_ids, args.max_new_tokens, eos_ids, on_token=on_token, sampling=sampling)
    result = _run_strategy(args, config, [request], show_progress)[0].result()
    if args.strategy not in ORACLES:
        result.metrics.extra["runtime"] = args.runtime
        result.metrics.extra["n_stages"] = args.n_stages_used
    if bar is not None:
        bar.close()
    metrics = result.metrics.to_dict()
    metrics["strategy"] = args.strategy
    metrics["stop_reason"] = result.stop_reason
    if args.json:
        text = None
        if tokenizer is not None:
            full = tokenizer.decode(prompt_ids + result.tokens)
            text = full[len(tokenizer.decode(prompt_ids)):]
        print(json.dumps({"tokens": result.tokens, "text": text, "metrics": metrics}))
    else:
        if stream is not None:
            sys.stdout.write(stream.flush())
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            sampled = f", sampled with {sampling.to_dict()}" if request.samples else ""
            print(f"[{args.strategy}] {result.metrics.summary()}, stopped by {result.stop_reason}{sampled}",
                  file=sys.stderr)
            if "speculation" in result.metrics.extra:
                print(f"[{args.strategy}] {result.metrics.extra['speculation'].summary()}", file=sys.stderr)
    if args.timeline:
        print(args.tracer.timeline(getattr(args, "timeline_width", 100)), file=sys.stderr)
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    """`generate --requests FILE`: serve every request of the file through one engine."""
    from .config import load_config
    from .paths import resolve_model
    from .requests_file import read_requests
    from .tokenizer import Tokenizer

    if args.max_new_tokens < 0:
        raise InputError("--max-new-tokens must be >= 0")
    _check_flags(args)
    args.model = resolve_model(args.model)
    config = load_config(args.model)
    try:
        tokenizer = Tokenizer(args.model, config.eos_ids)
    except MinipipeError:
        tokenizer = None  # prompt_ids only
    eos_ids = () if args.ignore_eos else tokenizer.eos_ids if tokenizer is not None else config.eos_ids
    requests = read_requests(args.requests, tokenizer, config.vocab_size, config.max_positions, args.max_new_tokens,
                             eos_ids, sampling_from_args(args, args.model), args.seed)
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr, leave=False)

    def text_of(request) -> str | None:
        if tokenizer is None:
            return None
        return tokenizer.decode(request.prompt + request.sink.tokens)[len(tokenizer.decode(request.prompt)):]

    def report(request) -> None:
        result = request.result()
        if bar is not None:
            bar.update(1)
        metrics = result.metrics.to_dict()
        metrics["stop_reason"] = result.stop_reason
        if args.json:
            print(json.dumps({"id": request.id, "tokens": result.tokens, "text": text_of(request), "metrics": metrics}),
                  flush=True)
        else:
            text = text_of(request)
            print(f"--- request {request.id}: {len(result.tokens)} tokens, stopped by {result.stop_reason}")
            print(text if text is not None else " ".join(map(str, result.tokens)), flush=True)

    _run_strategy(args, config, requests, bar is not None, on_finish=report)
    if bar is not None:
        bar.close()
    summary = summary_of(requests, args)
    if args.json:
        print(json.dumps({"summary": summary}))
    elif not args.quiet:
        print(f"[{args.strategy}] {summary['requests']} requests, {summary['generated_tokens']} tokens in "
              f"{summary['span_s']:.3f} s: {summary['tokens_per_s']} tok/s, {summary['requests_per_s']} req/s; "
              f"time to first token p50 {summary['time_to_first_token_s']['p50']} s", file=sys.stderr)
    if args.timeline:
        print(args.tracer.timeline(getattr(args, "timeline_width", 100)), file=sys.stderr)
    return 0


def summary_of(requests, args) -> dict:
    """Aggregate figures of finished requests (the engine's summary, for every strategy)."""
    from .engine import summarize

    out = summarize(requests)
    out["strategy"] = args.strategy
    if args.strategy not in ORACLES:
        out["runtime"], out["n_stages"] = args.runtime, args.n_stages_used
    return out


def _run_strategy(args, config, requests, show_progress, on_finish=None):
    """Serve `requests` with the chosen strategy on the chosen runtime; returns them finished.

    `greedy` is the single-process oracle: it decodes the requests one after another, as they
    arrive, each alone. Every other strategy goes through the engine.
    """
    from .model import load_stage

    if args.threads < 1:
        raise InputError("--threads must be >= 1")
    if args.max_running is not None and args.max_running < 1 or args.kv_cells is not None and args.kv_cells < 1:
        raise InputError("--max-running and --kv-cells must be >= 1")
    if args.strategy in ORACLES:
        if args.stages not in (None, 1) or args.split or args.trace or args.timeline or getattr(args, "html", None):
            raise InputError("--stages, --split, --trace, --timeline and --html need a pipelined --strategy")
        return _run_greedy(args, load_stage(args.model, progress=show_progress), requests, on_finish)
    if args.threads != 1 and args.runtime != "process":
        raise InputError("--threads with a pipelined strategy needs --runtime process (each stage's decode GEMVs "
                         "on N threads)")

    split = None
    if args.split:
        try:
            split = [int(n) for n in args.split.split(",")]
        except ValueError:
            raise InputError(f"--split must be comma-separated layer counts, got {args.split!r}") from None
    n_stages = args.stages if args.stages is not None else (len(split) if split else 2)
    if args.runtime == "mpi" and args.stages is None and not split:
        from .runtime.mpi import world_size

        n_stages = world_size() - 1  # every other rank of the job is a stage
    link_delay_ms = getattr(args, "link_delay_ms", 0.0)
    if link_delay_ms and args.runtime == "local":
        raise InputError("--link-delay-ms needs --runtime process or mpi (the local runtime's is --slow-link-ms)")
    if (getattr(args, "hostfile", None) or getattr(args, "hosts", None)) and args.runtime != "mpi":
        raise InputError("--hostfile and --hosts need --runtime mpi")
    stage_models = None
    if args.runtime == "local":  # the stages live in this process: a self:K draft shares their weights
        from .runtime import load_stage_models, split_layers

        stage_models = load_stage_models(args.model, split_layers(config.n_layers, n_stages, split))
    server = None
    if _wants_draft_server(args, n_stages):  # the draft in a process of its own, fed over a pipe
        from .draft_server import DraftServer

        server = DraftServer(_draft_spec(args)[0], args.model)
    try:
        strategy = _make_strategy(args, config, requests, stage_models, None if server is None else server.source)
        return _serve_requests(args, config, requests, strategy, n_stages, split, stage_models, link_delay_ms,
                               on_finish)
    finally:
        if server is not None:
            server.close()


def _wants_draft_server(args, n_stages: int) -> bool:
    """Process runtime, `--draft-lane own`: a draft server for the strategies that draft ahead of
    need (pipeinfer, specpipe) when the draft computes (a model or self:K; n-gram and oracle
    drafts cost too little to be worth a process) and the machine has a core to spare for it
    (more cores than the head and the stages: on fewer, the server's process takes its time from
    the stages; measured on 2 cores, 2 stages, 16 requests: SpecPipe-DB 430 tok/s with a server
    against 659 with the draft in the head, docs/benchmarks.md). The synchronous strategies draft
    in the head: they wait for every draft anyway, so a server would only add a round trip."""
    if args.runtime != "process" or getattr(args, "draft_lane", "own") != "own":
        return False
    if (os.cpu_count() or 1) < n_stages + 2:
        return False
    if args.strategy not in ("pipeinfer", "specpipe"):
        return False
    spec = _draft_spec(args)[0]
    return spec is None or any(part != "ngram" and not part.startswith("oracle") for part in spec.split("+"))


def _draft_spec(args) -> tuple[str | None, int | None]:
    """The draft source's spelling (sources joined by '+'; None: the default draft) and the number
    given to --draft, if any."""
    sources = [] if args.draft_model is None else [args.draft_model]
    n_draft = None
    for value in args.draft or []:
        if value.isdigit():
            n_draft = int(value)
        else:
            sources.append(value)
    return ("+".join(sources) if sources else None), n_draft


def _serve_requests(args, config, requests, strategy, n_stages, split, stage_models, link_delay_ms, on_finish):
    """Open the pipeline and serve `requests` with `strategy` through one engine."""
    from .engine import Engine
    from .model import load_stage
    from .runtime import open_pipeline
    from .strategies import largest_run
    from .trace import TracedDraft, TracedPipeline, Tracer

    max_running = args.max_running or (16 if args.requests else 1)
    html = getattr(args, "html", None)
    tracer = Tracer(enabled=bool(args.trace or args.timeline or html))
    cost = None
    if args.runtime == "local":
        from .runtime.cost import calibrate, fixed

        draft = getattr(strategy, "draft", None)
        models = [getattr(d, "model", None) for d in getattr(draft, "sources", [draft])]
        draft_model = next((m for m in models if m is not None), None)  # (merged: priced as its first model)
        if getattr(args, "cost", None) == "calibrated":
            cost = calibrate(load_stage(args.model), draft_model, repeats=2)
            how = "calibrated here"
        else:
            cost = fixed(config, None if draft_model is None else draft_model.config)
            how = "fixed costs, the same on every machine"
        cost = cost.with_hop_latency(args.slow_link_ms / 1e3)
        if not args.quiet:
            print(f"[local] virtual clock, {how}: {cost.describe()}", file=sys.stderr)
    elif args.slow_link_ms:
        raise InputError("--slow-link-ms needs --runtime local")
    elif getattr(args, "cost", None):
        raise InputError("--cost needs --runtime local")
    elif tracer.enabled and getattr(strategy, "draft", None) is not None:
        strategy.draft = TracedDraft(strategy.draft, tracer)  # drafting on the head's track, in real time
    if not (math.isfinite(args.stage_timeout) and (args.stage_timeout == 0 or args.stage_timeout >= 1)):
        raise InputError(f"--stage-timeout must be a number of seconds >= 1 (or 0: never), got {args.stage_timeout}")
    with open_pipeline(args.model, args.runtime, n_stages, split, Engine.n_seqs(strategy, max_running),
                       tracer=tracer, cost=cost, max_rows=largest_run(strategy, max_running),
                       stage_timeout=args.stage_timeout, cache_cells=args.kv_cells,
                       row_seqs=strategy.max_row_seqs(), logits_rows=max_running * strategy.logits_rows(),
                       link_delay=link_delay_ms / 1e3, models=stage_models,
                       draft_lane=getattr(args, "draft_lane", "own") == "own", gemv_threads=args.threads) as pipe:
        listeners = []
        recording = None
        if tracer.enabled:  # record what the head sends (KV edit labels, hops, the viewer's replay)
            pipe = TracedPipeline(pipe, tracer)
            listeners.append(pipe.observe)
            if html:
                from .viewer import Recording

                recording = Recording(pipe, args, requests)
                listeners.append(recording)
        if on_finish is not None:
            from .events import Finished

            by_id = {r.id: r for r in requests}
            listeners.append(lambda e: on_finish(by_id[e.request]) if isinstance(e, Finished) else None)
        engine = Engine(pipe, strategy, max_running, args.kv_cells, config.max_positions, listeners)
        for request in requests:
            engine.add(request)
        engine.run()
        args.n_stages_used = pipe.n_stages
    if args.trace:
        try:
            tracer.write_chrome(args.trace)
        except OSError as e:  # e.g. the disk filled up during the run
            raise InputError(f"--trace {args.trace}: could not write the trace ({e.strerror or e})") from None
    if recording is not None:
        try:
            recording.write_html(html)
        except OSError as e:
            raise InputError(f"--html {html}: could not write the page ({e.strerror or e})") from None
    args.tracer = tracer  # printed after the text
    return requests


def _run_greedy(args, model, requests, on_finish):
    """The oracle: each request decoded alone, one after another, in arrival order."""
    import time

    from . import kernels
    from .greedy import generate_greedy
    from .request import FINISHED

    kernels.set_gemv_threads(args.threads)
    t0 = time.perf_counter()
    try:
        for request in sorted(requests, key=lambda r: r.arrival_s):
            request.arrived_at = t0 + request.arrival_s
            time.sleep(max(0.0, request.arrived_at - time.perf_counter()))
            request.start(time.perf_counter(), model.config.max_positions, time.perf_counter)
            result = generate_greedy(model, request.prompt, request.max_new_tokens, request.stop_ids,
                                     on_token=request.on_token, sampling=request.sampling)
            request.sink.tokens, request.sink.stop_reason = result.tokens, result.stop_reason
            request.sink.metrics.token_times = [t + (request.admitted_s - request.arrived_at)
                                                for t in result.metrics.token_times]
            request.state, request.finished_s = FINISHED, time.perf_counter()
            if on_finish is not None:
                on_finish(request)
    finally:
        kernels.set_gemv_threads(1)
    return requests


def _make_strategy(args, config, requests, stage_models=None, draft=None):
    """The strategy object for --strategy, with its draft source; unset knobs take
    `strategies.default_settings` for the stage count (what the benchmark tables use).
    `stage_models`: the target's stages when they live in this process (a self:K draft shares
    their arrays); `draft`: the draft source if already made (a draft server's)."""
    from .strategies import (NEEDS_DRAFT, PipeInferStrategy, PipelineStrategy, SpecPipeStrategy, SpeculativeStrategy,
                             TreeStrategy, default_settings)

    if args.verify != "coupled" and args.strategy not in ("speculative", "tree"):
        raise InputError(f"--verify {args.verify} applies to --strategy speculative and tree")
    if args.strategy not in NEEDS_DRAFT:
        if args.draft or args.draft_model or args.tree_budget:
            raise InputError(f"--draft/--draft-model/--tree-budget need a speculative --strategy, not {args.strategy}")
        return PipelineStrategy()
    split = args.split.split(",") if getattr(args, "split", None) else None
    n_stages = args.stages or (len(split) if split else 2)
    defaults = default_settings(args.strategy, n_stages)
    source, n_draft = _draft_spec(args)
    n_draft = n_draft if n_draft is not None else defaults.get("k", defaults.get("n_draft", 4))
    p_accept = args.p_accept
    max_inflight = args.max_inflight if args.max_inflight is not None else defaults.get("max_inflight")
    if n_draft < 1 or args.branches < 1 or (max_inflight or 1) < 1:
        raise InputError("--draft, --branches and --max-inflight must be >= 1")
    if draft is None:
        draft = _make_draft(source, args.model, config, requests, stage_models)
    if args.verify == "mss" and not hasattr(draft, "sampling_distribution"):
        raise InputError(f"--verify mss needs a draft model (its distribution q), not {draft.name}")
    if args.strategy == "speculative":
        return SpeculativeStrategy(draft, k=n_draft, verify=args.verify,
                                   min_confidence=defaults["min_confidence"] if p_accept is None else p_accept)
    if args.strategy == "specpipe":
        if args.width < 1:
            raise InputError("--width must be >= 1")
        return SpecPipeStrategy(draft, width=args.width,
                                min_path=defaults["min_path"] if p_accept is None else p_accept)
    if args.strategy == "pipeinfer":
        return PipeInferStrategy(draft, p_accept=defaults["p_accept"] if p_accept is None else p_accept,
                                 p_split=args.p_split, p_recovery=args.p_recovery, p_decay=args.p_decay,
                                 n_draft=n_draft, branches=args.branches, max_inflight=max_inflight)
    try:
        schedule = [int(w) for w in args.tree_schedule.split(",")]
    except ValueError:
        raise InputError(f"--tree-schedule must be comma-separated widths, got {args.tree_schedule!r}") from None
    if any(w < 1 for w in schedule) or args.tree_budget is not None and args.tree_budget < 1:
        raise InputError("tree widths and --tree-budget must be >= 1")
    return TreeStrategy(draft, schedule=schedule, budget=args.tree_budget, verify=args.verify,
                        min_confidence=defaults["min_confidence"] if p_accept is None else p_accept)


def _make_draft(source, target_dir, config, requests, stage_models=None):
    """A draft source from its command-line spelling (see --draft-model; `draft.build_draft`)."""
    from .draft import build_draft
    from .model import load_stage

    truth_of = None
    if source is not None and any(part == "oracle" or part.startswith("oracle:") for part in source.split("+")):
        from .greedy import generate_greedy

        target = load_stage(target_dir)
        longest = max(r.max_new_tokens for r in requests)  # the oracle knows each request's own text
        stop_ids = requests[0].stop_ids

        def truth_of(prompt: list[int], sampling) -> list[int]:
            return generate_greedy(target, prompt, longest, stop_ids, sampling=sampling).tokens

    return build_draft(source, target_dir, config, stage_models, truth_of)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    from .paths import resolve_model

    return run_doctor(model_dir=None if args.model is None else resolve_model(args.model), quick=args.quick)


def _mpi_rank(argv: list[str]) -> int | None:
    """This process's MPI rank if it is part of an MPI job running `generate --runtime mpi`
    (decided before parsing: stage ranks take their orders from the head, and print nothing of
    their own), else None."""
    from .transport.mpi import env_rank

    rank = env_rank()
    if rank is None or not argv or argv[0] != "generate":
        return None
    mpi = "--runtime=mpi" in argv or any(a == "--runtime" and b == "mpi" for a, b in zip(argv, argv[1:]))
    return rank if mpi else None


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    if _mpi_rank(argv) not in (None, 0):
        from .runtime.mpi import stage_rank_main

        return stage_rank_main()
    # SIGTERM unwinds like Ctrl-C, so every `with` block (processes, shared memory) cleans up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error on an MPI job's head: the stage ranks wait for it
        if _mpi_rank(argv) == 0:
            from .runtime.mpi import WORLD, finish_head

            _guarded(lambda: WORLD.start() and 0)
            return finish_head(e.code if isinstance(e.code, int) else 2)
        raise
    if args.command == "generate" and args.runtime == "mpi":
        return _main_mpi(args, argv)
    return _run_command(args)


def _main_mpi(args, argv: list[str]) -> int:
    """`generate --runtime mpi`: the supervisor (started by hand: runs mpiexec on this same
    command) or the head (rank 0 under mpiexec), which ends the MPI job as it exits."""
    from .runtime import mpi

    if not mpi.under_mpi():
        def supervise() -> int:
            split = len(args.split.split(",")) if args.split else None
            return mpi.supervise(argv, args.stages or split or 2, args.hostfile, args.hosts)

        return _guarded(supervise)
    failed = _guarded(lambda: mpi.head_starts() or 0)  # mpi4py missing here: one line
    if failed:
        return failed
    try:
        code = _run_command(args)
    except SystemExit as e:  # SIGTERM (143) while running
        code = e.code if isinstance(e.code, int) else 1
        print("\nminipipe: interrupted", file=sys.stderr)
    return mpi.finish_head(code)


def _run_command(args) -> int:
    from .pull import cmd_pull
    from .serve import cmd_serve

    handlers = {"generate": cmd_generate, "doctor": cmd_doctor, "pull": cmd_pull, "serve": cmd_serve}
    return _guarded(lambda: handlers[args.command](args))


def _guarded(run) -> int:
    """Run a command; user errors and interruptions become one line and an exit status."""
    try:
        return run()
    except MinipipeError as e:
        print(f"minipipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nminipipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `minipipe generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
