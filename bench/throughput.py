"""Offline throughput: nanoserve against Hugging Face transformers on the same model and workload, in one run.

Workload: `--num-requests` prompts of random token ids with lengths uniform in [--min-input, --max-input], each
generating exactly `--output-len` tokens (`ignore_eos`), all submitted at once. Peers:
- nanoserve `LLM.generate` (continuous batching, paged KV cache, up to `--max-num-seqs` sequences per step);
- transformers `generate_batch` (its own continuous batching over a paged cache);
- transformers `generate` on left-padded batches of `--max-num-seqs` prompts.
Each engine gets one small warm-up call first. Prints a table of output tokens/s; `--json` saves the rows.

    python bench/throughput.py                      # embedded SmolLM2-135M on CPU
    python bench/throughput.py --model DIR --num-requests 128 --max-num-seqs 64
"""
import argparse
import json
import random
import time

import torch


def make_workload(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    high = min(vocab_size, 10000)
    return [[rng.randrange(100, high) for _ in range(rng.randint(args.min_input, args.max_input))]
            for _ in range(args.num_requests)]


def run_nanoserve(args, prompts):
    from nanoserve import LLM, SamplingParams
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              device=args.device, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed


def load_hf(args, model_dir, attn_implementation):
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if args.dtype in ("auto", "float32") and args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(args.device).eval()


def run_hf_generate_batch(args, model_dir, prompts):
    from transformers import GenerationConfig
    model = load_hf(args, model_dir, "paged|sdpa")
    config = GenerationConfig(max_new_tokens=args.output_len, do_sample=args.temperature > 0,
                              temperature=args.temperature or None, eos_token_id=-1, pad_token_id=0,
                              max_batch_tokens=args.max_num_batched_tokens)
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0), progress_bar=False)
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=not args.quiet)
    elapsed = time.perf_counter() - start
    return sum(len(r.generated_tokens) for r in results.values()), elapsed


@torch.inference_mode()
def run_hf_generate(args, model_dir, prompts):
    model = load_hf(args, model_dir, "sdpa")
    generated, elapsed = 0, 0.0
    batches = [prompts[i:i + args.max_num_seqs] for i in range(0, len(prompts), args.max_num_seqs)]
    for warmup, batch in [(True, prompts[:2])] + [(False, b) for b in batches]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4 if warmup else args.output_len,
                             min_new_tokens=4 if warmup else args.output_len, do_sample=args.temperature > 0,
                             temperature=args.temperature or None, top_p=None, top_k=None, pad_token_id=0)
        if not warmup:
            elapsed += time.perf_counter() - start
            generated += (out.shape[1] - width) * len(batch)
    return generated, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-input", type=int, default=32)
    parser.add_argument("--max-input", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--peers", default="nanoserve,hf-generate-batch,hf-generate",
                        help="comma-separated subset of nanoserve, hf-generate-batch, hf-generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result rows to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    from nanoserve.default_model import resolve_model
    from transformers import AutoConfig
    model_dir = resolve_model(args.model)
    args.model = model_dir
    prompts = make_workload(args, AutoConfig.from_pretrained(model_dir).vocab_size)
    runners = {"nanoserve": lambda: run_nanoserve(args, prompts),
               "hf-generate-batch": lambda: run_hf_generate_batch(args, model_dir, prompts),
               "hf-generate": lambda: run_hf_generate(args, model_dir, prompts)}
    rows = []
    for name in args.peers.split(","):
        tokens, seconds = runners[name]()
        rows.append({"engine": name, "output_tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1)})
    print_table(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)


def print_table(args, rows):
    print(f"\n{args.num_requests} requests, input {args.min_input}-{args.max_input} tokens, output "
          f"{args.output_len} tokens, max_num_seqs {args.max_num_seqs}, device {args.device}, torch {torch.__version__}")
    base = next((r["tokens_per_s"] for r in rows if r["engine"] == "nanoserve"), None)
    print(f"| {'engine':<18} | {'output tokens':>13} | {'seconds':>8} | {'output tok/s':>12} | {'nanoserve is':>12} |")
    print(f"|{'-' * 20}|{'-' * 15}:|{'-' * 9}:|{'-' * 13}:|{'-' * 13}:|")
    for r in rows:
        ratio = f"{base / r['tokens_per_s']:.1f}x" if base else "-"
        print(f"| {r['engine']:<18} | {r['output_tokens']:>13} | {r['seconds']:>8} | {r['tokens_per_s']:>12} | {ratio:>12} |")


if __name__ == "__main__":
    main()
