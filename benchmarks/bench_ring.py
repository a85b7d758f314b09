"""Ring buffer speed: one-way latency and messages/s, next to multiprocessing.Queue and Pipe.

    python benchmarks/bench_ring.py [--dim 384] [--messages 3000] [--json]

Records are activation-sized: 1 row and 16 rows of `--dim` float32 values (the default model's
hidden size), plus a 64-byte header. For each transport, in one run on this machine:

* **latency** — ping-pong between two processes: the parent sends a record, the child sends it
  straight back; one-way latency = round-trip time / 2 (median of the trips after a warm-up).
* **throughput** — the parent streams records to a child that reads (and for the ring, consumes
  in place) as fast as it can; messages/s over the whole stream.
* the limit: a plain in-process copy of the same bytes (`np.copyto`), no second process.
* "ring+spin": the ring whose reader busy-waits 50 µs before sleeping (`Ring.create(spin=...)`;
  the runtime's default is not to spin, see minipipe/transport/ring.py).

Each transport moves the bytes the same way the pipeline does: the ring copies into shared
memory and the reader reads in place; Queue and Pipe pickle (Queue also uses a feeder thread).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.transport.ring import Ring  # noqa: E402

CTX = mp.get_context("spawn")


def _ring_echo(h_in, h_out, n):
    a, b = Ring.attach(h_in), Ring.attach(h_out)
    for _ in range(n):
        payload = a.read()
        b.write([payload])
        a.consume()


def _ring_sink(h_in, n, done):
    a = Ring.attach(h_in)
    done.put("ready")
    for _ in range(n):
        a.read()
        a.consume()
    done.put(time.perf_counter())


def _queue_echo(q_in, q_out, n):
    for _ in range(n):
        q_out.put(q_in.get())


def _queue_sink(q_in, n, done):
    done.put("ready")
    for _ in range(n):
        q_in.get()
    done.put(time.perf_counter())


def _pipe_echo(conn, n):
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())


def _pipe_sink(conn, n, done):
    done.put("ready")
    for _ in range(n):
        conn.recv_bytes()
    done.put(time.perf_counter())


def ring_latency(record: np.ndarray, n: int, spin: float = 0.0, idle_s: float = 0.0) -> float:
    """Median one-way latency of ping-pongs; with `idle_s`, the sender computes that long before
    each ping, so the echoing reader has slept (as a stage sleeps while the others work)."""
    r1, r2 = Ring.create(8 << 20, CTX, spin=spin), Ring.create(8 << 20, CTX, spin=spin)
    p = CTX.Process(target=_ring_echo, args=(r1.handle, r2.handle, n))
    p.start()
    trips = []
    try:
        for _ in range(n):
            busy_until = time.perf_counter() + idle_s
            while time.perf_counter() < busy_until:  # compute, as another stage would
                pass
            t = time.perf_counter()
            r1.write([record])
            r2.read()
            r2.consume()
            trips.append(time.perf_counter() - t)
        p.join()
    finally:
        r1.release()
        r2.release()
    return statistics.median(trips[n // 10:]) / 2


def ring_throughput(record: np.ndarray, n: int) -> float:
    r = Ring.create(8 << 20, CTX)
    done = CTX.Queue()
    p = CTX.Process(target=_ring_sink, args=(r.handle, n, done))
    p.start()
    done.get()  # the reader is attached and running: start the clock
    t = time.perf_counter()
    for _ in range(n):
        r.write([record])
    end = done.get()
    p.join()
    r.release()
    return n / (end - t)


def queue_latency(record: bytes, n: int) -> float:
    q1, q2 = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=_queue_echo, args=(q1, q2, n))
    p.start()
    trips = []
    for _ in range(n):
        t = time.perf_counter()
        q1.put(record)
        q2.get()
        trips.append(time.perf_counter() - t)
    p.join()
    return statistics.median(trips[n // 10:]) / 2


def queue_throughput(record: bytes, n: int) -> float:
    q, done = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=_queue_sink, args=(q, n, done))
    p.start()
    done.get()
    t = time.perf_counter()
    for _ in range(n):
        q.put(record)
    end = done.get()
    p.join()
    return n / (end - t)


def pipe_latency(record: bytes, n: int) -> float:
    a, b = CTX.Pipe()
    p = CTX.Process(target=_pipe_echo, args=(b, n))
    p.start()
    trips = []
    for _ in range(n):
        t = time.perf_counter()
        a.send_bytes(record)
        a.recv_bytes()
        trips.append(time.perf_counter() - t)
    p.join()
    return statistics.median(trips[n // 10:]) / 2


def pipe_throughput(record: bytes, n: int) -> float:
    a, b = CTX.Pipe()
    done = CTX.Queue()
    p = CTX.Process(target=_pipe_sink, args=(b, n, done))
    p.start()
    done.get()
    t = time.perf_counter()
    for _ in range(n):
        a.send_bytes(record)
    end = done.get()
    p.join()
    return n / (end - t)


def copy_time(record: np.ndarray, n: int) -> float:
    dst = np.empty_like(record)
    t = time.perf_counter()
    for _ in range(n):
        np.copyto(dst, record)
    return (time.perf_counter() - t) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384, help="hidden size (default 384, the shipped target's)")
    parser.add_argument("--messages", type=int, default=3000, help="messages per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows_out = []
    for rows in (1, 16):
        record = np.random.default_rng(0).standard_normal(16 + rows * args.dim).astype(np.float32)  # header + rows
        raw = record.tobytes()
        n = args.messages
        print(f"measuring {rows}-row records ({record.nbytes} bytes)...", file=sys.stderr)
        row = {
            "rows": rows, "bytes": record.nbytes,
            "ring_latency_us": ring_latency(record, n) * 1e6, "ring_msgs_per_s": ring_throughput(record, n),
            "ring_spin_latency_us": ring_latency(record, n, spin=50e-6) * 1e6,
            "pipe_latency_us": pipe_latency(raw, n) * 1e6, "pipe_msgs_per_s": pipe_throughput(raw, n),
            "queue_latency_us": queue_latency(raw, n) * 1e6, "queue_msgs_per_s": queue_throughput(raw, n),
            "memcpy_us": copy_time(record, n * 10) * 1e6,
        }
        row["memcpy_msgs_per_s"] = 1e6 / row["memcpy_us"]
        rows_out.append(row)
    if args.json:
        print(json.dumps(rows_out, indent=2))
        return
    print(f"{'record':>16} | {'one-way latency (µs, median)':^47} | {'messages/s (streaming)':^46}")
    print(f"{'':>16} | {'ring':>8} {'ring+spin':>9} {'Pipe':>8} {'Queue':>8} {'memcpy':>10} | "
          f"{'ring':>10} {'Pipe':>10} {'Queue':>10} {'memcpy':>12}")
    for r in rows_out:
        print(f"{r['rows']:>3} rows {r['bytes']:>6} B | {r['ring_latency_us']:>8.1f} {r['ring_spin_latency_us']:>9.1f} "
              f"{r['pipe_latency_us']:>8.1f} "
              f"{r['queue_latency_us']:>8.1f} {r['memcpy_us']:>10.2f} | {r['ring_msgs_per_s']:>10.0f} "
              f"{r['pipe_msgs_per_s']:>10.0f} {r['queue_msgs_per_s']:>10.0f} {r['memcpy_msgs_per_s']:>12.0f}")
    print("ratios (ring vs): " + ", ".join(
        f"{r['rows']} rows: latency Pipe/ring {r['pipe_latency_us'] / r['ring_latency_us']:.2f}, "
        f"Queue/ring {r['queue_latency_us'] / r['ring_latency_us']:.2f}; throughput ring/Pipe "
        f"{r['ring_msgs_per_s'] / r['pipe_msgs_per_s']:.2f}, ring/Queue {r['ring_msgs_per_s'] / r['queue_msgs_per_s']:.2f}"
        for r in rows_out))


if __name__ == "__main__":
    main()
