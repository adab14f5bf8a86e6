"""Quantized weights: checkpoints in quantized formats, and int8 or FP8 on the fly, behind the models' `Linear`s.

Where data comes from and goes:
- `quantization_config` in config.json names the format (`compressed-tensors`, `fp8`, ...), as vLLM detects
  it; `EngineConfig.quantization` may name it too, or ask for `int8` or `fp8` on the fly from a full-precision
  checkpoint.
- While weights.py reads the checkpoint, every tensor of a quantized linear layer (packed weights, scales, zero
  points) is collected per shard (q, k, v of a fused qkv_proj are three shards) instead of being copied.
- `finalize` then turns each layer's shards into what its kernel wants, once: packed weights for a kernel, or a
  dequantized full-precision weight. The model keeps calling `Linear.forward`, which runs `layer.kernel(x)`
  when a kernel is set.

Kernels, all torch's own:
- int8 (on the fly, and int8 checkpoints): `_weight_int8pack_mm` for one row on a CPU; several rows, and every
  step on a GPU, use a transient dequantized copy, because torch's kernel loops over rows on a CPU and reads
  uncoalesced on a GPU. int8 saves memory (4x on a CPU, 2x against bf16), not time: 0.65x float32's speed at
  batch 1 on the project's 2-core CPU (docs/performance.md); on a GPU unmeasured.
- 4-bit checkpoints on a GPU: tinygemm (`Int4Kernel`); FP8 on a GPU of compute capability 8.9+: `_scaled_mm`
  (`Fp8Kernel`). On a CPU, where both measured far slower than float32, and for shapes they do not take, the
  weights are dequantized once at load, and the log says so.
"""
import torch

from .linear import Linear

ON_THE_FLY = ("int8", "fp8")
CHECKPOINT_FORMATS = ("compressed-tensors", "fp8", "gptq", "awq")


def activation_scale(rows: torch.Tensor, input_scale, per_token: bool, qmax: float) -> torch.Tensor:
    """The scale that maps activations onto [-qmax, qmax]: the checkpoint's static `input_scale`, or one taken
    from the activations now, per token (row) or per tensor."""
    if input_scale is not None:
        return input_scale
    amax = rows.abs().amax(-1, keepdim=True) if per_token else rows.abs().amax()
    return amax.clamp_min(1e-12) / qmax


class Int8Kernel:
    """y = x @ (W_int8 * scale)^T + b: int8 weights, per output channel. On the fly the activations stay in full
    precision, so the only error is the weights' rounding (mean |Δ log p| 0.08 nats on SmolLM2-135M; dynamic
    int8 activations per tensor, fbgemm's `linear_dynamic`, cost 1.4 nats and are not used). A W8A8 checkpoint
    asks for int8 activations too (`quantize_input`): they are rounded to int8 values as compressed-tensors does
    (scale = amax / 127.5, per token or per tensor, or the static `input_scale`), which gives the int8 matmul's
    product up to float32 rounding, on the weight-only kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None,
                 quantize_input: bool = False, per_token: bool = True, input_scale: torch.Tensor | None = None):
        weight = weight.float()
        if scale is None:  # symmetric per output channel
            scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.scale = scale.float().reshape(-1).contiguous()
        self.weight = torch.round(weight / self.scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.bias, self.quantize_input, self.per_token = bias, quantize_input, per_token
        self.input_scale = None if input_scale is None else input_scale.float().reshape(()).to(weight.device)
        self.nbytes = self.weight.numel() + 4 * self.scale.numel()
        self.shape = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.quantize_input:
            x_scale = activation_scale(rows.float(), self.input_scale, self.per_token, 127.5)
            rows = (torch.round(rows.float() / x_scale).clamp(-128, 127) * x_scale).to(x.dtype)
        # (Under torch.compile a row count can be data-dependent, e.g. the LM head's: no branching on it there.)
        if not rows.is_cuda and not torch.compiler.is_compiling() and rows.shape[0] == 1:
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, self.scale.to(rows.dtype))
        else:  # torch's kernel loops over rows on a CPU (a transient dequantized copy is 10-20x faster at M > 1),
            # and on a GPU runs one thread per output reading its own row (uncoalesced): the copy serves both
            out = torch.nn.functional.linear(rows, self.weight.to(rows.dtype)) * self.scale.to(rows.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


FP8_MAX = 448.0  # the largest float8_e4m3fn value
# Device types where a checkpoint's 4-bit and FP8 layers run on their kernels instead of being dequantized at load.
# Not "cpu": there torch's int4 kernel is 20-90x slower than float32 with float32 activations (bench/cpu_int4.py)
# and `_scaled_mm` 5-30x slower; the tests add "cpu" to check the kernels' arithmetic on the CPU twins.
KERNEL_DEVICES = ("cuda",)


INT4_CAPABILITY = (8, 0)  # tinygemm is built for Ampere and newer (its bf16 mma)
FP8_CAPABILITY = (8, 9)  # FP8 matmuls: Ada, Hopper


def kernel_fits(device: torch.device, capability: tuple[int, int]) -> bool:
    """Whether a kernel that needs this CUDA compute capability runs on `device` (the CPU twin for the tests)."""
    if device.type not in KERNEL_DEVICES:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= capability


class Int4Kernel:
    """y = x @ W^T (+ b), W = (q - z) * s per group of input columns, q and z in [0, 16): torch's tinygemm int4
    matmul (`_weight_int4pack_mm`, bf16 on a GPU; its CPU twin `_weight_int4pack_mm_for_cpu` for the tests).
    tinygemm computes (q - 8) * s + zero, so zero = (8 - z) * s. Act-order checkpoints (columns in groups out of
    order, GPTQ's g_idx) are served by sorting the weight's columns at load and gathering x's the same way."""
    GROUP_SIZES = (32, 64, 128, 256)

    @classmethod
    def make(cls, q, zero, scale, groups, bias, device):
        """The kernel for these tensors ([out, in], [out, G], [out, G], [in]), or None where tinygemm's shape
        rules do not fit (the caller then dequantizes)."""
        n_out, n_in = q.shape
        perm = None if bool((groups[1:] >= groups[:-1]).all()) else torch.argsort(groups, stable=True)
        if perm is not None:
            q, groups = q[:, perm], groups[perm]
        size = n_in // scale.shape[1]
        if scale.shape[1] * size != n_in or not torch.equal(groups, torch.arange(n_in) // size):
            return None  # groups of unequal size
        fit = next((g for g in cls.GROUP_SIZES[::-1] if size % g == 0), None)
        tiles = next((t for t in (8, 4, 2) if n_in % (16 * t) == 0), None)
        if fit is None or tiles is None or n_out % (8 if device.type == "cuda" else 16):  # n tiles of 8; CPU: 16
            return None
        repeat = size // fit  # channel-wise, or groups tinygemm lacks: each scale repeated over smaller groups
        zero, scale = zero.float().repeat_interleave(repeat, 1), scale.float().repeat_interleave(repeat, 1)
        return cls(q, zero, scale, fit, tiles, perm, bias, device)

    def __init__(self, q, zero, scale, group_size, tiles, perm, bias, device):
        self.group_size, self.bias, self.on_cuda = group_size, bias, device.type == "cuda"
        self.shape = q.shape
        self.perm = None if perm is None else perm.to(device)
        dtype = torch.bfloat16 if self.on_cuda else torch.float32
        self.scales_and_zeros = torch.stack([scale.t(), ((8 - zero) * scale).t()], -1).to(device, dtype).contiguous()
        q = q.to(device, torch.int32)
        if self.on_cuda:  # two values a byte, the even column in the high nibble (torch's packing for CUDA)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8),
                                                                     tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
        self.nbytes = q.numel() // 2 + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            rows = rows[:, self.perm]
        if self.on_cuda:
            out = torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), self.packed,
                                                     self.group_size, self.scales_and_zeros).to(x.dtype)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                             self.scales_and_zeros.to(rows.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


class Fp8Kernel:
    """y = x @ W^T (+ b) with W float8_e4m3fn times a scale per output channel (a per-tensor scale, or one per
    shard of a fused layer, is spread over its rows), and x quantized to FP8 on the way in: with the checkpoint's
    static `input_scale`, else dynamically, per token or per tensor. `torch._scaled_mm` multiplies the FP8 values
    with unit scales into float32, and the scales are applied after it: vLLM's "unfused" form, which works for
    any mix of per-tensor, per-token and per-channel scales and any output dtype (torch's row-wise scaling wants
    bf16 out)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias, input_scale=None, per_token: bool = True):
        self.weight, self.bias, self.per_token = weight.contiguous(), bias, per_token
        self.scale = scale.float().reshape(1, -1).to(weight.device)
        self.input_scale = None if input_scale is None else input_scale.float().reshape(()).to(weight.device)
        self.one = torch.ones((), device=weight.device)
        self.nbytes = weight.numel() + 4 * self.scale.numel()
        self.shape = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        x_scale = activation_scale(rows, self.input_scale, self.per_token, FP8_MAX)
        quantized = (rows / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(quantized, self.weight.t(), self.one, self.one, out_dtype=torch.float32)
        out = (out * x_scale * self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def make_method(quantization: str | None, hf_config, device: torch.device = torch.device("cpu")):
    """The method for this model: from `quantization` (the user's) or the checkpoint's quantization_config."""
    checkpoint = getattr(hf_config, "quantization_config", None)
    if checkpoint is not None and not isinstance(checkpoint, dict):
        checkpoint = checkpoint.to_dict()
    found = (checkpoint or {}).get("quant_method")
    if quantization is not None and quantization not in ON_THE_FLY + CHECKPOINT_FORMATS:
        raise ValueError(f"Unknown quantization {quantization!r}: {' and '.join(ON_THE_FLY)} quantize a model on the "
                         f"fly, {', '.join(CHECKPOINT_FORMATS)} name a checkpoint's format")
    if quantization in ON_THE_FLY and quantization != found:
        if found:
            raise ValueError(f"--quantization {quantization} quantizes a full-precision checkpoint, but this one "
                             f"is already quantized ({found})")
        if quantization == "int8":
            return OnTheFlyInt8()
        if not kernel_fits(device, FP8_CAPABILITY):
            raise ValueError(f"--quantization fp8 (dynamic FP8 on the fly) needs a GPU of compute capability 8.9 or "
                             f"newer (Ada, Hopper), and the model is on {device}; --quantization int8 works anywhere")
        return OnTheFlyFp8()
    if quantization is not None and quantization != found:
        raise ValueError(f"--quantization {quantization} does not match the checkpoint's quantization_config "
                         f"({found or 'none'})")
    if found is None:
        return None
    from . import quant_formats
    formats = {"compressed-tensors": quant_formats.CompressedTensors, "fp8": quant_formats.Fp8Checkpoint,
               "gptq": quant_formats.Gptq, "awq": quant_formats.Awq}
    if found in formats:
        method = formats[found](checkpoint)
        method.device = device
        return method
    raise ValueError(f"Unsupported quantization method {found!r} in config.json; nanoserve loads "
                     f"{', '.join(CHECKPOINT_FORMATS)} checkpoints and quantizes to {', '.join(ON_THE_FLY)} on the fly")


class QuantMethod:
    """One quantization method: which layers it covers, which checkpoint tensors they have, and how a layer's
    shards become its kernel."""
    name = "?"
    on_the_fly = False  # quantizes a loaded full-precision model (quantize_model) instead of reading a checkpoint
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
    on_the_fly = True

    def finalize(self, layer, shards, name: str = "") -> None:
        layer.kernel = Int8Kernel(layer.weight.detach(), layer.bias)
        layer.weight = None  # the full-precision copy is not kept (a tied lm_head keeps the embedding's)


class OnTheFlyFp8(QuantMethod):
    """`--quantization fp8`, as vLLM does it: each linear layer but lm_head gets float8_e4m3fn weights with one
    scale per tensor, and activations are quantized per tensor, dynamically, at every call."""
    name = "fp8 W8A8, per-tensor weights, dynamic per-tensor activations (on the fly)"
    on_the_fly = True

    def covers(self, layer_name: str) -> bool:
        return layer_name != "lm_head"

    def finalize(self, layer, shards, name: str = "") -> None:
        if layer.in_features % 16 or layer.out_features % 16:
            return  # `_scaled_mm` takes multiples of 16 only: the layer stays in full precision
        weight = layer.weight.detach().float()
        scale = weight.abs().amax().clamp_min(1e-12) / FP8_MAX
        fp8 = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        layer.kernel = Fp8Kernel(fp8, scale.expand(weight.shape[0]), layer.bias, per_token=False)
        layer.weight = None


def quantize_model(model: torch.nn.Module, method: QuantMethod) -> None:
    """On-the-fly methods: quantize every covered layer of a loaded full-precision model."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and method.covers(name):
            method.finalize(module, [], name)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights take, quantized kernels counted at their packed size."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return total + sum(m.kernel.nbytes for m in model.modules() if getattr(m, "kernel", None) is not None)
