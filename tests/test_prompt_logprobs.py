"""Prompt logprobs (`SamplingParams(prompt_logprobs=k)`) equal log_softmax of transformers' logits at every prompt
position (fp32, 1e-4), whatever the engine does to the prompt: whole, in chunks, after a prefix-cache hit,
preempted and recomputed, with n > 1."""
import pytest
import torch

import nanoserve.runner
from conftest import _load
from nanoserve import LLM, SamplingParams
from nanoserve.sampling import ParamError
from test_generate import random_prompts

TOL = 1e-4


@torch.no_grad()
def hf_prompt_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row p is log p(. | ids[:p + 1]) from transformers."""
    logits = _load(str(model_dir))(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_prompt_logprobs(model_dir, ids: list[int], got, k: int) -> None:
    want = hf_prompt_logprobs(model_dir, ids)
    assert got is not None and len(got) == len(ids) and got[0] is None
    for p, (token, entry) in enumerate(zip(ids[1:], got[1:])):
        row = want[p]
        assert abs(entry[token].logprob - row[token].item()) < TOL, f"position {p + 1}"
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        expected = row.topk(k)
        assert set(entry) == set(expected.indices.tolist()) | {token}  # the prompt token and the top k
        ranked = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.logprob for lp in ranked] == pytest.approx(expected.values.tolist(), abs=TOL)


def test_whole_prompt_matches_transformers(any_model_dir):
    llm = LLM(any_model_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=11, min_len=2, max_len=40)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        assert_prompt_logprobs(any_model_dir, ids, out.prompt_logprobs, 3)


def test_not_asked_not_returned(llama_dir):
    out = LLM(llama_dir).generate([[5, 6, 7]], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_logprobs is None


def test_one_token_prompt_has_only_the_none_entry(llama_dir):
    out = LLM(llama_dir).generate([[9]], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


def test_chunked_prefill_and_small_logit_slices(qwen3_dir, monkeypatch):
    # Prompt chunks of <= 7 tokens, and logits made 3 rows at a time within a chunk.
    monkeypatch.setattr(nanoserve.runner, "PROMPT_LOGITS_ROWS", 3)
    llm = LLM(qwen3_dir, block_size=4, max_num_batched_tokens=7)
    prompts = random_prompts(llm.get_tokenizer(), 3, seed=12, min_len=20, max_len=50)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0), use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        assert_prompt_logprobs(qwen3_dir, ids, out.prompt_logprobs, 0)


def test_prefix_cache_hit_is_recomputed(llama_dir):
    llm = LLM(llama_dir, block_size=4, enable_prefix_caching=True)
    ids = random_prompts(llm.get_tokenizer(), 1, seed=13, min_len=30, max_len=30)[0]
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    again = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # the prompt is in the cache...
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # ...but a request for prompt logprobs computes every position
    assert_prompt_logprobs(llama_dir, ids, out.prompt_logprobs, 2)
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids


def test_n_samples_share_one_prompt_logprobs(qwen2_dir):
    llm = LLM(qwen2_dir, block_size=4, enable_prefix_caching=True)
    ids = random_prompts(llm.get_tokenizer(), 1, seed=14, min_len=25, max_len=25)[0]
    out = llm.generate([ids], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert_prompt_logprobs(qwen2_dir, ids, out.prompt_logprobs, 1)
    assert llm.engine.scheduler.prefix_cache_hits > 0  # the other samples took the prompt from the cache


def test_preempted_prompt_keeps_one_entry_per_token(qwen2_dir):
    llm = LLM(qwen2_dir, block_size=4, num_gpu_blocks_override=24, max_model_len=96)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=5, min_len=20, max_len=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, prompt_logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outputs):
        assert_prompt_logprobs(qwen2_dir, ids, out.prompt_logprobs, 1)
    assert llm.engine.scheduler.block_manager.num_free_blocks == 24


@pytest.mark.parametrize("k, message", [(21, "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
                                        (-1, "`prompt_logprobs` must be a positive value.")])
def test_bad_prompt_logprobs(k, message):
    with pytest.raises(ParamError, match=message):
        SamplingParams(prompt_logprobs=k)
