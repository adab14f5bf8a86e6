"""Multi-LoRA overhead on CPU: 32 requests spread over 4 adapters of rank 16 against the same 32 on the base model,
in one run, on the embedded SmolLM2-135M (or `--model DIR`).

The adapters are made here with PEFT (all seven projections, rank 16, alpha 32, random non-zero B), so the
script needs `pip install peft`. Every request generates exactly 48 tokens from a prompt of 20-100 random token
ids; greedy. Prints output tok/s for both and the overhead in percent, and writes JSON with `--json`.

    python bench/lora.py --json bench/results/cpu-lora-smollm2.json
"""
import argparse
import random
import tempfile
import time

import torch

from benchlib import print_table, write_json


def make_adapters(model_dir: str, root: str, count: int, rank: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.01)
        peft.save_pretrained(f"{root}/adapter{i}")
        paths.append(f"{root}/adapter{i}")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    from nanoserve import LLM, LoRARequest, SamplingParams
    from nanoserve.default_model import resolve_model
    args.model = resolve_model(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(20, 100))] for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        paths = make_adapters(args.model, root, args.adapters, args.rank)
        llm = LLM(args.model, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank, max_num_seqs=32)
        loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(paths)]
        llm.generate(prompts[:4], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=loras)  # warm-up, load
        rows = []
        for label, choice in (("base", [None] * 32), (f"{args.adapters} adapters, rank {args.rank}",
                                                      [loras[i % len(loras)] for i in range(32)])):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False, lora_request=choice)
            seconds = time.perf_counter() - start
            rows.append({"requests": label, "seconds": seconds, "output_tok_s": 32 * 48 / seconds})
    overhead = rows[0]["output_tok_s"] / rows[1]["output_tok_s"] - 1
    rows[1]["overhead"] = overhead
    print_table(["requests", "seconds", "output tok/s", "overhead"],
                [[r["requests"], r["seconds"], r["output_tok_s"], r.get("overhead")] for r in rows],
                title=f"LoRA on CPU, {args.model.rsplit('/', 1)[-1]}: 32 requests, 48 new tokens each")
    write_json(args.json, "lora", args, rows)


if __name__ == "__main__":
    main()
