"""Quantized checkpoint formats: how each stores a linear layer, and how to get the weight back.

Each format class (a `QuantMethod` of quantization.py) names the tensors a quantized layer has in the checkpoint
(`tensor_suffixes`) and the layers it leaves in full precision (`covers`). `finalize` takes every shard of a
layer (q, k, v of qkv_proj) and either builds the layer's kernel (`kernel`: int4 from the integer formats'
values, zero points and scales, `integer_form`; FP8; int8) or turns the shards into the weight [out, in]
(`dequantize`), and checks the shape against the model's. Layouts, W being the torch weight [out, in] and b the
bits:
- compressed-tensors `pack-quantized`: weight_packed int32 [out, in*b/32], value j of a word in bits
  [j*b, (j+1)*b), stored as q + 2**(b-1); weight_scale [out, groups] (or [out, 1]); asymmetric: weight_zero_point
  packed the same way along `out`; weight_g_idx maps columns to groups under act-order. W = (q - zp) * scale.
- compressed-tensors `int-quantized` / `float-quantized`, and `fp8`: weight int8 / float8_e4m3fn [out, in],
  weight_scale per channel [out, 1] or per tensor; `fp8` block-wise: weight_scale_inv per 128x128 block.
- gptq: qweight int32 [in*b/32, out] packed along `in`; qzeros [groups, out*b/32] packed along `out`, holding
  z - 1 in the v1 convention and z in v2; scales [groups, out]; g_idx [in]. W^T = (q - z[g_idx]) * scales[g_idx].
- awq (GEMM): qweight int32 [in, out/8] and qzeros [groups, out/8], packed along `out` in the order
  0, 2, 4, 6, 1, 3, 5, 7; scales [groups, out]. W^T = (q - z[row // group]) * scales[row // group].
Anything else (other formats, schemes, bit widths, layouts) fails at start-up with an error that names it.
"""
import collections
import contextlib
import re

import torch

from .quantization import FP8_CAPABILITY, INT4_CAPABILITY, Fp8Kernel, Int4Kernel, Int8Kernel, QuantMethod, kernel_fits

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
FULL_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., n] -> unsigned values [..., n * 32 / bits], value j of each word from bits j*bits."""
    if bits not in (2, 4, 8):
        raise ValueError(f"Unsupported bit width {bits} (2, 4 or 8 are)")
    shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _groups(n_in: int, group_size: int | None, g_idx: torch.Tensor | None) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.long()
    size = n_in if not group_size or group_size < 0 else group_size
    return torch.arange(n_in) // size


class CheckpointMethod(QuantMethod):
    bits = None  # set by the integer formats; 4 takes the int4 kernel on a GPU
    skip: set[str] = set()  # modules_to_not_convert: names or name suffixes, with or without the "model." prefix

    def covers(self, layer_name: str) -> bool:
        names = (layer_name, "model." + layer_name)
        return not any(n == m or n.endswith("." + m) for m in self.skip for n in names)

    def __init__(self):
        self.placed = {}  # what each layer became: its kernel's name, or "dequantized"
        self.device = torch.device("cpu")  # where the model runs (make_method sets it)

    def finalize(self, layer, shards: list[dict[str, torch.Tensor]], name: str = "") -> None:
        with self._checked(name):
            if all(set(s) == {"weight"} and s["weight"].dtype in FULL_PRECISION for s in shards):
                kernel, weight = None, torch.cat([s["weight"].float() for s in shards])  # left unquantized
            else:
                kernel = self.kernel(shards, self.device, layer.bias)
                weight = None if kernel is not None else torch.cat([self.dequantize(shard) for shard in shards])
        shape = tuple(kernel.shape if kernel is not None else weight.shape)
        if shape != tuple(layer.weight.shape):
            raise ValueError(f"Checkpoint layer {name} dequantizes to {list(shape)}, the model expects "
                             f"{list(layer.weight.shape)}")
        self.placed[name] = type(kernel).__name__ if kernel is not None else "dequantized"
        if kernel is not None:
            layer.kernel, layer.weight = kernel, None
        else:  # the layer's weight is still on the meta device (runner.py): this is its first memory
            layer.weight = torch.nn.Parameter(weight.to(self.device, layer.weight.dtype), requires_grad=False)

    def expert_weight(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """An MoE expert's projection, dequantized: the experts run as one stacked full-precision tensor."""
        with self._checked(name):
            weight = self.dequantize(tensors)
        self.placed[name] = "dequantized"
        return weight

    @contextlib.contextmanager
    def _checked(self, name: str):
        """Checkpoint tensors that are missing or do not fit together become a start-up error naming the layer."""
        try:
            yield
        except KeyError as missing:
            raise ValueError(f"Checkpoint layer {name} lacks the tensor {missing} that {self.name} needs") from None
        except (RuntimeError, IndexError) as exc:
            raise ValueError(f"Checkpoint layer {name} has tensors of the wrong shape for {self.name}: "
                             f"{str(exc)[:200]}") from None

    def kernel(self, shards: list[dict[str, torch.Tensor]], device: torch.device, bias):
        """The kernel that computes this layer on `device` from its checkpoint tensors, or None to dequantize."""
        if self.bits != 4 or not kernel_fits(device, INT4_CAPABILITY):
            return None
        forms = [self.integer_form(shard) for shard in shards]
        if any(not torch.equal(form[3], forms[0][3]) for form in forms):
            return None  # act-order shards whose columns are grouped differently: one gather cannot serve all
        q, zero, scale = (torch.cat([form[i] for form in forms]) for i in range(3))
        return Int4Kernel.make(q, zero, scale, forms[0][3], bias, device)

    def integer_form(self, tensors: dict[str, torch.Tensor]):
        """(q [out, in], zero [out, groups], scale [out, groups], group of each input column [in]), q and zero
        unsigned, W = (q - zero) * scale by group."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q, zero, scale, groups = self.integer_form(tensors)
        return (q - zero.float()[:, groups]) * scale.float()[:, groups]

    def describe(self) -> str:
        counts = collections.Counter(self.placed.values())
        where = ", ".join(f"{n} layers {'dequantized at load' if k == 'dequantized' else 'on ' + k}"
                          for k, n in sorted(counts.items()))
        return f"{self.name} ({where or 'no layers'})"


class CompressedTensors(CheckpointMethod):
    """What llm-compressor writes. One config group targeting Linear layers; `ignore` stays full precision.
    W8A8 int8 runs on the int8 kernel (activations rounded to int8 first), FP8 on `_scaled_mm` where it runs, 4-bit
    on tinygemm on a GPU; the rest is dequantized."""
    FORMATS = ("pack-quantized", "int-quantized", "float-quantized")

    def __init__(self, config: dict):
        super().__init__()
        groups = list((config.get("config_groups") or {}).values())
        self.format = config.get("format")
        if self.format not in self.FORMATS or len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
            raise ValueError(f"Unsupported compressed-tensors checkpoint (format {self.format!r}, "
                             f"{len(groups)} config groups): nanoserve loads one group targeting Linear in the "
                             f"{', '.join(self.FORMATS)} formats")
        self.weights = groups[0]["weights"]
        if self.weights.get("type") not in ("int", "float") or self.weights.get("strategy") not in (
                "group", "channel", "tensor"):
            raise ValueError(f"Unsupported compressed-tensors weight scheme: {self.weights}")
        self.ignore = config.get("ignore") or []
        self.int8_kernel = self.format == "int-quantized" and self.weights.get("num_bits") == 8
        bits, kind = self.weights.get("num_bits"), self.weights.get("type")
        self.bits = bits if self.format == "pack-quantized" else None
        self.activations = groups[0].get("input_activations")
        if self.activations and not self.activations.get("symmetric", True):
            raise ValueError(f"Unsupported compressed-tensors activation scheme (asymmetric): {self.activations}")
        act = "A8" if self.activations else "A16"
        self.name = f"compressed-tensors {self.format} W{bits}{act} ({kind}, {self.weights['strategy']})"
        suffixes = ["weight_scale", "weight_zero_point", "weight_g_idx", "input_scale"]
        suffixes += ["weight_packed", "weight_shape"] if self.format == "pack-quantized" else ["weight"]
        self.tensor_suffixes = tuple("." + s for s in suffixes)

    def covers(self, layer_name: str) -> bool:
        names = (layer_name, "model." + layer_name)
        for entry in self.ignore:
            pattern = entry[3:] if entry.startswith("re:") else re.escape(entry) + "$"
            if any(re.match(pattern, n) for n in names):
                return False
        return True

    def integer_form(self, t: dict[str, torch.Tensor]):
        (out, n_in), offset = t["weight_shape"].tolist(), 1 << (self.bits - 1)
        q = unpack(t["weight_packed"], self.bits)[:, :n_in]
        scale = t["weight_scale"].float()
        zero = t.get("weight_zero_point")
        if zero is None:
            zero = torch.full(scale.shape, offset)
        elif zero.dtype == torch.int32 and zero.shape[0] != out:  # packed along `out`
            zero = unpack(zero.t(), self.bits).t()[:out]
        else:
            zero = zero + offset
        strategy = self.weights["strategy"]
        return q, zero, scale, _groups(n_in, self.weights.get("group_size") if strategy == "group" else None,
                                       t.get("weight_g_idx"))

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.format == "pack-quantized":
            return super().dequantize(t)
        scale = t["weight_scale"].float()
        return t["weight"].float() * (scale if scale.dim() == 2 else scale.reshape(-1)[0])

    def kernel(self, shards, device, bias):
        activations = self.activations or {}
        per_token = activations.get("strategy") == "token"
        if self.int8_kernel:  # the checkpoint's int8 values and per-channel scales, exactly
            weight = torch.cat([self.dequantize(s) for s in shards]).to(device)
            scale = torch.cat([s["weight_scale"].float().reshape(-1).expand(s["weight"].shape[0]) for s in shards])
            return Int8Kernel(weight, bias, scale.to(device), bool(self.activations), per_token,
                              static_input_scale(shards))
        if self.format == "float-quantized" and self.activations and kernel_fits(device, FP8_CAPABILITY):  # W8A8, not W8A16
            return fp8_kernel(shards, device, bias, per_token)
        return super().kernel(shards, device, bias)

    def describe(self) -> str:
        if self.int8_kernel:
            return f"{super().describe()}: activations rounded to int8, on the int8 weight kernel"
        return super().describe()


def fp8_kernel(shards, device, bias, per_token: bool):
    """An Fp8Kernel from FP8 checkpoint shards (per-tensor or per-channel `weight_scale`, optional static
    `input_scale`), or None where `_scaled_mm`'s shape rule (both dimensions multiples of 16) does not hold."""
    weight = torch.cat([s["weight"] for s in shards])
    if weight.dtype != torch.float8_e4m3fn or weight.shape[0] % 16 or weight.shape[1] % 16:
        return None
    scale = torch.cat([s["weight_scale"].float().reshape(-1).expand(s["weight"].shape[0]) for s in shards])
    return Fp8Kernel(weight.to(device), scale, bias, static_input_scale(shards), per_token)


def static_input_scale(shards) -> torch.Tensor | None:
    """A static activation scale: the shards of one layer share their input, so the largest serves them all."""
    scales = [s["input_scale"].float().reshape(()) for s in shards if "input_scale" in s]
    return torch.stack(scales).max() if scales else None


class Fp8Checkpoint(CheckpointMethod):
    """quant_method "fp8": float8_e4m3fn weights with a per-tensor `weight_scale`, or 128x128 block scales
    (`weight_scale_inv`, `weight_block_size`); an `input_scale` (static activations) is not needed here."""
    tensor_suffixes = (".weight", ".weight_scale", ".weight_scale_inv", ".input_scale")

    def __init__(self, config: dict):
        super().__init__()
        self.block = config.get("weight_block_size")
        self.static = config.get("activation_scheme") == "static"
        self.skip = set(config.get("modules_to_not_convert") or []) | {"lm_head"}
        self.name = "fp8" + (f" ({self.block[0]}x{self.block[1]} blocks)" if self.block else "")

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = t["weight"].float()
        if self.block is None:
            return weight * t["weight_scale"].float().reshape(-1)[0]
        rows, cols = self.block
        scale = t["weight_scale_inv"].float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        return weight * scale[:weight.shape[0], :weight.shape[1]]

    def kernel(self, shards, device, bias):
        if self.block is not None or not kernel_fits(device, FP8_CAPABILITY):
            return None  # block scales: no torch kernel takes them yet
        if not self.static:
            shards = [{k: v for k, v in s.items() if k != "input_scale"} for s in shards]
        return fp8_kernel(shards, device, bias, per_token=False)


class Gptq(CheckpointMethod):
    """quant_method "gptq" (AutoGPTQ / GPTQModel): 2, 4 or 8 bits, group-wise, act-order via g_idx, the v1 or
    v2 zero-point convention (`checkpoint_format`)."""
    tensor_suffixes = (".qweight", ".qzeros", ".scales", ".g_idx")

    def __init__(self, config: dict):
        super().__init__()
        self.bits, self.group_size = config.get("bits"), config.get("group_size", -1)
        self.v2 = config.get("checkpoint_format", "gptq") == "gptq_v2"
        self.skip = set(config.get("modules_to_not_convert") or []) | {"lm_head"}
        self.name = f"gptq {self.bits}-bit, group {self.group_size}{', v2 zeros' if self.v2 else ''}"

    def integer_form(self, t: dict[str, torch.Tensor]):
        q = unpack(t["qweight"].t(), self.bits)  # [out, in]
        zeros = unpack(t["qzeros"], self.bits)[:, :q.shape[0]] + (0 if self.v2 else 1)  # [groups, out]
        return q, zeros.t(), t["scales"].float().t(), _groups(q.shape[1], self.group_size, t.get("g_idx"))


class Awq(CheckpointMethod):
    """quant_method "awq", GEMM layout, 4 bits, zero points."""
    tensor_suffixes = (".qweight", ".qzeros", ".scales")

    def __init__(self, config: dict):
        super().__init__()
        self.bits, self.group_size = config.get("bits", config.get("w_bit")), config.get("group_size",
                                                                                           config.get("q_group_size"))
        version = str(config.get("version", "gemm")).lower()
        if self.bits != 4 or version != "gemm" or not config.get("zero_point", True):
            raise ValueError(f"Unsupported AWQ checkpoint (bits {self.bits}, version {version}, zero_point "
                             f"{config.get('zero_point')}): nanoserve loads 4-bit GEMM with zero points")
        self.skip = set(config.get("modules_to_not_convert") or []) | {"lm_head"}
        self.name = f"awq 4-bit, group {self.group_size}"

    def integer_form(self, t: dict[str, torch.Tensor]):
        order = torch.tensor(AWQ_ORDER).argsort()  # nibble k holds column ORDER[k]: put columns back in place

        def columns(packed: torch.Tensor) -> torch.Tensor:
            values = unpack(packed, 4).view(packed.shape[0], -1, 8)
            return values[:, :, order].flatten(1)
        q, zeros = columns(t["qweight"]), columns(t["qzeros"])  # [in, out], [groups, out]
        return q.t(), zeros.t(), t["scales"].float().t(), torch.arange(q.shape[0]) // self.group_size
