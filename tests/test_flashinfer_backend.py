"""The FlashInfer backend's own logic, on a CPU, with FlashInfer's wrappers replaced by `fake_flashinfer` (their
contract in plain PyTorch): the page layout it plans gives the reference attention's result for ragged prefill,
mixed and decode batches, also when a CUDA-graph batch is padded with rows on the dummy page; it plans once per
step, not per layer; and a whole model on it generates what transformers does. The real kernels are checked
against the reference on a GPU in test_gpu.py."""
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fake_flashinfer
from nanoserve import LLM, SamplingParams
from nanoserve.attention import AttentionMetadata, LayerSpec, ReferenceAttention
from test_generate import assert_same, random_prompts


@pytest.fixture(autouse=True, scope="module")
def fake_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "flashinfer", fake_flashinfer)
        yield


def make_backends(heads, kv_heads, head_dim, block_size, num_blocks, graph_sizes=(), specs=None):
    """The FlashInfer backend (on the stand-in) and the reference one; by default every layer attends plainly."""
    from nanoserve.flashinfer_attention import FlashInferAttention
    config = SimpleNamespace(block_size=block_size, max_model_len=num_blocks * block_size,
                             cudagraph_capture_sizes=list(graph_sizes))
    specs = specs or [LayerSpec(head_dim ** -0.5)] * 2
    fast = FlashInferAttention(heads, kv_heads, head_dim, specs, torch.float32, torch.device("cpu"), config)
    return fast, ReferenceAttention(heads, kv_heads, head_dim, specs)


def random_step(rng, num_seqs, block_size, num_blocks, decode_only):
    """A step's metadata: each sequence has some tokens cached and some new, on random distinct blocks."""
    free = list(range(num_blocks))  # the dummy page (index num_blocks) is never handed out
    rng.shuffle(free)
    query_start, seq_lens, tables, slots = [0], [], [], []
    for _ in range(num_seqs):
        new = 1 if decode_only else rng.randint(1, 3 * block_size)
        seq_len = new + rng.randint(0 if not decode_only else 1, 3 * block_size)
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - new, seq_len)]
        query_start.append(query_start[-1] + new)
        seq_lens.append(seq_len)
        tables.append(table)
    return AttentionMetadata(query_start, seq_lens, tables, torch.tensor(slots), block_size)


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), num_seqs=st.integers(1, 5), block_size=st.sampled_from([1, 4, 16]),
       group=st.sampled_from([1, 4, 8]), decode_only=st.booleans(), pad=st.integers(0, 3),
       window=st.sampled_from([None, 1, 3, 9]), softcap=st.sampled_from([None, 2.0]))
def test_layout_gives_reference_attention(seed, num_seqs, block_size, group, decode_only, pad, window, softcap):
    """Random ragged batches: outputs and written caches equal the reference; with a graph size, the padded
    rows only touch the dummy page. Layer 0 may have a sliding window, layer 1 soft-capped scores and another
    scale (Gemma's mix), each planned on its own wrappers."""
    rng, kv_heads, head_dim, layers = random.Random(seed), 2, 8, 2
    num_blocks = num_seqs * 6 + 2  # a sequence holds at most 6 * block_size tokens
    graph_size = num_seqs + pad if decode_only else None
    specs = [LayerSpec(head_dim ** -0.5, sliding_window=window), LayerSpec(0.5, logit_softcap=softcap)]
    fast, ref = make_backends(kv_heads * group, kv_heads, head_dim, block_size, num_blocks,
                              [graph_size] if graph_size else [], specs)
    meta = random_step(rng, num_seqs, block_size, num_blocks, decode_only)
    torch.manual_seed(seed)
    cache = torch.randn(layers, 2, num_blocks + 1, block_size, kv_heads, head_dim)
    fast.bind(cache.clone())
    ref.bind(cache.clone())
    fast.prepare(meta, graph_size=graph_size)
    ref.prepare(meta)
    rows = graph_size or meta.query_start_loc[-1]
    q = torch.randn(rows, kv_heads * group, head_dim)
    k, v = torch.randn(2, rows, kv_heads, head_dim)
    real = meta.query_start_loc[-1]
    for layer in range(layers):
        out = fast.forward(q, k, v, layer)
        want = ref.forward(q[:real], k[:real], v[:real], layer)
        torch.testing.assert_close(out[:real], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.kv_cache[:, :, :-1], ref.kv_cache[:, :, :-1], atol=0, rtol=0)


def test_graph_buffers_replan_for_longer_sequences():
    """One graph wrapper re-planned for a step whose sequences hold more pages (what a replay after many
    decode steps sees) reads the new layout from its fixed buffers."""
    rng = random.Random(7)
    fast, ref = make_backends(8, 2, 8, 4, 64, graph_sizes=[4])
    cache = torch.randn(1, 2, 65, 4, 2, 8)
    fast.bind(cache.clone())
    ref.bind(cache.clone())
    for num_seqs in (1, 3, 4):
        meta = random_step(rng, num_seqs, 4, 64, decode_only=True)
        fast.prepare(meta, graph_size=4)
        ref.prepare(meta)
        q, k, v = torch.randn(4, 8, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
        want = ref.forward(q[:num_seqs], k[:num_seqs], v[:num_seqs], 0)
        torch.testing.assert_close(fast.forward(q, k, v, 0)[:num_seqs], want)


def test_model_on_flashinfer_backend_matches_transformers(qwen3_dir):
    """A whole engine on the backend: transformers' greedy output, and one plan() per step for all layers."""
    llm = LLM(qwen3_dir, block_size=4, attention_backend="flashinfer", max_num_batched_tokens=64)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=9)
    fake_flashinfer.plans.clear()
    steps = 0
    params = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(str(i), prompt, params)
    outputs = {}
    while llm.engine.has_unfinished_requests():
        steps += 1
        outputs.update((o.request_id, o) for o in llm.engine.step() if o.finished)
    assert len(fake_flashinfer.plans) == steps
    assert_same(qwen3_dir, prompts, [outputs[str(i)] for i in range(len(prompts))], max_tokens=15)


def test_sliding_and_softcapped_model_on_flashinfer_backend(tiny_model_factory):
    """Gemma 2 (sliding and global layers, soft-capping) through the backend: transformers' greedy output, and one
    plan() per kind of layer per step."""
    model_dir = tiny_model_factory("gemma2")
    llm = LLM(model_dir, block_size=4, attention_backend="flashinfer", max_num_batched_tokens=16)
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=10, max_len=30)
    fake_flashinfer.plans.clear()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(fake_flashinfer.plans) % 2 == 0 and {p.window_left for p in fake_flashinfer.plans} == {7, -1}
    assert_same(model_dir, prompts, outputs, max_tokens=12)
