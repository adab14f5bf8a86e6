"""The three ways to add a multi-LoRA delta to one layer, timed on the same tensors (docs/lora.md says which
nanoserve uses where): segmented (one matmul pair per slot present, nanoserve's eager form), gathered (a per-token
A and B, then bmm) and masked (every slot's A at once, each token keeps its own slot's columns: nanoserve's form
under torch.compile and CUDA graphs). Each is checked equal to the segmented one first.

    python bench/lora_forms.py            # SmolLM2-135M's qkv layer, 4 adapters of rank 16 on q, k and v
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import mean_us, print_table  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--width", type=int, default=48, help="a slot's columns: shards x rank (q, k, v x 16)")
    parser.add_argument("--shape", default="576,1728", help="in,out features of the layer")
    parser.add_argument("--tokens", default="32,512")
    args = parser.parse_args()
    n_in, n_out = map(int, args.shape.split(","))
    torch.manual_seed(0)
    a, b = torch.randn(args.slots * args.width, n_in), torch.randn(n_out, args.slots * args.width)
    weight, column_slot = torch.randn(n_out, n_in), torch.arange(args.slots).repeat_interleave(args.width)
    a3, b3 = a.view(args.slots, args.width, n_in), b.view(n_out, args.slots, args.width).permute(1, 0, 2).contiguous()
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        x, out, slots = torch.randn(tokens, n_in), torch.zeros(tokens, n_out), torch.arange(tokens) % args.slots
        groups = [(s, (slots == s).nonzero().squeeze(1)) for s in slots.unique().tolist()]

        def segmented():
            o = out
            for s, index in groups:
                cols = slice(s * args.width, (s + 1) * args.width)
                o = o.index_add(0, index, (x[index] @ a[cols].t()) @ b[:, cols].t())
            return o

        def gathered():
            return out + torch.bmm(torch.bmm(x[:, None], a3[slots].transpose(1, 2)), b3[slots].transpose(1, 2))[:, 0]

        def masked():
            return out + ((x @ a.t()) * (slots[:, None] == column_slot[None, :]).to(x.dtype)) @ b.t()

        for form in (gathered, masked):
            torch.testing.assert_close(form(), segmented(), atol=1e-2, rtol=1e-4)
        rows.append([tokens, mean_us(segmented, 200), mean_us(gathered, 200), mean_us(masked, 200),
                     mean_us(lambda: torch.nn.functional.linear(x, weight), 200)])
    print_table(["tokens", "segmented us", "gathered us", "masked us", "the layer's own matmul us"], rows,
                title=f"LoRA delta forms, {args.slots} slots of {args.width} columns, layer {n_in} -> {n_out}, "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
