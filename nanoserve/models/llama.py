"""The decoder-only transformer behind Llama, Mistral-style, SmolLM2, Qwen2 and Qwen3 checkpoints.

One module covers them all through the Hugging Face config: Qwen2 adds a bias to the q/k/v projections, Qwen3
normalizes each head of q and k before RoPE. The layers mirror transformers' numerics (float32 RMSNorm, RoPE
from transformers' own frequency tables) so greedy output matches it token for token.

Input: a flat batch of tokens from many sequences (`input_ids`, `positions`); attention goes through the
`paged_attention` op, whose backend already holds the KV cache and this step's metadata. So the forward takes
tensors only, and torch.compile can trace it as one graph. The q/k/v and
gate/up projections are fused (one matmul each); `weights.py` fills them from the separate checkpoint tensors.
"""
import torch
from torch import nn
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..attention import attend
from ..linear import Linear, MergedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (the CPU path), the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_model_len, computed once as transformers computes them."""

    def __init__(self, config, max_len: int):
        super().__init__()
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"RoPE scaling type {rope_type!r} is not supported")
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = config.rope_parameters["rope_theta"]
            inv_freq, scaling = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        inv_freq = inv_freq.float().to(torch.get_default_device())  # transformers builds it on the CPU
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin for the step's positions, [T, 1, head_dim]: looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer: int, backend_id: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.layer, self.backend_id = layer, backend_id

    def forward(self, x, rope):
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)  # [T, heads + 2 * kv heads, D]
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:  # q and k side by side in one rotation: half the small ops
            q, k = apply_rotary(qkv[:, :self.num_heads + self.num_kv_heads], *rope).split(
                [self.num_heads, self.num_kv_heads], dim=1)
        out = attend(q, k, v, self.layer, self.backend_id)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, backend_id: int):
        super().__init__()
        self.self_attn = Attention(config, layer, backend_id)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, backend_id: int, max_model_len: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend_id) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config, max_model_len)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions) -> torch.Tensor:
        """Hidden states [T, hidden] of every input token."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # Checkpoint name fragment -> (our fused parameter, shard index); weights.py uses it.
    stacked_params = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
