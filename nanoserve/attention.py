"""Paged attention: the step's attention metadata, the attention op the model calls, and the reference backend.

The runner builds one `AttentionMetadata` per step from the scheduler's `Batch`: a ragged batch of query tokens
(`query_start_loc`), each sequence's total length after this step (`seq_lens`), its block table, and the cache
slot of every new token (`slot_mapping`). It hands it to the attention backend once per step (`prepare`, the
host-side planning every layer shares); then every attention layer of the model calls `paged_attention(q, k, v,
layer, backend_id)`, which writes the new K/V into that layer's paged cache through the slot mapping and attends
each query token to its sequence's cached keys, causally within the new chunk.

Two backends implement this: `ReferenceAttention` here (pure PyTorch, the CPU path and the test oracle) and
`FlashInferAttention` (flashinfer_attention.py, FlashInfer's paged kernels on NVIDIA GPUs).

Layers may differ in how they attend (`LayerSpec`): the softmax scale, a sliding window (Mistral, Gemma's local
layers: a query sees only the last `sliding_window` positions, itself included) and logit soft-capping (Gemma 2).
The model says which layer does what (models/llama.py, `attention_specs`); each backend honours it.

KV cache layout, all layers in one tensor: [layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim].
K and V of one layer are each a FlashInfer "NHD" paged cache; gathering a sequence's blocks gives its keys as
one contiguous tensor.
"""
import itertools
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerSpec:
    """How one attention layer attends, besides the shapes that all layers share."""
    scale: float  # softmax scale: head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
    sliding_window: int | None = None  # keys at positions > query position - sliding_window (None: all)
    logit_softcap: float | None = None  # scores become softcap * tanh(scores / softcap) before the softmax


@dataclass
class AttentionMetadata:
    """One step's attention layout, on the host; each backend turns it into device tensors in `prepare`."""
    query_start_loc: list[int]  # [num_seqs + 1] cumulative query lengths
    seq_lens: list[int]  # [num_seqs] tokens in the cache after this step (context + new)
    block_tables: list[list[int]]  # [num_seqs][blocks] KV blocks of each sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64 on the device: block * block_size + offset of each new token
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start_loc, self.query_start_loc[1:])]


# The model calls attention through a custom op, so torch.compile sees one opaque node per layer and compiles
# everything between them into one graph (fullgraph=True). A custom op takes only tensors and plain numbers,
# not the backend object, so backends are registered here and named by an integer id. Weak references: a
# backend lives as long as its runner. The lowest free id is reused because the compiled graph holds the id as
# a constant: an engine built after another one was dropped then reuses its compiled code.
_backends: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register_backend(backend) -> int:
    backend_id = next(i for i in itertools.count() if i not in _backends)
    _backends[backend_id] = backend
    return backend_id


@torch.library.custom_op("nanoserve::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, backend_id: int) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; returns [T, H, D]. Also writes k and v into the layer's KV cache, a
    side effect the compiler need not know about: nothing in the graph reads the cache except this op."""
    return _backends[backend_id].forward(q, k, v, layer)


@paged_attention.register_fake
def _(q, k, v, layer, backend_id):
    return torch.empty_like(q)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, backend_id: int) -> torch.Tensor:
    """What the model calls: the custom op when torch.compile traces, else the backend directly (a call through
    the op dispatcher costs tens of microseconds, per layer and step, for nothing in eager mode)."""
    if torch.compiler.is_compiling():
        return paged_attention(q, k, v, layer, backend_id)
    return _backends[backend_id].forward(q, k, v, layer)


def host_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor of `values`, pinned when `device` is a GPU, so that copies to it need not wait for the GPU
    to finish the work queued before them. Through numpy: a few times faster than torch.tensor on a long list."""
    tensor = torch.from_numpy(np.array(values, dtype=np.int32 if dtype == torch.int32 else np.int64))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K and V of one layer ([2, blocks, block_size, Hkv, D]) with one indexed copy."""
    slots = kv_cache.view(2, -1, *kv_cache.shape[-2:])  # [2, num_blocks * block_size, Hkv, D]
    slots.index_copy_(1, slot_mapping, torch.stack((k, v)).to(kv_cache.dtype))


class ReferenceAttention:
    """Pure-PyTorch paged attention. Decodes (one query token each) are batched into one padded call; prompt
    chunks run one sequence at a time with a causal mask offset by the tokens already in the cache. Masks are
    built once per step for each distinct sliding window among the layers."""
    supports_cuda_graphs = False  # prepare() makes new tensors of varying shapes every step

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, specs: list[LayerSpec]):
        self.num_heads, self.num_kv_heads, self.head_dim, self.specs = num_heads, num_kv_heads, head_dim, specs
        self.windows = sorted({s.sliding_window for s in specs}, key=lambda w: w or 0)

    def bind(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers: block tables on the device, the decode rows and their length
        mask, the chunks' causal masks."""
        self.meta, device = meta, self.kv_cache.device
        width = max((len(t) for t in meta.block_tables), default=0)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in meta.block_tables],
                                         dtype=torch.long, device=device)
        qlens = meta.query_lens
        decode = [i for i, q in enumerate(qlens) if q == 1]
        self.decode_tokens = None
        if len(decode) > 1:
            lens = torch.tensor([meta.seq_lens[i] for i in decode], device=device)[:, None]
            self.decode_tokens = torch.tensor([meta.query_start_loc[i] for i in decode], device=device)
            self.decode_tables = self.block_tables[torch.tensor(decode, device=device)]
            key_pos = torch.arange(width * meta.block_size, device=device)[None, :]
            # The query sits at position len - 1: it sees keys up to there, and only the window's last ones.
            self.decode_masks = {w: (key_pos < lens) & (key_pos >= lens - (w or 1 << 62)) for w in self.windows}
        else:
            decode = []
        chunks = [i for i in range(meta.num_seqs) if i not in decode]
        self.chunk_masks = {w: {i: self._chunk_mask(meta.seq_lens[i], qlens[i], w, device) for i in chunks}
                            for w in self.windows}
        # A sequence whose blocks are consecutive in the pool (the usual case for a lone sequence: the free list
        # hands out runs) is read in place, a view instead of a gather: (first block, last block + 1).
        self.block_ranges = {i: (t[0], t[-1] + 1) for i, t in enumerate(meta.block_tables)
                             if i in chunks and t and all(b - a == 1 for a, b in zip(t, t[1:]))}

    @staticmethod
    def _chunk_mask(seq_len: int, num_new: int, window: int | None, device) -> torch.Tensor | None:
        """None when no mask is needed: a fresh prompt (plain causal attention) or one new token (it sees all),
        with no window that cuts keys off."""
        if (num_new == seq_len or num_new == 1) and (window is None or window >= seq_len):
            return None
        # Query j sits at position seq_len - num_new + j and sees keys up to and including that position.
        q_pos = torch.arange(seq_len - num_new, seq_len, device=device)[:, None]
        k_pos = torch.arange(seq_len, device=device)[None, :]
        return (k_pos <= q_pos) & (k_pos > q_pos - window) if window else k_pos <= q_pos

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        kv_cache, meta, spec = self.kv_cache[layer], self.meta, self.specs[layer]
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if self.decode_tokens is not None:
            self._decode_batch(q, kv_cache, out, spec)
        for i, mask in self.chunk_masks[spec.sliding_window].items():
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[start:end] = self._one_sequence(q[start:end], kv_cache, i, mask, spec)
        return out

    def _gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor):
        """K and V of whole blocks, as [..., tokens, Hkv, D], with one indexing copy for both."""
        kv = kv_cache.index_select(1, block_table.flatten())  # [2, rows * blocks, block_size, Hkv, D]
        return kv.view(2, *block_table.shape[:-1], -1, *kv_cache.shape[-2:]).unbind(0)

    def _one_sequence(self, q, kv_cache, i, mask, spec):
        seq_len = self.meta.seq_lens[i]
        if i in self.block_ranges:
            first, end = self.block_ranges[i]
            k, v = kv_cache[:, first:end].flatten(1, 2).unbind(0)
        else:
            k, v = self._gather(kv_cache, self.block_tables[i, :-(-seq_len // self.meta.block_size)])
        k, v = k[:seq_len], v[:seq_len]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, tokens, D]: the fused kernel's shape
        causal = mask is None and q.shape[2] == seq_len > 1  # a fresh prompt; one new token sees every key
        return self._sdpa(q, k, v, mask, spec, is_causal=causal).squeeze(0).transpose(0, 1)

    def _decode_batch(self, q, kv_cache, out, spec):
        token_index = self.decode_tokens
        k, v = self._gather(kv_cache, self.decode_tables)  # [B, width, Hkv, D]
        qb = q[token_index].unsqueeze(2)  # [B, H, 1, D]
        mask = self.decode_masks[spec.sliding_window][:, None, None, :]  # [B, 1, 1, width]
        out[token_index] = self._sdpa(qb, k.transpose(1, 2), v.transpose(1, 2), mask, spec).squeeze(2)

    def _sdpa(self, q, k, v, mask, spec, is_causal=False):
        k, v = k.to(q.dtype), v.to(q.dtype)
        if spec.logit_softcap is not None:
            return _softcapped_attention(q, k, v, mask, spec, is_causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, is_causal=is_causal,
                                              enable_gqa=self.num_heads != self.num_kv_heads)


def _softcapped_attention(q, k, v, mask, spec: LayerSpec, is_causal: bool) -> torch.Tensor:
    """Attention with Gemma 2's capped scores, spelled out: the fused SDPA kernel has no soft-capping."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = (q @ k.transpose(-1, -2)) * spec.scale
    scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
