"""`minipipe serve`: an OpenAI-compatible HTTP server over the engine (docs/serving.md).

    pip install 'minipipe[serve]'
    minipipe serve --strategy specpipe --stages 2 --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 20}'

The stages start once, when the server starts, and serve every request: requests share the
pipeline's micro-batches (continuous batching, `minipipe.engine`), and each request's tokens
are exactly those of greedy decoding of that request alone, whatever else the server is doing.

Pieces: `serve_protocol` (OpenAI's request and response shapes, no web framework),
`serve_engine` (the engine thread, tickets, metrics; the threading model is described there),
`serve_app` (the Starlette routes). This module parses the flags, starts the stages, runs
uvicorn, and shuts everything down: on SIGTERM (or Ctrl-C) it stops accepting, lets running
requests finish for `--grace-s` seconds, aborts the rest, ends every stage process and unlinks
every shared-memory segment, and exits 0.
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
from pathlib import Path

from .errors import InputError, MinipipeError

SERVE_STRATEGIES = ("pipeline", "speculative", "tree", "pipeinfer", "specpipe")
MISSING_EXTRA = ("minipipe serve needs the 'serve' extra (Starlette and uvicorn): pip install 'minipipe[serve]'")


def add_serve_parser(sub) -> None:
    """Register `minipipe serve` (imports nothing of the web stack: `--help` works without it)."""
    from .cli import STRATEGIES, add_speculation_flags

    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Start the pipeline's stages once and serve /v1/completions, /v1/chat/completions, "
                    "/v1/models, /health and /metrics (Prometheus) over HTTP. Concurrent requests share the "
                    "pipeline; each gets exactly the tokens of greedy decoding of that request alone. "
                    "Needs the 'serve' extra: pip install 'minipipe[serve]'. See docs/serving.md.")
    p.add_argument("--model", metavar="DIR|NAME", help="checkpoint directory or model name (default: the shipped "
                                                       "tinybard model)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the API (default: --model as given, or its directory's name)")
    p.add_argument("--strategy", choices=[s for s in STRATEGIES if s in SERVE_STRATEGIES], default="pipeline",
                   help="decoding strategy (default pipeline); every one emits exactly the greedy tokens")
    p.add_argument("--stages", type=int, default=2, metavar="N", help="pipeline stages, one process each (default 2)")
    p.add_argument("--split", metavar="A,B,...", help="layers per stage (default: an even split)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000,
                   help="port to listen on (default 8000; 0: any free port, printed at start)")
    p.add_argument("--max-running", type=int, default=16, metavar="N",
                   help="requests decoded at once (default 16); the others wait in the queue")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait beyond --max-running (default 64); more get HTTP 429 with Retry-After")
    p.add_argument("--kv-cells", type=int, metavar="N",
                   help="KV budget in cells per stage: a request starts when the cells it may need fit beside the "
                        "running ones; one that could never fit gets HTTP 400 (default: no limit)")
    p.add_argument("--grace-s", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: seconds running requests may take to finish before they are "
                        "aborted (default 10)")
    p.add_argument("--stage-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop the server when a stage shows no sign of life for SECONDS with work waiting "
                        "(default 60; 0: never)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the checkpoint's; a plain "
                        "'ROLE:\\ntext' transcript for checkpoints without one)")
    p.add_argument("--verify", choices=("coupled", "independent", "mss"), default="coupled",
                   help="speculative and tree, for sampled requests: how drafts are verified (as for generate; "
                        "coupled and independent keep the text of sequential sampling, mss keeps only its "
                        "distribution)")
    p.add_argument("--log-requests", action="store_true", help="log every HTTP request on stderr")
    add_speculation_flags(p)


def _check(args: argparse.Namespace) -> None:
    """Refuse flag values no server could use (one line each)."""
    if args.stages < 1:
        raise InputError("--stages must be >= 1")
    if args.max_running < 1 or args.max_queue < 0:
        raise InputError("--max-running must be >= 1 and --max-queue >= 0")
    if args.kv_cells is not None and args.kv_cells < 1:
        raise InputError("--kv-cells must be >= 1")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    if not (math.isfinite(args.grace_s) and args.grace_s >= 0):
        raise InputError(f"--grace-s must be a number of seconds >= 0, got {args.grace_s}")
    if not (math.isfinite(args.stage_timeout) and (args.stage_timeout == 0 or args.stage_timeout >= 1)):
        raise InputError(f"--stage-timeout must be a number of seconds >= 1 (or 0: never), got {args.stage_timeout}")
    for flag, value in (("--p-accept", args.p_accept), ("--p-split", args.p_split),
                        ("--p-recovery", args.p_recovery), ("--p-decay", args.p_decay)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InputError(f"{flag} must be between 0 and 1, got {value}")
    sources = [args.draft_model] + [d for d in args.draft or [] if not d.isdigit()]
    if any(s is not None and s.startswith("oracle") for s in sources):
        raise InputError("oracle drafts need every request in advance: use a draft model or 'ngram' with serve")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so a busy port is one clear line and --port 0 works)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.setblocking(False)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError(MISSING_EXTRA) from None
    from .cli import _make_strategy
    from .config import load_config
    from .engine import Engine
    from .paths import resolve_model
    from .runtime import open_pipeline
    from .serve_app import FALLBACK_CHAT_TEMPLATE, ServeState, create_app
    from .serve_engine import EngineHost, ServeMetrics
    from .strategies import largest_run
    from .tokenizer import Tokenizer

    _check(args)
    given = args.model
    args.model = model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir, config.eos_ids)  # the API speaks text: a tokenizer is needed
    chat_template, source = tokenizer.chat_template, "checkpoint"
    if args.chat_template:
        try:
            chat_template, source = Path(args.chat_template).read_text(encoding="utf-8"), args.chat_template
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--chat-template {args.chat_template}: cannot read it "
                             f"({getattr(e, 'strerror', None) or e})") from None
    elif not chat_template:
        chat_template, source = FALLBACK_CHAT_TEMPLATE, "fallback"
    split = None
    if args.split:
        try:
            split = [int(n) for n in args.split.split(",")]
        except ValueError:
            raise InputError(f"--split must be comma-separated layer counts, got {args.split!r}") from None
    strategy = _make_strategy(args, config, [])
    name = args.served_model_name or (str(given) if given is not None else model_dir.name)
    sock = _listen(args.host, args.port)
    failure: list[str] = []
    server = None

    def on_failure(message: str) -> None:  # the engine thread: a stage crashed or stalled
        failure.append(message)
        if server is not None:
            server.should_exit = True

    try:
        with open_pipeline(model_dir, "process", args.stages, split, Engine.n_seqs(strategy, args.max_running),
                           max_rows=largest_run(strategy, args.max_running), stage_timeout=args.stage_timeout,
                           cache_cells=args.kv_cells, row_seqs=strategy.max_row_seqs()) as pipe:
            metrics = ServeMetrics(info={"model": name, "strategy": args.strategy, "stages": pipe.n_stages})
            host = EngineHost(pipe, strategy, args.max_running, args.kv_cells, config.max_positions, metrics,
                              on_failure=on_failure)
            state = ServeState(host, metrics, tokenizer, name, {model_dir.name, str(model_dir)}, config.vocab_size,
                               config.max_positions, args.max_running + args.max_queue, chat_template, source,
                               args.kv_cells, _sampling_defaults(model_dir))
            server = _server_class()(uvicorn.Config(create_app(state), log_level="info" if args.log_requests else "warning",
                                            access_log=args.log_requests, lifespan="off",
                                            timeout_graceful_shutdown=args.grace_s + 5),
                             state, args.grace_s)
            host.start()
            where = sock.getsockname()
            print(f"minipipe: serving {name} ({args.strategy}, {pipe.n_stages} stages, chat template: {source}) "
                  f"on http://{where[0]}:{where[1]}", file=sys.stderr, flush=True)
            # uvicorn restores the previous handlers afterwards and re-raises the signal it caught:
            # an ignored SIGTERM makes that a no-op, so a SIGTERM ends the server with status 0
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                server.run(sockets=[sock])
            finally:
                host.stop()
    finally:
        sock.close()
    if failure:
        raise MinipipeError(f"the engine stopped: {failure[0]}")
    print("minipipe: server stopped; stages ended, shared memory released", file=sys.stderr, flush=True)
    return 0


def _sampling_defaults(model_dir):
    """The checkpoint's sampling defaults, as `minipipe generate` reads them (None in a build
    whose requests cannot sample: `serve_protocol.sampling_available`)."""
    from .serve_protocol import sampling_available

    if not sampling_available():
        return None
    from .sampling import from_generation_config

    return from_generation_config(model_dir)


def _server_class():
    """uvicorn's Server with a signal hook (made on first use: uvicorn is an optional extra)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, told when a signal asks it to stop: from then on the app refuses new
        requests (503) and the engine aborts what still runs after the grace period."""

        def __init__(self, config, state, grace_s: float):
            super().__init__(config)
            self.state, self.grace_s = state, grace_s

        def handle_exit(self, sig, frame) -> None:
            self.state.draining = True
            self.state.host.drain(self.grace_s)
            super().handle_exit(sig, frame)

    return Server
