"""One decode step's matmuls of SmolLM2-135M at batch 1 (30 layers x qkv, o, gate_up, down, then lm_head; the
weights are 538 MB in float32, 135 MB in int8, so they stream from memory as in the engine), on each CPU kernel
that could run weight-only int8: is there one that beats float32, which issue 12's int8 target needs?

    python bench/cpu_int8.py

- fp32 OpenBLAS: what the engine runs for float32 (numpy's matmul on the same memory, linear.py);
- int8 `_weight_int8pack_mm`: torch's weight-only int8 kernel, what `--quantization int8` runs at one row;
- int8 Inductor: torch.compile's own C++ code for a fused dequantize-and-reduce GEMV, weights kept as int32
  words of four int8 values (read whole, unpacked with shifts; an int8 tensor gets 8-byte partial loads).
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import print_table  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # [out, in]


def pack_words(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int32 [N, K/4]: byte j of word k holds column j*K/4 + k."""
    n, k = q.shape
    b = q.view(n, 4, k // 4).to(torch.int32) & 0xFF
    return (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)).contiguous()


@torch.compile(dynamic=False)
def inductor_gemv(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xs = x.view(x.shape[0], 4, words.shape[1])
    out = sum((xs[:, j, None, :] * ((words << (24 - 8 * j)) >> 24).float()).sum(-1) for j in range(4))
    return out * scale


def step_ms(fn, layers, x_of, repeats: int = 5) -> float:
    fn(layers[0], x_of(layers[0]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            fn(layer, x_of(layer))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    torch.manual_seed(0)
    inputs = {k: torch.randn(1, k) for k in {k for _, k in SHAPES}}
    fp32 = [torch.randn(n, k) for n, k in SHAPES]
    scales = [w.abs().amax(1) / 127 for w in fp32]
    int8 = [torch.round(w / s[:, None]).to(torch.int8) for w, s in zip(fp32, scales)]
    words = [pack_words(q) for q in int8]
    fp32_bytes, int8_bytes = sum(w.numel() * 4 for w in fp32), sum(q.numel() for q in int8)
    for i, (q, s) in enumerate(zip(int8[:5], scales[:5])):  # every kernel computes the same product
        x = inputs[q.shape[1]]
        want = x @ (q.float() * s[:, None]).t()
        assert torch.allclose(inductor_gemv(x, words[i], s), want, atol=1e-3)
        assert torch.allclose(torch.ops.aten._weight_int8pack_mm(x, q, s), want, atol=1e-3)
    blas = step_ms(lambda w, x: np.matmul(x, w.T), [w.numpy() for w in fp32], lambda w: inputs[w.shape[1]].numpy())
    pack = step_ms(lambda i, x: torch.ops.aten._weight_int8pack_mm(x, int8[i], scales[i]), range(len(SHAPES)),
                   lambda i: inputs[SHAPES[i][1]])
    fused = step_ms(lambda i, x: inductor_gemv(x, words[i], scales[i]), range(len(SHAPES)),
                    lambda i: inputs[SHAPES[i][1]])
    rows = [["fp32 OpenBLAS", fp32_bytes / 1e6, blas, fp32_bytes / blas / 1e6, "1.00x"]]
    for name, ms in [("int8 _weight_int8pack_mm", pack), ("int8 Inductor fused GEMV", fused)]:
        rows.append([name, int8_bytes / 1e6, ms, int8_bytes / ms / 1e6, f"{blas / ms:.2f}x"])
    print_table(["kernel", "MB read", "ms per step", "GB/s", "speed vs fp32"], rows,
                title=f"SmolLM2-135M decode-step matmuls at batch 1, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
