"""Weight loading: read a model directory's safetensors files into our module, fusing projections on the way.

Checkpoints store q/k/v and gate/up as separate tensors; our layers hold each group in one fused matrix
(`MergedLinear`), so each checkpoint tensor is copied into its rows of the fused parameter. Everything else
is copied by name. Called once by the runner at start-up.
"""
import collections
import glob
import os
import sys

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .linear import Linear, MergedLinear
from .models.moe import copy_expert_tensor


def load_weights(model: torch.nn.Module, model_dir: str, optional: set[str] = frozenset(), method=None,
                 device: torch.device | None = None) -> None:
    """Fill `model` from the checkpoint; every parameter but those in `optional` must be there. With a checkpoint
    quantization `method` (quantization.py), a quantized layer's tensors are collected per shard and handed to
    `method.finalize` once all are read; a quantized MoE expert's are dequantized into the experts' stack.
    `device`: the model was built on the meta device, and only what the checkpoint holds in full precision gets
    memory there, so that a 4-bit model never passes through full precision on its way to the GPU."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {model_dir}")
    names = [(f, n) for f in files for n in _keys(f)]
    # (our layer, shard, suffix) of each tensor of a quantized layer, None for the others
    places = [_quantized_place(model, method, n.removeprefix("model.")) if method is not None and
              method.tensor_suffixes else None for _, n in names]
    if device is not None:
        materialize(model, device, {f"{place[0]}.weight" for place in places if place is not None})
    params = dict(model.named_parameters())
    loaded = collections.Counter()  # parameter name -> tensors written into it (an expert stack takes several)
    handles, quantized = {}, {}  # quantized: layer name -> shard index -> tensor suffix -> tensor
    # A bar only on a terminal: in a log file it is a spray of carriage returns.
    for (file, name), place in tqdm(list(zip(names, places)), desc="Loading weights", unit="tensor", leave=False,
                                    disable=not sys.stderr.isatty()):
        handle = handles.get(file) or handles.setdefault(file, safe_open(file, framework="pt"))
        ours = name.removeprefix("model.")
        if place is not None:
            layer, shard, suffix = place
            quantized.setdefault(layer, {}).setdefault(shard, {})[suffix[1:]] = handle.get_tensor(name)
            continue
        target = _copy_tensor(model, params, ours, handle.get_tensor(name))
        if target is not None:
            loaded[target] += 1
    for layer, shards in quantized.items():
        if ".experts." in layer:  # an MoE expert's projection: a slice of a stacked tensor, not a layer
            loaded[_copy_tensor(model, params, f"{layer}.weight", method.expert_weight(shards[0], layer))] += 1
            continue
        module = model.get_submodule(layer)
        if sorted(shards) != list(range(len(getattr(module, "shard_sizes", [0])))):
            raise ValueError(f"Checkpoint in {model_dir} lacks some of {layer}'s projections")
        method.finalize(module, [shards[i] for i in sorted(shards)], layer)
        loaded[f"{layer}.weight"] += 1
    missing = set(params) - set(loaded) - optional  # tied lm_head shares embed_tokens' parameter, not listed apart
    if missing:
        raise ValueError(f"Checkpoint in {model_dir} lacks weights for: {sorted(missing)[:5]}")
    for name, count in loaded.items():  # an expert stack: every expert's gate and up (w13), or down (w2), once
        per_expert = 2 if name.endswith(".mlp.w13") else 1 if name.endswith(".mlp.w2") else 0
        expected = per_expert * len(params[name])
        if expected and count != expected:
            raise ValueError(f"Checkpoint in {model_dir} has {count} expert projections for {name}, not {expected}")


def materialize(model: torch.nn.Module, device: torch.device, keep_meta: set[str]) -> None:
    """Give every parameter and buffer of a model built on the meta device memory on `device` (empty: the loader
    fills it), except the parameters in `keep_meta`, the quantized layers' weights: finalize replaces them."""
    made = {}  # by id: a tied parameter stays one parameter
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta" or f"{module_name}.{name}".lstrip(".") in keep_meta:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                made[id(param)].__dict__.update(param.__dict__)  # e.g. `shard` (parallel.py)
            module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:  # computed at construction on the CPU (the rotary tables)
                module._buffers[name] = buffer.to(device)


def _quantized_place(model, method, name: str) -> tuple[str, int, str] | None:
    """(our layer, shard index, tensor suffix) for a tensor of a layer the method quantizes, else None."""
    suffix = next((s for s in method.tensor_suffixes if name.endswith(s)), None)
    if suffix is None:
        return None
    layer, shard = name[:-len(suffix)], 0
    if not method.covers(layer):
        return None
    if ".experts." in layer:  # an expert's projection, named as in the checkpoint
        return layer, 0, suffix
    for fragment, (fused, index) in model.stacked_params.items():
        if layer.endswith(f".{fragment}"):
            layer, shard = layer[:-len(fragment)] + fused, index
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return None
    return (layer, shard, suffix) if isinstance(module, Linear) else None


def _keys(file: str) -> list[str]:
    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def _copy_tensor(model, params: dict, name: str, tensor: torch.Tensor) -> str | None:
    """Copy one checkpoint tensor (or, under tensor parallelism, this rank's slice of it) into its parameter;
    returns the parameter's name (None if unused)."""
    if ".experts." in name or "block_sparse_moe" in name:  # before the fused names: experts have gate_proj too
        return copy_expert_tensor(params, name, tensor)
    for fragment, (fused, shard) in model.stacked_params.items():
        if f".{fragment}." in name:
            target = name.replace(fragment, fused)
            module = model.get_submodule(target.rsplit(".", 1)[0])
            _copy_shard(params[target], module, shard, tensor)
            return target
    if name not in params:  # e.g. rotary inv_freq buffers saved by old checkpoints
        return None
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, MergedLinear) and tensor.shape[0] == sum(module.checkpoint_sizes) != module.out_features:
        # Already fused in the checkpoint (Phi-3's qkv_proj, gate_up_proj), but this rank keeps a slice of each part
        for shard, part in enumerate(tensor.split(module.checkpoint_sizes)):
            _copy_shard(params[name], module, shard, part)
        return name
    with torch.no_grad():
        params[name].copy_(_rank_slice(params[name], tensor))
    return name


def _copy_shard(param: torch.Tensor, module, shard: int, tensor: torch.Tensor) -> None:
    """One projection of a fused layer: this rank's rows of it, into the projection's rows of the parameter."""
    size = module.shard_sizes[shard]
    with torch.no_grad():
        param.narrow(0, sum(module.shard_sizes[:shard]), size).copy_(tensor.narrow(0, module.shard_starts[shard], size))


def _rank_slice(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The part of a checkpoint tensor this rank holds (parallel.py sets `param.shard`): a slice along one
    dimension, padded with zeros past the end (the vocabulary's last rows), or zeros (a row-parallel bias)."""
    shard = getattr(param, "shard", None)
    if shard is None or shard == "rank 0":
        return tensor
    if shard == "zero":
        return torch.zeros_like(param)
    dim, start = shard
    part = tensor.narrow(dim, start, max(0, min(param.shape[dim], tensor.shape[dim] - start)))
    padding = [0, 0] * (tensor.dim() - 1 - dim) + [0, param.shape[dim] - part.shape[dim]]
    return torch.nn.functional.pad(part, padding)
