"""MPI against the shared-memory rings, and real slow links against the virtual clock's prediction.

    python benchmarks/bench_mpi.py [--dim 384] [--messages 2000] [--tokens 32] [--json]

Needs `pip install 'minipipe[mpi]'`. Two tables, from one run on this machine:

1. **Per hop**: one-way latency (ping-pong, round trip / 2, median after a warm-up) and
   messages/s (a stream into a reader) for activation-sized records (1 and 16 rows of `--dim`
   float32 plus a 64-byte header), between two processes:
   * `ring` — the process runtime's shared-memory ring (benchmarks/bench_ring.py's functions);
   * `mpi` — the MPI runtime's way: non-blocking probe, receive, a sleep that grows from 50 to
     500 µs while nothing comes (`transport/mpi.py`), sends with `Isend`;
   * `mpi spin` — MPI's blocking `Send`/`Recv`, which spin: the lowest MPI latency, at the cost
     of a whole core per waiting rank (the runtime does not wait this way).
2. **Strategies on slow links**: tokens/s of `pipeline`, `speculative`, `pipeinfer` and
   `specpipe` with the shipped tinybard pair on 2 stages (`--runtime mpi`, 3 ranks), with 0, 1, 5
   and 10 ms of real delay on every hop (`--link-delay-ms`), next to the local runtime's
   prediction for the same settings (`--runtime local --cost calibrated --slow-link-ms`), and
   how far the prediction misses (predicted / measured).

This development machine has two cores, so a 3-rank run shares them with the head's drafting:
runs are kept short (`--tokens`), and the measured speeds include that contention, which the
virtual clock (one core per stage) does not model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STRATEGIES = ("pipeline", "speculative", "pipeinfer", "specpipe")
DELAYS_MS = (0, 1, 5, 10)


# ------------------------------------------------------------------------------------------------
# 1. per hop


def _mpi_hop_worker(n: int, n_bytes: int, mode: str) -> None:
    """Run under `mpiexec -n 2`: rank 0 measures, rank 1 echoes or sinks; prints JSON (rank 0)."""
    from minipipe.transport.channel import LinkDelay
    from minipipe.transport.mpi import DATA, Backoff, Outbox, import_mpi, receive_frames, send_frame

    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    payload = [np.zeros(n_bytes, dtype=np.uint8)]
    link, outbox, backoff, held = LinkDelay(0.0), Outbox(), Backoff(), []

    class Held(list):
        def append(self, item):
            super().append(item)

    held = Held()

    def recv_one(source: int) -> None:
        if mode == "spin":
            status = MPI.Status()
            comm.Probe(source, DATA, status)
            buf = bytearray(status.Get_count(MPI.BYTE))
            comm.Recv([buf, MPI.BYTE], source, DATA)
            return
        backoff.reset()
        while not held:
            if not receive_frames(comm, MPI, source, held):
                backoff.sleep()
        held.pop(0)

    def send_one(dest: int) -> None:
        if mode == "spin":
            comm.Send([bytes(8) + payload[0].tobytes(), MPI.BYTE], dest, DATA)
            return
        send_frame(comm, MPI, outbox, payload, dest, link)
        while len(outbox) > 4:
            outbox.progress()
        outbox.progress()

    comm.Barrier()
    if mode in ("poll", "spin"):  # latency
        if rank == 0:
            trips = []
            for _ in range(n):
                t = time.perf_counter()
                send_one(1)
                recv_one(1)
                trips.append(time.perf_counter() - t)
            print(json.dumps({"latency_s": statistics.median(trips[n // 10:]) / 2}), flush=True)
        else:
            for _ in range(n):
                recv_one(0)
                send_one(0)
    else:  # throughput: rank 0 streams, rank 1 reads
        mode = "poll"
        if rank == 0:
            t = time.perf_counter()
            for _ in range(n):
                send_one(1)
            while len(outbox):
                outbox.progress()
            recv_one(1)  # the reader's "done"
            print(json.dumps({"per_s": n / (time.perf_counter() - t)}), flush=True)
        else:
            for _ in range(n):
                recv_one(0)
            send_one(0)
    while len(outbox):
        outbox.progress()
    comm.Barrier()


def mpi_hop(n: int, n_bytes: int, mode: str) -> float:
    from minipipe.runtime.mpi import find_mpiexec

    out = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, __file__, "--hop-worker", str(n), str(n_bytes),
                          mode], capture_output=True, text=True, timeout=600, check=True).stdout
    d = json.loads(out.strip().splitlines()[-1])
    return d.get("latency_s", d.get("per_s"))


def hop_table(dim: int, n: int) -> list[dict]:
    from bench_ring import ring_latency, ring_throughput
    from minipipe.transport.messages import HEADER_BYTES

    rows = []
    for n_rows in (1, 16):
        n_bytes = HEADER_BYTES + 4 * dim * n_rows
        record = np.zeros(n_bytes, dtype=np.uint8)
        rows.append({"rows": n_rows, "bytes": n_bytes,
                     "ring_latency_us": ring_latency(record, n) * 1e6,
                     "mpi_latency_us": mpi_hop(n, n_bytes, "poll") * 1e6,
                     "mpi_spin_latency_us": mpi_hop(n, n_bytes, "spin") * 1e6,
                     "ring_msgs_per_s": ring_throughput(record, 4 * n),
                     "mpi_msgs_per_s": mpi_hop(4 * n, n_bytes, "stream")})
    return rows


# ------------------------------------------------------------------------------------------------
# 2. strategies on slow links


def _generate(strategy: str, extra: list[str], tokens: int) -> dict:
    cmd = [sys.executable, "-m", "minipipe", "generate", "ROMEO:", "--strategy", strategy, "--stages", "2",
           "--max-new-tokens", str(tokens), "--ignore-eos", "--json", "--quiet", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def link_table(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for strategy in STRATEGIES:
        for delay in DELAYS_MS:
            measured = [_generate(strategy, ["--runtime", "mpi", "--link-delay-ms", str(delay)], tokens)
                        for _ in range(repeats)]
            predicted = _generate(strategy, ["--runtime", "local", "--cost", "calibrated", "--slow-link-ms",
                                             str(delay)], tokens)
            assert all(m["tokens"] == predicted["tokens"] for m in measured), "every run emits the greedy tokens"
            real = statistics.median(m["metrics"]["tokens_per_s"] for m in measured)
            virtual = predicted["metrics"]["tokens_per_s"]
            rows.append({"strategy": strategy, "delay_ms": delay, "mpi_tok_s": real, "predicted_tok_s": virtual,
                         "predicted_over_measured": virtual / real})
            print(f"  {strategy:11s} {delay:2d} ms: mpi {real:6.1f} tok/s, predicted {virtual:6.1f} tok/s",
                  file=sys.stderr, flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hop-worker":
        _mpi_hop_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="MPI runs per setting (median)")
    parser.add_argument("--skip-hops", action="store_true", help="only the strategies table")
    parser.add_argument("--skip-links", action="store_true", help="only the per-hop table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from common import cpu_name

    hops = [] if args.skip_hops else hop_table(args.dim, args.messages)
    links = [] if args.skip_links else link_table(args.tokens, args.repeats)
    if args.json:
        print(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "hops": hops, "links": links}))
        return
    print(f"{cpu_name()}, {os.cpu_count()} cores\n")
    if hops:
        print("| record | ring one-way | mpi one-way | mpi (spinning) one-way | ring msgs/s | mpi msgs/s |")
        print("|---|---|---|---|---|---|")
        for r in hops:
            print(f"| {r['rows']} row{'s' if r['rows'] > 1 else ''}, {r['bytes']} B | {r['ring_latency_us']:.0f} µs | "
                  f"{r['mpi_latency_us']:.0f} µs | {r['mpi_spin_latency_us']:.0f} µs | {r['ring_msgs_per_s']:,.0f} | "
                  f"{r['mpi_msgs_per_s']:,.0f} |")
        print()
    if links:
        print("| strategy | link delay | MPI, measured | virtual clock, predicted | predicted / measured |")
        print("|---|---|---|---|---|")
    for r in links:
        print(f"| {r['strategy']} | {r['delay_ms']} ms | {r['mpi_tok_s']:.1f} tok/s | {r['predicted_tok_s']:.1f} tok/s | "
              f"{r['predicted_over_measured']:.2f} |")


if __name__ == "__main__":
    main()
