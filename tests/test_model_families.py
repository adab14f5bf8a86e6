"""The families beyond Llama/Qwen (Mistral, Gemma 2/3, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE): greedy output equal to
transformers' token for token (fp32, CPU) on tiny random models built from transformers' own config classes, with
prompts longer than the sliding windows, and under the engine's scheduling: chunked prefill, prefix-cache hits,
preemption and speculative decoding. Plus the mixture-of-experts routing against a dense per-token reference,
Phi-3's long RoPE factors, torch.compile over the experts, and the error for an unknown architecture."""
import gc
import json
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import FAMILIES
from nanoserve import LLM, SamplingParams
from nanoserve.models.moe import expert_outputs, route
from test_generate import assert_same, random_prompts

FAMILY_NAMES = list(FAMILIES)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(params=FAMILY_NAMES)
def family_dir(request, tiny_model_factory):
    return tiny_model_factory(request.param)


def test_batch_matches_transformers(family_dir):
    """Prompts of 3-40 tokens and 16 new ones: most sequences outgrow the windows of 8 and 12 tokens."""
    llm = LLM(family_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=11, max_len=40)
    assert_same(family_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False), max_tokens=16)


def test_scheduling_keeps_output(family_dir):
    """Chunked prefill (chunks of 5), a tiny KV pool that forces preemption, then prefix-cache hits on a rerun."""
    llm = LLM(family_dir, block_size=4, max_num_batched_tokens=5, num_gpu_blocks_override=20, max_model_len=64)
    shared = random_prompts(llm.get_tokenizer(), 1, seed=12, min_len=16, max_len=16)[0]
    prompts = [shared + tail for tail in random_prompts(llm.get_tokenizer(), 4, seed=13, min_len=2, max_len=10)]
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(family_dir, prompts, first, max_tokens=16)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert any(out.num_cached_tokens > 0 for out in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert llm.engine.scheduler.block_manager.num_free_blocks == 20


def test_speculative_decoding_keeps_output(family_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    llm = LLM(family_dir, block_size=4, speculative_config=spec)
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=14, min_len=10, max_len=30)
    prompts = [p + p[:8] for p in prompts]  # repeats give the n-gram proposer something to propose
    assert_same(family_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False), max_tokens=16)


@pytest.mark.parametrize("prompt_len, max_tokens", [(8, 20), (40, 24)])
def test_phi3_long_rope_picks_factors_like_transformers(tiny_model_factory, prompt_len, max_tokens):
    """longrope with an original context of 32: a sequence that stays within it runs on the short factors, a
    40-token prompt on the long ones from its first token. (One that crosses 32 while decoding is not compared:
    transformers then recomputes its whole cache with the long factors; nanoserve, like vLLM, keeps the keys
    already cached and rotates only the new tokens with the long factors.)"""
    head_dim = 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)]}
    model_dir = tiny_model_factory("phi3", rope_parameters=rope, original_max_position_embeddings=32,
                                   max_position_embeddings=128, sliding_window=None)
    llm = LLM(model_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 2, seed=15, min_len=prompt_len, max_len=prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    assert_same(model_dir, prompts, llm.generate(prompts, params, use_tqdm=False), max_tokens=max_tokens)


def test_unknown_architecture_lists_the_supported_ones(tmp_path, llama_dir):
    config = json.load(open(os.path.join(llama_dir, "config.json")))
    config["architectures"] = ["FalconForCausalLM"]
    for name in os.listdir(llama_dir):
        os.symlink(os.path.join(llama_dir, name), tmp_path / name)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Unsupported model architecture.*Falcon.*Gemma2ForCausalLM"):
        LLM(str(tmp_path))


def dense_reference(x, w13, w2, weights, experts):
    """Every token through each of its experts, one at a time: the definition the grouped forward must meet."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            gate, up = (w13[experts[t, j]] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[experts[t, j]] @ (F.silu(gate) * up))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.data())
def test_moe_routing_matches_dense_reference(num_tokens, num_experts, data):
    """Random routings, including experts that get no token and every token on one expert, through the grouped
    matmul (where torch has it) and the per-expert loop, against the per-token reference."""
    top_k = data.draw(st.integers(1, num_experts))
    hot = data.draw(st.booleans())  # all tokens on expert 0 first (then the others in their top-k, if k > 1)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(num_tokens, 8, generator=generator, dtype=torch.float64)
    w13 = torch.randn(num_experts, 2 * 6, 8, generator=generator, dtype=torch.float64)
    w2 = torch.randn(num_experts, 8, 6, generator=generator, dtype=torch.float64)
    logits = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    if hot:
        logits[:, 0] += 100
    weights, experts = route(logits, top_k, renormalize=data.draw(st.booleans()))
    want = dense_reference(x, w13, w2, weights.double(), experts)
    got = expert_outputs(x, w13, w2, weights.double(), experts, F.silu)
    torch.testing.assert_close(got, want)
    with mock.patch("nanoserve.models.moe.grouped_mm_works", lambda *args: False):  # the other path too
        torch.testing.assert_close(expert_outputs(x, w13, w2, weights.double(), experts, F.silu), want)


def test_moe_compiles_with_fullgraph_and_matches(tiny_model_factory):
    """The experts are one custom op: the whole model traces with fullgraph=True and a dynamic token dimension,
    and gives the eager tokens."""
    gc.collect()
    model_dir = tiny_model_factory("qwen3_moe")
    compiled = LLM(model_dir, block_size=4, compilation_config={"mode": 3})
    prompts = random_prompts(compiled.get_tokenizer(), 3, seed=16)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert_same(model_dir, prompts, compiled.generate(prompts, params, use_tqdm=False), max_tokens=8)
