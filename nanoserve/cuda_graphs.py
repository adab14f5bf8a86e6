"""CUDA graphs for decode steps: the model's forward pass captured once per batch size, replayed every step.

A decode step of a small model launches hundreds of small kernels; launching them one by one from Python costs
more than running them. A CUDA graph records the launches once and replays them in one call. What a graph
replays is frozen: its shapes and every tensor address. So the runner keeps static input buffers (token ids,
positions; the attention backend keeps the slot mapping and page indices), captures one graph per batch size in
`sizes`, pads a batch of B decodes to the smallest captured size that holds it, and re-plans the attention
(host work, outside the graph) before each replay. Only the forward pass is captured: sampling runs after it,
eagerly, so its random numbers are fresh each step.

Input: the flat token ids and positions of a decode step and its `AttentionMetadata`, from the runner.
Output: the hidden states of the real rows, a view into the graph's output buffer, valid until the next replay.
"""
import bisect
import logging
import time

import torch

from .attention import AttentionMetadata

logger = logging.getLogger("nanoserve")


class CudaGraphs:
    @torch.inference_mode()  # as execute() runs: a compiled forward would otherwise recompile for grad mode
    def __init__(self, forward, attention, sizes: list[int]):
        self.attention, self.sizes = attention, sorted(sizes)
        device = attention.device
        self.input_ids = torch.zeros(self.sizes[-1], dtype=torch.long, device=device)
        self.positions = torch.zeros(self.sizes[-1], dtype=torch.long, device=device)
        self.graphs, self.outputs = {}, {}
        start, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
        empty = AttentionMetadata([0], [], [], torch.zeros(0, dtype=torch.long, device=device), attention.block_size)
        # Largest first: the smaller graphs then fit in the memory pool the largest one allocated.
        for size in reversed(self.sizes):
            attention.prepare(empty, graph_size=size)  # every row is padding: any valid plan does for capture
            args = self.input_ids[:size], self.positions[:size]
            forward(*args)  # warm-up outside the capture: compilation, autotuning, lazy CUDA initialisation
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = forward(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        logger.info("Captured %d CUDA graphs (decode batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def fits(self, meta: AttentionMetadata) -> bool:
        """A step replays a graph if it is decodes only and no larger than the largest captured size."""
        return meta.num_seqs <= self.sizes[-1] and meta.query_start_loc[-1] == meta.num_seqs

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = len(input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        # Padded rows keep whatever ids and positions the buffers last held: valid values, and their results
        # are never read (their K/V go to the dummy page).
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.attention.prepare(meta, graph_size=size)
        self.graphs[size].replay()
        return self.outputs[size][:n]
