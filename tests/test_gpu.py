"""GPU tests: FlashInfer attention against the reference, CUDA graphs against eager execution, and the engine on
a GPU against the CPU and transformers. Every test is marked `gpu` and skips without CUDA; the FlashInfer ones
also skip when `flashinfer` cannot be imported (the import is tried lazily, in the `flashinfer` fixture).

What they prove:
- `test_flashinfer_matches_reference`: FlashInfer's prefill and decode kernels, as nanoserve plans and calls them,
  compute paged attention correctly on random ragged batches (page sizes, GQA ratios, head dims, cached
  contexts, chunks), and write the new K/V exactly where the reference writes them.
- `test_cuda_graph_replay_after_replanning`: a CUDA graph of the decode attention, captured on short sequences,
  replays correctly after re-planning with longer ones and a padded batch, and padding touches no real block.
- `test_cuda_graphs_match_eager_end_to_end`: the engine's decode CUDA graphs (padded batch sizes, a shrinking
  batch, batches too large for any graph) give what the same compiled model gives without graphs.
- `test_float32_gpu_matches_cpu_and_transformers`: in float32 the GPU engine (torch.compile on) produces the CPU
  engine's greedy output and transformers', token for token.
- `test_bf16_gpu_within_tolerance_of_fp32_cpu`: with the GPU defaults (bf16, FlashInfer, compile, graphs) every
  greedy token is, by transformers' fp32 reckoning on the CPU, within bf16 noise of the best token.
- `test_kv_cache_sized_by_profiling`: the default start-up sizes the KV cache from `gpu_memory_utilization`,
  and every block comes back after a busy generate.

Run on a GPU machine on its own: `pytest tests/test_gpu.py` (or `-m gpu`). The models are tiny: what costs
time is torch.compile, so LLM instances are few and the bf16 engine with graphs is shared by two tests.
"""
import functools
import gc
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import ARCHS, FAMILIES, QUANT_PROMPTS, build_tokenizer, hf_greedy, quant_checkpoint, top2_gap
from nanoserve import LLM, SamplingParams
from nanoserve.attention import AttentionMetadata, LayerSpec, ReferenceAttention
from nanoserve.flashinfer_attention import FlashInferAttention  # imports flashinfer only when instantiated

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
BF16 = torch.bfloat16

# FlashInfer (bf16 in, bf16 out) against the exact float64 answer for the same bf16 inputs. A correct bf16 kernel
# errs by the rounding of its output (2^-9 relative) and of the softmax weights it multiplies V with (bf16 on
# tensor cores, 2^-9 relative each): a few 1e-3 on outputs of magnitude ~1. A wrong mask, page or scale errs by
# ~0.1-1.
ATTN_ATOL = ATTN_RTOL = 2e-2
ATTN_REL_NORM = 1e-2  # ||error|| / ||exact|| over the whole output; a correct bf16 kernel stays below ~4e-3

# Tiny bf16 model for the FlashInfer engine tests: head_dim 64 (FlashInfer's prebuilt kernels are for 64 and 128),
# 8 query heads on 2 KV heads (group 4: the tensor-core decode kernel). Its init is smaller than conftest's 0.3:
# with 0.3 the random model amplifies bf16 rounding to several nats, a numerical property of the weights, not of
# the engine. Measured on the CPU (nanoserve in bf16 vs transformers in fp32, teacher-forced, 960 positions):
# the greedy token is at most 0.02 nats below the fp32 best and its logprob is within 0.04 nats of fp32's.
BF16_MODEL = dict(init_std=0.05, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64)
BF16_TOL = 0.1  # nats; ~3x the bf16 noise measured above, far below what a wrong attention or graph produces
GRAPH_SIZES = [1, 2, 4, 8]
SMALL_KV = 4096  # num_gpu_blocks_override: skips profiling, leaves the card's memory to the sizing test


# ---------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="session")
def flashinfer():
    """The flashinfer module, or a skip when it cannot be imported (ImportError, or a broken install that raises
    something else while loading its kernels)."""
    try:
        import flashinfer as module  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"flashinfer cannot be imported: {e!r}")
    # test_flashinfer_backend.py swaps in tests/fake_flashinfer.py for its own module only; never test the fake.
    assert "fake_flashinfer" not in getattr(module, "__file__", ""), "the fake flashinfer is still installed"
    return module


def _free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _random_prompts(count: int, seed: int, min_len: int, max_len: int) -> list[list[int]]:
    tokenizer = build_tokenizer()
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def _block_tables(seq_lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> list[list[int]]:
    """Distinct random blocks for every sequence (enough for `seq_lens` tokens), drawn from a permutation of the
    pool, so pages are scattered and out of order."""
    pool = rng.sample(range(num_blocks), num_blocks)
    tables, at = [], 0
    for n in seq_lens:
        pages = -(-n // block_size)
        tables.append(pool[at:at + pages])
        at += pages
    assert at <= num_blocks
    return tables


def _metadata(contexts: list[int], num_new: list[int], tables: list[list[int]], block_size: int,
              device) -> AttentionMetadata:
    """The step the runner would build: sequence i has contexts[i] tokens cached and computes num_new[i] more."""
    query_start, seq_lens, slots = [0], [], []
    for ctx, n, table in zip(contexts, num_new, tables):
        query_start.append(query_start[-1] + n)
        seq_lens.append(ctx + n)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
    return AttentionMetadata(query_start, seq_lens, [list(t) for t in tables],
                             torch.tensor(slots, dtype=torch.long, device=device), block_size)


class ExactAttention:
    """The oracle: the reference backend in float64 on the CPU, on its own copy of the KV cache. bf16 values are
    exact in float64, so its cache after a step must equal the bf16 backend's bit for bit, and its output is the
    exact attention of the bf16 inputs."""

    def __init__(self, kv_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_cache = kv_cache.detach().cpu().double()
        self.backend = ReferenceAttention(num_heads, num_kv_heads, head_dim, _plain_specs(head_dim))
        self.backend.bind(self.kv_cache)

    def step(self, meta: AttentionMetadata, q, k, v, layer: int) -> torch.Tensor:
        cpu_meta = AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                     meta.slot_mapping.cpu(), meta.block_size)
        self.backend.prepare(cpu_meta)
        return self.backend.forward(q.cpu().double(), k.cpu().double(), v.cpu().double(), layer)


def _assert_attention_close(got: torch.Tensor, exact: torch.Tensor, meta: AttentionMetadata, what: str) -> None:
    got = got.detach().cpu().double()
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite outputs"
    err = (got - exact).abs()
    bad = err > ATTN_ATOL + ATTN_RTOL * exact.abs()
    if bad.any():
        token, head, _ = (int(i) for i in bad.nonzero()[0])
        seq = next(i for i in range(meta.num_seqs) if meta.query_start_loc[i + 1] > token)
        pytest.fail(f"{what}: {int(bad.sum())} outputs off, max error {err.max():.3g}; first at token {token} "
                    f"(sequence {seq}: seq_len {meta.seq_lens[seq]}, {meta.query_lens[seq]} new), head {head}: "
                    f"got {got[token, head, :4].tolist()}, exact {exact[token, head, :4].tolist()}")
    rel = float((got - exact).norm() / exact.norm().clamp_min(1e-30))
    assert rel < ATTN_REL_NORM, f"{what}: relative error norm {rel:.3g} is above bf16 noise"


def _flashinfer_backend(num_heads, num_kv_heads, head_dim, block_size, capture_sizes=(), max_model_len=4096):
    config = SimpleNamespace(block_size=block_size, max_model_len=max_model_len,
                             cudagraph_capture_sizes=list(capture_sizes))
    return FlashInferAttention(num_heads, num_kv_heads, head_dim, _plain_specs(head_dim), BF16, CUDA, config)


def _plain_specs(head_dim: int, num_layers: int = 64) -> list[LayerSpec]:
    return [LayerSpec(head_dim ** -0.5)] * num_layers


def _random_bf16(shape, generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=CUDA) * scale).to(BF16)


# ------------------------------------------------------------------------- 1. FlashInfer vs reference attention

@dataclass(frozen=True)
class AttentionCase:
    head_dim: int
    num_kv_heads: int
    group: int  # query heads per KV head; >= 4 takes the tensor-core decode kernel
    block_size: int
    contexts: tuple[int, ...]  # tokens already cached per sequence
    num_new: tuple[int, ...]  # tokens computed this step per sequence
    layer: int
    spare_blocks: int
    seed: int

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new)


@st.composite
def attention_cases(draw) -> AttentionCase:
    num_seqs = draw(st.integers(1, 6))
    # Empty, short (within a page or two) and long (many pages, split-KV territory) cached contexts.
    context = st.one_of(st.just(0), st.integers(1, 64), st.integers(65, 1500))
    contexts = draw(st.lists(context, min_size=num_seqs, max_size=num_seqs))
    if draw(st.booleans()):  # pure decode: the decode wrapper
        num_new = [1] * num_seqs
    else:  # prompt chunks, alone or mixed with decodes: the prefill wrapper
        num_new = draw(st.lists(st.integers(1, 48), min_size=num_seqs, max_size=num_seqs).filter(
            lambda ns: max(ns) > 1))
    return AttentionCase(
        head_dim=draw(st.sampled_from([64, 128])), num_kv_heads=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 4, 8])), block_size=draw(st.sampled_from([8, 16, 32])),
        contexts=tuple(contexts), num_new=tuple(num_new), layer=draw(st.integers(0, 1)),
        spare_blocks=draw(st.integers(0, 4)), seed=draw(st.integers(0, 2**31 - 1)))


@given(case=attention_cases())
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_flashinfer_matches_reference(flashinfer, case: AttentionCase):
    """FlashInferAttention (bf16) computes what the reference attention computes, exactly in float64 on the same
    bf16 inputs, within bf16 rounding: for ragged batches of sequences with random cached contexts (empty, within
    a page, many pages) and random new-token counts, pure decodes (decode kernel; tensor cores for GQA group >= 4)
    and prompt chunks mixed with decodes (prefill kernel, causal within the chunk), page sizes 8/16/32, GQA groups
    1/4/8, head dims 64/128, either layer of a two-layer cache, pages scattered over the pool. Its K/V write leaves
    the cache bit-identical to the reference's (right slots, right layer, nothing else touched). A second step
    decodes one more token for every sequence on the same backend, re-planned, over the cache the first wrote."""
    rng, gen = random.Random(case.seed), torch.Generator(device=CUDA).manual_seed(case.seed)
    num_kv_heads, head_dim, bs = case.num_kv_heads, case.head_dim, case.block_size
    num_heads = case.group * num_kv_heads
    final_lens = [c + n + 1 for c, n in zip(case.contexts, case.num_new)]  # room for the decode step too
    num_blocks = sum(-(-n // bs) for n in final_lens) + case.spare_blocks
    tables = _block_tables(final_lens, bs, num_blocks, rng)
    # Two layers, every slot random (stale data past a sequence's end must be ignored), plus the dummy page.
    kv_cache = _random_bf16((2, 2, num_blocks + 1, bs, num_kv_heads, head_dim), gen)

    backend = _flashinfer_backend(num_heads, num_kv_heads, head_dim, bs)
    backend.bind(kv_cache.clone())
    oracle = ExactAttention(kv_cache, num_heads, num_kv_heads, head_dim)
    steps = [(list(case.contexts), list(case.num_new)),
             ([c + n for c, n in zip(case.contexts, case.num_new)], [1] * len(case.contexts))]
    for step, (contexts, num_new) in enumerate(steps):
        meta = _metadata(contexts, num_new, tables, bs, CUDA)
        tokens = meta.query_start_loc[-1]
        # q at twice the scale: logits with std 2, so attention is peaked and a wrong key or mask shows.
        q = _random_bf16((tokens, num_heads, head_dim), gen, scale=2.0)
        k, v = (_random_bf16((tokens, num_kv_heads, head_dim), gen) for _ in range(2))
        backend.prepare(meta)
        decode = all(n == 1 for n in num_new)
        prefill_wrapper, decode_wrapper, _ = backend.wrappers[0]
        assert backend.active[0] is (decode_wrapper if decode else prefill_wrapper)
        out = backend.forward(q, k, v, case.layer)
        torch.cuda.synchronize()
        assert out.dtype == BF16
        exact = oracle.step(meta, q, k, v, case.layer)
        what = f"step {step} ({'decode' if decode else 'prefill'} kernel)"
        _assert_attention_close(out, exact, meta, what)
        assert torch.equal(backend.kv_cache.cpu().double(), oracle.kv_cache), f"{what}: KV caches differ"


# ------------------------------------------------------------------- 2. CUDA graphs: kernel level, end to end

@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 128), (8, 2, 64), (16, 2, 128)],
                         ids=["group1-d128", "group4-d64", "group8-d128"])
def test_cuda_graph_replay_after_replanning(flashinfer, num_heads, num_kv_heads, head_dim):
    """A CUDA graph of the attention (KV write + decode kernel) captured once per batch size stays correct when
    the step is re-planned before each replay: sequences with many more pages than at capture (up to
    max_model_len, filling the shared page-index buffer), fewer real rows than the graph's size (the rest padding
    on the dummy page), the two graphs sharing one page-index buffer, and shorter sequences again afterwards.
    Graph 8 is captured after a plan of real short sequences, graph 4 after an all-padding plan (as the engine
    captures). Each replay matches an eager (uncaptured) FlashInfer step on an identical cache copy and the exact
    float64 reference; the real blocks of the cache end up as the eager step leaves them (padding writes only to
    the dummy page)."""
    bs, max_model_len, layer = 16, 512, 1
    rng, gen = random.Random(0), torch.Generator(device=CUDA).manual_seed(0)
    num_blocks = 8 * -(-max_model_len // bs) + 20
    kv_cache = _random_bf16((2, 2, num_blocks + 1, bs, num_kv_heads, head_dim), gen)
    backend = _flashinfer_backend(num_heads, num_kv_heads, head_dim, bs, [4, 8], max_model_len)
    backend.bind(kv_cache)
    eager = _flashinfer_backend(num_heads, num_kv_heads, head_dim, bs)
    static_q = _random_bf16((8, num_heads, head_dim), gen)
    static_k, static_v = (_random_bf16((8, num_kv_heads, head_dim), gen) for _ in range(2))

    def attention(size):
        return backend.forward(static_q[:size], static_k[:size], static_v[:size], layer)

    def decode_meta(contexts):
        tables = _block_tables([c + 1 for c in contexts], bs, num_blocks, rng)
        return _metadata(contexts, [1] * len(contexts), tables, bs, CUDA)

    empty = AttentionMetadata([0], [], [], torch.zeros(0, dtype=torch.long, device=CUDA), bs)
    graphs, outputs = {}, {}
    for size, meta in [(8, decode_meta([rng.randint(0, 20) for _ in range(6)])), (4, empty)]:
        backend.prepare(meta, graph_size=size)
        attention(size)  # warm-up outside the capture: kernel loading, lazy initialisation
        torch.cuda.synchronize()
        graphs[size] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[size]):
            outputs[size] = attention(size)
    torch.cuda.synchronize()

    for size, num_rows, lo, hi in [(8, 5, 100, 400), (4, 3, 300, max_model_len - 1), (8, 8, max_model_len - 1,
                                   max_model_len - 1), (4, 1, 0, 5), (8, 7, 17, 250)]:
        meta = decode_meta([rng.randint(lo, hi) for _ in range(num_rows)])
        q = _random_bf16((num_rows, num_heads, head_dim), gen, scale=2.0)
        k, v = (_random_bf16((num_rows, num_kv_heads, head_dim), gen) for _ in range(2))
        for buffer, fresh in [(static_q, q), (static_k, k), (static_v, v)]:
            buffer.copy_(torch.randn(buffer.shape, generator=gen, device=CUDA))  # padding rows: garbage
            buffer[:num_rows].copy_(fresh)
        before = kv_cache.clone()
        backend.prepare(meta, graph_size=size)
        graphs[size].replay()
        torch.cuda.synchronize()
        got = outputs[size][:num_rows].clone()

        eager.bind(before.clone())
        eager.prepare(meta)
        assert eager.active[0] is eager.wrappers[0][1]
        want = eager.forward(q, k, v, layer)
        exact = ExactAttention(before, num_heads, num_kv_heads, head_dim).step(meta, q, k, v, layer)
        what = f"graph {size}, {num_rows} real rows, seq_lens {meta.seq_lens}"
        _assert_attention_close(got, exact, meta, what + " (replay)")
        _assert_attention_close(want, exact, meta, what + " (eager)")
        assert torch.equal(kv_cache[:, :, :num_blocks], eager.kv_cache[:, :, :num_blocks]), \
            f"{what}: the replay's KV writes differ from the eager step's"


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama", **BF16_MODEL)


@pytest.fixture(scope="module")
def graph_llm(flashinfer, bf16_model_dir):
    """The GPU defaults (bf16, FlashInfer, torch.compile, decode CUDA graphs) with capture sizes 1, 2, 4, 8 so that
    batches of 3, 5 and 13 need padding or an eager step, and a fixed small KV pool (no profiling)."""
    llm = LLM(bf16_model_dir, num_gpu_blocks_override=SMALL_KV,
              compilation_config={"cudagraph_capture_sizes": GRAPH_SIZES})
    yield llm
    del llm
    _free_gpu_memory()


def _assert_same_up_to_ties(model_dir, prompts, outs_a, outs_b, name_a: str, name_b: str, tol: float) -> None:
    """Two bf16 runs of one model agree: while their greedy tokens agree, the chosen token's logprob agrees within
    `tol`; where they first part, each run's token is within `tol` of the other's in its own distribution (a
    near-tie that bf16 rounding may break either way), and the comparison of that sequence stops there."""
    for i, (prompt, a, b) in enumerate(zip(prompts, outs_a, outs_b)):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        for j, (x, y) in enumerate(zip(ta, tb)):
            if x == y:
                diff = abs(la[j][x].logprob - lb[j][y].logprob)
                assert diff <= tol, (f"request {i}, output token {j}: both chose {x} but its logprob is "
                                     f"{la[j][x].logprob:.4f} with {name_a}, {lb[j][y].logprob:.4f} with {name_b}")
                continue
            alt_a, alt_b = la[j].get(y), lb[j].get(x)
            margin_a = la[j][x].logprob - alt_a.logprob if alt_a else float("inf")
            margin_b = lb[j][y].logprob - alt_b.logprob if alt_b else float("inf")
            if max(margin_a, margin_b) > tol:
                gap = top2_gap(model_dir, prompt + ta[:j])
                pytest.fail(f"request {i}, output token {j}: {name_a} chose {x} ({margin_a:.3g} nats above {y}), "
                            f"{name_b} chose {y} ({margin_b:.3g} nats above {x}); transformers fp32 top-2 logit gap "
                            f"there is {gap:.2e}. A near-tie would show margins below {tol}: this is a bug.")
            break
        else:
            assert len(ta) == len(tb), f"request {i}: {len(ta)} tokens with {name_a}, {len(tb)} with {name_b}"


def test_cuda_graphs_match_eager_end_to_end(graph_llm, bf16_model_dir):
    """Decode steps replayed from CUDA graphs give the same tokens and logprobs (up to bf16 near-ties) as the
    same compiled model run without graphs (compilation_config cudagraph_mode NONE): batches of 3 and 5
    sequences (padded to graphs 4 and 8) whose requests stop at different lengths (the batch shrinks through
    every graph size down to 1), and a batch of 13 (too big for any graph: eager compiled steps, then graphs as
    it shrinks), whose prompts partly extend earlier ones (prefix-cache hits: FlashInfer prefill over cached
    pages). Decodes run long enough to cross page boundaries after capture."""
    runner = graph_llm.engine.runner
    assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
    assert runner.graphs.sizes == GRAPH_SIZES and runner.forward_model is not runner.model  # compiled
    eager = LLM(bf16_model_dir, num_gpu_blocks_override=SMALL_KV, compilation_config={"cudagraph_mode": "NONE"})
    assert eager.engine.runner.graphs is None and eager.engine.runner.forward_model is not eager.engine.runner.model

    graphs, replayed = runner.graphs, []
    replay = graphs.replay

    def recording_replay(input_ids, positions, meta):
        replayed.append(len(input_ids))
        return replay(input_ids, positions, meta)

    first = _random_prompts(3, seed=31, min_len=40, max_len=90)
    batches = [(first, [7, 19, 33]),
               (_random_prompts(5, seed=32, min_len=5, max_len=80), [4, 12, 20, 28, 40]),
               ([p + q for p, q in zip(first, _random_prompts(3, seed=33, min_len=1, max_len=20))]
                + _random_prompts(10, seed=34, min_len=5, max_len=80), list(range(3, 40, 3)))]
    graphs.replay = recording_replay
    try:
        for prompts, max_tokens in batches:
            params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=5) for m in max_tokens]
            with_graphs = graph_llm.generate(prompts, params, use_tqdm=False)
            without = eager.generate(prompts, params, use_tqdm=False)
            _assert_same_up_to_ties(bf16_model_dir, prompts, with_graphs, without, "CUDA graphs", "no graphs",
                                    BF16_TOL)
            assert [len(o.outputs[0].token_ids) for o in with_graphs] == max_tokens
        assert all(o.num_cached_tokens > 0 for o in with_graphs[:3]), "the extended prompts missed the prefix cache"
    finally:
        del graphs.replay
    # Every graph size replayed, with padded batches among them; nothing above the largest graph.
    assert {1, 2, 3, 4, 5, 8} <= set(replayed) and max(replayed) <= max(GRAPH_SIZES), sorted(set(replayed))
    del eager
    _free_gpu_memory()


# ---------------------------------------------------------------------------- 3. float32: GPU == CPU == HF

def _first_mismatch(got: list[int], want: list[int]) -> int | None:
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


@pytest.mark.parametrize("arch", ARCHS + list(FAMILIES))  # every family, MoE included
def test_float32_gpu_matches_cpu_and_transformers(arch, tiny_model_factory):
    """In float32 on the GPU (the torch reference attention, as FlashInfer has no fp32 kernels; torch.compile on,
    the GPU default; no graphs) greedy output equals the CPU engine's and transformers', token for token, for every
    conftest architecture, with pages of 4 tokens and a prompt long enough to be prefilled in chunks."""
    model_dir = tiny_model_factory(arch)
    prompts = _random_prompts(8, seed=41, min_len=3, max_len=60) + _random_prompts(1, seed=42, min_len=150,
                                                                                     max_len=150)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine_args = dict(block_size=4, max_num_batched_tokens=64)
    gpu = LLM(model_dir, device="cuda", dtype="float32", num_gpu_blocks_override=1024, **engine_args)
    runner = gpu.engine.runner
    assert runner.dtype == torch.float32 and isinstance(runner.attention, ReferenceAttention)
    assert runner.graphs is None and runner.forward_model is not runner.model  # compiled, no graphs
    on_gpu = [o.outputs[0].token_ids for o in gpu.generate(prompts, params, use_tqdm=False)]
    del gpu, runner
    _free_gpu_memory()
    on_cpu = [o.outputs[0].token_ids for o in LLM(model_dir, device="cpu", **engine_args).generate(
        prompts, params, use_tqdm=False)]
    expected = hf_greedy(model_dir, prompts, 20, ignore_eos=True)
    for name, reference in [("the CPU engine", on_cpu), ("transformers", expected)]:
        for i, (prompt, got, want) in enumerate(zip(prompts, on_gpu, reference)):
            k = _first_mismatch(got, want)
            if k is not None:
                gap = top2_gap(model_dir, prompt + want[:k])
                pytest.fail(f"{arch}, prompt {i}: GPU fp32 differs from {name} at output token {k}: got "
                            f"{got[k:k + 3]}, expected {want[k:k + 3]}; top-2 logit gap there is {gap:.2e} "
                            f"(a gap near 0 is a tie, anything else a bug)")


# --------------------------------------------------------------------- 4. bf16 on GPU vs fp32 on the CPU

@functools.lru_cache(maxsize=2)
def _hf_fp32(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _teacher_forced_logprobs(model_dir: str, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[len(continuation), vocab] fp32 log-probabilities (CPU, transformers) of each continuation position, given
    the prompt and the continuation before it."""
    logits = _hf_fp32(model_dir)(torch.tensor([prompt + continuation])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(continuation) - 1], dim=-1)


def test_bf16_gpu_within_tolerance_of_fp32_cpu(graph_llm, bf16_model_dir):
    """With the GPU defaults (bf16, FlashInfer, torch.compile, decode CUDA graphs), greedy decoding stays within
    bf16 noise of fp32: teacher-forcing transformers in fp32 on the CPU with the GPU's own continuation, every
    token the GPU chose is within BF16_TOL nats of the fp32 best token at its position, and the logprob the GPU
    reported for it is within BF16_TOL of fp32's. Covers fresh prompts and follow-ups that extend them with their
    output (prefix-cache hits: prefill over cached pages). Nearly all tokens must be fp32's argmax outright."""
    prompts = _random_prompts(8, seed=51, min_len=20, max_len=100)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=1)
    outs = graph_llm.generate(prompts, params, use_tqdm=False)
    follow_ups = [p + o.outputs[0].token_ids + extra
                  for p, o, extra in zip(prompts, outs, _random_prompts(8, seed=52, min_len=1, max_len=30))]
    more = graph_llm.generate(follow_ups, params, use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in more), "follow-ups missed the prefix cache"

    worst_deficit, worst_drift, not_argmax, total = (0.0, None), (0.0, None), 0, 0
    for i, (prompt, out) in enumerate(zip(prompts + follow_ups, outs + more)):
        tokens, entries = out.outputs[0].token_ids, out.outputs[0].logprobs
        logprobs = _teacher_forced_logprobs(bf16_model_dir, prompt, tokens)
        for j, token in enumerate(tokens):
            deficit = float(logprobs[j].max() - logprobs[j, token])
            drift = abs(entries[j][token].logprob - float(logprobs[j, token]))
            worst_deficit = max(worst_deficit, (deficit, (i, j)), key=lambda w: w[0])
            worst_drift = max(worst_drift, (drift, (i, j)), key=lambda w: w[0])
            not_argmax += deficit > 0
            total += 1
    assert worst_deficit[0] <= BF16_TOL, (
        f"request {worst_deficit[1][0]}, output token {worst_deficit[1][1]}: the GPU's greedy token is "
        f"{worst_deficit[0]:.3f} nats below fp32's best (bf16 tolerance {BF16_TOL})")
    assert worst_drift[0] <= BF16_TOL, (
        f"request {worst_drift[1][0]}, output token {worst_drift[1][1]}: the GPU's logprob is off fp32's by "
        f"{worst_drift[0]:.3f} nats (bf16 tolerance {BF16_TOL})")
    assert not_argmax <= 0.1 * total, f"{not_argmax} of {total} greedy tokens are not fp32's argmax"


# --------------------------------------------------------------------------------- 5. start-up KV sizing

def test_kv_cache_sized_by_profiling(flashinfer, bf16_model_dir):
    """Start-up with the default settings sizes the KV cache by profiling: the cache takes what
    gpu_memory_utilization leaves after the memory in use and a step's peak (never more, and not much less),
    the card's total use after start-up (compile and CUDA graphs included) stays within the utilization, a lower
    utilization gives fewer blocks, and after a busy generate (many requests of varied lengths, shared
    prefixes, sampling) every block is back in the free pool.
    Kept last in this file: the default engine takes 90% of the card. The low-utilization engine runs eagerly
    (profiling happens before compilation and capture, so it is measured the same way, and one compile fewer
    keeps the process under torch.compile's recompile limit)."""
    gib = 1 << 30
    _free_gpu_memory()
    free, total = torch.cuda.mem_get_info()
    in_use = total - free
    low_util = round(in_use / total + 0.1, 3)  # ~8 GiB of cache on an 80 GiB card
    if low_util > 0.75:
        pytest.skip(f"the card is {in_use / total:.0%} in use before the test")
    low = LLM(bf16_model_dir, gpu_memory_utilization=low_util, enforce_eager=True)
    runner = low.engine.runner
    bytes_per_block = runner.dtype.itemsize
    for dim in runner.kv_shape:
        bytes_per_block *= dim
    low_blocks = runner.num_blocks
    assert 0 < low_blocks * bytes_per_block <= low_util * total - in_use
    del low, runner
    _free_gpu_memory()

    free, total = torch.cuda.mem_get_info()
    in_use = total - free
    llm = LLM(bf16_model_dir)  # every default: 0.9 utilization, bf16, FlashInfer, compile, CUDA graphs
    runner, block_manager = llm.engine.runner, llm.engine.scheduler.block_manager
    assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
    budget = 0.9 * total - in_use  # what the cache may take, at most
    # Not much less: the weights, FlashInfer's workspaces, a step's peak and the 512 MiB graph reserve are < 3 GiB.
    assert budget - 3 * gib <= runner.num_blocks * bytes_per_block <= budget, (runner.num_blocks, budget / gib)
    assert low_blocks < runner.num_blocks
    used_after = total - torch.cuda.mem_get_info()[0]
    assert used_after <= 0.9 * total + gib, f"{used_after / gib:.1f} GiB in use, over 90% of {total / gib:.1f} GiB"
    assert block_manager.num_blocks == runner.num_blocks == block_manager.num_free_blocks

    shared = _random_prompts(1, seed=61, min_len=48, max_len=48)[0]
    prompts = (_random_prompts(40, seed=62, min_len=2, max_len=300)
               + [shared + p for p in _random_prompts(24, seed=63, min_len=1, max_len=40)])
    rng = random.Random(64)
    params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), top_p=0.95, max_tokens=rng.randint(1, 48),
                             n=rng.choice([1, 1, 2]), seed=i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in outs)
    assert not llm.engine.has_unfinished_requests()
    assert block_manager.num_free_blocks == runner.num_blocks, "KV blocks leaked"
    del llm, runner, block_manager
    _free_gpu_memory()


# ------------------------------------------------------------------------- 6. quantized kernels on the GPU

def _quantized_logprobs(llm, prompts: list[list[int]]) -> list[float]:
    """Teacher-forced prompt logprobs, one prompt at a time (dynamic per-tensor FP8 scales span a whole step)."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = []
    for ids in prompts:
        entries = llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs[1:]
        out += [entry[t].logprob for entry, t in zip(entries, ids[1:])]
    return out


@pytest.mark.parametrize("name, kernel, compiled", [
    ("llama-gptq-w4-g32-sym-descact", "Int4Kernel", True), ("qwen2-ct-w4a16-g32-asym", "Int4Kernel", False),
    ("llama-awq-w4-g32", "Int4Kernel", False), ("llama-ct-w4a16-ch-asym", "Int4Kernel", False),
    ("llama-ct-fp8-dynamic", "Fp8Kernel", True), ("qwen2-ct-fp8-static", "Fp8Kernel", False),
    ("llama-ct-w8a8-int", "Int8Kernel", False), ("on the fly: fp8", "Fp8Kernel", False),
    ("on the fly: int8", "Int8Kernel", True)])
def test_quantized_kernels_on_gpu_match_their_cpu_twins(name, kernel, compiled, tmp_path, monkeypatch, llama_dir):
    """On the GPU, 4-bit checkpoints run tinygemm (`_weight_int4pack_mm`, bf16 activations), FP8 `_scaled_mm`
    (compute capability 8.9+), int8 a dequantized copy; one case of each under torch.compile, the others
    eager (compiling costs the most GPU time). The CPU engine runs the same kernels' CPU twins in float32, which
    tests/test_quantization.py checks against transformers and compressed-tensors. A wrong packing, zero point,
    gather or scale is off by nats; bf16 activations by hundredths."""
    from nanoserve import quantization
    if kernel == "Fp8Kernel" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    monkeypatch.setattr(quantization, "KERNEL_DEVICES", ("cuda", "cpu"))
    on_the_fly = name.startswith("on the fly")
    path = llama_dir if on_the_fly else quant_checkpoint(name, tmp_path / "q")
    extra = dict(quantization=name.split()[-1]) if on_the_fly else {}
    gpu = LLM(path, device="cuda", dtype="float32", num_gpu_blocks_override=256, enforce_eager=not compiled,
              **extra)
    kernels = {type(m.kernel).__name__ for m in gpu.engine.runner.model.modules() if hasattr(m, "kernel")}
    assert kernel in kernels and (gpu.engine.runner.forward_model is not gpu.engine.runner.model) == compiled
    on_gpu = _quantized_logprobs(gpu, QUANT_PROMPTS)
    del gpu
    _free_gpu_memory()
    on_cpu = _quantized_logprobs(LLM(path, device="cpu", **extra), QUANT_PROMPTS)
    errors = [abs(a - b) for a, b in zip(on_gpu, on_cpu)]
    assert sum(errors) / len(errors) < 0.05 and max(errors) < 0.5, errors
