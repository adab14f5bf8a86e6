"""Write tiny random quantized checkpoints with the formats' own tools.

    python make_checkpoints.py OUT_DIR [--archs llama,qwen2,qwen3,qwen3_moe] [--only SUBSTR,...]

For each arch it first writes OUT_DIR/<arch>-base (the fp32 model from
tests/conftest.py `make_tiny_model`: hidden 64, 2 layers, 4 heads, 2 kv heads,
head_dim 16) and then one directory per variant, OUT_DIR/<arch>-<variant>, each
with config.json (incl. quantization_config), model.safetensors, tokenizer
files and generation_config.json:

  compressed-tensors, written by llm-compressor (`oneshot` + save_compressed):
    ct-w4a16-g32-sym / -g32-asym / -ch-sym / -ch-asym   pack-quantized int4
    ct-w8a16-ch-sym                                      pack-quantized int8
    ct-gptq-w4a16-g32-sym     pack-quantized, GPTQModifier (random-token calibration)
    ct-w8a8-int               int-quantized: int8 per-channel W, dynamic per-token int8 A
    ct-fp8-dynamic            float-quantized: fp8 per-channel W, dynamic per-token A
    ct-fp8-dynamic-tensor     float-quantized: fp8 per-tensor W, dynamic per-token A
    ct-fp8-static             float-quantized: fp8 per-tensor W + static per-tensor input_scale
  GPTQ / AWQ, written by GPTQModel (fp16 model, fp16 scales):
    gptq-w4-g32-sym / -g32-asym / -g32-sym-descact / gptq-w8-g32-sym   (quant_method "gptq")
    awq-w4-g32                AWQ GEMM layout, zero_point true (quant_method "awq").
      AWQ's clip search needs out_features % 64 == 0, so the AWQ variant is
      built from <arch>-base-hd32 (head_dim 32: k/v_proj have 64 outputs).
  Every source model is fp32 with weights ~N(0, 0.3); lm_head and embeddings
  are never quantized.

Tool versions this was written and run with (CPU only, ~1-2 min for all archs):
  python3.11 -m venv venv && . venv/bin/activate
  pip install torch==2.13.0 llmcompressor==0.14.0.1 gptqmodel==7.6.0 pytest
  (pulls transformers 5.17.0 -- llmcompressor 0.14 pins transformers<=5.17 --,
  compressed-tensors 0.19.0, datasets 5.2.0; gptqmodel 7.7 needs torch>=2.14.1.)
GPTQModel on a 2-core machine needs GPTQMODEL_CPU_WORKERS=2 (set below).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # default pool is too small on 2 cores

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest
from conftest import make_tiny_model  # noqa: E402

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json"]


def calib_rows(n=16, seq=32, vocab=800, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (seq,), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------- compressed-tensors
def ct_variants():
    from compressed_tensors.quantization import QuantizationArgs as A
    int_w = lambda bits, sym, gs=None: A(num_bits=bits, type="int", symmetric=sym,  # noqa: E731
                                         strategy="group" if gs else "channel", group_size=gs)
    fp8_tok = A(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    return {  # name: (modifier, scheme: preset name or dict of QuantizationArgs)
        "ct-w4a16-g32-sym": ("rtn", {"weights": int_w(4, True, 32)}),
        "ct-w4a16-g32-asym": ("rtn", {"weights": int_w(4, False, 32)}),
        "ct-w4a16-ch-sym": ("rtn", {"weights": int_w(4, True)}),
        "ct-w4a16-ch-asym": ("rtn", {"weights": int_w(4, False)}),
        "ct-w8a16-ch-sym": ("rtn", {"weights": int_w(8, True)}),
        "ct-gptq-w4a16-g32-sym": ("gptq", {"weights": int_w(4, True, 32)}),
        "ct-w8a8-int": ("rtn", "W8A8"),
        "ct-fp8-dynamic": ("rtn", "FP8_DYNAMIC"),
        "ct-fp8-dynamic-tensor": ("rtn", {
            "weights": A(num_bits=8, type="float", symmetric=True, strategy="tensor"),
            "input_activations": fp8_tok}),
        "ct-fp8-static": ("calib", "FP8"),
    }


def write_ct(base: str, out: str, kind: str, scheme) -> None:
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if isinstance(scheme, str):
        kw = dict(targets="Linear", scheme=scheme, ignore=["lm_head"])
    else:
        kw = dict(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
                  ignore=["lm_head"])
    if kind == "rtn":  # data-free: weights only, activations dynamic
        oneshot(model=model, recipe=QuantizationModifier(**kw))
    else:
        rows = calib_rows()
        ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
        mod = GPTQModifier(**kw) if kind == "gptq" else QuantizationModifier(**kw)
        oneshot(model=model, recipe=mod, dataset=ds, num_calibration_samples=len(rows),
                max_seq_length=32)
    model.save_pretrained(out, save_compressed=True)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(base, f), Path(out, f))


# ---------------------------------------------------------------- GPTQ / AWQ (GPTQModel)
GPTQMODEL_VARIANTS = {
    "gptq-w4-g32-sym": dict(bits=4, group_size=32, sym=True, desc_act=False),
    "gptq-w4-g32-asym": dict(bits=4, group_size=32, sym=False, desc_act=False),
    "gptq-w4-g32-sym-descact": dict(bits=4, group_size=32, sym=True, desc_act=True),
    "gptq-w8-g32-sym": dict(bits=8, group_size=32, sym=True, desc_act=False),
    "awq-w4-g32": dict(bits=4, group_size=32, sym=False, method="awq", format="gemm"),
}


def write_gptqmodel(base: str, out: str, cfg: dict) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.long)}
             for r in calib_rows()]
    model = GPTQModel.load(base, QuantizeConfig(**cfg), device="cpu", dtype=torch.float16)
    # AWQ's default (CUDA) kernel refuses CPU; its pure-torch one packs the same GEMM layout.
    model.quantize(calib, batch_size=1, **({"backend": "awq_torch"} if cfg.get("method") == "awq" else {}))
    model.save(out)
    for f in TOKENIZER_FILES:  # GPTQModel writes these too; make sure they match the base
        shutil.copy(Path(base, f), Path(out, f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--archs", default="llama,qwen2,qwen3")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    want = lambda name: not only or any(s in name for s in only)  # noqa: E731
    out_root = Path(args.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    failures = []
    for arch in args.archs.split(","):
        base = make_tiny_model(out_root / f"{arch}-base", arch)
        jobs = [(n, base, lambda b, o, v=v: write_ct(b, o, *v)) for n, v in ct_variants().items()]
        for n, cfg in GPTQMODEL_VARIANTS.items():
            b = base
            if n.startswith("awq") and want(n):
                b = make_tiny_model(out_root / f"{arch}-base-hd32", arch, head_dim=32)
            jobs.append((n, b, lambda b, o, cfg=cfg: write_gptqmodel(b, o, cfg)))
        for name, b, fn in jobs:
            if not want(name):
                continue
            out = str(out_root / f"{arch}-{name}")
            t = time.time()
            try:
                fn(b, out)
                print(f"OK   {arch}-{name} ({time.time() - t:.1f}s)", flush=True)
            except Exception as e:  # keep going: report every variant that fails
                failures.append(f"{arch}-{name}: {type(e).__name__}: {e}")
                print(f"FAIL {failures[-1]}", flush=True)
    if failures:
        sys.exit("failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
