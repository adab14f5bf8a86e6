"""The GPU path's parts that run on a CPU too: the model compiled with torch.compile (attention as the
`paged_attention` custom op, one graph for every step size) gives the eager output; the compilation and
CUDA-graph settings are checked and cover every batch size; random-weight (`load_format="dummy"`) engines
without a tokenizer run on a config.json alone, as the GPU benchmarks use them."""
import gc
import importlib.util
import json

import pytest
import torch
from hypothesis import given, strategies as st
from torch._dynamo.utils import counters

from conftest import hf_greedy
from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.sampling import ParamError
from test_generate import assert_same, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_compiled_model_matches_eager_and_transformers(qwen3_dir):
    """Inductor on CPU: same tokens as transformers, with prefill, mixed and single-sequence decode steps all
    served by one graph (the token dimension is dynamic and unbacked, so one token does not recompile)."""
    gc.collect()  # engines of earlier tests hold attention backend ids (a constant in the graph) until collected
    counters.clear()
    llm = LLM(qwen3_dir, block_size=4, compilation_config={"mode": 3})
    prompts = random_prompts(llm.get_tokenizer(), 5, seed=3)
    assert_same(qwen3_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False), max_tokens=12)
    single = llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # steps of exactly one token
    assert single[0].outputs[0].token_ids == hf_greedy(qwen3_dir, prompts[:1], 12)[0]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # An engine built after this one is gone reuses its compiled graph (the backend id in the graph is free again).
    del llm
    gc.collect()
    again = LLM(qwen3_dir, block_size=4, compilation_config={"mode": 3})
    assert again.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == single[0].outputs[0].token_ids
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_is_off_by_default_on_cpu(llama_dir):
    llm = LLM(llama_dir)
    assert llm.engine.runner.forward_model is llm.engine.runner.model
    assert llm.engine.runner.graphs is None


@pytest.mark.parametrize("bad", [{"mode": 2}, {"cudagraph_mode": "PIECEWISE"}, {"level": 3},
                                 {"cudagraph_capture_sizes": [0, 8]}, {"cudagraph_capture_sizes": 8}])
def test_bad_compilation_config(bad):
    with pytest.raises(ValueError, match="compilation_config"):
        EngineConfig(compilation_config=bad)


def test_cuda_graphs_need_cuda():
    config = EngineConfig(device="cpu", compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"})
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        config.cudagraph_capture_sizes
    assert EngineConfig(device="cpu").cudagraph_capture_sizes == []


@given(max_num_seqs=st.integers(1, 2048), enforce_eager=st.booleans())
def test_capture_sizes_cover_every_batch_size(max_num_seqs, enforce_eager):
    """Every decode batch up to min(max_num_seqs, 1024) maps to a captured size (a batch pads up to the smallest
    size that holds it); none exceeds max_num_seqs; enforce_eager captures nothing."""
    config = EngineConfig(device="cuda", max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
    sizes = config.cudagraph_capture_sizes
    if enforce_eager:
        assert sizes == [] and not config.compile_model
        return
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] == min(max_num_seqs, 1024)
    assert config.compile_model


def test_explicit_capture_sizes_are_capped():
    config = EngineConfig(device="cuda", max_num_seqs=20, compilation_config={"cudagraph_capture_sizes": [16, 4, 64]})
    assert config.cudagraph_capture_sizes == [4, 16]


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory):
    """A model directory with nothing but config.json, as the GPU benchmarks make for a model's shape."""
    path = tmp_path_factory.mktemp("shape")
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 256, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_dummy_weights_without_tokenizer(config_only_dir):
    llm = LLM(config_only_dir, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=4)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, logprobs=2) for n in (3, 9, 5)]
    outputs = llm.generate([[1, 2, 3], [4] * 20, [299, 7]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 9, 5]
    assert all(o.outputs[0].text == "" for o in outputs)
    assert all(t < 300 for o in outputs for t in o.outputs[0].token_ids)
    weights = torch.cat([p.flatten() for p in llm.engine.runner.model.parameters()])
    assert weights.abs().max() <= 1e-3  # vLLM's dummy init range: the weights were not left at their defaults
    engine = llm.engine
    with pytest.raises(ParamError, match="tokenizer"):
        engine.add_request("text", "a text prompt", None)
    with pytest.raises(ParamError, match="tokenizer"):
        engine.add_request("stop", [1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks
    assert not engine.has_unfinished_requests()


def test_profiling_step_runs_on_cpu(llama_dir):
    """The GPU sizes its KV cache after one step at the token budget; that step runs through the normal path
    (here on CPU, where it can be tested) and leaves the real cache in use afterwards."""
    llm = LLM(llama_dir, max_num_batched_tokens=300, max_num_seqs=8, max_model_len=128)
    runner = llm.engine.runner
    scratch_bytes = runner._profile_run()
    assert 0 < scratch_bytes < runner.kv_cache.numel() * runner.kv_cache.element_size()
    runner.attention.bind(runner.kv_cache)
    prompts = random_prompts(llm.get_tokenizer(), 3, seed=5)
    assert_same(llama_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False), max_tokens=12)


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="flashinfer is installed here")
def test_flashinfer_backend_without_flashinfer_says_how_to_get_it(llama_dir):
    with pytest.raises(RuntimeError, match="pip install flashinfer-python"):
        LLM(llama_dir, attention_backend="flashinfer")
