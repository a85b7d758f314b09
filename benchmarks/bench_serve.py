"""What HTTP costs: `minipipe serve` under 1, 4 and 16 concurrent clients, beside `minipipe generate --requests`.

    python benchmarks/bench_serve.py                                   # shipped pair, every strategy
    python benchmarks/bench_serve.py --strategies pipeline,specpipe --concurrency 1,4
    python benchmarks/bench_serve.py --model smollm2-135m --draft ngram --max-tokens 16 --rounds 1
    python benchmarks/bench_serve.py --quick                           # pipeline and specpipe, 1 and 4 clients

A bounded load generator on localhost. For each strategy one server starts (2 stages, its stages
started once), gets one warm-up request, then for each concurrency c, c client threads each send
`--rounds` streamed completions one after another (closed loop: at most c requests in the server,
which runs up to 16 at once, so none queues), every request its own prompt, `--max-tokens` tokens
with `ignore_eos` (a fixed length). The same c × rounds requests then go through
`minipipe generate --requests FILE --max-running c` (one engine in one process, no HTTP, all
requests arriving at once, c decoded at a time: the same concurrency). Columns:

* **tok/s** — generated tokens of all requests / (last token − first request sent); for
  `generate`, its summary's figure (first arrival to last finish). **HTTP/gen** — their ratio
  (the median of the ratios of runs made one after the other).
* **TTFT** — time to first token, median over requests: HTTP from sending the request to
  receiving the first token's chunk (client side: parsing, tokenizing, the engine thread's
  hand-off and the response path included); `generate` from the request's admission (its
  time to first token less its queueing, as a closed-loop client would not queue).
* **TBT** — time between tokens: per request, (last token − first token) / (tokens − 1), the
  mean over requests; a group of tokens committed together counts as one gap and zero gaps.
* **exact** — every request's token ids from the server equal `generate`'s for it.

Each row is the median of `--repeats` runs of each way, interleaved (the order alternating).
A 2-core machine runs the server, its stages and the clients together: compare figures within a
run. Bounded: every request and run has a timeout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_name  # noqa: E402

PROMPTS = ["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING RICHARD III:\n", "First Citizen:\n", "MENENIUS:\n",
           "LADY MACBETH:\n", "PETRUCHIO:\n", "PORTIA:\n", "BRUTUS:\n", "OTHELLO:\n", "PROSPERO:\n",
           "Tell me about the weather.", "What is the capital of France?", "Write a short poem.", "Hello!"]
STRATEGIES = ("pipeline", "speculative", "tree", "pipeinfer", "specpipe")
MINIPIPE = [sys.executable, "-m", "minipipe"]


class Server:
    """`minipipe serve --port 0` in a subprocess, for one strategy."""

    def __init__(self, args: list[str], timeout: float = 300):
        self.proc = subprocess.Popen([*MINIPIPE, "serve", "--port", "0", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        for line in self.proc.stderr:
            match = re.search(r"serving .* on http://([\d.]+):(\d+)", line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"the server did not start: {self.proc.wait()}")
        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()

    def stream(self, prompt: str, max_tokens: int) -> dict:
        """One streamed completion: send time, each token's arrival time, token ids."""
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                           "return_token_ids": True})
        sent = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
            times, ids = [], []
            while True:
                line = response.fp.readline()  # the raw chunked body: each event is one chunk
                if not line or line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: "):
                    new = json.loads(line[6:])["choices"][0].get("token_ids") or []
                    now = time.perf_counter()
                    times += [now] * len(new)
                    ids += new
        finally:
            conn.close()
        return {"sent": sent, "times": times, "ids": ids}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def load(server: Server, prompts: list[str], clients: int, max_tokens: int) -> list[dict]:
    """`clients` threads share the prompts, each sending its own one after another."""
    results: list = [None] * len(prompts)

    def client(k: int) -> None:
        for i in range(k, len(prompts), clients):
            results[i] = server.stream(prompts[i], max_tokens)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if any(r is None for r in results):
        raise SystemExit("a client did not finish")
    return results


def http_figures(results: list[dict]) -> dict:
    tokens = sum(len(r["ids"]) for r in results)
    span = max(r["times"][-1] for r in results) - min(r["sent"] for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results]
    tbt = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
    return {"tok_s": tokens / span, "ttft_s": statistics.median(ttft), "tbt_s": statistics.mean(tbt) if tbt else None}


def generate_requests(model_args: list[str], strategy_args: list[str], prompts: list[str], clients: int,
                      max_tokens: int) -> tuple[dict, dict]:
    """The same requests through `minipipe generate --requests` (c at a time): figures, tokens by id."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        out = subprocess.run([*MINIPIPE, "generate", "--requests", str(path), "--json", "--quiet", "--ignore-eos",
                              "--max-new-tokens", str(max_tokens), "--max-running", str(clients), *model_args,
                              *strategy_args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"minipipe generate --requests failed: {out.stderr.strip()}")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    summary = lines[-1]["summary"]
    per = lines[:-1]
    ttft = [d["metrics"]["time_to_first_token_s"] - d["metrics"]["queued_s"] for d in per]
    tbt = [d["metrics"]["inter_token_latency_s"]["mean"] for d in per if d["metrics"]["inter_token_latency_s"]["mean"]]
    figures = {"tok_s": summary["tokens_per_s"], "ttft_s": statistics.median(ttft),
               "tbt_s": statistics.mean(tbt) if tbt else None}
    return figures, {d["id"]: d["tokens"] for d in per}


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs if r[k] is not None) if any(r[k] is not None for r in runs)
            else None for k in runs[0]}


def ms(x) -> str:
    return "—" if x is None else f"{x * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped tinybard)")
    parser.add_argument("--draft", help="draft for speculative strategies: a model or 'ngram' (default: the shipped "
                                        "draft for the shipped model)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per request (ignore_eos)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each way per row, interleaved; medians reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="pipeline and specpipe, 1 and 4 clients, 1 round")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        strategies, concurrency, args.rounds, args.repeats = ["pipeline", "specpipe"], [1, 4], 1, 1
    model_args = ["--model", args.model] if args.model else []
    rows = []
    print(f"# minipipe serve vs generate --requests: {args.model or 'tinybard'}, {args.stages} stages, "
          f"{args.max_tokens} tokens per request, {args.rounds} request(s) per client, medians of {args.repeats} "
          f"interleaved runs; {cpu_name()}\n")
    print("| strategy | clients | HTTP tok/s | gen tok/s | HTTP/gen | HTTP TTFT ms | gen TTFT ms | HTTP TBT ms | "
          "gen TBT ms | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for strategy in strategies:
        strategy_args = ["--strategy", strategy, "--stages", str(args.stages)]
        if strategy != "pipeline" and args.draft:
            strategy_args += ["--draft-model", args.draft]
        server = Server([*model_args, *strategy_args])
        try:
            server.stream(PROMPTS[0], 4)  # warm-up
            for c in concurrency:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c * args.rounds)]
                hs, gs, exact = [], [], True
                for rep in range(args.repeats):  # interleaved, the order alternating, to spread drift
                    for way in (("http", "gen") if rep % 2 == 0 else ("gen", "http")):
                        if way == "http":
                            results = load(server, prompts, c, args.max_tokens)
                            hs.append(http_figures(results))
                        else:
                            g, tokens = generate_requests(model_args, strategy_args, prompts, c, args.max_tokens)
                            gs.append(g)
                    exact &= all(r["ids"] == tokens[i] for i, r in enumerate(results))
                h, g = medians(hs), medians(gs)
                ratio = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(hs, gs))
                rows.append({"strategy": strategy, "clients": c, "http": hs, "generate": gs, "exact": exact})
                print(f"| {strategy} | {c} | {h['tok_s']:.1f} | {g['tok_s']:.1f} | {ratio:.2f} | "
                      f"{ms(h['ttft_s'])} | {ms(g['ttft_s'])} | {ms(h['tbt_s'])} | {ms(g['tbt_s'])} | "
                      f"{'yes' if exact else 'NO'} |", flush=True)
        finally:
            code = server.stop()
            if code != 0:
                print(f"(the {strategy} server exited with status {code})", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not all(r["exact"] for r in rows):
        raise SystemExit("some request's tokens differ between the server and generate --requests")


if __name__ == "__main__":
    main()
