"""The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE, in place of the dense MLP.

A router (one small linear layer) scores every expert for every token; each token goes to its top-k experts, and
its output is the sum of their outputs weighted by the router's softmax probabilities (renormalized over the k
when the model says so: Mixtral always, Qwen when `norm_topk_prob`). Qwen2-MoE adds a dense "shared expert" that
every token passes through, scaled by a sigmoid gate.

The experts' weights are stored stacked, `w13` [E, 2 * I, H] (gate and up) and `w2` [E, H, I] (down), filled by
`copy_expert_tensor` from the checkpoint's per-expert tensors. One routed forward sorts the (token, expert) pairs by
expert, so each expert's tokens are one contiguous run of rows, and runs a grouped matmul over the runs
(`torch._grouped_mm`), or, where torch lacks it for the device and dtype, one matmul per expert that received
tokens. No expert computes a token it was not routed. Under torch.compile the experts are one custom op, like
attention, since the fallback's per-expert loop depends on the routing.
"""
import functools
import re

import torch
import torch.nn.functional as F
from torch import nn



class SparseMoeBlock(nn.Module):
    """Under tensor parallelism every rank holds every expert, each cut to its slice of the expert width (like the
    dense MLP: gate/up rows, down columns), and the partial outputs are summed over the ranks. `shared_expert`:
    Qwen2-MoE's dense MLP that every token also passes through (built by the model, like its other MLPs)."""

    def __init__(self, config, activation, tp, shared_expert: nn.Module | None = None):
        super().__init__()
        hidden = config.hidden_size
        self.num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        first, inter = tp.split(getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                                "expert intermediate size")
        self.top_k, self.activation, self.tp = config.num_experts_per_tok, activation, tp
        self.renormalize = getattr(config, "norm_topk_prob", True)  # Mixtral has no such flag: it always does
        self.gate = nn.Linear(hidden, self.num_experts, bias=False)  # the router: never quantized, never LoRA
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, hidden, inter))
        self.w13.shard, self.w2.shard = (1, first), (2, first)  # where this rank's slice starts in the checkpoint
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        out = self.tp.all_reduce(run_experts(x, self.w13, self.w2, weights.to(x.dtype), experts, self.activation))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [T, k] and their weights [T, k] (float32), as transformers routes."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def run_experts(x, w13, w2, weights, experts, activation) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return moe_experts(x, w13, w2, weights, experts, _ACTIVATIONS.index(activation))
    return expert_outputs(x, w13, w2, weights, experts, activation)


def expert_outputs(x, w13, w2, weights, experts, activation) -> torch.Tensor:
    """sum over k of weights[t, k] * expert[experts[t, k]](x[t]), for every token t."""
    num_tokens, top_k = experts.shape
    order = experts.flatten().argsort(stable=True)  # (token, k) pairs grouped by expert
    token = order // top_k
    counts = torch.bincount(experts.flatten(), minlength=w13.shape[0])
    rows = x[token]
    if grouped_mm_works(x.device.type, x.dtype):
        ends = counts.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        out = torch._grouped_mm(activation(gate) * up, w2.transpose(1, 2), offs=ends)
    else:
        out, start = torch.empty_like(rows), 0
        for expert, count in enumerate(counts.tolist()):
            if count:  # experts that received no token cost nothing
                gate, up = F.linear(rows[start:start + count], w13[expert]).chunk(2, dim=-1)
                out[start:start + count] = F.linear(activation(gate) * up, w2[expert])
                start += count
    out = out * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token, out)


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped matmul for the device and dtype (CUDA's needs bf16 on Hopper or later):
    tried once on a tiny input."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, b = torch.ones(16, 16, dtype=dtype, device=device_type), torch.ones(2, 16, 16, dtype=dtype, device=device_type)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


_ACTIVATIONS = [F.silu]  # a custom op takes numbers, not functions: the activation goes by its index here


@torch.library.custom_op("nanoserve::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                activation: int) -> torch.Tensor:
    return expert_outputs(x, w13, w2, weights, experts, _ACTIVATIONS[activation])


@moe_experts.register_fake
def _(x, w13, w2, weights, experts, activation):
    return torch.empty_like(x)


# Checkpoint tensors of one expert: Mixtral's w1/w3/w2 under block_sparse_moe, Qwen's gate/up/down_proj under mlp.
_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
_SHARD = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
          "w2": ("w2", None), "down_proj": ("w2", None)}


def copy_expert_tensor(params: dict, name: str, tensor: torch.Tensor) -> str | None:
    """Copy one per-expert checkpoint tensor (or Mixtral's router) into the stacked parameters; returns the
    parameter's name, None if `name` is not an expert tensor."""
    if name.endswith("block_sparse_moe.gate.weight"):
        name = name.replace("block_sparse_moe.", "mlp.")
        params[name].data.copy_(tensor)
        return name
    match = _EXPERT.fullmatch(name)
    if match is None:
        if ".experts." in name:  # e.g. qweight/scales of a quantized MoE checkpoint
            raise ValueError(f"Expert tensor {name!r}: quantized or unknown expert layouts are not supported")
        return None
    prefix, expert, kind = match.groups()
    stacked, shard = _SHARD[kind]
    param = params[f"{prefix}.mlp.{stacked}"]
    target, (dim, start) = param.data[int(expert)], param.shard
    if shard is not None:  # gate rows first, then up rows
        target = target.narrow(0, shard * target.shape[0] // 2, target.shape[0] // 2)
    target.copy_(tensor.narrow(dim - 1, start, target.shape[dim - 1]))  # this rank's slice of the expert width
    return f"{prefix}.mlp.{stacked}"
