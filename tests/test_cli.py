"""The command line, run as a user would: real subprocesses, real exit codes (flag refusals run
in-process, where main() returns the exit status)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipipe.synthetic import hf_config, make_random_checkpoint

from .conftest import reference_pair

SMALL = dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_positions=32)


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minipipe", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name, prompt, expected", [
    ("tinybard", "HAMLET:\nTo be, or not to be: that is the question:\n", "I'll be a man, and be a man"),
    ("stories260k", "Once upon a time", ", there was a little girl named Lily."),
])
def test_generate_streams_text(name, prompt, expected):
    d = reference_pair(name).target
    r = run("generate", prompt, "--model", str(d), "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(expected)


def test_generate_json_and_prompt_ids(pair):
    args = ["generate", "--prompt-ids", ",".join(map(str, pair.prompt)), "--model", str(pair.target),
            "--max-new-tokens", "7", "--json"]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from minipipe.greedy import generate_greedy
    from minipipe.model import load_stage
    from minipipe.tokenizer import Tokenizer

    expected = generate_greedy(load_stage(pair.target), list(pair.prompt), 7).tokens
    assert out["tokens"] == expected
    tok = Tokenizer(pair.target)
    assert out["text"] == tok.decode(list(pair.prompt) + expected)[len(tok.decode(list(pair.prompt))):]
    if pair.name == "stories260k":
        assert out["tokens"] == [432, 383, 286, 261, 376, 298, 315]
        assert out["text"] == ", there was a little gir"  # "girl" is two pieces
    m = out["metrics"]
    assert m["n_prompt_tokens"] == len(pair.prompt) and m["n_generated_tokens"] == 7
    assert m["tokens_per_s"] > 0 and m["time_to_first_token_s"] > 0 and m["stop_reason"] == "length"


def test_generate_without_tokenizer_prints_ids(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=1, **SMALL)
    (d / "tokenizer.json").unlink()
    r = run("generate", "--prompt-ids", "3,4,5", "--model", str(d), "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tokens"]) == 4
    r = run("generate", "--prompt-ids", "3,4,5", "--model", str(d), "--max-new-tokens", "4")
    assert r.returncode == 0 and len(r.stdout.split()) == 4


def test_ignore_eos_generates_the_full_count(tmp_path):
    """--ignore-eos: end-of-sequence ids do not stop generation (benchmarks make a fixed count)."""
    from minipipe.greedy import generate_greedy
    from minipipe.synthetic import random_model

    first = generate_greedy(random_model(seed=1, **SMALL), [3, 4, 5], 1).tokens[0]
    d = make_random_checkpoint(tmp_path / "m", seed=1, eos_token_id=int(first), **SMALL)  # eos comes at once
    base = ["generate", "--prompt-ids", "3,4,5", "--model", str(d), "--max-new-tokens", "6", "--json"]
    for extra in ([], ["--strategy", "pipeline", "--stages", "2"]):
        stopped = json.loads(run(*base, *extra).stdout)
        assert stopped["tokens"] == [first] and stopped["metrics"]["stop_reason"] == "eos"
        full = json.loads(run(*base, *extra, "--ignore-eos").stdout)
        assert len(full["tokens"]) == 6 and full["tokens"][0] == first
        assert full["metrics"]["stop_reason"] == "length"


def _bad_model(tmp_path, kind: str):
    d = make_random_checkpoint(tmp_path / "m", seed=1, **SMALL)
    raw = hf_config(**SMALL)
    if kind == "malformed":
        (d / "config.json").write_text("{oops")
    elif kind == "arch":
        raw["model_type"] = "mixtral"
        (d / "config.json").write_text(json.dumps(raw))
    elif kind == "rope":
        raw["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
        (d / "config.json").write_text(json.dumps(raw))
    elif kind == "no_weights":
        (d / "model.safetensors").unlink()
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "model directory not found"),
    ("malformed", "is not valid JSON"),
    ("arch", "model_type 'mixtral' is not supported"),
    ("rope", "RoPE type 'longrope' is not supported"),
    ("no_weights", "no model.safetensors"),
    ("too_long", "the prompt has 40 tokens but the model's context holds 32"),
    ("bad_id", "token id 50 is outside the vocabulary"),
    ("bad_ids_syntax", "--prompt-ids must be comma-separated integers"),
    ("no_prompt", "give a PROMPT, --prompt-ids or --requests"),
])
def test_user_errors_are_one_line(tmp_path, case, message):
    d = tmp_path / "absent" if case == "missing" else _bad_model(tmp_path, case)
    ids = {"too_long": ",".join(["3"] * 40), "bad_id": "3,50", "bad_ids_syntax": "3,x"}.get(case, "3,4")
    args = ["generate", "--model", str(d), "--max-new-tokens", "2"]
    if case != "no_prompt":
        args += ["--prompt-ids", ids]
    r = run(*args)
    assert r.returncode == 1
    assert r.stderr.strip() == f"minipipe: error: {r.stderr.strip().removeprefix('minipipe: error: ')}"
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_explains():
    r = run("generate", "--help")
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "--prompt-ids" in r.stdout


def test_doctor_quick():
    r = run("doctor", "--quick", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "row-gemv" in r.stdout and "DIFFERENT" not in r.stdout


@pytest.mark.parametrize("strategy, extra", [
    ("pipeline", ["--stages", "3"]),
    ("pipeline", ["--split", "SPLIT", "--runtime", "local", "--timeline"]),
    ("speculative", ["--draft", "4"]),
    ("tree", ["--tree-budget", "5", "--runtime", "local"]),
    ("pipeinfer", ["--draft", "3", "--branches", "2", "--p-accept", "0.2", "--stages", "3"]),
    ("specpipe", ["--width", "2", "--stages", "4", "--runtime", "local", "--slow-link-ms", "0.5"]),
])
def test_every_strategy_from_the_command_line(pair, strategy, extra):
    d, dd = pair.target, pair.draft
    args = ["generate", "--prompt-ids", ",".join(map(str, pair.prompt)), "--model", str(d), "--max-new-tokens", "20",
            "--json"]
    greedy = json.loads(run(*args).stdout)["tokens"]
    draft = ["--draft", str(dd)] if strategy != "pipeline" else []
    from minipipe.config import load_config

    split = f"2,{load_config(d).n_layers - 2}"  # two stages, uneven
    r = run(*args, "--strategy", strategy, *draft, *[split if e == "SPLIT" else e for e in extra], timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == greedy
    assert out["metrics"]["strategy"] == strategy
    if strategy != "pipeline":
        assert "speculation" in out["metrics"]


def test_strategy_flag_errors():
    d = reference_pair("tinybard").target
    for args, message in ((["--strategy", "pipeline", "--stages", "9"], "--stages must be between 1 and the model's 8"),
                          (["--strategy", "pipeline", "--split", "2,2"], "summing to the model's 8 layers"),
                          (["--strategy", "greedy", "--stages", "2"], "need a pipelined --strategy"),
                          (["--strategy", "speculative", "--draft", "oracle:x"], "oracle drafts are spelled"),
                          (["--strategy", "pipeinfer", "--p-accept", "2", "--draft", "ngram"], "--p-accept must be"),
                          (["--strategy", "pipeline", "--slow-link-ms", "3"], "--slow-link-ms needs --runtime local"),
                          (["--strategy", "pipeline", "--runtime", "local", "--threads", "2"],
                           "--threads with a pipelined strategy needs --runtime process")):
        r = run("generate", "--prompt-ids", "1,2", "--model", str(d), *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# bad flag values, refused in one line before any work (run in-process: main() returns the status)

def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from minipipe.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cli") / "m", seed=1, **SMALL)


@pytest.mark.parametrize("flag, value, message", [
    ("--draft-model", "oracle:1.5", "oracle drafts are spelled oracle:P with P a probability between 0 and 1"),
    ("--draft-model", "oracle:nan", "oracle drafts are spelled oracle:P"),
    ("--draft-model", "oracle:-0.1", "oracle drafts are spelled oracle:P"),
    ("--draft-model", "oracle:abc", "oracle drafts are spelled oracle:P"),
    ("--draft-model", "oracle:inf", "oracle drafts are spelled oracle:P"),
    ("--slow-link-ms", "-5", "--slow-link-ms must be a finite number of milliseconds >= 0, got -5.0"),
    ("--slow-link-ms", "nan", "--slow-link-ms must be a finite number"),
    ("--slow-link-ms", "inf", "--slow-link-ms must be a finite number"),
    ("--p-accept", "nan", "--p-accept must be between 0 and 1, got nan"),
    ("--p-split", "nan", "--p-split must be between 0 and 1"),
    ("--p-recovery", "-inf", "--p-recovery must be between 0 and 1"),
    ("--p-decay", "nan", "--p-decay must be between 0 and 1"),
])
def test_bad_numbers_are_refused_in_one_line(capsys, small_model, flag, value, message):
    draft = [] if flag == "--draft-model" else ["--draft-model", "ngram"]
    code, out, err = run_in_process(
        capsys, "generate", "--prompt-ids", "3,4,5", "--model", str(small_model), "--max-new-tokens", "4",
        "--strategy", "speculative", "--runtime", "local", "--quiet", *draft, f"{flag}={value}")
    assert code == 1 and out == "", (out, err)
    assert err.startswith("minipipe: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("where", ["a directory", "in a missing directory", "under a file"])
def test_unwritable_trace_is_refused_before_any_work(capsys, tmp_path, small_model, where):
    (tmp_path / "file").write_text("")
    trace = {"a directory": tmp_path, "in a missing directory": tmp_path / "absent" / "t.json",
             "under a file": tmp_path / "file" / "t.json"}[where]
    code, out, err = run_in_process(
        capsys, "generate", "--prompt-ids", "3,4,5", "--model", str(small_model), "--max-new-tokens", "4",
        "--strategy", "pipeline", "--runtime", "local", "--quiet", "--trace", str(trace))
    assert code == 1 and out == "", (out, err)  # no token was generated
    assert err.startswith(f"minipipe: error: --trace {trace}: cannot write there (") and err.count("\n") == 1


def test_writable_trace_is_written_and_left_alone_when_refused(capsys, tmp_path, small_model):
    trace = tmp_path / "t.json"
    args = ["generate", "--prompt-ids", "3,4,5", "--model", str(small_model), "--max-new-tokens", "4",
            "--strategy", "pipeline", "--runtime", "local", "--quiet", "--trace", str(trace)]
    code, _, err = run_in_process(capsys, *args, "--strategy", "greedy")  # refused after the check
    assert code == 1 and "need a pipelined --strategy" in err and not trace.exists(), err
    code, _, err = run_in_process(capsys, *args)
    assert code == 0, err
    assert json.loads(trace.read_text())["traceEvents"]
