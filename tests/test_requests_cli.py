"""`minipipe generate --requests FILE`: several requests through one pipeline from the command line.

Oracle: each request's greedy decoding alone (`--strategy greedy` on the same file, and the
Python API). Bad request files get one line naming the line, and exit 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipipe.greedy import generate_greedy
from minipipe.model import load_stage

from .conftest import SHIPPED_MODELS

TINYBARD = SHIPPED_MODELS / "tinybard"
REQUESTS = [
    {"id": "romeo", "prompt": "ROMEO:\n"},
    {"id": "juliet", "prompt": "JULIET:\nO Romeo, Romeo!", "max_new_tokens": 9, "arrival_s": 0.02},
    {"prompt_ids": [1, 1889, 28], "max_new_tokens": 5},
    {"id": 7, "prompt": "HAMLET:\nTo be", "max_new_tokens": 0},
    {"id": "late", "prompt": "KING:\n", "max_new_tokens": 14, "arrival_s": 0.05},
]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minipipe", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def request_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("requests") / "requests.jsonl"
    path.write_text("# five requests\n" + "\n".join(json.dumps(r) for r in REQUESTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def expected(request_file):
    """Each request decoded alone by greedy decoding."""
    from minipipe.tokenizer import Tokenizer

    model, tok = load_stage(TINYBARD), Tokenizer(TINYBARD)
    out = {}
    for line, r in enumerate(REQUESTS, start=2):
        prompt = r["prompt_ids"] if "prompt_ids" in r else tok.encode(r["prompt"])
        out[r.get("id", line)] = generate_greedy(model, prompt, r.get("max_new_tokens", 16), tok.eos_ids).tokens
    return out


def parse(stdout: str) -> tuple[dict, dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert "summary" in lines[-1] and all("summary" not in d for d in lines[:-1])
    return {d["id"]: d for d in lines[:-1]}, lines[-1]["summary"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy, extra", [
    ("greedy", []),
    ("pipeline", ["--stages", "3"]),
    ("speculative", ["--runtime", "local", "--max-running", "2"]),
    ("tree", ["--kv-cells", "120"]),
    ("pipeinfer", ["--stages", "3", "--draft", "4"]),
    ("specpipe", ["--stages", "4", "--runtime", "local", "--width", "2"]),
])
def test_every_strategy_serves_a_request_file(request_file, expected, strategy, extra):
    r = run("generate", "--requests", str(request_file), "--model", str(TINYBARD), "--max-new-tokens", "16",
            "--json", "--strategy", strategy, *extra)
    assert r.returncode == 0, r.stderr
    results, summary = parse(r.stdout)
    assert {k: v["tokens"] for k, v in results.items()} == expected
    assert results["late"]["text"] and results[7]["tokens"] == []
    assert summary["requests"] == len(REQUESTS) and summary["generated_tokens"] == sum(map(len, expected.values()))
    assert summary["tokens_per_s"] > 0 and summary["time_to_first_token_s"]["p50"] > 0


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 5}', "line 1: prompt must be a string"),
    ('[1, 2]', "line 1: a request is a JSON object"),
    ('{"prompt": "a", "prompt_ids": [1]}', 'line 1: give either "prompt" or "prompt_ids"'),
    ('{"prompt_ids": [1, 99999]}', "line 1: token id 99999 is outside the vocabulary"),
    ('{"prompt": "a", "arrival_s": -1}', "line 1: arrival_s must be"),
    ('{"prompt": "a", "max_new_tokens": 1.5}', "line 1: max_new_tokens must be"),
    ('{"prompt": "a", "colour": "red"}', "line 1: unknown field(s) ['colour']"),
    ('{"prompt": "a"}\n{"id": 1, "prompt": "b"}', "line 2: id 1 is used twice"),
    ('{"prompt": "a"', "line 1: not JSON"),
    ('', "no requests in the file"),
])
def test_bad_request_files_are_one_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    r = run("generate", "--requests", str(path), "--model", str(TINYBARD), "--strategy", "pipeline")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_request_flag_errors(tmp_path, request_file):
    for args, message in ((["--requests", str(tmp_path / "missing.jsonl")], "cannot read it"),
                          (["--requests", str(request_file), "ROMEO:"], "no PROMPT"),
                          (["--requests", str(request_file), "--strategy", "pipeline", "--kv-cells", "10"],
                           "needs up to"),
                          (["--requests", str(request_file), "--strategy", "pipeline", "--max-running", "0"],
                           "--max-running and --kv-cells must be >= 1")):
        r = run("generate", "--model", str(TINYBARD), *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
