"""Paged attention: the step's attention metadata and the pure-PyTorch reference backend.

The runner builds one `AttentionMetadata` per step from the scheduler's `Batch`: a ragged batch of query tokens
(`query_start_loc`), each sequence's total length after this step (`seq_lens`), its block table, and the cache
slot of every new token (`slot_mapping`). Every attention layer of the model receives it as an argument and
calls the backend: `forward(q, k, v, kv_cache, meta)` first writes the new K/V into the paged cache through the
slot mapping, then attends each query token to its sequence's cached keys, causally within the new chunk.
This is the interface FlashInfer's paged kernels implement on the GPU; the reference backend here is what the
GPU backend is tested against.

KV cache layout, per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]. K and V are each a
FlashInfer "NHD" paged cache, and gathering a sequence's blocks gives its keys as one contiguous tensor.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_start_loc: list[int]  # [num_seqs + 1] cumulative query lengths
    seq_lens: list[int]  # [num_seqs] tokens in the cache after this step (context + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset of each new token
    block_size: int
    # Derived once per step (not per layer) by the reference backend.
    decode_tokens: torch.Tensor | None = None  # query tokens of the decodes batched into one padded call
    decode_tables: torch.Tensor | None = None  # their block tables
    decode_mask: torch.Tensor | None = None  # [decodes, width]: which gathered slots hold real tokens
    chunk_masks: dict | None = None  # sequence -> causal mask of its chunk (None: plain causal, no cache)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' K and V at their slots with one indexed copy."""
    slots = kv_cache.view(2, -1, *kv_cache.shape[-2:])  # [2, num_blocks * block_size, Hkv, D]
    slots.index_copy_(1, meta.slot_mapping, torch.stack((k, v)).to(kv_cache.dtype))


class ReferenceAttention:
    """Pure-PyTorch paged attention. Decodes (one query token each) are batched into one padded call; prompt
    chunks run one sequence at a time with a causal mask offset by the tokens already in the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: the decode rows and their length mask, the chunks' masks."""
        qlens = [meta.query_start_loc[i + 1] - meta.query_start_loc[i] for i in range(meta.num_seqs)]
        decode = [i for i, q in enumerate(qlens) if q == 1]
        device = meta.block_tables.device
        if len(decode) > 1:
            lens = torch.tensor([meta.seq_lens[i] for i in decode], device=device)
            width = meta.block_tables.shape[1] * meta.block_size
            meta.decode_tokens = torch.tensor([meta.query_start_loc[i] for i in decode], device=device)
            meta.decode_tables = meta.block_tables[torch.tensor(decode, device=device)]
            meta.decode_mask = torch.arange(width, device=device)[None, :] < lens[:, None]  # [B, width]
        else:
            decode = []
        meta.chunk_masks = {i: self._chunk_mask(meta.seq_lens[i], qlens[i], device)
                            for i in range(meta.num_seqs) if i not in decode}

    @staticmethod
    def _chunk_mask(seq_len: int, num_new: int, device) -> torch.Tensor | None:
        if num_new == seq_len:  # nothing cached before this chunk: plain causal attention, no mask tensor
            return None
        # Query j sits at position seq_len - num_new + j and sees keys up to and including that position.
        q_pos = torch.arange(seq_len - num_new, seq_len, device=device)[:, None]
        return torch.arange(seq_len, device=device)[None, :] <= q_pos

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; returns [T, H, D]."""
        write_kv(kv_cache, k, v, meta)
        out = torch.empty_like(q)
        if meta.decode_tokens is not None:
            self._decode_batch(q, kv_cache, meta, out)
        for i, mask in meta.chunk_masks.items():
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[start:end] = self._one_sequence(q[start:end], kv_cache, meta, i, mask)
        return out

    def _gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor):
        """K and V of whole blocks, as [..., tokens, Hkv, D], with one indexing copy for both."""
        kv = kv_cache.index_select(1, block_table.flatten())  # [2, rows * blocks, block_size, Hkv, D]
        return kv.view(2, *block_table.shape[:-1], -1, *kv_cache.shape[-2:]).unbind(0)

    def _one_sequence(self, q, kv_cache, meta, i, mask):
        seq_len = meta.seq_lens[i]
        k, v = self._gather(kv_cache, meta.block_tables[i, :-(-seq_len // meta.block_size)])
        k, v = k[:seq_len], v[:seq_len]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, tokens, D]: the fused kernel's shape
        return self._sdpa(q, k, v, mask, is_causal=mask is None).squeeze(0).transpose(0, 1)

    def _decode_batch(self, q, kv_cache, meta, out):
        token_index = meta.decode_tokens
        k, v = self._gather(kv_cache, meta.decode_tables)  # [B, width, Hkv, D]
        qb = q[token_index].unsqueeze(2)  # [B, H, 1, D]
        mask = meta.decode_mask[:, None, None, :]  # [B, 1, 1, width]
        out[token_index] = self._sdpa(qb, k.transpose(1, 2), v.transpose(1, 2), mask).squeeze(2)

    def _sdpa(self, q, k, v, mask, is_causal=False):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale,
                                              is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads)
