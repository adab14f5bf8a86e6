"""The model runner: turns the scheduler's `Batch` into tensors, runs the model, samples the next tokens.

It owns the model, the KV cache (one tensor for all layers, sized at start-up) and the attention backend.
`execute(batch)` builds the flat token batch (ids, positions, slot mapping, block tables), runs one forward pass,
takes the logits of the last computed token of every sequence whose chunk reaches its end, and samples there.
The engine hands the result back to the scheduler.
"""
import logging

import torch
from transformers import AutoConfig

from .attention import AttentionMetadata, ReferenceAttention
from .config import EngineConfig
from .models import model_class
from .sampling import SampleRequest, SampleResult, sample
from .scheduler import Batch, Sequence
from .weights import load_weights

logger = logging.getLogger("nanoserve")
CPU_KV_CACHE_BYTES = 2 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: str, eos_token_ids: set[int]):
        self.config, self.eos_token_ids = config, set(eos_token_ids)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.hf_config = hf = AutoConfig.from_pretrained(model_dir)
        config.resolve_for_model(hf)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.kv_shape = (hf.num_hidden_layers, 2, config.block_size, hf.num_key_value_heads, head_dim)  # per block
        self.attention = ReferenceAttention(hf.num_attention_heads, hf.num_key_value_heads, head_dim,
                                            head_dim ** -0.5)
        with torch.device(self.device):
            model = model_class(hf)(hf, self.attention, config.max_model_len)
        load_weights(model, model_dir)
        self.model = model.to(self.dtype).eval()
        self.rotary_tables_float32()
        self.num_blocks = self._num_kv_blocks()
        layers, kv, *block_shape = self.kv_shape
        self.kv_cache = torch.zeros(layers, kv, self.num_blocks, *block_shape, dtype=self.dtype, device=self.device)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB) on %s", self.num_blocks, config.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, self.device)

    def rotary_tables_float32(self):
        """RoPE tables stay float32 (transformers computes them in float32 and casts at use)."""
        rotary = self.model.rotary
        rotary.cos, rotary.sin = rotary.cos.float(), rotary.sin.float()

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
            free, total = torch.cuda.mem_get_info(self.device)
            headroom = total * (1 - c.gpu_memory_utilization) + (1 << 30)  # activations of one step
            num_blocks = int((free - headroom) // bytes_per_block)
        if num_blocks * c.block_size < c.max_model_len:
            raise ValueError(f"The KV cache holds {max(num_blocks, 0) * c.block_size} tokens, fewer than "
                             f"max_model_len={c.max_model_len}: lower max_model_len or give the cache more memory")
        return num_blocks

    @torch.inference_mode()
    def execute(self, batch: Batch) -> SampleResult:
        """One forward pass over the batch; returns a token for each sequence that samples, in batch order."""
        input_ids, positions, meta, sample_index = self._prepare(batch)
        self.attention.prepare(meta)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        sampling = [item.seq for item in batch.scheduled if item.samples]
        if not sampling:
            return SampleResult([], [])
        logits = self.model.compute_logits(hidden[sample_index])
        return sample(logits, [self._sample_request(seq) for seq in sampling], self.generator)

    def _prepare(self, batch: Batch):
        bs = self.config.block_size
        ids, positions, slots, query_start, seq_lens, sample_index = [], [], [], [0], [], []
        for item in batch.scheduled:
            seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_index.append(query_start[-1] - 1)
        width = max(len(item.seq.block_table) for item in batch.scheduled)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch.scheduled]
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(query_start, seq_lens, as_tensor(tables, torch.int32), as_tensor(slots, torch.long), bs)
        return as_tensor(ids, torch.long), as_tensor(positions, torch.long), meta, as_tensor(sample_index, torch.long)

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        p = seq.params
        if p.seed is not None and seq.generator is None:
            seq.generator = torch.Generator(self.device).manual_seed(p.seed)
        banned = []
        if seq.num_output_tokens < p.min_tokens:  # stop tokens cannot end a sequence before min_tokens
            banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return SampleRequest(p, seq.prompt_token_ids, seq.output_token_ids, seq.generator, banned)
