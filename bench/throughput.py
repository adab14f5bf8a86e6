"""Offline throughput: nanoserve against Hugging Face transformers on the same model and workload.

Workload: `--num-requests` prompts of random token ids, input lengths uniform in [--min-input, --max-input] and
output lengths uniform in [--min-output, --max-output] (drawn per request; `--output-len N` fixes both), every
output generated to its full length (`ignore_eos`), all submitted at once. Peers:
- nanoserve `LLM.generate` (continuous batching, paged KV cache, up to `--max-num-seqs` sequences per step);
- transformers continuous batching (`generate_batch`'s manager, paged cache, "paged|sdpa" attention), each
  request with its own `max_new_tokens`;
- transformers `generate` on left-padded batches of `--hf-batch-size` prompts; a batch runs until its longest
  output is done, and only the requested tokens count as output.
Each engine gets one small warm-up first (on prompts unrelated to the workload); start-up is not timed.
nanoserve's prefix cache is off unless `--prefix-caching`: no two prompts share a prefix, and a cache would only
replay prompts an earlier run in the process computed. transformers is slow, so `--hf-num-requests K`
gives it the first K requests only, and nanoserve runs those K as well: the speed ratio compares identical
workloads (same requests, same fingerprint).

Two ways to name the model:
- `--model DIR` (default: the embedded SmolLM2-135M): real weights and tokenizer;
- `--shape {qwen3-0.6b,llama-3.1-8b,mixtral-8x7b,qwen3-30b-a3b,tiny,tiny-moe}`: a config.json only, random
  weights (nanoserve `load_format="dummy"`, transformers `from_config`), token ids only. With a shape the defaults
  are the offline protocol: 256 requests, input and output lengths in [100, 1024], temperature 0.6,
  max_num_seqs 256.

Next to nanoserve's rate it prints the byte model of the run: each step with decodes reads all weights once
(steps counted in the engine) and each decode reads its sequence's whole K/V context (summed exactly from the
workload), over the device-to-device copy bandwidth measured in the same process: the memory-bound floor. Of a
mixture of experts a step counts only the top_k experts one token is routed to (the batch-1 read), so for a batch
the floor is a lower bound. `--dry-run` prints the weight bytes of one step and stops: the model is built on the
meta device (no memory, no weights), so it works for shapes far larger than the machine.

    python bench/throughput.py                                   # embedded SmolLM2-135M, CPU
    python bench/throughput.py --shape qwen3-0.6b --hf-num-requests 32 --json qwen.json     # GPU
    python bench/throughput.py --shape tiny --device cpu --num-requests 8 --min-input 8 --max-input 32 \\
        --min-output 8 --max-output 32                           # CPU smoke test of every path
    python bench/throughput.py --shape mixtral-8x7b --dry-run    # weight bytes per decode step, nothing run
"""
import argparse
import contextlib
import gc
import random
import time

import torch

from benchlib import (SHAPES, StepCounter, copy_bandwidth, decode_context_tokens, fingerprint, kv_bytes_per_token,
                      log_engine_info, make_shape_dir, print_table, sync, weight_bytes_per_step, write_json)

PROTOCOL = dict(num_requests=256, min_input=100, max_input=1024, min_output=100, max_output=1024,
                max_num_seqs=256, temperature=0.6)
MODEL_DEFAULTS = dict(num_requests=64, min_input=32, max_input=256, min_output=64, max_output=64,
                      max_num_seqs=64, temperature=0.0)


class Workload:
    """Prompts (token ids) and the output length each request must reach; `head(k)` is its first k requests."""

    def __init__(self, prompts: list[list[int]], output_lens: list[int], model: str):
        self.prompts, self.output_lens, self.model = prompts, output_lens, model
        self.input_lens = [len(p) for p in prompts]
        self.id = fingerprint(prompts, output_lens)

    @classmethod
    def random(cls, args, vocab_size: int) -> "Workload":
        rng = random.Random(args.seed)
        # Real checkpoints: skip the low ids, where special tokens live. Random weights: any id will do.
        low, high = (0, vocab_size) if args.shape else (100, min(vocab_size, 10000))
        prompts, outputs = [], []
        for _ in range(args.num_requests):
            prompts.append([rng.randrange(low, high) for _ in range(rng.randint(args.min_input, args.max_input))])
            outputs.append(rng.randint(args.min_output, args.max_output))
        return cls(prompts, outputs, args.shape or args.model)

    def head(self, k: int) -> "Workload":
        return Workload(self.prompts[:k], self.output_lens[:k], self.model)

    def warmup_prompts(self, k: int) -> list[list[int]]:
        """Prompts for a warm-up that share no prefix with the workload's (reversed), so that no engine's prefix
        cache holds any of the timed prompts."""
        return [p[::-1] for p in self.prompts[:k]]

    def __len__(self):
        return len(self.prompts)


def row(engine: str, work: Workload, seconds: float, output_tokens: int, **extra) -> dict:
    return {"kind": "offline", "engine": engine, "model": work.model, "requests": len(work), "workload": work.id,
            "input_tokens": sum(work.input_lens), "output_tokens": output_tokens, "seconds": round(seconds, 3),
            "output_tokens_per_s": output_tokens / seconds,
            "total_tokens_per_s": (sum(work.input_lens) + output_tokens) / seconds, **extra}


# ---------------------------------------------------------------------------------------------------------------
# nanoserve
# ---------------------------------------------------------------------------------------------------------------

def build_nanoserve(args, model_dir, tensor_parallel_size: int = 1):
    from nanoserve import LLM
    kwargs = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  tensor_parallel_size=tensor_parallel_size,
                  device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=args.prefix_caching)
    if args.shape:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    start = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    return llm, time.perf_counter() - start


def run_nanoserve(args, llm, work: Workload, bandwidth: dict | None) -> dict:
    from nanoserve import SamplingParams
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    preempted = llm.engine.scheduler.num_preemptions
    counter = StepCounter(llm.engine)
    tp = llm.engine.runner.tp.size
    sync(args.device)
    with CommunicationTimer() if tp > 1 else contextlib.nullcontext() as comm:
        start = time.perf_counter()
        outputs = llm.generate(work.prompts, params, use_tqdm=not args.quiet)
        sync(args.device)
        seconds = time.perf_counter() - start
    counts = counter.close()
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    extra = dict(counts, preemptions=llm.engine.scheduler.num_preemptions - preempted,
                 complete=lengths == work.output_lens, tensor_parallel_size=tp)
    if comm is not None:
        extra.update(comm.summary(counts["steps"]))
    extra.update(byte_model(llm, work, counts, seconds, bandwidth))
    return row("nanoserve" if tp == 1 else f"nanoserve-tp{tp}", work, seconds, sum(lengths), **extra)


class CommunicationTimer:
    """Rank 0's time inside torch.distributed calls (the step broadcast, all-reduces, the logits gather): what
    tensor parallelism adds to a step, waiting for the slower rank included. The workers are other processes
    and are not patched."""
    CALLS = ("broadcast_object_list", "all_reduce", "all_gather")

    def __enter__(self):
        import torch.distributed as dist
        self.seconds, self.calls, self.saved = {}, {}, {name: getattr(dist, name) for name in self.CALLS}
        for name, fn in self.saved.items():
            setattr(dist, name, self._timed(name, fn))
        return self

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1
        return call

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def summary(self, steps: int) -> dict:
        total = sum(self.seconds.values())
        return {"comm_s": total, "comm_ms_per_step": 1e3 * total / max(steps, 1),
                "comm_calls_per_step": sum(self.calls.values()) / max(steps, 1),
                **{f"comm_{name}_s": t for name, t in self.seconds.items()}}


def byte_model(llm, work: Workload, counts: dict, seconds: float, bandwidth: dict | None) -> dict:
    """Bytes the run must move: weights once per step that decodes, plus each decode's whole K/V context."""
    runner = llm.engine.runner
    # Rank 0's share times the ranks: the whole model (under TP the norms, copied on every rank, count N times).
    weights = weight_bytes_per_step(runner.model, runner.hf_config) * runner.tp.size
    per_token = kv_bytes_per_token(runner.hf_config, runner.dtype)
    context = decode_context_tokens(work.input_lens, work.output_lens)
    total = weights * counts["decode_steps"] + per_token * context
    model = {"weight_bytes": weights, "kv_bytes_per_token": per_token, "workload_decode_context_tokens": context,
             "bytes_model": total}
    if bandwidth:
        floor = total / bandwidth["bytes_per_s"]
        model.update(floor_s=floor, bandwidth_fraction=floor / seconds)
    return model


def dry_run(args, model_dir) -> None:
    """The byte model's weights per decode step of nanoserve's model, built with its parameters on the meta device
    (no memory used, nothing initialized; buffers such as RoPE tables stay on the CPU), in the dtype asked for
    (auto: bfloat16, as on a GPU)."""
    from transformers import AutoConfig
    from nanoserve.models import model_class
    hf = AutoConfig.from_pretrained(model_dir)
    dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):  # the CPU tensor a module allocates is dropped before anything fills it
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    previous, torch.nn.Module.register_parameter = torch.get_default_dtype(), on_meta
    torch.set_default_dtype(dtype)
    try:
        model = model_class(hf)(hf, 0, args.max_model_len or 4096)
    finally:
        torch.nn.Module.register_parameter = register
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    weights = weight_bytes_per_step(model, hf)
    print(f"{args.shape or args.model}: {params / 1e9:.3g}B parameters, {dtype}; weights read per decode step "
          f"(batch 1): {weights / 1e9:.3g} GB ({weights / dtype.itemsize / 1e9:.3g}B parameters); "
          f"K/V {kv_bytes_per_token(hf, dtype):,} bytes per token")


def warm_up_nanoserve(args, llm, work: Workload) -> None:
    from nanoserve import SamplingParams
    params = SamplingParams(temperature=args.temperature, max_tokens=16, ignore_eos=True)
    llm.generate(work.warmup_prompts(8), params, use_tqdm=False)


# ---------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------

def load_hf(args, model_dir, attn_implementation):
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = torch.float32 if args.dtype in ("auto", "float32") and args.device == "cpu" else torch.bfloat16
    if args.shape:  # random weights, built directly on the device
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(args.device).eval()


def hf_generation_config(args, max_new_tokens: int, **extra):
    """Plain temperature sampling, as nanoserve's SamplingParams(temperature=...) does: top_k=0 and top_p=1.0 switch
    off the filters (top_k left unset would get transformers' global default of 50)."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 \
        else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=0, **sampling, **extra)


def cb_attention() -> str:
    """transformers up to 5.22 runs continuous batching with SDPA as "paged|sdpa"; 5.23 deprecates the prefix
    ("sdpa" pages by itself there) but still accepts it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return "paged|sdpa" if "paged|sdpa" in ALL_ATTENTION_FUNCTIONS._global_mapping else "sdpa"


def run_hf_generate_batch(args, model_dir, work: Workload) -> dict:
    """transformers' continuous batching, through the manager that `generate_batch` uses, so that each request
    gets its own max_new_tokens. The manager's own warm-up (CUDA graph capture) and one small batch of requests
    run before the clock starts."""
    from transformers.generation.continuous_batching.utils import WorkloadHints
    model = load_hf(args, model_dir, cb_attention())
    hints = WorkloadHints(max_prompt_length=max(work.input_lens), max_generated_length=max(work.output_lens),
                          num_requests=len(work))
    config = hf_generation_config(args, max(work.output_lens), eos_token_id=-1)  # -1: no EOS, as ignore_eos
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=10,
                                                   workload_hints=hints) as manager:
        hf_collect(manager, work.warmup_prompts(2), [4, 4], "warmup")
        sync(args.device)
        start = time.perf_counter()
        tokens = hf_collect(manager, work.prompts, work.output_lens, "req")
        sync(args.device)
        seconds = time.perf_counter() - start
    return row("hf-generate-batch", work, seconds, sum(tokens), complete=tokens == work.output_lens,
               attn_implementation=model.config._attn_implementation)


def hf_collect(manager, prompts, output_lens, prefix: str) -> list[int]:
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for request_id, prompt, n in zip(ids, prompts, output_lens):
        manager.add_request(prompt, request_id=request_id, max_new_tokens=n, eos_token_id=-1)
    done = {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
            done[result.request_id] = len(result.generated_tokens)
        elif result is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching thread stopped")
    return [done[i] for i in ids]


@torch.inference_mode()
def run_hf_generate(args, model_dir, work: Workload) -> dict:
    """Padded static batches: each runs until its longest output is done (min_new_tokens stops an early EOS);
    the extra tokens of shorter requests are generated but not counted as output."""
    model = load_hf(args, model_dir, "sdpa")
    size = args.hf_batch_size or args.max_num_seqs
    batches = [list(range(i, min(i + size, len(work)))) for i in range(0, len(work), size)]
    seconds, generated = 0.0, 0
    for warmup, batch in [(True, [0, 1][:len(work)])] + [(False, b) for b in batches]:
        prompts = [work.prompts[i] for i in batch]
        new_tokens = 4 if warmup else max(work.output_lens[i] for i in batch)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)
        sync(args.device)
        start = time.perf_counter()
        config = hf_generation_config(args, new_tokens, min_new_tokens=new_tokens)
        out = model.generate(ids, attention_mask=mask, generation_config=config)
        sync(args.device)
        if not warmup:
            seconds += time.perf_counter() - start
            generated += (out.shape[1] - width) * len(batch)
    return row("hf-generate", work, seconds, sum(work.output_lens), generated_tokens=generated, batch_size=size,
               complete=generated >= sum(work.output_lens))


def free_device_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory still allocated after freeing the engine: "
              f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    model.add_argument("--shape", choices=sorted(SHAPES), help="a model shape with random weights")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--min-input", type=int)
    parser.add_argument("--max-input", type=int)
    parser.add_argument("--min-output", type=int)
    parser.add_argument("--max-output", type=int)
    parser.add_argument("--output-len", type=int, help="every request generates exactly this many tokens")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, help="default with --shape: room for the longest request")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--peers", default="nanoserve,hf-generate-batch,hf-generate",
                        help="comma-separated subset of nanoserve, hf-generate-batch, hf-generate")
    parser.add_argument("--hf-num-requests", type=int, help="transformers gets the first K requests only; "
                        "nanoserve runs them too, for the ratio on identical workloads")
    parser.add_argument("--hf-batch-size", type=int, help="batch size of padded generate (default max-num-seqs)")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    # Off by default: random prompts share no prefix, so the cache could only serve the prompts a previous run in
    # this process already computed (the scaled-down run repeats the first K), which would fake a speed-up.
    parser.add_argument("--prefix-caching", action="store_true", help="keep nanoserve's prefix cache on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result rows to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--tensor-parallel-size", default="1",
                        help="nanoserve's tensor_parallel_size; a list such as 1,2 runs one engine per size")
    parser.add_argument("--dry-run", action="store_true", help="print the weight bytes of one decode step and stop")
    args = parser.parse_args()
    defaults = PROTOCOL if args.shape else MODEL_DEFAULTS
    if args.output_len is not None:
        args.min_output = args.max_output = args.output_len
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape and args.max_model_len is None:  # the longest prompt plus the longest output, 256-aligned
        args.max_model_len = max(2048, -(-(args.max_input + args.max_output) // 256) * 256)
    return args


def main():
    args = parse_args()
    log_engine_info()
    threads = torch.get_num_threads()
    if args.shape:
        model_dir = make_shape_dir(args.shape)
    else:
        from nanoserve.default_model import resolve_model
        model_dir = resolve_model(args.model)
    args.model = model_dir
    if args.dry_run:
        return dry_run(args, model_dir)
    from transformers import AutoConfig
    work = Workload.random(args, AutoConfig.from_pretrained(model_dir).vocab_size)
    small = work.head(args.hf_num_requests) if args.hf_num_requests and args.hf_num_requests < len(work) else work
    peers = args.peers.split(",")
    rows = []
    bandwidth = None if args.no_bandwidth else copy_bandwidth(args.device)
    if bandwidth:
        rows.append(bandwidth)
        print(f"copy bandwidth (read + write): {bandwidth['bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
    for tp in ([int(n) for n in args.tensor_parallel_size.split(",")] if "nanoserve" in peers else []):
        llm, startup = build_nanoserve(args, model_dir, tp)
        warm_up_nanoserve(args, llm, work)
        for w in [work] + ([small] if small is not work else []):
            rows.append(run_nanoserve(args, llm, w, bandwidth) | {"startup_s": round(startup, 1)})
            print(f"{rows[-1]['engine']}, {len(w)} requests: {rows[-1]['output_tokens_per_s']:.0f} output tok/s",
                  flush=True)
        del llm
        gc.collect()  # ends a tensor-parallel engine's workers before the next engine starts
        free_device_memory(args.device)
    torch.set_num_threads(threads)  # nanoserve's CPU path leaves torch one thread; transformers gets its default
    for name, run in [("hf-generate-batch", run_hf_generate_batch), ("hf-generate", run_hf_generate)]:
        if name in peers:
            rows.append(run(args, model_dir, small))
            print(f"{name}, {len(small)} requests: {rows[-1]['output_tokens_per_s']:.1f} output tok/s", flush=True)
            free_device_memory(args.device)
    write_json(args.json, "throughput", args, rows)
    print_tables(args, rows)


def print_tables(args, rows: list[dict]) -> None:
    offline = [r for r in rows if r["kind"] == "offline"]
    nano = {r["workload"]: r["output_tokens_per_s"] for r in offline if r["engine"] == "nanoserve"}
    print(f"\n{args.shape or args.model}: input {args.min_input}-{args.max_input}, output {args.min_output}-"
          f"{args.max_output} tokens per request, temperature {args.temperature}, max_num_seqs {args.max_num_seqs}, "
          f"prefix caching {'on' if args.prefix_caching else 'off'}, device {args.device}, torch {torch.__version__}")
    print_table(["engine", "requests", "workload", "output tokens", "seconds", "output tok/s", "total tok/s",
                 "nanoserve is"],
                [[r["engine"], r["requests"], r["workload"], r["output_tokens"], r["seconds"], r["output_tokens_per_s"],
                  r["total_tokens_per_s"], f"{nano[r['workload']] / r['output_tokens_per_s']:.1f}x"
                  if r["workload"] in nano else "-"] for r in offline])
    model_rows = [r for r in offline if "bytes_model" in r]
    bandwidth = next((r for r in rows if r["kind"] == "bandwidth"), None)
    if model_rows:
        print("\nByte model: every step that decodes reads all weights once (steps counted in the engine; of a "
              "mixture of experts only the top_k experts of one token, so for a batch a lower bound); each "
              "decode reads its sequence's whole K/V context (summed from the workload). Floor = bytes / measured "
              "copy bandwidth" + (f" ({bandwidth['bytes_per_s'] / 1e9:.0f} GB/s, read + write, "
                                  f"{bandwidth['device']})." if bandwidth else " (not measured)."))
        print_table(["requests", "decode steps", "weights GB", "KV GB", "total GB", "floor s", "measured s",
                     "% of copy BW", "KV check"],
                    [[r["requests"], r["decode_steps"], r["weight_bytes"] * r["decode_steps"] / 1e9,
                      r["kv_bytes_per_token"] * r["workload_decode_context_tokens"] / 1e9, r["bytes_model"] / 1e9,
                      r.get("floor_s"), r["seconds"],
                      f"{100 * r['bandwidth_fraction']:.0f}%" if "bandwidth_fraction" in r else "-",
                      "ok" if r["decode_context_tokens"] == r["workload_decode_context_tokens"] else
                      f"engine {r['decode_context_tokens']:,}"] for r in model_rows])
    tp_rows = [r for r in offline if r.get("tensor_parallel_size", 1) > 1]
    if tp_rows:
        single = {r["workload"]: r for r in offline if r["engine"] == "nanoserve"}
        print("\nTensor parallelism: rank 0's time in torch.distributed calls (step broadcast, all-reduces, logits "
              "gather), waiting for the other ranks included; overhead = seconds against the TP=1 row.")
        print_table(["engine", "steps", "calls per step", "comm ms per step", "comm s", "seconds", "TP=1 seconds",
                     "overhead"],
                    [[r["engine"], r["steps"], r["comm_calls_per_step"], r["comm_ms_per_step"], r["comm_s"],
                      r["seconds"], single[r["workload"]]["seconds"] if r["workload"] in single else "-",
                      f"{r['seconds'] / single[r['workload']]['seconds']:.2f}x" if r["workload"] in single else "-"]
                     for r in tp_rows])
    bad = [f"{r['engine']} ({r['requests']} requests)" for r in offline if not r.get("complete", True)]
    if bad:
        print(f"WARNING: outputs shorter than requested: {', '.join(bad)}")


if __name__ == "__main__":
    main()
