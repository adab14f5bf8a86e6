"""Quantized weights: checkpoints in quantized formats, and int8 on the fly, behind the models' `Linear` layers.

Where data comes from and goes:
- `quantization_config` in config.json names the format (`compressed-tensors`, `fp8`, ...), as vLLM detects
  it; `EngineConfig.quantization` may name it too, or ask for `int8` on the fly from a full-precision checkpoint.
- While weights.py reads the checkpoint, every tensor of a quantized linear layer (packed weights, scales, zero
  points) is collected per shard (q, k, v of a fused qkv_proj are three shards) instead of being copied.
- `finalize` then turns each layer's shards into what its kernel wants, once: a dequantized full-precision
  weight, or int8 weights for the int8 kernel. The model keeps calling `Linear.forward`, which runs
  `layer.kernel(x)` when a kernel is set.

Kernels: int8 is weight-only, on torch's `_weight_int8pack_mm` for one row (and on a GPU); on a CPU several rows
use a transient dequantized copy, because that kernel loops over rows. On the project's 2-core CPU int8 saves
memory (4x), not time: 0.65x float32's speed at batch 1, 0.94x at 32 sequences (docs/performance.md). Checkpoints
in 4-bit and FP8 are dequantized once at load (the log says so): they load and run correctly, without the memory
saving, until kernels for them are measured.
"""
import torch

from .linear import Linear

ON_THE_FLY = ("int8",)
CHECKPOINT_FORMATS = ("compressed-tensors", "fp8", "gptq", "awq")


class Int8Kernel:
    """y = x @ (W_int8 * scale)^T + b: weight-only int8, per output channel. The activations stay in full
    precision, so the only error is the weights' rounding (mean |Δ log p| 0.08 nats on SmolLM2-135M; dynamic
    int8 activations per tensor, fbgemm's `linear_dynamic`, cost 1.4 nats and are not used)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None):
        weight = weight.float()
        if scale is None:  # symmetric per output channel
            scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.scale = scale.float().reshape(-1).contiguous()
        self.weight = torch.round(weight / self.scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.bias = bias
        self.nbytes = self.weight.numel() + 4 * self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 1 or rows.is_cuda:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale.to(rows.dtype))
        else:  # torch's CPU kernel loops over rows: at M > 1 a transient dequantized copy is 10-20x faster
            out = torch.nn.functional.linear(rows, self.weight.to(rows.dtype)) * self.scale.to(rows.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def make_method(quantization: str | None, hf_config):
    """The method for this model: from `quantization` (the user's) or the checkpoint's quantization_config."""
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    found = (checkpoint or {}).get("quant_method")
    if quantization in ON_THE_FLY:
        if found:
            raise ValueError(f"--quantization {quantization} quantizes a full-precision checkpoint, but this one "
                             f"is already quantized ({found})")
        return OnTheFlyInt8()
    if quantization == "fp8" and found is None:
        raise ValueError("--quantization fp8 on the fly (dynamic FP8, a GPU of compute capability 8.9 or newer) is "
                         "not implemented yet; FP8 checkpoints load (dequantized), and --quantization int8 works")
    if quantization is not None and quantization != found:
        raise ValueError(f"--quantization {quantization} does not match the checkpoint's quantization_config "
                         f"({found or 'none'})")
    if found is None:
        return None
    from . import quant_formats
    formats = {"compressed-tensors": quant_formats.CompressedTensors, "fp8": quant_formats.Fp8Checkpoint,
               "gptq": quant_formats.Gptq, "awq": quant_formats.Awq}
    if found in formats:
        return formats[found](checkpoint)
    raise ValueError(f"Unsupported quantization method {found!r} in config.json; nanoserve loads "
                     f"{', '.join(CHECKPOINT_FORMATS)} checkpoints and quantizes to {', '.join(ON_THE_FLY)} on the fly")


class QuantMethod:
    """One quantization method: which layers it covers, which checkpoint tensors they have, and how a layer's
    shards become its kernel."""
    name = "?"
    tensor_suffixes: tuple[str, ...] = ()  # the checkpoint tensors of a quantized layer

    def covers(self, layer_name: str) -> bool:
        return True

    def finalize(self, layer, shards: list[dict[str, torch.Tensor]], name: str = "") -> None:
        """Turn one layer's checkpoint tensors (one dict per shard of a fused layer) into its weight or kernel."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class OnTheFlyInt8(QuantMethod):
    """`--quantization int8`: a full-precision checkpoint whose linear layers (lm_head included) are quantized to
    int8 per output channel at load, weight-only."""
    name = "int8 weight-only, per output channel (on the fly)"

    def finalize(self, layer, shards, name: str = "") -> None:
        layer.kernel = Int8Kernel(layer.weight.detach(), layer.bias)
        layer.weight = None  # the full-precision copy is not kept (a tied lm_head keeps the embedding's)


def quantize_model(model: torch.nn.Module, method: QuantMethod) -> None:
    """On-the-fly methods: quantize every covered layer of a loaded full-precision model."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and method.covers(name):
            method.finalize(module, [], name)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights take, quantized kernels counted at their packed size."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return total + sum(m.kernel.nbytes for m in model.modules() if getattr(m, "kernel", None) is not None)
