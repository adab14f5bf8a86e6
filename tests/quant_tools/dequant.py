"""Pure-torch dequantization of the checkpoints make_checkpoints.py writes.

    python dequant.py QUANT_DIR OUT_DIR    # -> plain fp32 checkpoint, no quantization_config

Needs only torch + safetensors, so tests can build a dequantized fp32 reference
that plain transformers loads (no gptqmodel/optimum/compressed-tensors). It was
checked against transformers 5.24 + compressed-tensors 0.19 (`run_compressed=False`:
bit-exact) and against GPTQModel 7.6's own CPU kernels (GPTQ/AWQ: equal up to fp16).

Layouts (W is the torch Linear weight, shape (out, in)):
  compressed-tensors pack-quantized: weight_packed int32 (out, ceil(in*b/32)), packed
    along `in`, little-endian: value j of a word sits in bits [j*b, (j+1)*b); stored
    unsigned = q + 2**(b-1), q the signed quant value. weight_scale (out, in/group) or
    (out, 1); weight_shape int64 [out, in]; asym only: weight_zero_point int32 packed
    the same way but along `out`: (ceil(out*b/32), groups), also offset by 2**(b-1).
    W = (q - zp) * scale.
  int-quantized / float-quantized: weight int8 / float8_e4m3fn (out, in),
    weight_scale (out, 1) or (1,): W = weight * scale.
  gptq (v1 "gptq" checkpoint_format): qweight int32 (in*b/32, out) packed along `in`;
    qzeros int32 (groups, out*b/32) packed along `out`, storing zero-1; scales (groups, out);
    g_idx (in,) = group of each input row (permuted when desc_act).
    W.T = (q - (z + 1)) * scales[g_idx].
  awq GEMM: qweight int32 (in, out/8), qzeros int32 (groups, out/8), both packed along
    `out` with the nibble order [0, 2, 4, 6, 1, 3, 5, 7] (nibble k of a word holds
    column 8*w + ORDER[k]); scales (groups, out); W.T = (q - z) * scales[row // group].
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_last(p: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (..., n) -> (..., n*32/bits) unsigned values; value j in bits [j*bits, ...)."""
    shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
    return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _per_input(t: torch.Tensor, n_in: int) -> torch.Tensor:
    """(out, groups) -> (out, n_in): repeat each group's value over its columns."""
    return t.repeat_interleave(n_in // t.shape[-1], dim=-1)


def ct_weight(sd: dict, pre: str, wargs: dict) -> torch.Tensor:
    scale = sd.pop(pre + "weight_scale").float()
    if pre + "weight_packed" not in sd:  # int-quantized / float-quantized
        return sd.pop(pre + "weight").float() * scale
    bits, (out, n_in) = wargs["num_bits"], sd.pop(pre + "weight_shape").tolist()
    off = 1 << (bits - 1)
    q = unpack_last(sd.pop(pre + "weight_packed"), bits)[:, :n_in] - off
    zp = sd.pop(pre + "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None else (unpack_last(zp.t(), bits).t()[:out] - off)
    return (q - _per_input(zp, n_in)).float() * _per_input(scale, n_in)


def gptq_weight(sd: dict, pre: str, bits: int) -> torch.Tensor:
    q = unpack_last(sd.pop(pre + "qweight").t(), bits).t()  # (in, out)
    z = unpack_last(sd.pop(pre + "qzeros"), bits) + 1       # (groups, out)
    s, g = sd.pop(pre + "scales").float(), sd.pop(pre + "g_idx").long()
    return ((q - z[g]).float() * s[g]).t()


def awq_weight(sd: dict, pre: str, group: int) -> torch.Tensor:
    inv = [AWQ_ORDER.index(i) for i in range(8)]

    def un(p):  # (rows, out/8) -> (rows, out) in natural column order
        return unpack_last(p, 4).view(p.shape[0], -1, 8)[:, :, inv].reshape(p.shape[0], -1)
    q, z, s = un(sd.pop(pre + "qweight")), un(sd.pop(pre + "qzeros")), sd.pop(pre + "scales").float()
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]).float() * s[g]).t()


def dequantize_state_dict(sd: dict, qc: dict) -> dict:
    sd, out = dict(sd), {}
    method = qc["quant_method"]
    marker = {"compressed-tensors": "weight_scale", "gptq": "qweight", "awq": "qweight"}[method]
    for pre in sorted({k[: -len(marker)] for k in sd if k.endswith("." + marker)}):
        if method == "compressed-tensors":
            (group,) = qc["config_groups"].values()  # make_checkpoints writes one group
            w = ct_weight(sd, pre, group["weights"])
            sd.pop(pre + "input_scale", None)
        elif method == "gptq":
            w = gptq_weight(sd, pre, qc["bits"])
        else:
            w = awq_weight(sd, pre, qc["group_size"])
        out[pre + "weight"] = w
    out.update({k: v.float() for k, v in sd.items()})  # norms, embeddings, biases, lm_head
    return out


def dequantize_checkpoint(src: str, dst: str) -> str:
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    config["dtype"] = "float32"
    sd = dequantize_state_dict(load_file(src / "model.safetensors"), qc)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "chat_template")):
            shutil.copy(f, dst / f.name)
    return str(dst)


if __name__ == "__main__":
    dequantize_checkpoint(sys.argv[1], sys.argv[2])
