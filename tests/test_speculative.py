"""Speculative decoding (issue 5): lossless for greedy, distribution-preserving for sampling.

- Greedy output with speculation is token-identical to output without it and to transformers, for the n-gram
  proposer and for draft models (the target itself: every draft accepted; a different random model: some
  rejected), across hypothesis-generated prompts, batch mixes, chunked prefill, preemption and prefix-cache hits;
  every KV block is free afterwards. Random tiny models never repeat themselves, so the n-gram proposer is also
  run on a "bigram" model (attention output zeroed: the next token depends on the last one only) whose greedy
  output cycles like a model copying a passage: there its drafts are accepted.
- `rejection_sample` is checked directly on a 5-token vocabulary with a chi-square test over many draws, and the
  same check is shown to reject copies of the rule with a planted mistake, so it can fail. An end-to-end run on
  the tiny model (top-k 5) checks the joint law of two sampled tokens against transformers' probabilities.
- Sampling parameters (seed, n, logprobs, penalties), stop conditions met in the middle of a multi-token step,
  and configuration errors.
- Regressions of bugs found while writing this file: logprobs taken after penalties under speculation; a stop
  string and max_tokens met in one step reported "length"; blocks filled by accepted drafts hashed from a partial
  token list (no prefix-cache hits on generated text); blocks cached before the draft model's K/V were complete;
  an n-gram config with only prompt_lookup_min rejected.
"""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import _load, hf_greedy, make_tiny_model, top2_gap
from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.scheduler import rejection_sample

K = 3
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
FIRST_TOKEN = 3  # ids 0..2 are the tokenizer's special tokens; prompts avoid them
VOCAB = 800
PROPOSERS = ["ngram", "self-draft", "other-draft"]


def greedy(max_tokens=20, ignore_eos=True, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, **kw)


def random_prompts(count, seed, min_len=3, max_len=40):
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def repeated_chunks(count, seed):
    """A random chunk repeated a few times."""
    rng = random.Random(seed)
    return [chunk * rng.randint(2, 5) for chunk in random_prompts(count, seed, 3, 8)]


def ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def spec_stats(llm):
    s = llm.engine.stats()
    return s["spec_decode_num_drafts"], s["spec_decode_num_draft_tokens"], s["spec_decode_num_accepted_tokens"]


def stats_delta(llm, before):
    return tuple(a - b for a, b in zip(spec_stats(llm), before))


def assert_no_leak(llm):
    bm = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0


def assert_matches_hf(model_dir, prompts, outputs, max_tokens, ignore_eos=True):
    expected = hf_greedy(model_dir, prompts, max_tokens, ignore_eos=ignore_eos)
    for prompt, got, want in zip(prompts, ids(outputs), expected):
        if got != want:
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            gap = top2_gap(model_dir, prompt + want[:k])
            pytest.fail(f"mismatch at output token {k}: got {got[k:k + 3]}, transformers {want[k:k + 3]}; "
                        f"top-2 logit gap there is {gap:.2e} (a gap near 0 is a tie, anything else a bug)")


# ----------------------------------------------------------------------------------------------------------------
# Models and engines shared by the tests of this module
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads per process thrash on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_draft_dir(tiny_model_factory):
    """Same tokenizer and vocabulary as the target, other weights, one layer: a draft that is often wrong."""
    return tiny_model_factory("llama", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    """A tiny Llama whose attention output projections are zero: its next token is a function of the last token,
    so greedy output runs into a cycle of that map and repeats it, as a model copying a passage does. The final
    norm's gain is doubled (sharper distributions, same argmax), so sampled output often follows the cycle too."""
    path = make_tiny_model(tmp_path_factory.mktemp("bigram"), "llama", seed=3)
    weights = load_file(f"{path}/model.safetensors")
    for name, w in weights.items():
        if "o_proj" in name:
            w.zero_()
        elif name == "model.norm.weight":
            w.mul_(2)
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def cycles(bigram_dir):
    """The cycles of the bigram model's greedy map (without special tokens), each a list of tokens."""
    with torch.no_grad():
        successor = _load(bigram_dir)(torch.arange(VOCAB)[:, None]).logits[:, -1].argmax(-1).tolist()
    found = set()
    for token in range(FIRST_TOKEN, VOCAB):
        for _ in range(VOCAB):  # walk until surely on the cycle
            token = successor[token]
        cycle = [token]
        while successor[cycle[-1]] != token:
            cycle.append(successor[cycle[-1]])
        start = cycle.index(min(cycle))
        if min(cycle) >= FIRST_TOKEN:
            found.add(tuple(cycle[start:] + cycle[:start]))
    assert found
    return [list(c) for c in sorted(found)]


def cycle_prompt(cycles, head, which, shift, reps):
    """A random head, then a cycle of the bigram model (rotated) `reps` times: the output continues the cycle."""
    cycle = cycles[which % len(cycles)]
    shift %= len(cycle)
    return head + (cycle[shift:] + cycle[:shift]) * reps


@pytest.fixture(scope="module")
def llm_for(llama_dir, other_draft_dir, bigram_dir):
    """llm_for(model, proposer, k, **engine_args): one engine per distinct arguments, reused by every test of this
    module (hypothesis runs many examples; reuse also makes later requests prefix-cache hits)."""
    models = {"llama": llama_dir, "bigram": bigram_dir}
    cache = {}

    def get(model="llama", proposer=None, k=K, **engine_args):
        key = (model, proposer, k, tuple(sorted(engine_args.items())))
        if key not in cache:
            spec = None if proposer is None else {
                "ngram": {**NGRAM, "num_speculative_tokens": k},
                "self-draft": {"model": models[model], "num_speculative_tokens": k},
                "other-draft": {"model": other_draft_dir, "num_speculative_tokens": k}}[proposer]
            engine_args.setdefault("block_size", 4)
            cache[key] = LLM(models[model], speculative_config=spec, **engine_args)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def model_dirs(llama_dir, bigram_dir):
    return {"llama": llama_dir, "bigram": bigram_dir}


# ----------------------------------------------------------------------------------------------------------------
# Lossless greedy decoding
# ----------------------------------------------------------------------------------------------------------------

token = st.integers(FIRST_TOKEN, VOCAB - 1)
random_prompt = st.lists(token, min_size=1, max_size=40)
chunk_prompt = st.builds(lambda head, chunk, reps: head + chunk * reps,
                         st.lists(token, max_size=5), st.lists(token, min_size=2, max_size=8), st.integers(2, 5))
cycle_args = st.tuples(st.lists(token, max_size=5), st.integers(0, 99), st.integers(0, 99), st.integers(1, 4))


@pytest.mark.parametrize("model, proposer", [("llama", "ngram"), ("llama", "self-draft"), ("llama", "other-draft"),
                                             ("bigram", "ngram"), ("bigram", "other-draft")])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), max_tokens=st.integers(1, 24), ignore_eos=st.booleans())
def test_greedy_lossless_hypothesis(llm_for, model_dirs, cycles, model, proposer, data, max_tokens, ignore_eos):
    kinds = [random_prompt, chunk_prompt] + ([cycle_args] if model == "bigram" else [])
    drawn = data.draw(st.lists(st.one_of(kinds), min_size=1, max_size=4), label="prompts")
    prompts = [cycle_prompt(cycles, *x) if isinstance(x, tuple) else x for x in drawn]
    params = greedy(max_tokens, ignore_eos=ignore_eos)
    llm = llm_for(model, proposer)
    before = spec_stats(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_matches_hf(model_dirs[model], prompts, outputs, max_tokens, ignore_eos)
    assert ids(outputs) == ids(llm_for(model).generate(prompts, params, use_tqdm=False))
    drafts, draft_tokens, accepted = stats_delta(llm, before)
    if proposer == "ngram" and max_tokens >= 3 and any(isinstance(x, tuple) for x in drawn):
        assert accepted > 0, "the output repeats a cycle of the prompt: prompt lookup must predict some of it"
    assert_no_leak(llm)


def test_ngram_accepts_repeated_output(llm_for, bigram_dir, cycles):
    llm = llm_for("bigram", "ngram", k=4)
    prompts = [cycle_prompt(cycles, head, i, 3 * i, 2) for i, head in enumerate(random_prompts(6, 10, 0, 5))]
    outputs = llm.generate(prompts, greedy(40), use_tqdm=False)
    assert_matches_hf(bigram_dir, prompts, outputs, 40)
    drafts, draft_tokens, accepted = spec_stats(llm)
    # Prompt lookup proposes what followed the last match: up to a cycle's length, at most 4 tokens.
    assert accepted == draft_tokens and accepted / drafts > 2
    assert_no_leak(llm)


def test_self_draft_accepts_everything(llm_for, llama_dir):
    llm = llm_for("llama", "self-draft")
    before = spec_stats(llm)
    prompts = random_prompts(5, seed=11)
    outputs = llm.generate(prompts, greedy(25), use_tqdm=False)
    drafts, draft_tokens, accepted = stats_delta(llm, before)
    assert accepted == draft_tokens > 0
    # the first token comes from the prefill, then each step adds K + 1 tokens: 24 tokens in 6 steps
    assert drafts == len(prompts) * 6
    assert_matches_hf(llama_dir, prompts, outputs, 25)


def test_other_draft_rejections_keep_output(llm_for, llama_dir):
    llm = llm_for("llama", "other-draft")
    before = spec_stats(llm)
    prompts = random_prompts(6, seed=12) + repeated_chunks(2, seed=13)
    outputs = llm.generate(prompts, greedy(30), use_tqdm=False)
    drafts, draft_tokens, accepted = stats_delta(llm, before)
    assert 0 < accepted < draft_tokens, (accepted, draft_tokens)
    assert ids(outputs) == ids(llm_for("llama").generate(prompts, greedy(30), use_tqdm=False))
    assert_matches_hf(llama_dir, prompts, outputs, 30)
    assert_no_leak(llm)


@pytest.mark.parametrize("model, proposer, budget", [
    ("llama", "ngram", 9), ("llama", "self-draft", 9), ("llama", "other-draft", 9), ("bigram", "ngram", 9),
    ("llama", "self-draft", 2), ("bigram", "ngram", 3)])
def test_chunked_prefill(llm_for, model_dirs, cycles, model, proposer, budget):
    # a few tokens a step: prompts are split into chunks and run beside speculating decodes (1 + K tokens each,
    # fewer drafts when the budget runs out)
    llm = llm_for(model, proposer, max_num_batched_tokens=budget)
    prompts = random_prompts(4, seed=14, min_len=20, max_len=50)
    prompts += [cycle_prompt(cycles, [], i, 0, 3) for i in range(2)] if model == "bigram" else repeated_chunks(2, 15)
    outputs = llm.generate(prompts, greedy(20), use_tqdm=False)
    assert_matches_hf(model_dirs[model], prompts, outputs, 20)
    assert spec_stats(llm)[1] > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("model, proposer", [("llama", "ngram"), ("llama", "self-draft"), ("llama", "other-draft"),
                                             ("bigram", "ngram")])
def test_preemption(llm_for, model_dirs, cycles, model, proposer):
    # 24 blocks of 4 tokens cannot hold 6 sequences of ~60 tokens: sequences are preempted and recomputed
    llm = llm_for(model, proposer, k=4, num_gpu_blocks_override=24, max_model_len=96)
    prompts = random_prompts(4, seed=16, min_len=20, max_len=40)
    prompts += [cycle_prompt(cycles, [5] * 9, i, 0, 3) for i in range(2)] if model == "bigram" else repeated_chunks(2, 17)
    outputs = llm.generate(prompts, greedy(30), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(model_dirs[model], prompts, outputs, 30)
    assert_no_leak(llm)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_prefix_cache_hits(llm_for, llama_dir, proposer):
    llm = llm_for("llama", proposer, enable_prefix_caching=True)
    shared = random_prompts(1, seed=18, min_len=30, max_len=30)[0]
    prompts = [shared + tail for tail in random_prompts(3, seed=19, min_len=1, max_len=9)] + [shared[:28]]
    first = llm.generate(prompts, greedy(20), use_tqdm=False)
    again = llm.generate(prompts, greedy(20), use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in again) and again[-1].num_cached_tokens == 24
    assert_matches_hf(llama_dir, prompts, first, 20)
    assert ids(again) == ids(first)
    assert_no_leak(llm)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_requests_arriving_while_speculating(llama_dir, other_draft_dir, proposer):
    spec = {"ngram": NGRAM, "self-draft": {"model": llama_dir, "num_speculative_tokens": K},
            "other-draft": {"model": other_draft_dir, "num_speculative_tokens": K}}[proposer]
    engine = LLMEngine(EngineConfig(model=llama_dir, block_size=4, max_num_batched_tokens=16, speculative_config=spec))
    prompts = random_prompts(4, seed=20) + repeated_chunks(2, seed=21)
    lengths = [5, 17, 12, 1, 20, 9]  # different max_tokens: sequences finish at different steps
    results, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:  # one new request every step while the others decode
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, greedy(lengths[i]))
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out
    for i, prompt in enumerate(prompts):
        assert_matches_hf(llama_dir, [prompt], [results[i]], lengths[i])
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_abort_while_speculating_frees_blocks(llama_dir, other_draft_dir, proposer):
    spec = {"ngram": NGRAM, "self-draft": {"model": llama_dir, "num_speculative_tokens": K},
            "other-draft": {"model": other_draft_dir, "num_speculative_tokens": K}}[proposer]
    engine = LLMEngine(EngineConfig(model=llama_dir, block_size=4, speculative_config=spec))
    prompts = random_prompts(6, seed=43) + repeated_chunks(2, seed=44)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(40))
    for step in range(6):
        engine.step()
        engine.abort_request(str(step))  # some mid-prefill, most with draft slots reserved
    while engine.has_unfinished_requests():
        engine.step()
    bm = engine.scheduler.block_manager
    assert engine.scheduler.spec_num_draft_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0


@pytest.mark.parametrize("model, proposer", [("llama", "self-draft"), ("llama", "other-draft"), ("bigram", "ngram")])
def test_batch_mixing_greedy_and_sampled(llm_for, model_dirs, cycles, model, proposer):
    """Greedy requests keep their exact output next to sampled ones (with their own seeds) and parallel samples."""
    prompts = random_prompts(6, seed=22) + [cycle_prompt(cycles, [], i, 1, 2) for i in range(2)]
    params = [greedy(15) if i % 2 == 0 else SamplingParams(temperature=0.8, seed=i, max_tokens=15, n=1 + i % 3)
              for i in range(len(prompts))]
    llm = llm_for(model, proposer)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    rows = range(0, len(prompts), 2)
    assert_matches_hf(model_dirs[model], [prompts[i] for i in rows], [outputs[i] for i in rows], 15)
    assert [len(o.outputs) for o in outputs] == [p.n for p in params]
    assert_no_leak(llm)


def test_max_model_len_reached_while_speculating(llm_for, cycles):
    prompts = [cycle_prompt(cycles, [], i, 0, 3)[:40] for i in range(3)] + random_prompts(2, 24, 30, 45)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    llm = llm_for("bigram", "ngram", k=5, max_model_len=64)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert ids(got) == ids(llm_for("bigram", max_model_len=64).generate(prompts, params, use_tqdm=False))
    for prompt, out in zip(prompts, got):
        assert len(prompt) + len(out.outputs[0].token_ids) == 64 and out.outputs[0].finish_reason == "length"
    assert spec_stats(llm)[2] > 0
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------------
# Distribution preservation: rejection_sample on a 5-token vocabulary
# ----------------------------------------------------------------------------------------------------------------

N_DRAWS = 20_000
P = torch.tensor([[0.40, 0.25, 0.15, 0.12, 0.08],  # the target's distribution at each position (no history)
                  [0.10, 0.30, 0.05, 0.35, 0.20],
                  [0.22, 0.18, 0.20, 0.25, 0.15]], dtype=torch.float64)
Q = torch.tensor([[0.10, 0.15, 0.20, 0.25, 0.30],  # the proposer's, deliberately far from P
                  [0.30, 0.30, 0.20, 0.10, 0.10]], dtype=torch.float64)
R = torch.tensor([[0.70, 0.10, 0.10, 0.05, 0.05]], dtype=torch.float64)  # picks drafts the sampler is not told about


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of integer `samples` against `probs` (flattened cells) and its p-value: the chi-square
    survival function is the regularized upper incomplete gamma function Q(df / 2, stat / 2)."""
    probs = probs.flatten().double()
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = counts.sum() * probs
    assert expected.min() >= 5, "too few draws per cell for the chi-square approximation"
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return stat, float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def assert_same_law(samples, probs):
    stat, p_value = chi_square(samples, probs)
    assert p_value > 1e-4, f"chi-square {stat:.1f}, p = {p_value:.2e}: not distributed as the target"


def assert_other_law(samples, probs):
    stat, p_value = chi_square(samples, probs)
    assert p_value < 1e-9, f"chi-square {stat:.1f}, p = {p_value:.2e}: the planted mistake went unnoticed"


def draw_drafts(q: torch.Tensor, n: int, generator) -> torch.Tensor:
    """[n, k] drafts, position i drawn from q[i]."""
    return torch.multinomial(q, n, replacement=True, generator=generator).T


@pytest.mark.parametrize("k", [1, 2])
def test_rejection_sample_first_token_follows_target(k):
    g = torch.Generator().manual_seed(k)
    first = [rejection_sample(P[:k + 1], d, Q[:k], g)[0] for d in draw_drafts(Q[:k], N_DRAWS, g).tolist()]
    assert_same_law(torch.tensor(first), P[0])


def test_rejection_sample_deterministic_drafts_follow_target():
    """draft_probs=None: drafts chosen by a rule the sampler does not see are one-hot proposals (what the n-gram
    and draft-model proposers make); the emitted token still follows p."""
    g = torch.Generator().manual_seed(3)
    first = [rejection_sample(P[:2], d, None, g)[0] for d in draw_drafts(R, N_DRAWS, g).tolist()]
    assert_same_law(torch.tensor(first), P[0])


def test_rejection_sample_two_tokens_joint_law():
    """k = 2: the first two emitted tokens are jointly distributed as p0 x p1. When the first draft is rejected the
    call emits one token; the next step then proposes a new draft for position 1 and verifies it against p1."""
    g = torch.Generator().manual_seed(4)
    drafts, next_drafts = draw_drafts(Q, N_DRAWS, g).tolist(), draw_drafts(Q[1:], N_DRAWS, g).tolist()
    pairs = []
    for d, d_next in zip(drafts, next_drafts):
        out = rejection_sample(P, d, Q, g)
        assert 1 <= len(out) <= 3 and out[:-1] == d[:len(out) - 1]
        if len(out) == 1:
            out += rejection_sample(P[1:], d_next, Q[1:], g)
        pairs.append(out[0] * 5 + out[1])
    assert_same_law(torch.tensor(pairs), P[0][:, None] * P[1][None, :])


def test_rejection_sample_greedy_keeps_matching_prefix():
    one_hot = torch.nn.functional.one_hot(torch.tensor([3, 1, 4, 0]), 5).double()
    assert rejection_sample(one_hot, [3, 1, 4]) == [3, 1, 4, 0]
    assert rejection_sample(one_hot, [3, 2, 4]) == [3, 1]
    assert rejection_sample(one_hot, [0, 1, 4]) == [3]


def reference_rule(p, drafts, q, u, generator, mistake=None):
    """The test's own vectorized copy of the speculative sampling rule for n trials at once, with an optional planted
    mistake. drafts: [n, k]; q: [k, vocab] or None (one-hot drafts); u: [n, k] uniforms. Returns the first emitted
    token of every trial."""
    n, k = drafts.shape
    q_full = (q.expand(n, k, -1) if q is not None
              else torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype))  # [n, k, vocab]
    p_full = p[:k].expand(n, k, -1)
    pd, qd = p_full.gather(2, drafts[..., None])[..., 0], q_full.gather(2, drafts[..., None])[..., 0]
    accept = u * pd < qd if mistake == "accept_with_q_over_p" else u * qd < pd  # u < min(1, p/q)
    first_rejected = torch.where(accept.all(1), k, (~accept).int().argmax(1))
    rows, at = torch.arange(n), first_rejected.clamp(max=k - 1)
    diff = p_full[rows, at] - q_full[rows, at]
    residual = {None: diff.clamp_min(0), "resample_from_p": p_full[rows, at], "residual_without_clamp": diff.abs(),
                "accept_with_q_over_p": diff.clamp_min(0)}[mistake]
    dist = torch.where((first_rejected == k)[:, None], p[k].expand(n, -1), residual)  # bonus token if all kept
    last = torch.multinomial(dist / dist.sum(1, keepdim=True), 1, generator=generator)[:, 0]
    return torch.where(first_rejected > 0, drafts[:, 0], last)


@pytest.mark.parametrize("draft_probs", ["q", "none"])
def test_chi_square_check_catches_planted_mistakes(draft_probs):
    """The check above passes the test's own correct copy of the rule and rejects each planted mistake, so the tests
    of rejection_sample would fail if it resampled from the wrong distribution or accepted with the wrong ratio."""
    g = torch.Generator().manual_seed(5)
    q = Q[:1] if draft_probs == "q" else None
    drafts = draw_drafts(Q[:1] if q is not None else R, N_DRAWS, g)
    u = torch.rand(N_DRAWS, 1, generator=g, dtype=torch.float64)
    assert_same_law(reference_rule(P[:2], drafts, q, u, g), P[0])
    for mistake in ["resample_from_p", "accept_with_q_over_p", "residual_without_clamp"]:
        assert_other_law(reference_rule(P[:2], drafts, q, u, g, mistake), P[0])


def test_engine_sampled_tokens_follow_target(llama_dir):
    """End to end on the tiny model with top-k 5 (a 5-token support) at temperature 1.5: with the target as its own
    one-token draft, the second sampled token is a verified draft or a residual resample, and the joint law of the
    first two tokens is transformers' p(x1) p(x2 | x1)."""
    llm = LLM(llama_dir, block_size=4, seed=7, speculative_config={"model": llama_dir, "num_speculative_tokens": 1})
    prompt = random_prompts(1, seed=26, min_len=6, max_len=6)[0]
    num_requests = 2000
    outputs = llm.generate([prompt] * num_requests, SamplingParams(temperature=1.5, top_k=5, max_tokens=3,
                                                                   ignore_eos=True), use_tqdm=False)
    drafts, draft_tokens, accepted = spec_stats(llm)
    assert draft_tokens == num_requests and 0.2 * num_requests < accepted < 0.9 * num_requests

    model = _load(llama_dir)
    law = {}
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / 1.5, -1).topk(5)
        for a, pa in zip(first.indices.tolist(), (first.values / first.values.sum()).tolist()):
            second = torch.softmax(model(torch.tensor([prompt + [a]])).logits[0, -1].double() / 1.5, -1).topk(5)
            for b, pb in zip(second.indices.tolist(), (second.values / second.values.sum()).tolist()):
                law[a, b] = pa * pb
    # Pairs expected fewer than 5 times share one cell.
    big = [pair for pair in law if law[pair] * num_requests >= 5]
    cell = {pair: big.index(pair) if pair in big else len(big) for pair in law}
    probs = torch.tensor([law[pair] for pair in big] + [sum(law[p] for p in law if p not in big)])
    samples = [cell[tuple(out.outputs[0].token_ids[:2])] for out in outputs]  # KeyError: outside the top-5 support
    assert_same_law(torch.tensor(samples), probs if probs[-1] > 0 else probs[:-1])


# ----------------------------------------------------------------------------------------------------------------
# Sampling parameters under speculation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft"), ("llama", "other-draft")])
def test_seeded_sampling_is_reproducible(llm_for, cycles, model, proposer):
    llm = llm_for(model, proposer)
    prompt = cycle_prompt(cycles, [], 4, 0, 3)
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=30, ignore_eos=True)
    before = spec_stats(llm)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    if proposer != "other-draft":  # multi-token steps happened (a wrong draft is rarely kept at temperature 0.8)
        assert stats_delta(llm, before)[2] > 0
    again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    busy = llm.generate(random_prompts(5, seed=28) + [prompt],
                        [SamplingParams(temperature=0.8, max_tokens=30)] * 5 + [params], use_tqdm=False)[-1].outputs[0]
    assert alone.text == again.text and alone.token_ids == again.token_ids == busy.token_ids
    other = llm.generate([prompt], SamplingParams(temperature=0.8, seed=4321, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert other.token_ids != alone.token_ids


@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft")])
def test_parallel_samples_and_logprobs(llm_for, cycles, model, proposer):
    llm = llm_for(model, proposer)
    prompt = cycle_prompt(cycles, [], 4, 0, 3)
    before = spec_stats(llm)
    out = llm.generate([prompt], SamplingParams(temperature=0.8, n=3, seed=5, max_tokens=20, ignore_eos=True,
                                                logprobs=2), use_tqdm=False)[0]
    assert stats_delta(llm, before)[2] > 0
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 3
    for completion in out.outputs:
        assert len(completion.token_ids) == 20 and len(completion.logprobs) == 20
        for tok, entry in zip(completion.token_ids, completion.logprobs):
            assert tok in entry and len(entry) in (2, 3)  # the sampled token and the top 2
            assert all(v.logprob <= 0 for v in entry.values())
        assert completion.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)), rel=1e-5)
    assert_no_leak(llm)


@pytest.mark.parametrize("model, proposer", [("llama", "self-draft"), ("llama", "other-draft"), ("bigram", "ngram")])
def test_greedy_logprobs_match_plain(llm_for, cycles, model, proposer):
    prompts = [cycle_prompt(cycles, [], 2, 0, 2)] + random_prompts(2, seed=31)
    params = greedy(16, logprobs=2)
    want = llm_for(model).generate(prompts, params, use_tqdm=False)
    got = llm_for(model, proposer).generate(prompts, params, use_tqdm=False)
    assert ids(got) == ids(want)
    for a, b in zip(want, got):
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert ea.keys() == eb.keys()
            for t in ea:
                assert eb[t].logprob == pytest.approx(ea[t].logprob, abs=1e-4) and eb[t].rank == ea[t].rank


@pytest.mark.parametrize("model, proposer", [("llama", "ngram"), ("llama", "self-draft"), ("llama", "other-draft"),
                                             ("bigram", "ngram")])
def test_penalties_greedy_identical(llm_for, cycles, model, proposer):
    prompts = [cycle_prompt(cycles, [], i, 0, 3) for i in range(2)] + repeated_chunks(1, 32) + random_prompts(2, 33)
    for params in [greedy(24, repetition_penalty=1.3), greedy(24, presence_penalty=0.5),
                   greedy(24, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)]:
        want = llm_for(model).generate(prompts, params, use_tqdm=False)
        assert ids(llm_for(model, proposer).generate(prompts, params, use_tqdm=False)) == ids(want)


def test_greedy_logprobs_with_penalties_match_plain(llm_for):
    prompts = repeated_chunks(2, seed=30)
    params = greedy(16, logprobs=2, repetition_penalty=1.3)
    want = llm_for("llama").generate(prompts, params, use_tqdm=False)
    got = llm_for("llama", "self-draft").generate(prompts, params, use_tqdm=False)
    assert ids(got) == ids(want)
    for a, b in zip(want, got):
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in ea:
                assert eb[t].logprob == pytest.approx(ea[t].logprob, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Stop conditions met in the middle of a multi-token step
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft")])
def test_max_tokens_exact(llm_for, cycles, model, proposer):
    llm = llm_for(model, proposer)
    prompts = [cycle_prompt(cycles, [], i, 0, 2) for i in range(2)] + random_prompts(1, seed=35)
    for max_tokens in range(1, 12):
        for out in llm.generate(prompts, greedy(max_tokens), use_tqdm=False):
            assert len(out.outputs[0].token_ids) == max_tokens and out.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


def completion_fields(out):
    c = out.outputs[0]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason


def stop_strings_from(llm, prompt, max_tokens):
    """Stop strings taken from the plain greedy output text: three characters at several places."""
    text = llm.generate([prompt], greedy(max_tokens), use_tqdm=False)[0].outputs[0].text
    stops = []
    for i in range(1, len(text) - 2, 4):
        if text[i:i + 3].strip() and "\ufffd" not in text[i:i + 3] and text[i:i + 3] not in stops:
            stops.append(text[i:i + 3])
    assert stops
    return stops


@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft")])
def test_stop_strings_match_plain(llm_for, cycles, model, proposer):
    for prompt in [cycle_prompt(cycles, [], i, 0, 2) for i in (1, 5)] + random_prompts(1, seed=37):
        for n, stop in enumerate(stop_strings_from(llm_for(model), prompt, 30)):
            include = n % 2 == 1
            params = greedy(40, stop=[stop], include_stop_str_in_output=include)
            want = llm_for(model).generate([prompt], params, use_tqdm=False)[0]
            got = llm_for(model, proposer).generate([prompt], params, use_tqdm=False)[0]
            assert want.outputs[0].finish_reason == "stop" and want.outputs[0].text.endswith(stop) == include
            assert completion_fields(got) == completion_fields(want)
    assert_no_leak(llm_for(model, proposer))


def test_stop_string_and_max_tokens_in_the_same_step(llm_for):
    for prompt in random_prompts(2, seed=38):
        for stop in stop_strings_from(llm_for("llama"), prompt, 10):
            for max_tokens in range(2, 12):
                params = greedy(max_tokens, stop=[stop])
                want = llm_for("llama").generate([prompt], params, use_tqdm=False)[0]
                got = llm_for("llama", "self-draft").generate([prompt], params, use_tqdm=False)[0]
                assert completion_fields(got) == completion_fields(want), (stop, max_tokens)


@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft")])
def test_stop_token_ids_eos_and_min_tokens_match_plain(llm_for, cycles, model, proposer):
    for prompt in [cycle_prompt(cycles, [], i, 0, 2) for i in range(2)] + random_prompts(1, seed=40):
        plain = llm_for(model).generate([prompt], greedy(30), use_tqdm=False)[0].outputs[0].token_ids
        for stop_token in sorted(set(plain[3:12]))[:2]:
            for min_tokens in (0, 8):
                for params in (greedy(30, stop_token_ids=[stop_token], min_tokens=min_tokens),
                               greedy(30, ignore_eos=False, min_tokens=min_tokens)):
                    want = llm_for(model).generate([prompt], params, use_tqdm=False)[0]
                    got = llm_for(model, proposer).generate([prompt], params, use_tqdm=False)[0]
                    assert completion_fields(got) == completion_fields(want)
    assert_no_leak(llm_for(model, proposer))


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping of multi-token steps
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, proposer", [("bigram", "ngram"), ("llama", "self-draft")])
def test_generated_blocks_are_prefix_cache_hits(llm_for, cycles, model, proposer):
    for head in range(4):  # prompt lengths of every residue modulo the block size
        prompt = cycle_prompt(cycles, [7] * (5 + head), 3, 0, 2)
        cached = []
        for llm in (llm_for(model), llm_for(model, proposer)):
            first = llm.generate([prompt], greedy(30), use_tqdm=False)[0]
            follow_up = prompt + first.outputs[0].token_ids + [5, 6, 7]  # a multi-turn chat's next prompt
            cached.append(llm.generate([follow_up], greedy(5), use_tqdm=False)[0].num_cached_tokens)
        # without speculation, every block the first request computed (all but its last token) is a hit
        assert cached[0] == (len(prompt) + 29) // 4 * 4
        assert cached[1] == cached[0]


def test_committed_blocks_hold_draft_kv(llama_dir):
    """With the target as its own draft, both caches must hold the same K/V in every committed block."""
    llm = LLM(llama_dir, block_size=4, speculative_config={"model": llama_dir, "num_speculative_tokens": K})
    rng = random.Random(42)
    prompts = [[rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(length)] for length in range(16, 24)]
    for max_tokens in (25, 26, 27, 28):
        llm.generate(prompts, greedy(max_tokens), use_tqdm=False)
    bm = llm.engine.scheduler.block_manager
    target, draft = llm.engine.runner.kv_cache, llm.engine.scheduler.proposer.runner.kv_cache
    committed = [b for b, h in enumerate(bm.hash_of_block) if h is not None]
    assert committed
    for b in committed:
        assert torch.allclose(target[:, :, b], draft[:, :, b], atol=1e-4), f"block {b}"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "ngram"),
    ({"num_speculative_tokens": 3}, "ngram"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 0, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "model"),
])
def test_bad_speculative_config(spec, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="unused", speculative_config=spec)


def test_draft_with_other_vocabulary_is_rejected(llama_dir, tiny_model_factory):
    other = tiny_model_factory("llama", seed=2, num_hidden_layers=1, vocab_size=VOCAB + 64)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(llama_dir, speculative_config={"model": other, "num_speculative_tokens": 2})


def test_ngram_config_with_only_prompt_lookup_min():
    EngineConfig(model="unused", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                     "prompt_lookup_min": 3})
