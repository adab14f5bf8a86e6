"""Greedy output of nanoserve equals transformers' `generate`, token for token (fp32, CPU), for every
supported architecture, and stays equal under the engine's scheduling tricks: prefix-cache hits, preemption,
chunked prefill, and requests that arrive while others decode."""
import random

import sys

import pytest
import torch

from conftest import hf_greedy, top2_gap
from nanoserve import LLM, SamplingParams
from nanoserve.engine import LLMEngine
from nanoserve.config import EngineConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def random_prompts(tokenizer, count: int, seed: int = 0, min_len: int = 3, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    return [[rng.choice(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def assert_same(model_dir, prompts, outputs, max_tokens=20, ignore_eos=True):
    expected = hf_greedy(model_dir, prompts, max_tokens, ignore_eos=ignore_eos)
    for prompt, out, want in zip(prompts, outputs, expected):
        got = out.outputs[0].token_ids
        if got != want:
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            gap = top2_gap(model_dir, prompt + want[:k])
            pytest.fail(f"mismatch at output token {k}: got {got[k:k + 3]}, transformers {want[k:k + 3]}; "
                        f"top-2 logit gap there is {gap:.2e} (a gap near 0 is a tie, anything else a bug)")


def test_batch_matches_transformers(any_model_dir):
    llm = LLM(any_model_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 8)
    assert_same(any_model_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False))


def test_stops_at_eos_like_transformers(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_same(qwen3_dir, prompts, outputs, max_tokens=40, ignore_eos=False)
    for out in outputs:
        assert out.outputs[0].finish_reason == ("length" if len(out.outputs[0].token_ids) == 40 else "stop")


def test_rope_scaling_llama3(tiny_model_factory):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model_dir = tiny_model_factory("llama", rope_parameters=rope)
    llm = LLM(model_dir)
    prompts = random_prompts(llm.get_tokenizer(), 3, seed=2, min_len=70, max_len=120)
    assert_same(model_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False))


def test_prefix_cache_hits_keep_output(llama_dir):
    llm = LLM(llama_dir, block_size=4)
    shared = random_prompts(llm.get_tokenizer(), 1, seed=3, min_len=30, max_len=30)[0]
    tails = random_prompts(llm.get_tokenizer(), 4, seed=4, min_len=1, max_len=9)
    prompts = [shared + t for t in tails] + [shared[:28]]  # 28 = 7 full blocks: a full-prefix hit
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(out.num_cached_tokens > 0 for out in again)
    assert again[-1].num_cached_tokens == 24  # the last token of a fully cached prompt is still computed
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert_same(llama_dir, prompts, first)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]


def test_preemption_keeps_output(qwen2_dir):
    # 24 blocks of 4 tokens cannot hold 6 sequences of ~50 tokens: the scheduler must preempt and recompute.
    llm = LLM(qwen2_dir, block_size=4, num_gpu_blocks_override=24, max_model_len=96)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=5, min_len=20, max_len=40)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same(qwen2_dir, prompts, outputs, max_tokens=30)
    assert llm.engine.scheduler.block_manager.num_free_blocks == 24


def test_chunked_prefill_keeps_output(qwen3_dir):
    llm = LLM(qwen3_dir, block_size=4, max_num_batched_tokens=7)  # every prompt is split into chunks of <= 7
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=6, min_len=20, max_len=50)
    assert_same(qwen3_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False))


def test_decodes_continue_during_long_prefill(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir, block_size=4, max_num_batched_tokens=8))
    short, long = random_prompts(engine.tokenizer, 2, seed=7, min_len=5, max_len=5)[0], [5] * 200
    engine.add_request("short", short, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.step()  # the short prompt is prefilled
    engine.add_request("long", long, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    finished_short_at = None
    for step in range(1, 40):
        if any(o.request_id == "short" and o.finished for o in engine.step()):
            finished_short_at = step
            break
    assert finished_short_at is not None and finished_short_at <= 10  # one token per step, never stalled


def test_requests_arriving_while_decoding(qwen3_dir):
    engine = LLMEngine(EngineConfig(model=qwen3_dir, block_size=4, max_num_batched_tokens=16))
    prompts = random_prompts(engine.tokenizer, 6, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:  # one new request every step, while the earlier ones are mid-generation
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out
    assert_same(qwen3_dir, prompts, [results[i] for i in range(len(prompts))], max_tokens=12)


def test_chat_uses_template(qwen2_dir):
    llm = LLM(qwen2_dir)
    conversation = [{"role": "user", "content": "The cat eats an apple today."}]
    out = llm.chat(conversation, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    expected_prompt = llm.get_tokenizer().apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == expected_prompt
    assert_same(qwen2_dir, [out.prompt_token_ids], [out], max_tokens=10)


def test_text_is_the_decoded_tokens(llama_dir):
    llm = LLM(llama_dir)
    prompts = ["The cat eats", "café naïve", "日本語の", "emoji 🙂 and"]
    tokenizer = llm.get_tokenizer()
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True), use_tqdm=False):
        full = tokenizer.decode(out.prompt_token_ids + out.outputs[0].token_ids, skip_special_tokens=True)
        assert out.prompt + out.outputs[0].text == full


def test_outputs_in_input_order_and_prompt_forms(qwen3_dir):
    llm = LLM(qwen3_dir)
    ids = llm.get_tokenizer()("The robot builds").input_ids
    outs = llm.generate(["The robot builds", {"prompt_token_ids": ids}, {"prompt": "We read"}], GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["The robot builds", None, "We read"]
    assert outs[0].prompt_token_ids == ids and outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


@pytest.mark.parametrize("bad", [{"max_model_len": 0}, {"block_size": -1}, {"dtype": "int3"}, {"device": "tpu"},
                                 {"max_num_seqs": 1.5}, {"gpu_memory_utilization": 1.5}])
def test_bad_engine_config_fails_at_construction(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(model="unused", **bad)


def test_bad_prompts_raise_and_leak_nothing(llama_dir):
    llm = LLM(llama_dir, max_model_len=64)
    free = llm.engine.scheduler.block_manager.num_free_blocks
    for prompt, message in [("", "empty"), ([1] * 64, "maximum context length is"), ([10 ** 7], "out of vocabulary")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(["ok", prompt], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.block_manager.num_free_blocks == free


def test_final_only_steps_return_finished_requests_only(llama_dir):
    """The offline API asks the engine for finished requests only (no per-step copies of every output)."""
    engine = LLMEngine(EngineConfig(model=llama_dir))
    for i, n in enumerate((2, 7)):
        engine.add_request(str(i), [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        outputs = engine.step(final_only=True)
        assert all(o.finished for o in outputs)
        seen += [(o.request_id, len(o.outputs[0].token_ids)) for o in outputs]
    assert seen == [("0", 2), ("1", 7)]


def test_reset_prefix_cache(llama_dir):
    llm = LLM(llama_dir, block_size=4)
    prompt = random_prompts(llm.get_tokenizer(), 1, seed=11, min_len=30, max_len=30)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 28  # all full blocks but the last token's
    assert llm.reset_prefix_cache()
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    llm.engine.add_request("busy", prompt, params)
    llm.engine.step()  # the request now holds blocks: a reset is refused
    assert not llm.reset_prefix_cache()
    llm.engine.abort_request("busy")
    assert llm.reset_prefix_cache()


def test_progress_reports_the_rate(llama_dir, capsys, monkeypatch):
    """Off a terminal: one summary line, no carriage-return spray. On a terminal: the bar never shows a rate
    of 0.0 once requests have finished."""
    import re
    llm = LLM(llama_dir)
    assert "\r" not in capsys.readouterr().err  # loading: no bar off a terminal either
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate(["The cat", "A robot", "We"], params)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.strip().splitlines()) == 1
    counts = re.fullmatch(r"Generated 3 requests, (\d+) tokens in [\d.]+ s \(([\d.]+) tok/s\)\n", err)
    assert counts and int(counts[1]) == 15 and float(counts[2]) > 0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    llm.generate(["The cat", "A robot", "We"], params)
    frames = capsys.readouterr().err.split("\r")
    assert "3/3" in frames[-1] and "tok/s" in frames[-1]
    assert not [f for f in frames if "/3" in f and "0/3" not in f and "output 0.0 tok/s" in f]


def test_cpu_float32_linears_run_on_openblas_unless_compiled(llama_dir):
    """The eager float32 CPU model computes its projections on OpenBLAS (nanoserve/linear.py), with the same
    result as F.linear; a model torch.compile will trace keeps F.linear."""
    from nanoserve.linear import Linear
    layers = [m for m in LLM(llama_dir).engine.runner.model.modules() if isinstance(m, Linear)]
    assert layers and all(m.blas for m in layers)
    x = torch.randn(5, layers[0].in_features)
    torch.testing.assert_close(layers[0](x), torch.nn.functional.linear(x, layers[0].weight, layers[0].bias))
    compiled = LLM(llama_dir, compilation_config={"mode": 3}).engine.runner.model
    assert not any(m.blas for m in compiled.modules() if isinstance(m, Linear))
