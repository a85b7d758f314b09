"""Find the BLAS library NumPy loaded, report it, and set its thread count.

minipipe runs one BLAS thread per process by default (a pipeline stage is one process on one
core, docs/design.md), and the exactness contract is stated for one fixed kernel configuration.
NumPy exposes no API for the thread count, so this module calls OpenBLAS's own
`openblas_set_num_threads` through ctypes (the symbol carries a prefix/suffix in the
`scipy-openblas` builds that NumPy wheels ship). Where no OpenBLAS is found (another BLAS),
`set_threads` reports False and `minipipe doctor` says so.

BLAS stays on one thread for everything minipipe computes except decode GEMVs under
`minipipe generate --threads N` (`minipipe.kernels.gemv_rows`): OpenBLAS's own threads run a
GEMV whose padded width is a multiple of 16 x N (its even split then keeps the bits of one
thread), and `ColumnTeam` runs the column ranges of other GEMVs on threads of minipipe's own,
each a one-thread BLAS call, split where the bits do not change
(`minipipe.kernels.column_chunks`).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# (set threads, get threads, get config) symbol names, as OpenBLAS builds export them.
_SYMBOLS = [
    (f"{p}openblas_set_num_threads{s}", f"{p}openblas_get_num_threads{s}", f"{p}openblas_get_config{s}")
    for p in ("scipy_", "") for s in ("64_", "")
] + [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_config64_")]


@dataclass(frozen=True)
class BlasInfo:
    name: str  # e.g. "OpenBLAS 0.3.31 ... Haswell MAX_THREADS=64", or what NumPy reports
    library: str | None  # path of the shared object, when found
    controllable: bool  # True when the thread count can be read and set


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
        return sorted(paths)
    except OSError:
        return []


@lru_cache(maxsize=1)
def _openblas():
    """(library path, set_threads, get_threads, get_config) or None."""
    for path in _loaded_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name, config_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is None or getter is None:
                continue
            getter.restype = ctypes.c_int
            config = getattr(lib, config_name, None)
            if config is not None:
                config.restype = ctypes.c_char_p
            return path, setter, getter, config
    return None


def info() -> BlasInfo:
    """What BLAS NumPy uses here."""
    found = _openblas()
    if found is None:
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            name = f"{blas.get('name')} {blas.get('version')}"
        except Exception:  # noqa: BLE001 - show_config's shape varies across NumPy versions
            name = "unknown"
        return BlasInfo(name=name, library=None, controllable=False)
    path, _, _, config = found
    name = config().decode() if config is not None else "OpenBLAS"
    return BlasInfo(name=name, library=path, controllable=True)


def get_threads() -> int | None:
    found = _openblas()
    return None if found is None else int(found[2]())


def set_threads(n: int) -> bool:
    """Set the BLAS thread count; False when the library cannot be controlled."""
    found = _openblas()
    if found is None:
        return False
    found[1](int(n))
    return True


@contextmanager
def threads(n: int):
    """Run a block with `n` BLAS threads, then restore the previous count."""
    before = get_threads()
    if before is None or before == n:
        yield
        return
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


class ColumnTeam:
    """`n_threads` threads, the caller and n - 1 workers, that run one function on column ranges.

    `run(fn, args, chunks)` calls `fn(*args, start, end)` for every `(start, end)` in `chunks`:
    the first range on the calling thread, the others on the workers (one each), and returns
    when all are done. NumPy releases the GIL inside BLAS calls, so the ranges' GEMVs run in
    parallel. Workers wait on locks between calls (no spinning: the cores stay free for other
    processes). A call made while another is running (another Python thread) runs every range
    on the caller instead of waiting.
    """

    def __init__(self, n_threads: int):
        if n_threads < 2:
            raise ValueError("a ColumnTeam needs at least 2 threads")
        self.n_threads = n_threads
        self._busy = threading.Lock()
        self._go = [threading.Lock() for _ in range(n_threads - 1)]
        self._done = [threading.Lock() for _ in range(n_threads - 1)]
        for lock in self._go + self._done:
            lock.acquire()
        self._task: list = [None] * (n_threads - 1)
        self._error: list = [None] * (n_threads - 1)
        self._workers = [threading.Thread(target=self._work, args=(k,), name=f"minipipe-gemv-{k + 1}", daemon=True)
                         for k in range(n_threads - 1)]
        for w in self._workers:
            w.start()

    def _work(self, k: int) -> None:
        go, done = self._go[k], self._done[k]
        while True:
            go.acquire()
            task = self._task[k]
            if task is None:  # close()
                done.release()
                return
            fn, args, start, end = task
            try:
                fn(*args, start, end)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error[k] = e
            self._task[k] = None
            done.release()

    def run(self, fn, args: tuple, chunks: list[tuple[int, int]]) -> None:
        if not self._busy.acquire(blocking=False):
            for start, end in chunks:
                fn(*args, start, end)
            return
        try:
            n_workers = min(len(chunks) - 1, len(self._workers))
            for k in range(n_workers):
                self._task[k] = (fn, args) + chunks[k + 1]
                self._go[k].release()
            try:
                for start, end in chunks[:1] + chunks[n_workers + 1:]:  # ranges beyond the workers: the caller's
                    fn(*args, start, end)
            finally:
                for k in range(n_workers):
                    self._done[k].acquire()
            errors = [e for e in self._error[:n_workers] if e is not None]
            self._error[:n_workers] = [None] * n_workers
            if errors:
                raise errors[0]
        finally:
            self._busy.release()

    def close(self) -> None:
        """Stop the workers (the team cannot run afterwards)."""
        self._busy.acquire()
        for k in range(len(self._workers)):
            self._task[k] = None
            self._go[k].release()
        for k, w in enumerate(self._workers):
            self._done[k].acquire()
            w.join()
        self._workers = []


if sys.platform.startswith("linux"):
    # Policy: one BLAS thread per process unless a caller asks otherwise.
    set_threads(1)
