"""Tensor parallelism: N processes each hold 1/N of every layer (Megatron style) and run every step together.

Rank 0 is the engine's own process: it schedules, turns each step's `Batch` into host inputs (runner.py,
`StepInputs`), sends them to the other ranks, and samples from the full logits. Ranks 1..N-1 are worker processes,
spawned at start-up (`start_workers`); each builds the same `ModelRunner` on its shard and loops in `_worker`:
receive a step's inputs, run the forward pass, repeat. Communication is one `torch.distributed` group: NCCL on
CUDA, gloo on a CPU, so CPU tests run the same code.

How the layers split (models/llama.py asks `TensorParallel` for its share):
- q/k/v and gate/up are column-parallel: a rank holds its heads (KV heads are replicated when there are fewer
  of them than ranks) and its slice of the intermediate size, so attention and the activation need no talk;
- o_proj and down_proj are row-parallel: each rank multiplies its slice, then one all-reduce sums them;
- a mixture of experts cuts every expert like the dense MLP (its slice of the expert width) and sums once;
- the embedding and the LM head are vocab-parallel: a rank looks up only its rows (an all-reduce fills in the
  others), and the LM head's logits are gathered along the vocabulary.
Weights are cut while they load (weights.py reads each parameter's `shard` attribute): no rank holds the model.
The scheduler is unchanged: block tables are the same on every rank, each rank's KV cache holds its heads.

A worker that dies makes the next collective fail (gloo and NCCL see the closed connection, or time out), so the
engine fails loudly instead of hanging; workers are daemon processes, ended when the engine's process exits.
"""
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger("nanoserve")
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("NANOSERVE_TP_TIMEOUT", "300")))


class EngineDeadError(RuntimeError):
    """The engine cannot go on (a tensor-parallel rank died, or the ranks fell out of step): unlike a failed
    request, this stops the engine, so that a server reports 503 and exits for its orchestrator to restart it."""


@dataclass
class TensorParallel:
    """This process's place in the group; size 1 (the default) means no parallelism and no communication."""
    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, count) of this rank's share of `total` heads or channels, which must divide evenly."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} must divide the model's {what} ({total})")
        count = total // self.size
        return self.rank * count, count

    def kv_heads(self, total: int) -> tuple[int, int]:
        """(first, count) KV heads of this rank: its share, or one replicated head when ranks outnumber them."""
        if self.size <= total:
            return self.split(total, "number of KV heads")
        if self.size % total:
            raise ValueError(f"tensor_parallel_size={self.size} must be a multiple of the KV heads ({total})")
        return self.rank * total // self.size, 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's logits for its vocabulary rows, side by side, without the padding rows of the last."""
        if self.size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    def min(self, value: int) -> int:
        """The smallest `value` over the ranks (the KV cache gets as many blocks as the tightest rank has)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)


class VocabParallelEmbedding(torch.nn.Module):
    """An embedding table cut by rows: rank r holds ids [r * rows, (r + 1) * rows), the last one padded."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.rows = -(-vocab_size // tp.size)
        self.start, self.tp = tp.rank * self.rows, tp
        self.weight = torch.nn.Parameter(torch.zeros(self.rows, hidden))
        self.weight.shard = (0, self.start)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return torch.nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = torch.nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))


def start_workers(config, model_dir: str, eos_token_ids: set[int]):
    """Spawn ranks 1..N-1 and join the group as rank 0. Returns the worker processes."""
    size = config.tensor_parallel_size
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.get_context("spawn")
    workers = [context.Process(target=_worker, args=(rank, address, config, model_dir, eos_token_ids),
                               daemon=True, name=f"nanoserve-tp{rank}") for rank in range(1, size)]
    for worker in workers:
        worker.start()
    _join_group(0, size, address, config)
    logger.info("Tensor parallel: %d ranks (%s), workers %s", size, dist.get_backend(),
                [w.pid for w in workers])
    return workers


def send_step(inputs) -> None:
    """Rank 0: give this step's inputs (None: stop) to the other ranks."""
    dist.broadcast_object_list([inputs], src=0)


def check_workers(workers) -> None:
    dead = [w.name for w in workers if not w.is_alive()]
    if dead:
        raise EngineDeadError(f"Tensor-parallel worker(s) {dead} exited: the engine cannot go on")


def stop_workers(workers) -> None:
    """Tell the workers to stop, wait a little, then end any that did not."""
    if workers and all(w.is_alive() for w in workers):
        try:
            send_step(None)
        except RuntimeError:
            pass
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
    if dist.is_initialized():
        dist.destroy_process_group()


def _join_group(rank: int, size: int, address: str, config) -> None:
    backend = "nccl" if config.torch_device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=TIMEOUT)


def _worker(rank: int, address: str, config, model_dir: str, eos_token_ids: set[int]) -> None:
    from .runner import ModelRunner  # noqa: PLC0415 (runner imports this module)
    logging.basicConfig(level=logging.WARNING)
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(rank)
    _join_group(rank, config.tensor_parallel_size, address, config)
    runner = ModelRunner(config, model_dir, eos_token_ids, TensorParallel(rank, config.tensor_parallel_size))
    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                break
            runner.run_inputs(box[0])
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_parallel_support(config, hf_config) -> None:
    """What tensor parallelism does not cover yet fails here, by name, before any process starts."""
    refused = {"LoRA adapters (enable_lora)": config.enable_lora,
               "quantized weights": config.quantization or getattr(hf_config, "quantization_config", None)}
    for what, used in refused.items():
        if used:
            raise ValueError(f"tensor_parallel_size > 1 does not support {what} yet")
    tp = TensorParallel(0, config.tensor_parallel_size)  # the shapes must split evenly: say so before spawning
    tp.split(hf_config.num_attention_heads, "number of attention heads")
    tp.kv_heads(hf_config.num_key_value_heads)
    tp.split(hf_config.intermediate_size, "intermediate size")
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(hf_config, name, None):
            tp.split(getattr(hf_config, name), name.replace("_", " "))
