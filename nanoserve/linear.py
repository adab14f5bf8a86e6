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
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    blas = False  # set by use_blas: float32 on a CPU, eager
    kernel = None  # set by quantization.py: a callable that computes the layer from its quantized weights
    lora = None  # set by lora.py: adds the adapters' B · A · x for the tokens that use one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if self.lora is not None and self.lora.manager.token_groups:
            out = self.lora.add(x, out)
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

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes


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
