"""Speculative decoding at batch size 1 on CPU: plain decoding, n-gram speculation and a draft model, in one run.

Task: the chat model is asked to fix the one misspelled word in a ~150-word passage and write the passage out
again (greedy, `--max-tokens` 200), so its output mostly copies its prompt, which is what prompt lookup (n-gram
speculation) predicts. The draft model is a
layer-truncated copy of the target: its first `--draft-layers` layers, the final norm and the tied head, built once
into the cache. Each method gets a short warm-up generation first. Greedy speculation is lossless, so every output
must equal the plain output token for token (the last column). Prints a table; `--json` saves the rows.

    python bench/speculative.py                    # embedded SmolLM2-135M-Instruct, CPU
    python bench/speculative.py --num-speculative-tokens 4 --draft-layers 8 --json spec.json
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

PASSAGE = (  # one misspelled word: "polisshed"
    "The lighthouse stood at the edge of the northern cliffs for more than two hundred years. Every evening the "
    "keeper climbed the narrow stairs, trimmed the wick, polisshed the great lens and watched the beam sweep across "
    "the dark water. Fishing boats returning late followed that light home, and sailors far from shore counted its "
    "flashes to learn where they were. In winter the storms were so strong that waves broke over the rocks and salt "
    "covered the windows, yet the lamp never went out. When electricity finally reached the village, engineers "
    "replaced the old flame with a bright electric bulb and a small motor that turned the lens without help. The "
    "last keeper left his cottage, but he still walked up the hill each night to see the beam. Today the "
    "lighthouse is a museum, and children climb the same stairs to look out over the sea that it protected."
)


def build_draft(model_dir: str, num_layers: int) -> str:
    """A copy of the model with only its first `num_layers` layers (the same tokenizer, norm and tied head)."""
    from safetensors.torch import load_file, save_file
    root = Path(os.environ.get("NANOSERVE_CACHE") or "~/.cache/nanoserve").expanduser()
    target = root / f"{Path(model_dir).name.lower()}-draft-L{num_layers}"
    if (target / "model.safetensors").is_file():
        return str(target)
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config.get("tie_word_embeddings"), "the truncated copy reuses the embedding as its head"
    config["num_hidden_layers"] = num_layers
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"]:
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, target / name)
    keep = lambda key: not key.startswith("model.layers.") or int(key.split(".")[2]) < num_layers  # noqa: E731
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if keep(k)}, str(target / "model.safetensors.tmp"),
              metadata={"format": "pt"})
    os.replace(target / "model.safetensors.tmp", target / "model.safetensors")  # written last: marks it complete
    return str(target)


def run(model_dir, spec, messages, args):
    from nanoserve import LLM, SamplingParams
    llm = LLM(model_dir, max_num_seqs=1, max_model_len=2048, speculative_config=spec, seed=0)
    llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=8),
             use_tqdm=False)  # warm-up
    before = llm.engine.stats()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    seconds = time.perf_counter() - start
    s = {k: v - before[k] for k, v in llm.engine.stats().items() if k.startswith("spec_decode_num")}
    return out, seconds, s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-k", type=int, default=None, help="draft model's k (default: --num-speculative-tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="save the rows to this file")
    args = parser.parse_args()

    import torch
    from nanoserve.default_model import resolve_model
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    draft_dir = build_draft(model_dir, args.draft_layers)
    messages = [{"role": "user", "content": "Fix the spelling mistake in this passage and write out the whole "
                                           f"corrected passage:\n\n{PASSAGE}"}]
    k = args.num_speculative_tokens
    methods = [
        ("plain", None),
        (f"ngram k={k}", {"method": "ngram", "num_speculative_tokens": k,
                          "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}),
        (f"draft L{args.draft_layers} k={args.draft_k or k}",
         {"model": draft_dir, "num_speculative_tokens": args.draft_k or k}),
    ]
    rows, plain = [], None
    for name, spec in methods:
        out, seconds, s = run(model_dir, spec, messages, args)
        plain = plain or out
        tokens = len(out.token_ids)
        rows.append({
            "method": name, "output_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2),
            "speedup": round(rows[0]["seconds"] / seconds, 2) if rows else 1.0,
            "acceptance_rate": round(s["spec_decode_num_accepted_tokens"] / s["spec_decode_num_draft_tokens"], 3)
            if s["spec_decode_num_draft_tokens"] else None,
            "mean_accepted_per_step": round(s["spec_decode_num_accepted_tokens"] / s["spec_decode_num_drafts"], 2)
            if s["spec_decode_num_drafts"] else None,
            "same_as_plain": out.token_ids == plain.token_ids,
        })
        print(f"{name}: {tokens} tokens in {seconds:.2f} s", flush=True)

    print(f"\nmodel {model_dir}, batch size 1, greedy, max_tokens {args.max_tokens}, torch threads "
          f"{torch.get_num_threads()}\noutput starts: {plain.text[:100]!r}\n")
    header = ["method", "output tokens", "seconds", "tokens/s", "speedup", "acceptance", "accepted/step", "same"]
    table = [[r["method"], r["output_tokens"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}",
              f"{r['speedup']:.2f}x", "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}",
              "-" if r["mean_accepted_per_step"] is None else f"{r['mean_accepted_per_step']:.2f}",
              "yes" if r["same_as_plain"] else "NO"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in [header, ["-" * w for w in widths]] + table:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not all(r["same_as_plain"] for r in rows):
        raise SystemExit("speculative output differs from plain output: speculation must be lossless")


if __name__ == "__main__":
    main()
