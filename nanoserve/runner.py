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
from .sampling import SampleRequest, logprob_entry, sample, target_probs
from .scheduler import Batch, Sequence, rejection_sample
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
    def execute(self, batch: Batch) -> tuple[list[list[int]], list[list]]:
        """One forward pass over the batch. Returns, per scheduled item, its new tokens (none for a prompt chunk,
        one for a decode, the kept drafts plus one under speculation) and their logprob entries (or None)."""
        logits = self._forward(batch)
        tokens, logprobs = [[] for _ in batch.scheduled], [[] for _ in batch.scheduled]
        rows, requests, plain = 0, [], []
        for i, item in enumerate(batch.scheduled):
            drafts = item.draft_token_ids[len(item.draft_token_ids) - item.num_logits + 1:]
            requests += [self._sample_request(item.seq, drafts[:j]) for j in range(item.num_logits)]
            if item.num_logits == 1:
                plain.append((i, rows))
            elif item.num_logits > 1:
                tokens[i], logprobs[i] = self._verify(logits[rows:rows + item.num_logits],
                                                      requests[rows:rows + item.num_logits], drafts)
            rows += item.num_logits
        if plain:
            index = [row for _, row in plain]
            result = sample(logits[index], [requests[row] for row in index], self.generator)
            for (i, _), token, entry in zip(plain, result.token_ids, result.logprobs):
                tokens[i], logprobs[i] = [token], [entry]
        return tokens, logprobs

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
        logits = self._forward(batch)
        best = iter(logits.argmax(dim=-1).tolist()) if logits is not None else iter(())
        return [next(best) if item.num_logits else None for item in batch.scheduled]

    def _forward(self, batch: Batch) -> torch.Tensor | None:
        """Run the model; logits of the positions that need them, in batch order."""
        input_ids, positions, meta, logit_rows = self._prepare(batch)
        self.attention.prepare(meta)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[logit_rows]) if len(logit_rows) else None

    def _prepare(self, batch: Batch):
        bs = self.config.block_size
        ids, positions, slots, query_start, seq_lens, logit_rows = [], [], [], [0], [], []
        for item in batch.scheduled:
            seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
            ids += item.token_ids
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            logit_rows += range(query_start[-1] - item.num_logits, query_start[-1])
        width = max(len(item.seq.block_table) for item in batch.scheduled)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch.scheduled]
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(query_start, seq_lens, as_tensor(tables, torch.int32), as_tensor(slots, torch.long), bs)
        return as_tensor(ids, torch.long), as_tensor(positions, torch.long), meta, as_tensor(logit_rows, torch.long)

    def _sample_request(self, seq: Sequence, drafts: list[int] = ()) -> SampleRequest:
        """What the sampler needs for `seq`'s next token, as if `drafts` had already been generated."""
        p = seq.params
        if p.seed is not None and seq.generator is None:
            seq.generator = torch.Generator(self.device).manual_seed(p.seed)
        output = seq.output_token_ids + list(drafts)
        banned = []
        if len(output) < p.min_tokens:  # stop tokens cannot end a sequence before min_tokens
            banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return SampleRequest(p, seq.prompt_token_ids, output, seq.generator, banned)
