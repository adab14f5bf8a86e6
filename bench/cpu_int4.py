"""torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, the one issue 12 names for 4-bit checkpoints) against
a float32 matmul of the same dequantized weights, per activation dtype: is it worth packing 4-bit checkpoints for
it on a CPU? Asymmetric int4 per group of 64, the tinygemm convention (w = (q - 8) * scale + zero).

    python bench/cpu_int4.py              # SmolLM2-135M's gate_up layer, 576 -> 3072
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import mean_us, print_table  # noqa: E402



def quantize(w: torch.Tensor, group: int):
    """int4 codes [N, K], scales and float zeros [K / group, N], and the dequantized weight."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    zero_point = torch.round(-low / scale).clamp(0, 15)
    q = (torch.round(g / scale) + zero_point).clamp(0, 15)
    dequantized = ((q - zero_point) * scale).view(n, k)
    zeros = (8 - zero_point) * scale  # (q - zp) * s == (q - 8) * s + (8 - zp) * s
    return q.to(torch.int32).view(n, k), scale.view(n, -1).t().contiguous(), zeros.view(n, -1).t().contiguous(), dequantized


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="576,3072", help="in,out features")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--rows", default="1,32")
    args = parser.parse_args()
    k, n = map(int, args.shape.split(","))
    torch.manual_seed(0)
    q, scale, zeros, dequantized = quantize(torch.randn(n, k), args.group)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        scales_and_zeros = torch.stack([scale, zeros], dim=-1).to(dtype)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k)
            xd = x.to(dtype)
            int4 = mean_us(lambda: torch._weight_int4pack_mm_for_cpu(xd, packed, args.group, scales_and_zeros))
            fp32 = mean_us(lambda: x @ dequantized.t())
            error = (torch._weight_int4pack_mm_for_cpu(xd, packed, args.group, scales_and_zeros).float()
                     - x @ dequantized.t()).abs().max().item()
            rows.append([str(dtype).removeprefix("torch."), m, int4, fp32, f"{fp32 / int4:.2f}x", error])
    print_table(["activations", "rows", "int4 kernel us", "fp32 matmul us", "int4 speed", "max |error|"], rows,
                title=f"CPU int4 ({k} -> {n}, groups of {args.group}), torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
