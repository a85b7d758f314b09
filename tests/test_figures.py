"""benchmarks/bench_figures.py: the papers' plots, reproducible on the virtual clock.

Oracle: the runs behind the figures are `minipipe generate --runtime local --cost fixed`, so a
second measurement gives the same numbers; the PNGs are real images of the expected size.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_figures", REPO / "benchmarks" / "bench_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_figures"] = module
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # about 10 s: two dozen runs on the virtual clock
def test_quick_figures_are_reproducible(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[plots]')")
    b = bench()
    assert b.main(["--quick", "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "figures.json").read_text())
    speed = first["speedup"]["4"]["tokens_per_s"]
    assert set(speed) == {"pipeline", "speculative", "tree", "pipeinfer", "specpipe"}
    assert all(len(v) == len(first["p"]) and all(x > 0 for x in v) for v in speed.values())
    for name in ("speedup.png", "tbt_vs_stages.png", "throughput_vs_concurrency.png"):
        w, h = png_size(tmp_path / "a" / name)
        assert 300 < w < 1000 and 200 < h < 800, (name, w, h)
    # the same command gives the same numbers (fixed costs), and replots from them
    assert b.main(["--quick", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "figures.json").read_text()) == first
    assert b.main(["--data", str(tmp_path / "a" / "figures.json"), "--out", str(tmp_path / "c")]) == 0
    assert png_size(tmp_path / "c" / "speedup.png") == png_size(tmp_path / "a" / "speedup.png")


def test_committed_figures_match_their_numbers():
    """docs/figures: the PNGs the docs show, and figures.json they were drawn from."""
    figures = REPO / "docs" / "figures"
    data = json.loads((figures / "figures.json").read_text())
    for n, v in data["speedup"].items():
        rows = v["tokens_per_s"]
        assert len(v["specpipe_hit_rate"]) == len(data["p"]) and all(0 <= h <= 1 for h in v["specpipe_hit_rate"])
        assert all(len(r) == len(data["p"]) for r in rows.values()), n
    for name in ("speedup.png", "tbt_vs_stages.png", "throughput_vs_concurrency.png"):
        assert (figures / name).stat().st_size < 200_000  # small enough to commit
        png_size(figures / name)
