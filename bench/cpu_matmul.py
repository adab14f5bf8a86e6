"""CPU matmul kernels at decode sizes: torch's `F.linear` against OpenBLAS (numpy), which nanoserve/linear.py uses.

What is measured: `y = x @ W.T` in float32 for each projection shape of SmolLM2-135M (30 layers' worth of distinct
weights, cycled, so that the small ones do not sit in cache) at M = 1, 4 and 32 rows, as GB/s of weight bytes read
(best of `--repeat` timings), next to the machine's read bandwidth (`x.sum()` over 1 GiB) in the same process.
torch runs on its default thread count, numpy on OpenBLAS's.

    python bench/cpu_matmul.py [--json PATH]
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import print_table, write_json

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def best_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    big = torch.randn(2**28)
    read_bw = big.numel() * 4 / best_seconds(big.sum, 5) / 1e9
    del big
    rows = []
    for m in (1, 4, 32):
        for name, (out, inp) in SHAPES.items():
            weights = [torch.randn(out, inp) for _ in range(1 if name == "lm_head" else 30)]
            arrays = [w.numpy() for w in weights]
            x = torch.randn(m, inp)
            nbytes = sum(w.numel() * 4 for w in weights)
            torch_s = best_seconds(lambda: [F.linear(x, w) for w in weights], args.repeat)
            blas_s = best_seconds(lambda: [np.matmul(x.numpy(), a.T) for a in arrays], args.repeat)
            rows.append({"m": m, "weight": name, "shape": f"{out}x{inp}", "torch_gb_s": nbytes / torch_s / 1e9,
                         "openblas_gb_s": nbytes / blas_s / 1e9, "speedup": torch_s / blas_s})
    print(f"read bandwidth (x.sum over 1 GiB): {read_bw:.1f} GB/s; torch threads {torch.get_num_threads()}")
    print_table(["M", "weight", "shape", "torch F.linear GB/s", "OpenBLAS GB/s", "OpenBLAS is"],
                [[r["m"], r["weight"], r["shape"], r["torch_gb_s"], r["openblas_gb_s"], f"{r['speedup']:.2f}x"]
                 for r in rows])
    write_json(args.json, "cpu_matmul", args, [{"kind": "read_bandwidth", "gb_s": read_bw}] + rows)


if __name__ == "__main__":
    main()
