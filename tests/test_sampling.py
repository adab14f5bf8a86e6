"""Tests for sampling: `SamplingParams` (validation, generation_config defaults), the batched sampler
`sample(logits, rows, generator)` (greedy, temperature, top-k/p, min-p, penalties, banned ids, seeds, logprobs),
and the same features end to end through `LLM.generate` on a tiny random-weight model.

The statistical tests compare empirical token counts with the distribution computed by an independent reference
implementation (`reference_probs`) using a chi-square test. Generators are seeded, so every run draws the same
samples: the tests are deterministic, and the critical values (alpha = 0.001) only decide how far off a
distribution may be before it is called wrong. `test_chi_square_detects_a_wrong_distribution` checks that the
test has the power to notice a small mistake.
"""
import json
import math
import os

import pytest
import torch

from nanoserve import LLM, SamplingParams
from nanoserve.sampling import GREEDY_EPS, ParamError, SampleRequest, sample

# ---------------------------------------------------------------------------------------------------------------
# SamplingParams: validation
# ---------------------------------------------------------------------------------------------------------------

BAD_PARAMS = [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=-1e-9), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=-100), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.01), "min_p"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=2.01), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(frequency_penalty=2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
]


@pytest.mark.parametrize("kwargs, param", BAD_PARAMS, ids=[f"{k}" for k, _ in BAD_PARAMS])
def test_bad_value_names_its_param(kwargs, param):
    with pytest.raises(ParamError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)  # the server maps ValueError to a 400
    assert info.value.param == param
    assert str(info.value)  # a message for the user


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=2.0), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=-1), dict(top_k=0),
    dict(top_k=1), dict(min_p=0.0), dict(min_p=1.0), dict(presence_penalty=-2.0, frequency_penalty=2.0),
    dict(presence_penalty=2.0, frequency_penalty=-2.0), dict(repetition_penalty=1e-3), dict(max_tokens=1),
    dict(min_tokens=4, max_tokens=4), dict(min_tokens=100, max_tokens=None), dict(n=1), dict(n=8),
    dict(logprobs=0), dict(logprobs=20), dict(stop=["a", "b"]), dict(seed=0), dict(seed=2**63 - 1),
])
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams.resolve: generation_config defaults, then OpenAI's
# ---------------------------------------------------------------------------------------------------------------

OPENAI_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
MODEL_DEFAULTS = dict(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1)


def fields(p, names=OPENAI_DEFAULTS):
    return {name: getattr(p, name) for name in names}


def test_resolve_falls_back_to_openai_defaults():
    p = SamplingParams().resolve({})
    assert fields(p) == OPENAI_DEFAULTS
    assert not p.greedy
    # Keys that do not name a sampling default are ignored.
    assert fields(SamplingParams().resolve({"eos_token_id": 2, "do_sample": True})) == OPENAI_DEFAULTS


def test_resolve_takes_generation_config():
    assert fields(SamplingParams().resolve({**MODEL_DEFAULTS, "do_sample": True})) == MODEL_DEFAULTS


def test_resolve_fills_only_unset_fields():
    p = SamplingParams(top_k=5).resolve({**MODEL_DEFAULTS, "do_sample": True})
    assert fields(p) == {**MODEL_DEFAULTS, "top_k": 5}


@pytest.mark.parametrize("explicit", [
    dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0),  # falsy values still win
    dict(temperature=1.3, top_p=0.5, top_k=-1, min_p=0.2, repetition_penalty=0.9),
])
def test_explicit_values_win(explicit):
    p = SamplingParams(**explicit).resolve({**MODEL_DEFAULTS, "do_sample": True})
    assert fields(p) == explicit


def test_resolve_returns_a_new_object_and_keeps_other_fields():
    original = SamplingParams(max_tokens=7, stop=["x"], seed=3, n=2, logprobs=1)
    resolved = original.resolve(MODEL_DEFAULTS)
    assert original.temperature is None and original.top_k is None  # not modified in place
    assert (resolved.max_tokens, resolved.stop, resolved.seed, resolved.n, resolved.logprobs) == (7, ["x"], 3, 2, 1)


def test_greedy_below_epsilon():
    assert SamplingParams(temperature=0.0).resolve({}).greedy
    assert SamplingParams(temperature=GREEDY_EPS / 2).resolve({}).greedy
    assert not SamplingParams(temperature=GREEDY_EPS * 10).resolve({}).greedy
    assert SamplingParams().resolve({"temperature": 0.0}).greedy  # a model may default to greedy


# ---------------------------------------------------------------------------------------------------------------
# The sampler: helpers and an independent reference for the distribution each row samples from
# ---------------------------------------------------------------------------------------------------------------

def req(prompt=(), output=(), banned=(), generator=None, **params):
    return SampleRequest(SamplingParams(**params).resolve({}), list(prompt), list(output), generator, list(banned))


def reference_probs(logits, p, prompt=(), output=(), banned=()):
    """The distribution a row is sampled from, written independently of sampling.py (float64):
    repetition penalty (prompt and output), frequency/presence penalties (output), banned ids, temperature,
    then top-k, top-p and min-p, each on the renormalized survivors, as in vLLM and transformers."""
    x = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * list(output).count(t) + p.presence_penalty
    x[list(banned)] = -math.inf
    probs = torch.softmax(x / p.temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = probs > 0
    if p.top_k and 0 < p.top_k < len(x):
        keep[order[p.top_k:]] = False
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:
        before = 0.0
        for t in order.tolist():
            if before >= p.top_p:
                keep[t] = False
            before += float(probs[t])
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


# Chi-square critical values at alpha = 0.001 by degrees of freedom.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
             11: 31.26, 12: 32.91}


def chi_square(counts, probs):
    """Pearson's statistic over the tokens with probability > 0 (expected counts of at least 5, else pooled)
    and its degrees of freedom. Tokens with probability 0 must never be drawn."""
    n = int(counts.sum())
    assert int(counts[probs == 0].sum()) == 0, f"drew tokens outside the support: {counts.tolist()}"
    cells, pool_obs, pool_exp = [], 0.0, 0.0
    for c, p in zip(counts.tolist(), probs.tolist()):
        if p == 0:
            continue
        if n * p >= 5:
            cells.append((c, n * p))
        else:
            pool_obs, pool_exp = pool_obs + c, pool_exp + n * p
    if pool_exp:
        cells.append((pool_obs, pool_exp))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def draw(logits, n, seed=0, **kwargs):
    """Counts of n samples of one row (n identical rows in one batch, one shared generator)."""
    row = req(**kwargs)
    result = sample(logits.expand(n, -1).clone(), [row] * n, torch.Generator().manual_seed(seed))
    return torch.bincount(torch.tensor(result.token_ids), minlength=logits.numel()), row


def assert_follows(logits, n, seed=0, **kwargs):
    counts, row = draw(logits, n, seed, **kwargs)
    probs = reference_probs(logits, row.params, row.prompt_token_ids, row.output_token_ids, row.banned_token_ids)
    stat, df = chi_square(counts, probs)
    if df == 0:
        return
    assert stat < CHI2_CRIT[df], f"chi2={stat:.1f} (df={df}): counts {counts.tolist()}, expected " \
                                 f"{[round(float(p) * n) for p in probs]}"


LOGITS8 = torch.tensor([1.2, -0.3, 0.8, 2.0, -1.5, 0.1, 1.6, -0.7])


def test_temperature_one_matches_softmax():
    assert_follows(LOGITS8, 20_000)


def test_chi_square_detects_a_wrong_distribution():
    # The same 20k samples against a distribution 10% hotter must fail: the test has power.
    counts, _ = draw(LOGITS8, 20_000)
    stat, df = chi_square(counts, torch.softmax(LOGITS8.double() / 1.1, dim=-1))
    assert stat > CHI2_CRIT[df]


@pytest.mark.parametrize("params", [
    dict(temperature=0.5),
    dict(temperature=1.7),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.7),  # keeps 3 tokens: 0.36 + 0.24 + 0.16 crosses 0.7
    dict(temperature=0.8, top_k=5, top_p=0.9),  # keeps 4 of the top 5 (0.86 < 0.9 < 0.96)
    dict(temperature=1.0, min_p=0.25),  # keeps 4: 0.109 > 0.25 * 0.361 > 0.054
    dict(temperature=1.0, top_k=100),  # larger than the vocabulary: no truncation
    dict(temperature=1.0, top_k=-1),
])
def test_truncated_distributions(params):
    assert_follows(LOGITS8, 6000, seed=1, **params)


@pytest.mark.parametrize("context", [
    dict(prompt=[3, 0], repetition_penalty=1.5),  # 2.0 -> 1.33, 1.2 -> 0.8
    dict(output=[4, 1], repetition_penalty=1.5),  # negative logits: -1.5 -> -2.25, -0.3 -> -0.45
    dict(output=[3, 3, 6], presence_penalty=0.7, frequency_penalty=0.4),
    dict(output=[4], presence_penalty=-1.5),  # negative: encourages repetition
    dict(banned=[3, 6]),
    dict(banned=[3], top_k=2, output=[0], presence_penalty=0.5),  # banned before top-k
])
def test_penalized_distributions(context):
    assert_follows(LOGITS8, 6000, seed=2, temperature=1.0, **context)


def test_repetition_penalty_lowers_seen_tokens_frequency():
    logits = torch.ones(8)
    free, _ = draw(logits, 8000, seed=3, temperature=1.0)
    penalized, _ = draw(logits, 8000, seed=3, temperature=1.0, prompt=[0, 5], repetition_penalty=2.0)
    assert penalized[0] < 0.8 * free[0] and penalized[5] < 0.8 * free[5]
    assert penalized[1] > free[1]


# ---------------------------------------------------------------------------------------------------------------
# The sampler: deterministic rules
# ---------------------------------------------------------------------------------------------------------------

def random_logits(rows, vocab, seed, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_picks_argmax():
    logits = random_logits(64, 500, seed=4)
    rows = [req(temperature=0.0), req(temperature=GREEDY_EPS / 10)] * 32
    assert sample(logits.clone(), rows).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=1), dict(temperature=5.0, top_k=1), dict(temperature=1.0, top_p=1e-6),
    dict(temperature=2.0, top_p=0.01), dict(temperature=1.0, min_p=1.0), dict(temperature=3.0, min_p=1.0),
    dict(temperature=1e-3),  # tiny but not greedy: logits / T is huge, the softmax must not turn into NaN
])
def test_filters_that_leave_only_the_top_token(params):
    logits = random_logits(256, 300, seed=5)
    result = sample(logits.clone(), [req(**params)] * 256, torch.Generator().manual_seed(6))
    assert result.token_ids == logits.argmax(-1).tolist()


def test_banned_ids_are_never_chosen():
    logits = random_logits(512, 40, seed=7, scale=1.0)
    top3 = logits.topk(3, dim=-1).indices
    rows = [req(temperature=t, banned=top3[i].tolist()) for i, t in enumerate([1.0, 0.0, 2.0, 0.7] * 128)]
    tokens = torch.tensor(sample(logits.clone(), rows, torch.Generator().manual_seed(8)).token_ids)
    assert not (tokens[:, None] == top3).any()
    greedy = [i for i in range(512) if rows[i].params.greedy]
    assert tokens[greedy].tolist() == logits[greedy].topk(4, dim=-1).indices[:, 3].tolist()  # the 4th best


def test_everything_banned_but_one():
    logits = random_logits(64, 16, seed=9)
    rows = [req(temperature=1.0, banned=[t for t in range(16) if t != i % 16]) for i in range(64)]
    assert sample(logits.clone(), rows, torch.Generator().manual_seed(10)).token_ids == [i % 16 for i in range(64)]


@pytest.mark.parametrize("logits, context, expected", [
    ([2.0, 1.9, 0.5], dict(prompt=[0], repetition_penalty=1.2), 1),  # 2.0 / 1.2 < 1.9
    ([2.0, 1.9, 0.5], dict(prompt=[0], repetition_penalty=1.04), 0),  # 2.0 / 1.04 > 1.9
    ([-1.0, -1.1, -3.0], dict(output=[0], repetition_penalty=1.2), 1),  # -1.0 * 1.2 < -1.1
    ([2.0, 1.9, 0.5], dict(output=[0], presence_penalty=0.5), 1),
    ([2.0, 1.9, 0.5], dict(prompt=[0], presence_penalty=2.0, frequency_penalty=2.0), 0),  # output only
    ([2.0, 1.9, 0.5], dict(output=[0, 0, 0], frequency_penalty=0.1), 1),  # 2.0 - 3 * 0.1 < 1.9
    ([2.0, 1.9, 0.5], dict(output=[0], frequency_penalty=0.05), 0),  # 2.0 - 0.05 > 1.9
    ([2.0, 1.9, 0.5], dict(output=[1], presence_penalty=-0.5), 1),  # a negative penalty rewards repetition
    ([2.0, 1.9, 0.5], dict(output=[1, 1], frequency_penalty=-0.1), 1),
])
def test_penalties_change_the_greedy_choice(logits, context, expected):
    assert sample(torch.tensor([logits]), [req(temperature=0.0, **context)]).token_ids == [expected]


def test_rows_are_independent_of_each_other():
    # Per-row params: a penalized or filtered row must not leak into its neighbours.
    logits = torch.tensor([[2.0, 1.9, 0.5]] * 3)
    rows = [req(temperature=0.0, output=[0], presence_penalty=1.0), req(temperature=0.0),
            req(temperature=1.0, top_k=1, banned=[0])]
    assert sample(logits, rows, torch.Generator().manual_seed(0)).token_ids == [1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_logits(dtype):
    logits = random_logits(8, 50, seed=11).to(dtype)
    rows = [req(temperature=0.0, logprobs=2), req(temperature=1.0, top_p=0.9, logprobs=2)] * 4
    result = sample(logits, rows, torch.Generator().manual_seed(12))
    assert result.token_ids[::2] == logits.float().argmax(-1)[::2].tolist()
    assert all(isinstance(t, int) for t in result.token_ids)


def test_sample_does_not_modify_its_input():
    from nanoserve.sampling import target_probs
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    before = logits.clone()
    row = req(temperature=0.0, prompt=[2], repetition_penalty=2.0, banned=[1])
    sample(logits, [row])
    target_probs(logits, [row])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------------------------
# Seeds: a seeded row does not depend on its batch
# ---------------------------------------------------------------------------------------------------------------

VOCAB = 64
OUR_LOGITS = random_logits(10, VOCAB, seed=13, scale=1.5)  # one row per step
OUR_PARAMS = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2)


def seeded_run(seed, position, batch_size, noise_seed):
    """Sample our seeded row for 10 steps at `position` in batches of `batch_size`, the other rows being random
    logits with assorted params (unseeded, seeded with other seeds, greedy, with logprobs)."""
    ours = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(noise_seed)
    others = [torch.Generator().manual_seed(noise_seed * 100 + i) for i in range(batch_size)]
    kinds = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, top_k=5, logprobs=3),
             dict(temperature=1.2, min_p=0.1), dict(temperature=1.0, seeded=True)]
    out = []
    for step in range(10):
        logits = random_logits(batch_size, VOCAB, seed=noise_seed * 1000 + step)
        rows = []
        for i in range(batch_size):
            if i == position:
                logits[i] = OUR_LOGITS[step]
                rows.append(req(prompt=[1, 2, 3], output=out, generator=ours, **OUR_PARAMS))
            else:
                kind = dict(kinds[(i + step + noise_seed) % len(kinds)])
                gen = others[i] if kind.pop("seeded", False) else None
                rows.append(req(prompt=[4], output=[5, 6], generator=gen, **kind))
        out.append(sample(logits, rows, shared).token_ids[position])
    return out


def test_seeded_row_ignores_its_batch():
    alone = seeded_run(seed=1234, position=0, batch_size=1, noise_seed=0)
    for position, batch_size, noise_seed in [(0, 5, 1), (3, 6, 2), (6, 7, 3), (2, 3, 4)]:
        assert seeded_run(1234, position, batch_size, noise_seed) == alone
    assert seeded_run(1235, 0, 1, 0) != alone  # the seed matters (10 draws from ~20 likely tokens)


def test_seeded_rows_leave_the_shared_generator_alone():
    """Unseeded rows draw from the shared generator in order; seeded and greedy rows do not touch it."""
    logits = random_logits(6, VOCAB, seed=14)
    plain = [req(temperature=1.0), req(temperature=1.0, top_k=10)]
    a = sample(logits[[0, 1]], plain, torch.Generator().manual_seed(5)).token_ids
    mixed = [req(temperature=1.0, generator=torch.Generator().manual_seed(9)), plain[0], req(temperature=0.0),
             plain[1], req(temperature=1.0, generator=torch.Generator().manual_seed(10))]
    b = sample(logits[[2, 0, 3, 1, 4]], mixed, torch.Generator().manual_seed(5)).token_ids
    assert [b[1], b[3]] == a


# ---------------------------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------------------------

def test_logprobs_are_raw_with_rank_and_sorted_top_k():
    logits = random_logits(8, 100, seed=15, scale=2.0)
    rows = [req(temperature=0.0, logprobs=0), req(temperature=1.0, logprobs=1),
            req(temperature=0.7, top_k=10, logprobs=5, output=[3], presence_penalty=1.0),
            req(temperature=1.5, logprobs=20, prompt=[1, 2], repetition_penalty=1.3),
            req(temperature=1.0, logprobs=3, banned=logits[4].topk(2).indices.tolist()),
            req(temperature=1.0),  # no logprobs asked
            req(temperature=2.0, logprobs=2), req(temperature=0.0, logprobs=20)]
    result = sample(logits.clone(), rows, torch.Generator().manual_seed(16))
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert result.logprobs[5] is None
    for i, (row, token, entry) in enumerate(zip(rows, result.token_ids, result.logprobs)):
        if row.params.logprobs is None:
            continue
        chosen, rank, top = entry
        k = row.params.logprobs
        # vLLM's default: log-probabilities of the model's raw distribution, before penalties and temperature.
        assert chosen == pytest.approx(float(raw[i, token]), abs=1e-5)
        assert rank == 1 + int((raw[i] > raw[i, token]).sum())
        assert len(top) == k
        assert [t for t, _ in top] == raw[i].topk(k).indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(raw[i].topk(k).values.tolist(), abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert result.logprobs[0][1] == 1  # greedy: rank 1
    assert result.logprobs[4][1] >= 3  # the two best were banned
    ranks = [e[1] for e in result.logprobs if e is not None]
    assert max(ranks) > 1  # sampling does not only pick the top token here


def test_no_logprobs_requested():
    result = sample(random_logits(3, 10, seed=17), [req(temperature=1.0)] * 3, torch.Generator().manual_seed(0))
    assert result.logprobs == [None, None, None]


# ---------------------------------------------------------------------------------------------------------------
# End to end through LLM.generate on a tiny model
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ["The cat eats an apple", "A robot builds", "My friend reads many books near the river,",
           "Every student counts strange numbers", "x = [1, 2, 3]", "Nobody", "Our teacher explains code today.",
           "She paints the red house in the morning!"]


@pytest.fixture(scope="module")
def llm(llama_dir):
    # Small blocks and a small token budget: busy batches mix chunked prefills, decodes and prefix hits.
    return LLM(llama_dir, block_size=4, max_num_batched_tokens=48, max_model_len=256)


def greedy(max_tokens, **kwargs):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def only(out):
    (completion,) = out.outputs
    return completion


def test_seeded_request_same_alone_and_in_a_busy_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=4242, max_tokens=24, ignore_eos=True)
    target = PROMPTS[2]
    alone = only(llm.generate([target], seeded, use_tqdm=False)[0])
    assert len(alone.token_ids) == 24
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=12, ignore_eos=True),
              greedy(20), SamplingParams(temperature=1.3, max_tokens=5, ignore_eos=True, n=2),
              SamplingParams(temperature=1.0, seed=4242, max_tokens=18, ignore_eos=True)]  # same seed, other prompt
    for position in (0, 3, 7):
        prompts = [p for p in PROMPTS if p != target]
        params = [others[i % len(others)] for i in range(len(prompts))]
        prompts.insert(position, target)
        params.insert(position, seeded)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert only(outs[position]).token_ids == alone.token_ids, position
        assert only(outs[position]).text == alone.text
    # A different engine configuration (no chunked prefill, other block size, other engine seed) too.
    other = LLM(llm.engine.config.model, block_size=8, max_model_len=256, seed=99)
    assert only(other.generate([PROMPTS[0], target], [others[0], seeded], use_tqdm=False)[1]).token_ids == \
        alone.token_ids
    # And a pool so small that sequences are preempted and recomputed (the last admitted first, so the seeded
    # request, last here, is preempted twice): its generator's state survives that.
    tight = LLM(llm.engine.config.model, block_size=4, num_gpu_blocks_override=24, max_model_len=96)
    long = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    outs = tight.generate(PROMPTS[:2] + PROMPTS[3:6] + [target], [long] * 5 + [seeded], use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert only(outs[-1]).token_ids == alone.token_ids


def test_parallel_samples_differ(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Seeded: reproducible, and still different from each other.
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=11)
    first = [c.token_ids for c in llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs]
    assert first == again and len({tuple(t) for t in first}) > 1


def test_greedy_parallel_samples_are_identical(llm):
    out = llm.generate([PROMPTS[1]], greedy(10, n=3), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert out.outputs[0].token_ids == only(llm.generate([PROMPTS[1]], greedy(10), use_tqdm=False)[0]).token_ids


_references = {}


def reference(llm, prompt, max_tokens=30):
    """The plain greedy completion (cached: several tests derive stop strings and stop tokens from it)."""
    key = (id(llm.engine), prompt, max_tokens)
    if key not in _references:
        _references[key] = only(llm.generate([prompt], greedy(max_tokens), use_tqdm=False)[0])
    return _references[key]


def test_max_tokens_and_ignore_eos(llm):
    for max_tokens in (1, 2, 7):
        c = only(llm.generate([PROMPTS[0]], greedy(max_tokens), use_tqdm=False)[0])
        assert len(c.token_ids) == max_tokens and c.finish_reason == "length" and c.stop_reason is None
    full = reference(llm, PROMPTS[0])
    assert only(llm.generate([PROMPTS[0]], greedy(7), use_tqdm=False)[0]).token_ids == full.token_ids[:7]


def ascii_stop_string(llm, full, min_index=2):
    """A short ASCII string of the greedy text that first appears at or after token `min_index`, with the index of
    the token that completes it."""
    tok = llm.get_tokenizer()
    for j in range(min_index, len(full.token_ids)):
        piece = tok.decode(full.token_ids[j:j + 1]).strip()
        if len(piece) >= 2 and piece.isascii() and piece.isprintable():
            at = full.text.find(piece)
            if at >= len(tok.decode(full.token_ids[:j])) - 2:
                # the token that completes the first occurrence
                end = next(i for i in range(1, len(full.token_ids) + 1)
                           if piece in tok.decode(full.token_ids[:i]))
                return piece, at, end - 1
    pytest.skip("no ASCII token in the greedy text")


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_stop_string(llm, prompt):
    full = reference(llm, prompt)
    stop, at, j = ascii_stop_string(llm, full)
    c = only(llm.generate([prompt], greedy(30, stop=[stop, "\x00never"]), use_tqdm=False)[0])
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full.text[:at]  # truncated before the stop string
    assert c.token_ids == full.token_ids[:j + 1]  # up to the token that completed it
    c = only(llm.generate([prompt], greedy(30, stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0])
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full.text[:at + len(stop)]


def test_stop_string_on_the_last_allowed_token(llm):
    prompt = PROMPTS[0]
    full = reference(llm, prompt)
    stop, at, j = ascii_stop_string(llm, full)
    c = only(llm.generate([prompt], greedy(j + 1, stop=[stop]), use_tqdm=False)[0])
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, full.text[:at])  # as vLLM reports it


def test_stop_string_counts_from_min_tokens(llm):
    prompt = PROMPTS[0]
    full = reference(llm, prompt)
    stop, at, j = ascii_stop_string(llm, full)
    c = only(llm.generate([prompt], greedy(30, stop=[stop], min_tokens=j + 2), use_tqdm=False)[0])
    # The occurrence completed before min_tokens is ignored and kept in the text; greedy output is unchanged
    # (stop strings ban nothing), and a later occurrence may still stop it.
    assert c.token_ids == full.token_ids[:len(c.token_ids)] and len(c.token_ids) >= j + 2
    assert c.text.startswith(full.text[:at + len(stop)])
    assert c.finish_reason == "length" or (c.finish_reason, c.stop_reason) == ("stop", stop)


def test_stop_string_on_the_min_tokens_th_token_is_ignored(llm):
    # As in vLLM, stop strings count once more than min_tokens tokens exist, like stop tokens (masked up to and
    # including the min_tokens-th token).
    prompt = PROMPTS[0]
    full = reference(llm, prompt)
    stop, at, j = ascii_stop_string(llm, full)
    c = only(llm.generate([prompt], greedy(30, stop=[stop], min_tokens=j + 1), use_tqdm=False)[0])
    assert len(c.token_ids) > j + 1


def first_fresh_token(ids, min_index):
    """The first token at or after min_index that does not occur before it."""
    return next(j for j in range(min_index, len(ids)) if ids[j] not in ids[:j])


@pytest.mark.parametrize("prompt", PROMPTS[3:5])
def test_stop_token_ids(llm, prompt):
    full = reference(llm, prompt)
    j = first_fresh_token(full.token_ids, 3)
    t = full.token_ids[j]
    c = only(llm.generate([prompt], greedy(30, stop_token_ids=[t]), use_tqdm=False)[0])
    assert (c.finish_reason, c.stop_reason) == ("stop", t)
    assert c.token_ids == full.token_ids[:j + 1]  # the stop token is in token_ids
    without = only(llm.generate([prompt], greedy(j), use_tqdm=False)[0]).text
    assert c.text == without  # but not in the text
    c = only(llm.generate([prompt], greedy(30, stop_token_ids=[t], include_stop_str_in_output=True),
                          use_tqdm=False)[0])
    assert c.text == only(llm.generate([prompt], greedy(j + 1), use_tqdm=False)[0]).text


def test_min_tokens_bans_stop_tokens(llm):
    prompt = PROMPTS[3]
    full = reference(llm, prompt)
    j = first_fresh_token(full.token_ids, 1)
    t = full.token_ids[j]
    c = only(llm.generate([prompt], greedy(30, stop_token_ids=[t], min_tokens=j + 3), use_tqdm=False)[0])
    assert t not in c.token_ids[:j + 3]  # masked while below min_tokens...
    assert c.token_ids[:j] == full.token_ids[:j]  # ...which changes nothing before it would have been chosen
    assert c.token_ids[j] != t
    assert c.finish_reason == "length" or (c.finish_reason == "stop" and c.token_ids[-1] == t)


@pytest.fixture(scope="module")
def eos_model_dir(llm, llama_dir, tmp_path_factory):
    """The llama test model with generation_config's eos_token_id set to a token its greedy output produces,
    so EOS handling can be tested (the random model hardly ever emits the real EOS)."""
    ids = reference(llm, PROMPTS[5]).token_ids
    j = first_fresh_token(ids, 3)
    path = tmp_path_factory.mktemp("eos_model")
    for name in os.listdir(llama_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(llama_dir, name), path / name)
    with open(os.path.join(llama_dir, "generation_config.json")) as f:
        gen = json.load(f)
    gen["eos_token_id"] = ids[j]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return str(path), ids, j


def test_eos_ignore_eos_and_min_tokens(eos_model_dir):
    path, ids, j = eos_model_dir
    llm = LLM(path, max_model_len=256)
    eos = ids[j]
    c = only(llm.generate([PROMPTS[5]], SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)[0])
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", None, ids[:j + 1])  # EOS kept in token_ids
    c = only(llm.generate([PROMPTS[5]], greedy(30), use_tqdm=False)[0])  # ignore_eos: runs on, EOS not masked
    assert (c.finish_reason, c.token_ids) == ("length", ids)
    c = only(llm.generate([PROMPTS[5]], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=j + 2),
                          use_tqdm=False)[0])
    assert eos not in c.token_ids[:j + 2] and c.token_ids[:j] == ids[:j]
    assert c.finish_reason == "length" or (c.finish_reason, c.stop_reason, c.token_ids[-1]) == ("stop", None, eos)


def test_logprobs_match_the_model(llm, llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    for params in (greedy(12, logprobs=2), SamplingParams(temperature=1.5, seed=3, max_tokens=12, ignore_eos=True,
                                                           logprobs=2), greedy(6, logprobs=0)):
        c = only(llm.generate([PROMPTS[6]], params, use_tqdm=False)[0])
        prompt_ids = tok(PROMPTS[6]).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + c.token_ids])).logits[0, len(prompt_ids) - 1:-1]
        want = torch.log_softmax(logits.double(), dim=-1)
        assert len(c.logprobs) == len(c.token_ids)
        total = 0.0
        for pos, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert token in entry
            top = want[pos].topk(params.logprobs).indices.tolist() if params.logprobs else []
            assert set(entry) == set(top) | {token}
            for t, lp in entry.items():
                assert lp.logprob == pytest.approx(float(want[pos, t]), abs=1e-4)
                assert lp.decoded_token == tok.decode([t])
            assert entry[token].rank == 1 + int((want[pos] > want[pos, token] + 1e-6).sum())
            for r, t in enumerate(top, start=1):
                assert entry[t].rank == r
            total += entry[token].logprob
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
        if params.temperature == 0:
            assert all(entry[t].rank == 1 for t, entry in zip(c.token_ids, c.logprobs))
    assert only(llm.generate([PROMPTS[6]], greedy(3), use_tqdm=False)[0]).logprobs is None


GEN_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_k": 1, "top_p": 0.9, "min_p": 0.05,
                "repetition_penalty": 1.8}


def test_generation_config_defaults(tiny_model_factory):
    path = tiny_model_factory("llama", generation_config_overrides=GEN_DEFAULTS)
    llm = LLM(path, max_model_len=256)
    engine = llm.engine
    engine.add_request("defaults", PROMPTS[0], SamplingParams(max_tokens=3))
    engine.add_request("explicit", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, top_k=0, top_p=1.0,
                                                                min_p=0.0, repetition_penalty=1.0))
    engine.add_request("none", PROMPTS[0])  # no params at all
    got = {rid: fields(engine.requests[rid].params) for rid in ("defaults", "explicit", "none")}
    for rid in list(got):
        engine.abort_request(rid)
    model_defaults = {k: v for k, v in GEN_DEFAULTS.items() if k != "do_sample"}
    assert got["defaults"] == model_defaults == got["none"]
    assert got["explicit"] == dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks

    # The defaults are used: top_k=1 from the model makes sampling greedy, with its repetition penalty (which
    # changes the output of some prompts).
    def run(params):
        return [only(out).token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False)]
    sampled = run(SamplingParams(max_tokens=16, ignore_eos=True))
    assert sampled == run(greedy(16, repetition_penalty=GEN_DEFAULTS["repetition_penalty"]))
    assert sampled != run(greedy(16, repetition_penalty=1.0))


def test_do_sample_false_is_greedy_as_in_transformers(llama_dir, tmp_path):
    """A model whose generation_config says do_sample: false (with a temperature that would otherwise apply)
    decodes greedily, token for token as transformers' generate() with that config does."""
    import shutil

    from conftest import _load

    path = str(shutil.copytree(llama_dir, tmp_path / "model"))
    config_path = os.path.join(path, "generation_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:  # transformers refuses to save this combination, but models ship it
        json.dump({**config, "do_sample": False, "temperature": 0.9}, f)
    llm = LLM(path)
    prompts = [llm.get_tokenizer()(p).input_ids for p in PROMPTS[:4]]
    got = [only(out).token_ids for out in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                      SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)]
    model = _load(path)  # generate() reads the same generation_config.json
    for ids, tokens in zip(prompts, got):
        x = torch.tensor([ids])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, eos_token_id=[],
                              pad_token_id=model.config.pad_token_id)[0, len(ids):].tolist()
        assert tokens == want


def test_max_new_tokens_is_the_default_max_tokens():
    assert SamplingParams(max_tokens=None).resolve({"max_new_tokens": 7}).max_tokens == 7
    assert SamplingParams(max_tokens=3).resolve({"max_new_tokens": 7}).max_tokens == 3  # the request wins
    assert SamplingParams(max_tokens=None).resolve({}).max_tokens is None  # unset: up to the context
