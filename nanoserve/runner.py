"""The model runner: turns the scheduler's `Batch` into tensors, runs the model, samples the next tokens.

It owns the model, the KV cache (one tensor for all layers, sized at start-up) and the attention backend.
`execute(batch)` builds the flat token batch (ids, positions, slot mapping, block tables), runs one forward pass,
takes the logits of the last computed token of every sequence whose chunk reaches its end, and samples there.
The engine hands the result back to the scheduler.

Start-up on a GPU: build the model in its dtype, load the weights, profile one forward pass at the largest
step to learn how much memory activations take, give the rest (up to `gpu_memory_utilization`) to the KV
cache, compile the model (torch.compile) and capture the decode CUDA graphs (cuda_graphs.py).
"""
import contextlib
import importlib.util
import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from .attention import AttentionMetadata, ReferenceAttention, host_tensor, register_backend
from .config import EngineConfig
from .linear import use_blas
from .models import attention_specs, model_class
from .lora import LoRAManager
from .parallel import (EngineDeadError, TensorParallel, check_parallel_support, check_workers, send_step,
                       start_workers, stop_workers)
from .pooling import Pooler
from .quantization import make_method, quantize_model, weight_bytes
from .sampling import SampleRequest, SamplingParams, logprob_entries, logprob_entry, sample, target_probs
from .scheduler import Batch, ScheduledSeq, Sequence, rejection_sample
from .weights import load_weights

logger = logging.getLogger("nanoserve")
CPU_KV_CACHE_BYTES = 2 << 30
CUDA_GRAPH_RESERVE_BYTES = 512 << 20  # kept free of the KV cache for graph pools and FlashInfer's plans
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: logits rows at a time (256 x a 152k vocabulary in fp32 is 155 MB)


@dataclass
class StepInputs:
    """What one forward pass needs, as host lists: built from the `Batch` on rank 0, and under tensor parallelism
    sent as is to the other ranks (parallel.py), which run the same pass on their shards."""
    ids: list[int]
    positions: list[int]  # RoPE table rows: the token positions, offset for a longrope model's long sequences
    slots: list[int]  # KV cache slot of every new token
    query_start: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    logit_rows: list[int]  # the hidden rows that sample
    prompt_rows: list[tuple[int, int]]  # hidden row ranges scored for prompt logprobs, in order (TP only)
    block_copies: list[tuple[int, int]]


@dataclass
class StepResult:
    """What one forward pass produced, per scheduled item (see `ModelRunner.execute`)."""
    tokens: list[list[int]]
    logprobs: list[list]
    prompt_logprobs: list[list | None]
    pooled: list  # runner="pooling": the raw pooled vector once an item's prompt is complete, else None


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, eos_token_ids: set[int], tp: TensorParallel = None):
        self.config, self.eos_token_ids = config, set(eos_token_ids)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.hf_config = hf = AutoConfig.from_pretrained(model_dir)
        config.resolve_for_model(hf)
        self.workers, self.sends_steps = [], False  # rank 0 of a tensor-parallel group: the other ranks' processes
        if tp is None and config.tensor_parallel_size > 1:
            check_parallel_support(config, hf)
            self.workers = start_workers(config, model_dir, eos_token_ids)
            weakref.finalize(self, stop_workers, self.workers)
        self.tp = tp = tp or TensorParallel(0, config.tensor_parallel_size if self.workers else 1)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_heads = tp.split(hf.num_attention_heads, "number of attention heads")[1]
        num_kv_heads = tp.kv_heads(hf.num_key_value_heads)[1]
        self.kv_shape = (hf.num_hidden_layers, 2, config.block_size, num_kv_heads, head_dim)  # per block, this rank
        self.attention = self._make_attention(num_heads, num_kv_heads, head_dim, attention_specs(hf))
        self.quant_method = make_method(config.quantization, hf, self.device)
        start = time.perf_counter()
        # A quantized checkpoint's model is built on the meta device: its quantized layers never hold full-precision
        # weights (weights.py gives memory to the rest).
        lazy = self.quant_method is not None and not self.quant_method.on_the_fly and config.load_format != "dummy"
        with torch.device("meta" if lazy else self.device), _default_dtype(self.dtype):
            model = model_class(hf)(hf, register_backend(self.attention), config.max_model_len, tp)
        if config.load_format == "dummy":
            _dummy_weights(model)
        else:  # an embedding checkpoint has no lm_head: it is never used
            optional = {"lm_head.weight"} if config.runner == "pooling" else set()
            load_weights(model, model_dir, optional, self.quant_method, self.device if lazy else None)
        if self.quant_method is not None and self.quant_method.on_the_fly:
            quantize_model(model, self.quant_method)
        # Compiled or graphed: LoRA in one shape for any mix of adapters (lora.py, "static").
        static = config.compile_model or bool(config.cudagraph_capture_sizes)
        self.lora = LoRAManager(model, config.max_loras, config.max_lora_rank, config.max_num_batched_tokens,
                                static) if config.enable_lora else None
        self.pooler = Pooler.for_model(model_dir, hf, config.pooler_config) if config.runner == "pooling" else None
        self.model = model.eval().requires_grad_(False)
        quantized = f", quantization: {self.quant_method.describe()}" if self.quant_method else ""
        logger.info("Model loaded in %.1f s (weights %.3f GiB%s)", time.perf_counter() - start,
                    weight_bytes(model) / 2**30, quantized)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.forward_model, self.graphs = self.model, None  # eager until the cache is sized (profiling runs)
        self.num_blocks = tp.min(self._num_kv_blocks())
        layers, kv, *block_shape = self.kv_shape
        # One block more than the scheduler hands out: padded rows of a CUDA-graph batch write there.
        self.kv_cache = torch.zeros(layers, kv, self.num_blocks + 1, *block_shape, dtype=self.dtype,
                                    device=self.device)
        self.attention.bind(self.kv_cache)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB) on %s", self.num_blocks, config.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float32 and not config.compile_model:
            if use_blas(self.model):
                logger.info("CPU: matmuls on OpenBLAS (%d threads), torch on 1 thread", os.cpu_count() or 1)
        if config.compile_model:
            logger.info("torch.compile: the model compiles at its first forward pass (up to a minute; Inductor "
                        "caches the result for later starts)")
            self.forward_model = _compile(self.model)
        if config.cudagraph_capture_sizes and self.attention.supports_cuda_graphs:
            from .cuda_graphs import CudaGraphs
            self.graphs = CudaGraphs(self.forward_model, self.attention, config.cudagraph_capture_sizes)
        elif config.cudagraph_capture_sizes:
            logger.warning("CUDA graphs are off: the torch attention backend (float32) cannot be captured")
        self.sends_steps = bool(self.workers)  # from now on the workers wait for steps (not during profiling)

    def _make_attention(self, num_heads: int, num_kv_heads: int, head_dim: int, specs: list):
        name = self.config.attention_backend
        if name == "auto":
            fast = self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
            name = "flashinfer" if fast and _flashinfer_installed() else "torch"
            if fast and name == "torch":
                logger.warning("flashinfer is not installed: using the (slow) torch attention, without CUDA graphs")
        logger.info("Attention backend: %s", name)
        if name == "torch":
            return ReferenceAttention(num_heads, num_kv_heads, head_dim, specs)
        from .flashinfer_attention import FlashInferAttention
        return FlashInferAttention(num_heads, num_kv_heads, head_dim, specs, self.dtype, self.device, self.config)

    def _num_kv_blocks(self) -> int:
        c = self.config
        bytes_per_block = self.dtype.itemsize
        for dim in self.kv_shape:
            bytes_per_block *= dim
        if c.num_gpu_blocks_override is not None:
            num_blocks = c.num_gpu_blocks_override
        elif c.kv_cache_memory_bytes is not None or self.device.type == "cpu":
            num_blocks = (c.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES) // bytes_per_block
            # More blocks than every sequence at full length could use is wasted memory.
            num_blocks = min(num_blocks, c.max_num_seqs * -(-c.max_model_len // c.block_size))
        else:
            num_blocks = self._profile_kv_bytes() // bytes_per_block
        if num_blocks * c.block_size < c.max_model_len:
            raise ValueError(f"The KV cache holds {max(num_blocks, 0) * c.block_size} tokens, fewer than "
                             f"max_model_len={c.max_model_len}: lower max_model_len or give the cache more memory")
        return num_blocks

    def _profile_kv_bytes(self) -> int:
        """GPU: the memory left for the KV cache, as vLLM measures it: `gpu_memory_utilization` of the card, less
        what is in use now (weights, CUDA context, other processes) and the peak of a step at the largest size."""
        c, device = self.config, self.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        scratch_cache_bytes = self._profile_run()
        torch.cuda.synchronize(device)
        activations = torch.cuda.max_memory_allocated(device) - baseline - scratch_cache_bytes
        torch.cuda.empty_cache()
        # Read after the step, so that kernels and libraries it loaded count; the scratch cache, still bound to
        # the backend, does not.
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free - scratch_cache_bytes
        kv_bytes = int(total * c.gpu_memory_utilization - in_use - activations - CUDA_GRAPH_RESERVE_BYTES)
        logger.info("Memory: %.1f GiB in use before the KV cache, step peak %.2f GiB, KV cache gets %.1f GiB",
                    in_use / 2**30, activations / 2**30, kv_bytes / 2**30)
        return max(kv_bytes, 0)

    @torch.inference_mode()
    def _profile_run(self) -> int:
        """One step at the token budget, prompts as long as allowed, sampling `max_num_seqs` rows with the most
        expensive rules; on a scratch KV cache just big enough, whose size is returned."""
        c, bs = self.config, self.config.block_size
        budget, params = c.max_num_batched_tokens, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=20)
        lens = [min(budget - i, c.max_model_len - 1) for i in range(0, budget, c.max_model_len - 1)]
        lens += [1] * max(0, min(c.max_num_seqs, budget) - len(lens))  # more sampled rows, as decodes bring
        items, next_block = [], 0
        for n in lens:
            seq = Sequence(-1, [0] * n, n, params.resolve({}))
            seq.block_table = list(range(next_block, next_block + -(-n // bs)))
            next_block += len(seq.block_table)
            items.append(ScheduledSeq(seq, 0, n))
        layers, kv, *block_shape = self.kv_shape
        scratch = torch.zeros(layers, kv, next_block + 1, *block_shape, dtype=self.dtype, device=self.device)
        self.attention.bind(scratch)
        self.execute(Batch(items))
        return scratch.numel() * scratch.element_size()

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        """One forward pass over the batch. Returns, per scheduled item, its new tokens (none for a prompt chunk,
        one for a decode, the kept drafts plus one under speculation), their logprob entries (or None), the
        prompt logprob entries its chunk produced (None unless it asked for them), and its pooled vector.
        Under tensor parallelism a failed step is fatal: the ranks may be out of step after it."""
        if not self.workers:
            return self._execute(batch)
        try:
            return self._execute(batch)
        except EngineDeadError:
            raise
        except Exception as e:
            check_workers(self.workers)
            raise EngineDeadError(f"A tensor-parallel step failed ({e}): the ranks may be out of step") from e

    def _execute(self, batch: Batch) -> StepResult:
        logits, hidden = self._forward(batch)
        prompt_logprobs = self._prompt_logprobs(batch, hidden)
        pooled = self._pool(batch, hidden)
        tokens, logprobs = [[] for _ in batch.scheduled], [[] for _ in batch.scheduled]
        rows, requests, plain = 0, [], []
        for i, item in enumerate(batch.scheduled):
            n = item.num_logits
            drafts = item.draft_token_ids[len(item.draft_token_ids) - n + 1:]
            requests += [self._sample_request(item.seq, drafts[:j]) for j in range(n)]
            if n == 1:
                plain.append((i, rows))
            elif n > 1:
                tokens[i], logprobs[i] = self._verify(logits[rows:rows + n], requests[rows:rows + n], drafts)
            rows += n
        if plain:
            index = [row for _, row in plain]
            plain_logits = logits if len(index) == len(logits) else logits[index]  # all plain, the usual case
            result = sample(plain_logits, [requests[row] for row in index], self.generator)
            for (i, _), token, entry in zip(plain, result.token_ids, result.logprobs):
                tokens[i], logprobs[i] = [token], [entry]
        return StepResult(tokens, logprobs, prompt_logprobs, pooled)

    def _pool(self, batch: Batch, hidden: torch.Tensor) -> list:
        if self.pooler is None:
            return [None] * len(batch.scheduled)
        pooled, first_row = [], 0
        for item in batch.scheduled:
            rows = hidden[first_row:first_row + item.num_new_tokens]
            first_row += item.num_new_tokens
            last = item.start + item.num_new_tokens == item.seq.num_tokens
            pooled.append(self.pooler.update(item.seq, rows, item.start, last))
        return pooled

    def _prompt_logprobs(self, batch: Batch, hidden: torch.Tensor) -> list[list | None]:
        """SamplingParams.prompt_logprobs: the logits at prompt position p score prompt token p + 1, so a chunk
        covering positions [start, end) yields the entries of tokens start + 1 .. end (the last prompt position
        scores the first generated token instead, and is sampled as usual). Logits are made PROMPT_LOGITS_ROWS
        rows at a time and cut down to the top k at once: a long prompt never holds [prompt_len, vocab]."""
        out = []
        for item, chunks in zip(batch.scheduled, _prompt_chunks(batch)):
            entries = None if chunks is None else []
            for start, stop, first_row in chunks or ():
                logits = self.model.compute_logits(hidden[first_row:first_row + stop - start])
                targets = self.to_device(item.seq.token_ids[start + 1:stop + 1])
                entries += logprob_entries(torch.log_softmax(logits.float(), dim=-1), targets,
                                           item.seq.params.prompt_logprobs)
            out.append(entries)
        return out

    def _verify(self, logits: torch.Tensor, requests: list[SampleRequest], drafts: list[int]):
        """Speculative decoding: keep the drafts the target agrees with (see scheduler.rejection_sample)."""
        generator = requests[0].generator or self.generator
        kept = rejection_sample(target_probs(logits, requests), drafts, None, generator)
        k = requests[0].params.logprobs
        if k is None:
            return kept, [None] * len(kept)
        raw = torch.log_softmax(logits.float(), dim=-1)
        return kept, [logprob_entry(raw[j], token, k) for j, token in enumerate(kept)]

    @torch.inference_mode()
    def greedy_next(self, batch: Batch) -> list[int | None]:
        """The argmax next token of every item that samples (None for the others): the draft model's proposals."""
        logits, _ = self._forward(batch)
        best = iter(logits.argmax(dim=-1).tolist()) if logits is not None else iter(())
        return [next(best) if item.num_logits else None for item in batch.scheduled]

    def _forward(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run the model: logits of the positions that sample, in batch order, and every position's hidden state."""
        inputs = self._host_inputs(batch)
        if self.sends_steps:
            check_workers(self.workers)
            send_step(inputs)
        if self.lora is not None:
            self.lora.prepare([(item.seq.lora_slot, item.num_new_tokens) for item in batch.scheduled])
        return self._run(inputs)

    def run_inputs(self, inputs: StepInputs) -> None:
        """A tensor-parallel worker's step: the same forward pass and LM-head calls as rank 0, results unused."""
        _, hidden = self._run(inputs)
        for first, last in inputs.prompt_rows:
            self.model.compute_logits(hidden[first:last])

    def _run(self, inputs: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor]:
        if inputs.block_copies:  # copy-on-write of blocks shared by forked beams, before anything writes them
            source, destination = zip(*inputs.block_copies)
            self.kv_cache[:, :, list(destination)] = self.kv_cache[:, :, list(source)]
        meta = AttentionMetadata(inputs.query_start, inputs.seq_lens, inputs.block_tables,
                                 self.to_device(inputs.slots), self.config.block_size)
        input_ids, positions = self.to_device(inputs.ids), self.to_device(inputs.positions)
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.replay(input_ids, positions, meta)
        else:
            self.attention.prepare(meta)
            hidden = self.forward_model(input_ids, positions)
        rows = inputs.logit_rows
        return (self.model.compute_logits(hidden[self.to_device(rows)]) if rows else None), hidden

    def _host_inputs(self, batch: Batch) -> StepInputs:
        bs = self.config.block_size
        ids, positions, slots, query_start, seq_lens, logit_rows = [], [], [], [0], [], []
        for item in batch.scheduled:
            seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
            ids += item.token_ids
            rope = self.model.rope_table_offset(end)  # nonzero only for Phi-3's long sequences
            positions += range(start + rope, end + rope)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            logit_rows += range(query_start[-1] - item.num_logits, query_start[-1])
        # Only the other ranks of a tensor-parallel group need these (rank 0 scores the chunks in _prompt_logprobs).
        prompt_rows = [(row, row + stop - start) for chunks in _prompt_chunks(batch) if chunks
                       for start, stop, row in chunks] if self.workers else []
        tables = [item.seq.block_table for item in batch.scheduled]
        return StepInputs(ids, positions, slots, query_start, seq_lens, tables, logit_rows, prompt_rows,
                          list(batch.block_copies))

    def to_device(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor on the device. On a GPU it goes through pinned memory with an asynchronous copy:
        a copy from ordinary memory would wait for the GPU to finish the work queued before it."""
        return host_tensor(values, torch.long, self.device).to(self.device, non_blocking=True)

    def _sample_request(self, seq: Sequence, drafts: list[int] = ()) -> SampleRequest:
        """What the sampler needs for `seq`'s next token, as if `drafts` had already been generated."""
        p = seq.params
        if p.seed is not None and seq.generator is None:
            seq.generator = torch.Generator(self.device).manual_seed(p.seed)
        banned = []
        if seq.num_output_tokens + len(drafts) < p.min_tokens:  # stop tokens cannot end a sequence before min_tokens
            banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        if not p.has_penalties:  # the token lists are copied only when the sampler reads them (long ones cost)
            return SampleRequest(p, [], [], seq.generator, banned)
        return SampleRequest(p, seq.prompt_token_ids, seq.output_token_ids + list(drafts), seq.generator, banned)


def _prompt_chunks(batch: Batch) -> list[list[tuple[int, int, int]] | None]:
    """Per item, the prompt-logprob chunks its rows score: (first position, end position, first hidden row),
    PROMPT_LOGITS_ROWS at a time; None for an item that scores none."""
    out, first_row = [], 0
    for item in batch.scheduled:
        seq, rows = item.seq, first_row
        first_row += item.num_new_tokens
        end = min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        if not seq.needs_prompt_logits or end <= item.start:
            out.append(None)
            continue
        out.append([(start, min(start + PROMPT_LOGITS_ROWS, end), rows + start - item.start)
                    for start in range(item.start, end, PROMPT_LOGITS_ROWS)])
    return out


def _flashinfer_installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build the model's parameters directly in `dtype` (no float32 copy of an 8B model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _dummy_weights(model: torch.nn.Module) -> None:
    """load_format="dummy": small random weights, as vLLM's dummy loader, for benchmarking a model's shape."""
    for param in model.parameters():
        param.uniform_(-1e-3, 1e-3)


def _compile(model: torch.nn.Module):
    """torch.compile the whole forward as one graph; attention is the `paged_attention` custom op inside it.
    The token dimension is dynamic (one graph serves every step size) and unbacked, so that a step of one
    token does not get its own specialised graph."""
    # Each engine alive in the process (a draft model, tests) holds its own backend id, a constant in its graph;
    # Dynamo's default of 8 graphs per function would make the 9th engine fail rather than recompile.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(model, fullgraph=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        torch._dynamo.decorators.mark_unbacked(input_ids, 0)
        torch._dynamo.decorators.mark_unbacked(positions, 0)
        return compiled(input_ids, positions)
    return forward
