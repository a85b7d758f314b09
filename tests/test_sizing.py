"""Shared memory sized to need: each ring holds what travels on it, SmolLM2 on 3 stages fits
Docker's default 64 MiB /dev/shm, and a /dev/shm without room is refused before anything starts.

Oracles: the message encoder (a ring's largest record is a real encoded message), the segments
a pipeline really creates, greedy decoding for a run whose prefill chunks fill the rings.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from types import SimpleNamespace

import numpy as np
import pytest

from minipipe import kernels
from minipipe.batch import Batch
from minipipe.config import ModelConfig
from minipipe.errors import InputError
from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
from minipipe.runtime import open_pipeline
from minipipe.runtime.process import ProcessPipeline
from minipipe.runtime.sizing import RING_FLOOR, check_room, plan_rings
from minipipe.strategies import PipelineStrategy, TreeStrategy, generate
from minipipe.draft import NgramDraft
from minipipe.synthetic import hf_config, make_random_checkpoint
from minipipe.transport.messages import Result, Run, encode, run_bytes
from minipipe.transport.ring import HEADER_BYTES, max_payload

from .test_runtime import _segments_of, assert_no_leaks

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SMOLLM2 = dict(dim=576, ffn_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, max_positions=8192,
               tie_embeddings=True)
BIG_VOCAB = dict(dim=64, ffn_dim=96, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=49152, max_positions=512,
                 tie_embeddings=True)


@pytest.mark.parametrize("n_seqs", [1, 18, 257])  # plain, pipeinfer's default, specpipe's default
def test_smollm2_on_three_stages_fits_in_64_mib(n_seqs):
    config = ModelConfig.from_hf(hf_config(**SMOLLM2))
    plan = plan_rings(config, 3, n_seqs=n_seqs)
    assert plan.total_bytes <= 64 * MiB
    first, *between, last = plan.capacities
    chunk = kernels.PREFILL_CHUNK
    for capacity in between:  # a whole prefill chunk of hidden rows fits a record, with room for more
        assert run_bytes(chunk, chunk * n_seqs, config.dim) <= max_payload(capacity)
        assert 3 * run_bytes(chunk, chunk * n_seqs, config.dim) <= capacity
    assert run_bytes(chunk, chunk * n_seqs) <= max_payload(first)  # token ids, no hidden rows
    assert last == RING_FLOOR  # token ids back to the head: no vocabulary-wide logits


def test_logits_only_when_asked_for():
    config = ModelConfig.from_hf(hf_config(**SMOLLM2))
    without, with_logits = plan_rings(config, 3), plan_rings(config, 3, logits_rows=4)
    assert with_logits.capacities[:-1] == without.capacities[:-1]
    result = Result(1, np.zeros(4, np.int64), np.zeros((4, config.vocab_size), np.float32), np.zeros(4, np.int64))
    assert sum(len(memoryview(p).cast("B")) for p in encode(result)) <= max_payload(with_logits.capacities[-1])


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """SmolLM2's vocabulary on a tiny body: logits rows would be 192 KiB each."""
    return make_random_checkpoint(tmp_path_factory.mktemp("sizing") / "m", seed=3, **BIG_VOCAB)


def test_a_pipeline_maps_what_its_plan_says(big_vocab):
    with ProcessPipeline(big_vocab, 3) as pipe:
        mapped = sum(os.stat(f"/dev/shm/{name}").st_size for name in _segments_of(os.getpid()))
        assert mapped == pipe.plan.total_bytes
        assert mapped <= 4 * MiB  # vocabulary-wide rings took 4 x 192 MiB here
        assert [ring.capacity for ring in pipe.rings] == pipe.plan.capacities
    assert_no_leaks()


def test_runs_beyond_the_plan_are_refused_and_logits_come_back_when_planned(big_vocab):
    with ProcessPipeline(big_vocab, 2, logits_rows=2) as pipe:
        rows = kernels.PREFILL_CHUNK + 1
        with pytest.raises(InputError, match=r"^a run of 129 rows does not fit .* planned for runs of up to 128 rows"):
            pipe.submit(Run(pipe.new_run_id(), Batch.chain(list(range(rows)), 0)))
        with pytest.raises(InputError, match=r"^a run of 3 rows returning 3 rows of logits does not fit"):
            pipe.submit(Run(pipe.new_run_id(), Batch.chain([5, 6, 7], 0, want_logits="all"), return_logits=True))
        batch = Batch.chain([5, 6], 0, want_logits="all")
        pipe.submit(Run(pipe.new_run_id(), batch, return_logits=True))  # 2 rows of logits: planned
        answer = pipe.receive()
        model = load_stage(big_vocab)
        expected = model.forward(model.new_cache(), batch)  # [2, V]
        assert answer.logits.shape == (2, BIG_VOCAB["vocab_size"])
        assert np.array_equal(answer.logits, expected)
        assert list(answer.tokens) == list(np.argmax(expected, axis=1))
    assert_no_leaks()


@pytest.mark.parametrize("make", [PipelineStrategy, lambda: TreeStrategy(NgramDraft())])
def test_full_prefill_chunks_cross_tight_rings(tmp_path, make):
    """Hidden rows wide enough that a prefill chunk is a big part of its ring (not the floor)."""
    shape = dict(dim=256, ffn_dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, max_positions=512)
    d = make_random_checkpoint(tmp_path / "m", seed=8, **shape)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 61, 300)]  # 3 chunks: 128, 128, 44 rows
    expected = generate_greedy(load_stage(d), prompt, 8).tokens
    strategy = make()
    with open_pipeline(d, "process", 3, n_seqs=strategy.n_seqs) as pipe:
        hidden_ring = pipe.rings[1].capacity
        assert hidden_ring > RING_FLOOR and 2 * run_bytes(128, 128 * strategy.n_seqs, 256) > hidden_ring // 4
        assert generate(strategy, pipe, prompt, 8, max_positions=512).tokens == expected
    assert_no_leaks()


def _statvfs_with(free_bytes: int):
    def statvfs(path):
        return SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)
    return statvfs


def test_no_room_in_dev_shm_is_one_line_with_the_fix(big_vocab, monkeypatch):
    check_room(10 * MiB, 3)  # the real /dev/shm of this machine has room for that
    monkeypatch.setattr(os, "statvfs", _statvfs_with(2 * MiB))
    with pytest.raises(InputError) as e:
        check_room(3 * MiB, 3)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("/dev/shm has 2.0 MiB free but 3 stages need 3.0 MiB of shared memory")
    assert "docker run --shm-size=64m" in message and "fewer --stages" in message
    monkeypatch.setattr(os, "statvfs", _statvfs_with(MiB // 2))
    with pytest.raises(InputError, match="/dev/shm has 0.5 MiB free but 3 stages need"):  # before anything starts
        ProcessPipeline(big_vocab, 3)
    assert not _segments_of(os.getpid()) and not multiprocessing.active_children()


def test_header_bytes_are_counted():
    config = ModelConfig.from_hf(hf_config(**SMOLLM2))
    plan = plan_rings(config, 2)
    assert plan.ring_bytes == sum(plan.capacities) + 3 * HEADER_BYTES


def test_trace_events_cross_the_rings_in_chunks(tmp_path):
    """A long traced run: each stage's events (far more than a ring record) come back whole."""
    from minipipe.runtime.process import _trace_messages
    from minipipe.runtime.sizing import TEXT_CHUNK
    from minipipe.trace import Tracer

    events = [dict(track="stage 0", name=f"run {i}", start=i, end=i + 1, kind="run", run_id=i, args={"rows": 1})
              for i in range(3000)]
    chunks = _trace_messages(0, events)
    assert len(chunks) > 1 and [e for c in chunks for e in c.events] == events
    assert all(len(json.dumps(c.events)) <= TEXT_CHUNK for c in chunks)

    d = make_random_checkpoint(tmp_path / "m", seed=5, **{**BIG_VOCAB, "vocab_size": 61, "max_positions": 1100})
    tracer = Tracer()
    with open_pipeline(d, "process", 2, tracer=tracer) as pipe:
        generate(PipelineStrategy(), pipe, [1, 2, 3], 1000, max_positions=1100)
        last_ring = pipe.rings[-1].capacity
    runs = [e for e in tracer.events if e.track == "stage 1" and e.kind == "run"]
    assert len(runs) >= 1000  # every run of the last stage: more than one ring record could hold
    assert len(json.dumps([vars(e) for e in runs])) > max_payload(last_ring)
    assert_no_leaks()
