"""Exact sampling: every strategy emits the tokens of plain sequential sampling with the same seed.

Oracles: `generate_greedy(..., sampling=...)` (sequential sampling, one token at a time), and, for
the sampler itself, the distribution softmax(z / T) restricted by top-k / top-p / min-p, checked
with a chi-square test over thousands of seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minipipe import kernels
from minipipe.draft import DraftModel, NgramDraft, OracleDraft
from minipipe.engine import Engine
from minipipe.errors import InputError
from minipipe.greedy import generate_greedy
from minipipe.request import Request
from minipipe.runtime import LocalPipeline, open_pipeline
from minipipe.sampling import Sampling, from_generation_config
from minipipe.strategies import generate
from minipipe.synthetic import make_random_checkpoint, random_model

from .random_pairs import ORACLE_P, RandomPair
from .test_runtime import DrawChooser, assert_no_leaks
from .test_strategies import STRATEGIES, held_resources, make_strategy

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=31, max_positions=64)
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=31, max_positions=64)
PAIR = RandomPair(TARGET, DRAFT, draft_seed=500)

samplings = st.builds(Sampling, temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.6]),
                      top_k=st.sampled_from([0, 1, 3, 10]), top_p=st.sampled_from([1.0, 0.9, 0.5, 0.1]),
                      min_p=st.sampled_from([0.0, 0.05, 0.3]), seed=st.integers(0, 2 ** 64 - 1))


def sampled(seed: int, prompt, n: int, sampling: Sampling) -> list[int]:
    """Sequential sampling of the whole target: the oracle."""
    return generate_greedy(random_model(seed=seed, **TARGET), list(prompt), n, sampling=sampling).tokens


def draft_for(kind: str, seed: int, sampling: Sampling, n: int):
    if kind == "model":
        return DraftModel(PAIR.draft_model(seed))
    if kind == "target":  # the target itself: with coupled drafting every guess is right
        return DraftModel(random_model(seed=seed, **TARGET))
    if kind == "ngram":
        return NgramDraft()
    if kind in ("self", "merged"):  # the target's first layers; or a model, the first layers and n-grams merged
        return PAIR.make_draft(kind, seed, (), n)
    return OracleDraft(lambda prompt, s: sampled(seed, prompt, n, s) + [0] * 30, ORACLE_P[kind], 31, seed=seed)


def test_a_tree_from_the_target_itself_accepts_its_deepest_path_not_its_siblings():
    """Hypothesis's find: a tree drafted by the target itself (greedy), cut to one level by a
    3-token budget, holds two siblings; the verification accepts the right one and rejects the
    other. All its depth is accepted (accepted_at == drafted_at), not every node."""
    sampling = Sampling(0.0)
    strategy = make_strategy("tree", draft_for("target", 0, sampling, 3))
    got = generate(strategy, LocalPipeline(PAIR.stage_models(0, 1), n_seqs=strategy.n_seqs), (0,), 3,
                   max_positions=64, sampling=sampling)
    assert got.tokens == sampled(0, (0,), 3, sampling)
    stats = got.metrics.extra["speculation"]
    assert stats.accepted_at == stats.drafted_at == [1] and (stats.drafted, stats.accepted) == (2, 1)


@given(data=st.data())
def test_every_strategy_equals_sequential_sampling(data):
    name = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    seed = data.draw(st.integers(0, 2), label="model seed")
    sampling = data.draw(samplings, label="sampling")
    prompt = tuple(data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=6), label="prompt"))
    n = data.draw(st.integers(1, 24), label="tokens")
    kind = data.draw(st.sampled_from(["model", "target", "ngram", "self", "merged", "half", "always"]), label="draft")
    strategy = make_strategy(name, draft_for(kind, seed, sampling, n))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(PAIR.stage_models(seed, data.draw(st.integers(1, 4), label="stages")),
                         n_seqs=strategy.n_seqs, chooser=chooser)
    got = generate(strategy, pipe, prompt, n, max_positions=64, sampling=sampling)
    assert got.tokens == sampled(seed, prompt, n, sampling)
    assert not held_resources(pipe)
    if kind == "target" and name in ("speculative", "tree") and n > 2:  # coupled drafting: all accepted
        stats = got.metrics.extra["speculation"]
        # every verification that drafted to depth d accepted d tokens: a chain's every token, a
        # tree's whole deepest path (its other branches are rejected by construction)
        assert stats.accepted_at == stats.drafted_at
        if name == "speculative":
            assert stats.accepted == stats.drafted


@given(data=st.data())
def test_concurrent_requests_each_with_their_own_seed(data):
    name = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    specs = data.draw(st.lists(st.tuples(st.lists(st.integers(0, 30), min_size=1, max_size=5), samplings,
                                         st.integers(0, 20), st.integers(0, 30)), min_size=1, max_size=6),
                      label="requests")
    strategy = make_strategy(name, draft_for("ngram", 0, Sampling(), 24))
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(PAIR.stage_models(0, data.draw(st.integers(1, 3), label="stages")),
                         n_seqs=Engine.n_seqs(strategy, 4), chooser=chooser)
    engine = Engine(pipe, strategy, max_running=4, max_positions=64)
    requests = [engine.add(Request(i, p, n, sampling=s, arrival_s=t * (1.0 if chooser else 1e-4)))
                for i, (p, s, n, t) in enumerate(specs)]
    engine.run()
    for r in requests:
        assert r.result().tokens == sampled(0, r.prompt, r.max_new_tokens, r.sampling)
    assert not held_resources(pipe)


def test_process_runtime_samples_exactly(tmp_path):
    d = make_random_checkpoint(tmp_path / "t", seed=0, **TARGET)
    s = Sampling(0.8, top_p=0.9, seed=123456789)
    for name in ("pipeline", "pipeinfer", "specpipe"):
        strategy = make_strategy(name, DraftModel(PAIR.draft_model(0)))
        with open_pipeline(d, "process", 2, n_seqs=strategy.n_seqs) as pipe:
            assert generate(strategy, pipe, (1, 2, 3), 20, max_positions=64, sampling=s).tokens == \
                   sampled(0, (1, 2, 3), 20, s)
    assert_no_leaks()


# ------------------------------------------------------------------------------------------------
# the sampler itself

CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # df -> 99.9% quantile


def expected_distribution(z: np.ndarray, s: Sampling) -> np.ndarray:
    """softmax(z / T) restricted by the filters, written out plainly (float64)."""
    scores = z.astype(np.float64) / s.temperature
    keep = np.ones(len(z), bool)
    if s.top_k:
        keep &= scores >= np.sort(scores)[-s.top_k]
    p = np.where(keep, np.exp(scores - scores[keep].max()), 0)
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p, kind="stable")
        ahead = np.cumsum(p[order]) - p[order]
        cut = np.zeros(len(z), bool)
        cut[order[ahead < s.top_p]] = True
        p = np.where(cut, p, 0)
        p /= p.sum()
    if s.min_p:
        p = np.where(p >= s.min_p * p.max(), p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("settings", [Sampling(1.0), Sampling(0.5), Sampling(2.0), Sampling(1.0, top_k=3),
                                      Sampling(0.8, top_p=0.7), Sampling(1.2, min_p=0.2),
                                      Sampling(1.5, top_k=5, top_p=0.9, min_p=0.05)])
def test_first_token_frequencies_match_the_distribution(settings):
    """Over 20,000 seeds the sampled token's frequencies fit the filtered softmax(z/T): a chi-square
    test at the 0.1% level (with these distributions and N, a sampler that ignored the temperature
    or a filter would score in the hundreds or thousands: the test has power well above 99%)."""
    z = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0], dtype=np.float32)
    n = 20_000
    counts = np.bincount([kernels.choose_token(z, 3, seed, *(getattr(settings, f) for f in kernels.SAMPLING_FIELDS))
                          for seed in range(n)], minlength=len(z))
    p = expected_distribution(z, settings)
    assert counts[p == 0].sum() == 0, "a filtered-out token was sampled"
    support = p > 0
    chi2 = float((((counts - n * p) ** 2)[support] / (n * p[support])).sum())
    assert chi2 < CHI2_999[int(support.sum()) - 1], (chi2, counts, np.round(n * p))


def test_noise_is_a_function_of_seed_and_position_only():
    a = kernels.gumbel_noise(42, 17, 1000)
    assert np.array_equal(a, kernels.gumbel_noise(42, 17, 1000))
    assert not np.array_equal(a, kernels.gumbel_noise(42, 18, 1000))
    assert not np.array_equal(a, kernels.gumbel_noise(43, 17, 1000))
    assert np.array_equal(kernels.gumbel_noise(42, 17, 1200)[:1000], a)  # token i's noise: word i
    assert np.array_equal(kernels.gumbel_noise_at(42, 17, [999, 0, 4]), a[[999, 0, 4]])
    # a known value: the scheme is part of the contract (runs must be reproducible across versions)
    assert float(kernels.gumbel_noise(1, 0, 1)[0]) == pytest.approx(float(kernels.gumbel_noise_at(1, 0, [0])[0]))


def test_top_p_head_sort_equals_the_full_sort():
    rng = np.random.default_rng(0)
    for trial in range(300):
        V = int(rng.integers(2, 3000))
        z = (rng.standard_normal(V) * rng.uniform(0.1, 8)).astype(np.float32)
        if trial % 3 == 0:
            z = np.round(z, 1).astype(np.float32)  # many ties
        p = kernels.softmax(z[None])[0]
        head = kernels.most_probable_first(p, float(rng.uniform(0.01, 1.0)))
        assert np.array_equal(np.argsort(-p, kind="stable")[: len(head)], head)


def test_settings_are_checked_and_read_from_generation_config(tmp_path):
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-2), dict(min_p=2.0), dict(seed=-1), dict(seed=2 ** 64)):
        with pytest.raises(InputError):
            Sampling(**bad)
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    assert from_generation_config(tmp_path) == Sampling(0.6, top_k=50, top_p=0.9)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6}')
    assert from_generation_config(tmp_path).greedy


# ------------------------------------------------------------------------------------------------
# multi-step speculative sampling: the target's distribution, whatever the draft


def test_mss_commits_tokens_distributed_as_the_target():
    """Trees drawn from a draft q that differs from the target p (without replacement, the
    Gumbel-top-k trick, as the decoders draw them): over 20,000 seeds, MSS's first committed token
    is distributed as p, and its second as p given the first (chi-square at 0.1%)."""
    from minipipe.mss import DRAFT_SALT, target_distribution, verify_mss
    from minipipe.tree import TokenTree

    V = 6
    rng = np.random.default_rng(1)
    target_logits = {(): rng.standard_normal(V).astype(np.float32) * 1.5}  # by path of tokens
    for t in range(V):
        target_logits[(t,)] = rng.standard_normal(V).astype(np.float32) * 1.5
    draft_logits = rng.standard_normal(V).astype(np.float32)  # q: another distribution, the same at every node
    s = Sampling(0.9, seed=0)
    n, first, pairs = 20_000, np.zeros(V, int), {}
    for seed in range(n):
        s = Sampling(0.9, seed=seed)
        noise_seed = seed ^ DRAFT_SALT
        tree = TokenTree(0)
        children = np.argsort(-(draft_logits / 0.9 + kernels.gumbel_noise(noise_seed, 1, V)), kind="stable")[:2]
        for c in children:  # two children drawn without replacement, each with one child of its own
            node = tree.add(0, int(c), 0.0)
            tree.add(node, int(np.argmax(draft_logits / 0.9 + kernels.gumbel_noise(noise_seed, 2, V))), 0.0)
        logits = np.stack([target_logits[tuple(tree.tokens_to(i))[:1]] for i in range(len(tree))])
        q = target_distribution(draft_logits, s)
        q_at = {i: q for i, node in enumerate(tree.nodes) if node.children}
        _, committed = verify_mss(tree, logits, q_at, 0, s)
        first[committed[0]] += 1
        if len(committed) > 1:
            pairs.setdefault(committed[0], []).append(committed[1])
    p = target_distribution(target_logits[()], Sampling(0.9))
    chi2 = float(((first - n * p) ** 2 / (n * p)).sum())
    assert chi2 < CHI2_999[V - 1], (chi2, first, np.round(n * p))
    for t, seconds in pairs.items():  # the second token (when the first was accepted) follows p(. | t)
        if len(seconds) < 500:
            continue
        counts = np.bincount(seconds, minlength=V)
        p2 = target_distribution(target_logits[(t,)], Sampling(0.9))
        m = len(seconds)
        chi2 = float(((counts - m * p2) ** 2 / (m * p2)).sum())
        assert chi2 < CHI2_999[V - 1], (t, chi2, counts, np.round(m * p2))


def test_mss_and_independent_drafts_run_every_request_to_the_end():
    """MSS changes the text (not the distribution): it still ends by the stop rules and frees every
    cell; independent drafts verified against the target's sample still give sequential sampling."""
    from minipipe.strategies import SpeculativeStrategy, TreeStrategy

    s = Sampling(0.9, seed=5)
    for make in (lambda d, v: SpeculativeStrategy(d, k=3, verify=v), lambda d, v: TreeStrategy(d, (2, 2), verify=v)):
        for verify in ("independent", "mss"):
            strategy = make(DraftModel(PAIR.draft_model(0)), verify)
            pipe = LocalPipeline(PAIR.stage_models(0, 2), n_seqs=strategy.n_seqs)
            got = generate(strategy, pipe, (1, 2, 3), 30, max_positions=64, sampling=s)
            assert len(got.tokens) == 30 and not held_resources(pipe)
            if verify == "independent":
                assert got.tokens == sampled(0, (1, 2, 3), 30, s)
            else:
                assert got.metrics.extra["speculation"].coupled_accepted is not None


# ------------------------------------------------------------------------------------------------
# the filters against transformers' own warpers (skipped without the `hf` extra)


@pytest.mark.parametrize("settings", [Sampling(0.7), Sampling(1.3, top_k=20), Sampling(0.9, top_p=0.8),
                                      Sampling(1.0, min_p=0.1), Sampling(0.6, top_k=50, top_p=0.95, min_p=0.02)])
def test_sampling_distribution_matches_transformers(settings):
    """The distribution minipipe samples from equals the one transformers' warpers leave
    (temperature, top-k, top-p, min-p, in transformers' order): the same tokens kept, the same
    probabilities to float32 precision, on the shipped model's real logits."""
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    lp = pytest.importorskip("transformers.generation.logits_process",
                             reason="the hf extra (torch, transformers) is not installed")
    from minipipe.mss import target_distribution

    from .conftest import SHIPPED_MODELS

    model = __import__("minipipe.model", fromlist=["load_stage"]).load_stage(SHIPPED_MODELS / "tinybard")
    cache = model.new_cache()
    from minipipe.greedy import prefill

    logits = prefill(model, cache, [1, 1889, 28, 201])  # [V] after "ROMEO:\n"
    warpers = [lp.TemperatureLogitsWarper(settings.temperature)]
    if settings.top_k:
        warpers.append(lp.TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1:
        warpers.append(lp.TopPLogitsWarper(settings.top_p))
    if settings.min_p:
        warpers.append(lp.MinPLogitsWarper(settings.min_p))
    scores = torch.tensor(logits[None, :])
    for w in warpers:
        scores = w(None, scores)
    theirs = torch.softmax(scores.double(), dim=-1)[0].numpy()
    ours = target_distribution(logits, settings)
    assert np.array_equal(theirs > 0, ours > 0), "different tokens kept"
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
