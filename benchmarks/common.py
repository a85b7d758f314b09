"""Small helpers the benchmark scripts share: progress bars on stderr, the machine's name."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


def progress(iterable, desc: str, **kw):
    """A tqdm bar on stderr that disappears when done."""
    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, **kw)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, for the report's header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
