"""The decoder-only transformer behind Llama, Mistral, SmolLM2, Qwen2/3, Gemma 2/3, Phi-3 and their MoE kin.

One module covers them all through the Hugging Face config, each family a small delta:
- Qwen2: a bias on the q/k/v projections. Qwen3 and Gemma 3: each head of q and k normalized before RoPE.
- Mistral, Phi-3: a sliding attention window; Gemma 2/3: sliding and global layers alternate (`layer_types`),
  and Gemma 3 gives each kind its own RoPE base. The windows are the attention backend's job (`attention_specs`).
- Gemma: RMSNorm scales by (1 + w), the embedding by sqrt(hidden), a norm after attention and around the MLP,
  GeGLU, the softmax scale from `query_pre_attn_scalar`; Gemma 2 soft-caps attention scores and final logits.
- Phi-3: q/k/v and gate/up come fused in the checkpoint; "longrope" RoPE takes its long factors once a sequence
  outgrows the original context (`rope_table_offset`).
- Mixtral, Qwen2-MoE, Qwen3-MoE: the MLP is a sparse mixture of experts (moe.py).
The layers mirror transformers' numerics (float32 RMSNorm, RoPE from transformers' own frequency tables) so
greedy output matches it token for token.

Input: a flat batch of tokens from many sequences (`input_ids`, `positions`); attention goes through the
`paged_attention` op, whose backend already holds the KV cache and this step's metadata. So the forward takes
tensors only, and torch.compile can trace it as one graph. The q/k/v and
gate/up projections are fused (one matmul each); `weights.py` fills them from the separate checkpoint tensors.
"""
import torch
from torch import nn
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..attention import LayerSpec, attend
from ..linear import Linear, MergedLinear, row_parallel
from ..parallel import TensorParallel, VocabParallelEmbedding
from .moe import SparseMoeBlock

GEMMA = ("gemma2", "gemma3_text")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def layer_types(config) -> list[str]:
    """"sliding_attention" or "full_attention" for each layer, as transformers reads the config."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def attention_specs(config) -> list[LayerSpec]:
    """How each layer attends: what the runner hands the attention backend."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scale = (getattr(config, "query_pre_attn_scalar", None) or head_dim) ** -0.5
    softcap = getattr(config, "attn_logit_softcapping", None)
    return [LayerSpec(scale, config.sliding_window if kind == "sliding_attention" else None, softcap)
            for kind in layer_types(config)]


class RMSNorm(nn.Module):
    """x / rms(x) * w; Gemma's variant (`unit_offset`) scales by 1 + w, in float32 before casting back."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            out = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
            return (out * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32:  # one fused op (the CPU path), the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_model_len, computed once as transformers computes them.
    For "longrope" (Phi-3) the table is twice as long: the short factors' rows, then the long factors' rows, which
    transformers uses for a sequence longer than the original context; the runner adds the offset to such a
    sequence's positions (`rope_table_offset`)."""

    def __init__(self, config, max_len: int, layer_type: str | None = None):
        super().__init__()
        params = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "dynamic":
            raise ValueError("RoPE scaling type 'dynamic' is not supported")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"RoPE on part of each head (partial_rotary_factor {params['partial_rotary_factor']}) "
                             "is not supported")
        # Built on the CPU, as transformers builds the frequencies; a model built on the meta device (a quantized
        # checkpoint, runner.py) keeps them there until weights.py moves them.
        device = torch.get_default_device()
        with torch.device("cpu"):
            freqs = [self._inv_freq(config, params, layer_type)]
            self.long_after = params.get("original_max_position_embeddings") if rope_type == "longrope" else None
            if self.long_after:
                freqs.append(ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=self.long_after + 1)[0])
            scaling = self._inv_freq(config, params, layer_type, scaling=True)
            positions = torch.arange(max_len, dtype=torch.float)[:, None]
            emb = torch.cat([torch.cat((positions * f.float(), positions * f.float()), dim=-1) for f in freqs])
        emb = emb.to(device if device.type != "meta" else "cpu")
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    @staticmethod
    def _inv_freq(config, params, layer_type, scaling=False):
        if params.get("rope_type", "default") == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = params["rope_theta"]
            return 1.0 if scaling else 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        extra = {"layer_type": layer_type} if layer_type else {}
        return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", **extra)[1 if scaling else 0]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin for the step's positions, [T, 1, head_dim]: looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Under tensor parallelism, this rank's heads only (parallel.py says which)."""

    def __init__(self, config, layer: int, backend_id: int, tp: TensorParallel):
        super().__init__()
        self.head_dim = d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        first_q, self.num_heads = tp.split(config.num_attention_heads, "number of attention heads")
        first_kv, self.num_kv_heads = tp.kv_heads(config.num_key_value_heads)
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        bias = getattr(config, "attention_bias", False) or config.model_type in ("qwen2", "qwen2_moe")
        full_kv = config.num_key_value_heads * d
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias,
                                     shard_starts=[first_q * d, first_kv * d, first_kv * d],
                                     checkpoint_sizes=[config.num_attention_heads * d, full_kv, full_kv])
        self.o_proj = row_parallel(Linear(q_size, config.hidden_size, bias=getattr(config, "attention_bias", False)),
                                   tp)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe", "gemma3_text")
        if self.qk_norm:
            gemma = config.model_type in GEMMA
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=gemma)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=gemma)
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
    """gate/up/down: the dense models' MLP, and the shared expert of a Qwen2-MoE layer."""

    def __init__(self, hidden: int, intermediate: int, activation, tp: TensorParallel):
        super().__init__()
        first, inter = tp.split(intermediate, "intermediate size")
        self.gate_up_proj = MergedLinear(hidden, [inter] * 2, bias=False, shard_starts=[first] * 2,
                                         checkpoint_sizes=[intermediate] * 2)
        self.down_proj = row_parallel(Linear(inter, hidden, bias=False), tp)
        self.activation = activation

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)


def _is_sparse(config, layer: int) -> bool:
    """Whether this layer's MLP is a mixture of experts (Qwen MoE may keep some layers dense)."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return experts > 0 and layer not in (getattr(config, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, backend_id: int, tp: TensorParallel):
        super().__init__()
        act_name = getattr(config, "hidden_activation", None) or config.hidden_act
        if act_name not in ACTIVATIONS:
            raise ValueError(f"Activation {act_name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        activation = ACTIVATIONS[act_name]
        self.self_attn = Attention(config, layer, backend_id, tp)
        if _is_sparse(config, layer):
            shared = getattr(config, "shared_expert_intermediate_size", 0)
            shared = MLP(config.hidden_size, shared, activation, tp) if shared else None
            self.mlp = SparseMoeBlock(config, activation, tp, shared)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, activation, tp)
        self.layer_type = layer_types(config)[layer]
        gemma = config.model_type in GEMMA
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
        self.sandwich = gemma  # Gemma also norms each block's output: post_attention_layernorm is one of those
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)

    def forward(self, x, rope):
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, backend_id: int, max_model_len: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.config, self.tp = config, tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend_id, tp) for i in range(config.num_hidden_layers))
        gemma = config.model_type in GEMMA
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
        self.embed_scale = config.hidden_size ** 0.5 if gemma else None
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma 3 gives sliding and global layers their own RoPE; the others have one for all layers.
        per_type = isinstance(config.rope_parameters, dict) and "full_attention" in config.rope_parameters
        kinds = sorted(set(layer_types(config))) if per_type else [None]
        self.rotary = nn.ModuleDict({kind or "all": Rotary(config, max_model_len, kind) for kind in kinds})
        self.max_model_len, self.long_rope_after = max_model_len, kinds == [None] and self.rotary["all"].long_after
        self.lm_head = Linear(config.hidden_size, self.embed_tokens.rows, bias=False)  # vocab-parallel too
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.lm_head.weight.shard = self.embed_tokens.weight.shard

    def forward(self, input_ids, positions) -> torch.Tensor:
        """Hidden states [T, hidden] of every input token."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        for layer in self.layers:
            x = layer(x, ropes.get(layer.layer_type) or ropes["all"])
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_vocab(self.lm_head(hidden), self.config.vocab_size)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def rope_table_offset(self, seq_len: int) -> int:
        """Where a sequence of `seq_len` tokens finds its RoPE rows: past the short table once a longrope model's
        sequence outgrows the original context, as transformers switches factors by the sequence's length."""
        return self.max_model_len if self.long_rope_after and seq_len > self.long_rope_after else 0

    # Checkpoint name fragment -> (our fused parameter, shard index); weights.py uses it.
    stacked_params = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
