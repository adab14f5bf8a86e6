"""A stand-in for the two FlashInfer wrappers nanoserve uses, in plain PyTorch, so the FlashInfer backend's own
code (page layout, plan arguments, CUDA-graph buffers and padding, wrapper choice) runs and is checked on a CPU.

It follows FlashInfer's documented contract, not its kernels: `plan()` takes the CSR page layout (`indptr`,
`indices`, `last_page_len`; for prefill also `qo_indptr`) with the signatures of flashinfer 0.7.2, and checks
what the real one checks (int32 indices, a fixed batch size in CUDA-graph mode, buffers large enough); a
CUDA-graph wrapper copies the layout into its fixed buffers and `run()` reads only those, as a replayed graph
does. `run()` attends each query to its sequence's pages, causally aligned to the end of the sequence.
The real kernels are tested against the reference backend on a GPU (tests/test_gpu.py).
"""
import torch

plans = []  # every plan() call, for tests that count them


class _Wrapper:
    def __init__(self, workspace, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
                 backend="auto"):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.use_cuda_graph = use_cuda_graph
        if use_cuda_graph:
            assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1
            self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def _plan(self, qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
              causal, q_data_type, kv_data_type, sm_scale, window_left=-1, logits_soft_cap=None):
        for t in (qo_indptr, indptr, indices, last_page_len):
            assert t.dtype == torch.int32, t.dtype
        assert indptr.device.type == "cpu" and last_page_len.device.type == "cpu"  # plan() reads them on the host
        batch = len(last_page_len)
        assert len(indptr) == batch + 1 and len(qo_indptr) == batch + 1 and int(indptr[-1]) == len(indices)
        assert bool(((1 <= last_page_len) & (last_page_len <= page_size)).all())
        assert q_data_type is not None and kv_data_type is not None and num_qo_heads % num_kv_heads == 0
        if self.use_cuda_graph:
            indptr_buf, indices_buf, last_buf = self.buffers
            assert batch == len(last_buf), "the batch size is fixed in CUDA-graph mode"
            assert len(indices) <= len(indices_buf), "indices exceed the fixed buffer"
            indptr_buf.copy_(indptr)
            indices_buf[:len(indices)].copy_(indices)
            last_buf.copy_(last_page_len)
        else:
            self.buffers = (indptr.clone(), indices.clone(), last_page_len.clone())
        self.qo_indptr, self.page_size, self.causal = qo_indptr.tolist(), page_size, causal
        self.scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        self.window_left, self.soft_cap = window_left, logits_soft_cap  # query i sees keys i - window_left .. i
        plans.append(self)

    def run(self, q, paged_kv_cache):
        k_cache, v_cache = paged_kv_cache
        indptr, indices, last_page_len = (b.tolist() for b in self.buffers)
        out = torch.empty_like(q)
        group = q.shape[1] // k_cache.shape[2]
        for i, (q0, q1) in enumerate(zip(self.qo_indptr, self.qo_indptr[1:])):
            pages = indices[indptr[i]:indptr[i + 1]]
            kv_len = (len(pages) - 1) * self.page_size + last_page_len[i]
            k = k_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
            v = v_cache[pages].flatten(0, 1)[:kv_len].float().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * self.scale
            if self.soft_cap:
                scores = self.soft_cap * torch.tanh(scores / self.soft_cap)
            q_pos, k_pos = torch.arange(kv_len - (q1 - q0), kv_len)[:, None], torch.arange(kv_len)[None, :]
            if self.causal:  # query j of n sits at position kv_len - n + j
                scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            if self.window_left >= 0:
                scores = scores.masked_fill(k_pos < q_pos - self.window_left, float("-inf"))
            out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        return out


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             q_data_type="float16", kv_data_type=None, sm_scale=None, window_left=-1, logits_soft_cap=None,
             **unused):
        qo_indptr = torch.arange(len(last_page_len) + 1, dtype=torch.int32)
        self._plan(qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                   False, q_data_type, kv_data_type, sm_scale, window_left, logits_soft_cap)


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None,
             causal=False, *, q_data_type="float16", kv_data_type=None, sm_scale=None, window_left=-1,
             logits_soft_cap=None, **unused):
        assert qo_indptr.device.type == "cpu"
        self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                   num_kv_heads, head_dim_qk, page_size, causal, q_data_type, kv_data_type, sm_scale, window_left,
                   logits_soft_cap)
