"""The GPU attention backend: FlashInfer's paged-attention kernels behind the reference backend's interface.

The runner calls `prepare(meta)` once per step; it plans the step on the host (FlashInfer's `plan()` reads the
page layout and splits the work across the GPU's multiprocessors), and then every layer's `forward` writes its
new K/V with one indexed copy and runs the planned kernel on its slice of the KV cache:
- a step of decodes only (one query token per sequence) runs the decode kernel, on tensor cores when each KV
  head serves four or more query heads (the GQA group fills the tile);
- any other step (prompt chunks, mixed batches, speculative verification) runs the ragged prefill kernel,
  causal within each sequence's new tokens.
For CUDA graphs (cuda_graphs.py) there is one decode wrapper per captured batch size, built on fixed index
buffers that `plan()` refills before each replay; padded rows attend to a reserved dummy page.

Layers that attend differently (`LayerSpec`: Gemma's sliding and global layers, soft-capping) get a set of
wrappers each, planned with their `window_left`, `logits_soft_cap` and `sm_scale`; the page layout, and so the
CUDA-graph index buffers, are the same for all of them.

FlashInfer's page layout: `kv_indptr[i]:kv_indptr[i+1]` indexes sequence i's pages in `kv_indices`, and
`kv_last_page_len[i]` is how many tokens its last page holds. flashinfer is imported here only, on first use.
"""
import torch

from .attention import AttentionMetadata, host_tensor, write_kv

WORKSPACE_BYTES = 256 << 20  # FlashInfer's split-k scratch space, shared by all wrappers (they run in turn)


class FlashInferAttention:
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, specs: list, dtype: torch.dtype,
                 device: torch.device, config):
        try:
            import flashinfer  # noqa: PLC0415 (imports torch.cuda and a kernel cache: GPU machines only)
        except ImportError as e:
            raise RuntimeError("attention_backend=\"flashinfer\" needs FlashInfer: pip install flashinfer-python") from e
        self.device, self.block_size = device, config.block_size
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.use_tensor_cores = num_heads // num_kv_heads >= 4
        self.kinds = list(dict.fromkeys(specs))  # the distinct ways of attending, in layer order
        self.kind_of_layer = [self.kinds.index(spec) for spec in specs]
        # CUDA-graph wrappers: their index buffers must stay at fixed addresses. The page-index buffer is shared
        # (one graph replays at a time) and holds every page a batch can touch: a sequence of max_model_len
        # tokens plus the one being computed needs ceil((max_model_len + 1) / block_size) pages.
        sizes = config.cudagraph_capture_sizes
        pages_per_seq = -(-(config.max_model_len + 1) // self.block_size)
        self.graph_indices = torch.zeros(max(sizes, default=0) * pages_per_seq, dtype=torch.int32, device=device)
        self.graph_buffers = {size: (torch.zeros(size + 1, dtype=torch.int32, device=device),
                                     torch.zeros(size, dtype=torch.int32, device=device)) for size in sizes}
        self.wrappers = [self._wrappers(flashinfer, sizes) for _ in self.kinds]  # per kind: prefill, decode, graphs
        self.graph_slots = torch.zeros(max(sizes, default=0), dtype=torch.long, device=device)
        # What every plan() call passes besides the page layout.
        self.plan_shape = (num_heads, num_kv_heads, head_dim, self.block_size)
        self.plan_options = [dict(q_data_type=dtype, kv_data_type=dtype, sm_scale=spec.scale,
                                  window_left=spec.sliding_window - 1 if spec.sliding_window else -1,
                                  logits_soft_cap=spec.logit_softcap) for spec in self.kinds]

    def _wrappers(self, flashinfer, sizes):
        # FA2 prefill: the bundle has it for head dims 64 and 128 (FA3, Hopper-only, just for 128; whether it is
        # faster here is still to be measured), and "auto" would pick FA3 and compile it for head dim 64.
        prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                               use_tensor_cores=self.use_tensor_cores)
        graphs = {size: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=self.graph_buffers[size][0], paged_kv_indices_buffer=self.graph_indices,
            paged_kv_last_page_len_buffer=self.graph_buffers[size][1]) for size in sizes}
        return prefill, decode, graphs

    def bind(self, kv_cache: torch.Tensor) -> None:
        """The KV cache of all layers; its last block is the dummy page that padded graph rows use."""
        self.kv_cache = kv_cache
        self.dummy_page = kv_cache.shape[2] - 1

    def prepare(self, meta: AttentionMetadata, graph_size: int | None = None) -> None:
        """Plan this step's kernels. With `graph_size`, plan that captured size's decode wrapper, padding the
        batch with one-token rows on the dummy page (their new K/V are written there too)."""
        num_pad = 0 if graph_size is None else graph_size - meta.num_seqs
        indptr, indices, last_page_len = self._page_layout(meta, num_pad)
        if graph_size is not None:
            self.active = [graphs[graph_size] for _, _, graphs in self.wrappers]
            self.graph_slots[:meta.num_seqs].copy_(meta.slot_mapping)
            self.graph_slots[meta.num_seqs:graph_size].fill_(self.dummy_page * self.block_size)
            self.slot_mapping = self.graph_slots[:graph_size]
        else:
            self.slot_mapping = meta.slot_mapping
            decode_only = all(n == 1 for n in meta.query_lens)
            self.active = [decode if decode_only else prefill for prefill, decode, _ in self.wrappers]
        for wrapper, options, (prefill, _, _) in zip(self.active, self.plan_options, self.wrappers):
            if wrapper is prefill:
                qo_indptr = host_tensor(meta.query_start_loc, torch.int32, self.device)
                wrapper.plan(qo_indptr, indptr, indices, last_page_len, *self.plan_shape, causal=True, **options)
            else:
                wrapper.plan(indptr, indices, last_page_len, *self.plan_shape, **options)

    def _page_layout(self, meta: AttentionMetadata, num_pad: int):
        """FlashInfer's CSR page layout: indptr and last_page_len on pinned host memory (plan() reads them on
        the host), the page indices copied to the GPU without waiting."""
        bs, indptr, indices, last_page_len = self.block_size, [0], [], []
        for table, seq_len in zip(meta.block_tables, meta.seq_lens):
            num_pages = -(-seq_len // bs)
            indices += table[:num_pages]
            indptr.append(indptr[-1] + num_pages)
            last_page_len.append(seq_len - (num_pages - 1) * bs)
        indices += [self.dummy_page] * num_pad
        indptr += range(indptr[-1] + 1, indptr[-1] + num_pad + 1)
        last_page_len += [1] * num_pad
        indptr, indices, last_page_len = (host_tensor(x, torch.int32, self.device)
                                          for x in (indptr, indices, last_page_len))
        return indptr, indices.to(self.device, non_blocking=True), last_page_len

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        kv_cache = self.kv_cache[layer]
        write_kv(kv_cache, k, v, self.slot_mapping)
        return self.active[self.kind_of_layer[layer]].run(q.contiguous(), (kv_cache[0], kv_cache[1]))

