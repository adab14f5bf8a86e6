"""Linear layers for the models: `y = x @ W.T + b`, on the fastest matmul kernel the device has.

On a GPU, and under torch.compile, this is plain `F.linear`. In eager float32 on a CPU it is OpenBLAS, through
numpy, on the same memory (no copy): decoding reads every weight once per step, so the matmul runs at small M
(1 to a few dozen rows), where torch's CPU kernel reaches about 9 GB/s on the project's 2-core machine and
OpenBLAS about 20 (bench/cpu_matmul.py measures both). Two thread pools on two cores then fight: torch's OpenMP
threads spin while OpenBLAS works, which makes both slow, so `use_blas` (called once by the runner at start-up)
switches the model's layers to OpenBLAS and gives torch one thread, leaving the matmuls, nearly all of the work,
to OpenBLAS's threads.

The models build their projections from `Linear` and `MergedLinear` (several projections fused into one matmul);
weights.py fills them from the checkpoint. A quantized layer (quantization.py) runs its `kernel` instead.
Under tensor parallelism (parallel.py) a layer holds a slice: `MergedLinear.shard_starts` says which rows of
each checkpoint projection this rank keeps (column-parallel), and a row-parallel `Linear` (`row_parallel`) keeps
a slice of the input columns and sums its partial output over the ranks.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    blas = False  # set by use_blas: float32 on a CPU, eager
    kernel = None  # set by quantization.py: a callable that computes the layer from its quantized weights
    lora = None  # set by lora.py: adds the adapters' B · A · x for the tokens that use one
    reduce = None  # set by row_parallel: the TensorParallel group whose partial outputs are summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if self.lora is not None and (self.lora.manager.static or self.lora.manager.token_groups):
            out = self.lora.add(x, out)
        if self.reduce is not None:
            out = self.reduce.all_reduce(out)
        return out

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        if not self.blas:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1]).numpy()
        out = torch.from_numpy(np.matmul(rows, self.weight.numpy().T))
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


class MergedLinear(Linear):
    """Several projections of the same input in one matmul; `shard_sizes` says where each one's rows are."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, shard_starts: list[int] | None = None,
                 checkpoint_sizes: list[int] | None = None):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes
        self.shard_starts = shard_starts or [0] * len(shard_sizes)  # this rank's first row of each projection
        self.checkpoint_sizes = checkpoint_sizes or shard_sizes  # each projection's rows in the checkpoint


def row_parallel(layer: Linear, tp) -> Linear:
    """Make `layer` ([out, in / N] on this rank) row-parallel: it loads its slice of the input columns, and its
    output is summed over the ranks; the bias is added once, by rank 0 (the others hold zeros)."""
    if tp.size > 1:
        layer.reduce = tp
        layer.weight.shard = (1, tp.rank * layer.in_features)
        if layer.bias is not None:
            layer.bias.shard = "rank 0" if tp.rank == 0 else "zero"
    return layer


def use_blas(model: nn.Module) -> bool:
    """Run the model's linear layers on OpenBLAS, and torch on one thread so that its OpenMP pool does not spin
    against OpenBLAS's threads (see above). Only for a float32 model on a CPU that torch.compile will not trace,
    and not for a quantized one: its int8 kernels run on torch's threads. True if it switched."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    if any(m.kernel is not None for m in layers):
        return False
    for module in layers:
        module.blas = True
    torch.set_num_threads(1)
    return True
