"""Find the BLAS library NumPy loaded, report it, and set its thread count.

minipipe runs one BLAS thread per process by default (a pipeline stage is one process on one
core, DESIGN.md §1), and the exactness contract is stated for one fixed kernel configuration.
NumPy exposes no API for the thread count, so this module calls OpenBLAS's own
`openblas_set_num_threads` through ctypes (the symbol carries a prefix/suffix in the
`scipy-openblas` builds that NumPy wheels ship). Where no OpenBLAS is found (another BLAS),
`set_threads` reports False and `minipipe doctor` says so.
"""

from __future__ import annotations

import ctypes
import sys
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


if sys.platform.startswith("linux"):
    # Policy: one BLAS thread per process unless a caller asks otherwise.
    set_threads(1)
