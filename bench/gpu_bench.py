"""Decode step times, batch-1 decode against the memory roofline, and engine start-up time; plus the summary that
`bench/gpu.sh` prints last. Every subcommand prints a table last and writes its rows with `--json`.

decode   Wall-clock time of one `engine.step()` when B sequences decode together. B requests with short random
         prompts and ample max_tokens are added, the engine is stepped until every one of them has its first
         token (all decoding), then `--warmup` steps, then `--steps` timed steps (device synchronized around each;
         median reported). Every timed step must be a pure decode of all B sequences, else the row says so.
         `--configs` picks the engine set-ups: eager (`enforce_eager=True`), compile (torch.compile, no CUDA
         graphs) and graphs (torch.compile + CUDA graphs: the GPU default); each runs in its own process so one
         engine's memory never squeezes the next. Beside each time: the step's bytes under the byte model
         (weights once + every sequence's K/V context) and what fraction of the measured copy bandwidth that is;
         at batch 1 the weights-only figure is the HBM roofline fraction of issue 4's batch-1 target. Then
         `--profile-steps` more steps under torch.profiler give the GPU's kernel time per step: "GPU busy"
         (kernel time / step time) far below 100% means the step waits on host work.
startup  Time of `LLM(...)` in a fresh process: "cold" with an empty TORCHINDUCTOR_CACHE_DIR (and Triton cache),
         so compilation starts from scratch, then "warm" with the same cache dir again. The child also times
         its imports and one short generate (which must not compile anything more).
summary  Reads the JSON files of a `gpu.sh` run and prints every headline figure against its target.
merge    Concatenates JSON files into one (gpu.sh keeps few files under $OUT).

    python bench/gpu_bench.py decode --shape qwen3-0.6b --configs graphs --batch-sizes 1,16,64,256 --json d.json
    python bench/gpu_bench.py decode --shape llama-3.1-8b --configs graphs --batch-sizes 1 --steps 200
    python bench/gpu_bench.py decode --shape llama-3.1-8b --configs graphs --batch-sizes 1 --quantization w4a16
    python bench/gpu_bench.py startup --shape qwen3-0.6b --json s.json
    python bench/gpu_bench.py decode --shape tiny --device cpu --configs eager --batch-sizes 1,4   # CPU smoke
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # engine arguments of each set-up; the GPU default is torch.compile + CUDA graphs
    "eager": dict(enforce_eager=True),
    "compile": dict(compilation_config={"mode": 3, "cudagraph_mode": "NONE"}),
    "graphs": dict(compilation_config={"mode": 3, "cudagraph_mode": "FULL_DECODE_ONLY"}),
}
TARGETS = {"offline_tok_s": 17500, "batch1_tok_s": 150, "roofline": 0.80, "hf_ratio": 10.0, "cold_s": 60.0,
           "warm_s": 20.0}


# ---------------------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------------------

def cmd_decode(args) -> None:
    """Each config in its own child process (`decode-one`), so each engine gets the whole GPU to itself."""
    rows = []
    for config in args.configs.split(","):
        if config == "graphs" and args.device == "cpu":
            print("graphs: skipped on cpu (CUDA graphs need a GPU)")
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            cmd = [sys.executable, __file__, "decode-one", "--config", config, "--json", part.name] + child_args(args)
            code = subprocess.run(cmd).returncode
            if code == 0:
                rows += json.load(open(part.name))["rows"]
            else:
                print(f"{config}: child exited with {code}", flush=True)
                rows.append({"kind": "decode", "shape": args.shape, "config": config, "error": f"exit {code}"})
    from benchlib import write_json
    write_json(args.json, "gpu_bench decode", args, rows)
    print_decode_table(rows)


def child_args(args) -> list[str]:
    return ["--shape", args.shape, "--device", args.device, "--batch-sizes", args.batch_sizes,
            "--quantization", args.quantization,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompt-len", str(args.prompt_len),
            "--profile-steps", str(args.profile_steps),
            "--max-model-len", str(args.max_model_len), "--seed", str(args.seed)]


def cmd_decode_one(args) -> None:
    from benchlib import (copy_bandwidth, kv_bytes_per_token, log_engine_info, make_shape_dir,
                          weight_bytes_per_step, write_json, write_random_w4a16)
    from nanoserve import LLM
    log_engine_info()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    bandwidth = copy_bandwidth(args.device)  # before the engine takes the GPU's memory for its KV cache
    shape_dir, weights = make_shape_dir(args.shape), dict(load_format="dummy")
    if args.quantization == "w4a16":  # a checkpoint (random values) of the shape: 4-bit needs one
        shape_dir, weights = write_random_w4a16(shape_dir), {}
    elif args.quantization != "none":  # int8 or fp8 on the fly, from the dummy weights
        weights["quantization"] = args.quantization
    start = time.perf_counter()
    llm = LLM(shape_dir, device=args.device, skip_tokenizer_init=True, max_num_seqs=max(sizes),
              max_model_len=args.max_model_len, max_num_batched_tokens=max(2048, args.prompt_len),
              **weights, **CONFIGS[args.config])
    startup = time.perf_counter() - start
    runner = llm.engine.runner
    weights, per_token = weight_bytes_per_step(runner.model, runner.hf_config), kv_bytes_per_token(
        runner.hf_config, runner.dtype)
    rows = [bandwidth]
    rng = random.Random(args.seed)
    for batch in sizes:
        r = measure_decode(llm, batch, args, rng)
        step_bytes = weights + per_token * r["mean_context"] * batch
        r.update(kind="decode", shape=args.shape, config=args.config, device=str(args.device),
                 quantization=args.quantization,
                 startup_s=round(startup, 1), weight_bytes=weights, step_bytes=step_bytes,
                 tokens_per_s=batch / r["median_s"],
                 bandwidth_fraction=step_bytes / r["median_s"] / bandwidth["bytes_per_s"],
                 roofline_fraction=weights / r["median_s"] / bandwidth["bytes_per_s"])
        rows.append(r)
        print(f"{args.config} batch {batch}: {1e3 * r['median_s']:.2f} ms per step", flush=True)
    del llm
    write_json(args.json, "gpu_bench decode-one", args, rows)
    print_decode_table(rows)


def measure_decode(llm, batch: int, args, rng: random.Random) -> dict:
    from benchlib import StepCounter, sync
    from nanoserve import SamplingParams
    engine, vocab = llm.engine, llm.engine.vocab_size
    # As many tokens as the context allows: no sequence finishes while timed.
    params = SamplingParams(temperature=0.6, max_tokens=args.max_model_len - args.prompt_len - 1, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(vocab) for _ in range(args.prompt_len)], params)
    started = set()
    for _ in range(batch * args.prompt_len + 8):  # prefill until every sequence has its first token: all decode
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        if len(started) == batch:
            break
    for _ in range(args.warmup):
        engine.step(final_only=True)  # as the offline API steps: no per-step outputs of unfinished requests
    counter, times = StepCounter(engine), []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        engine.step(final_only=True)
        sync(args.device)
        times.append(time.perf_counter() - start)
    counts = counter.close()
    device_s = device_time_per_step(engine, args.profile_steps, args.device)
    for request_id in ids:
        engine.abort_request(request_id)
    pure = counts["decode_tokens"] == batch * args.steps and counts["max_batch"] == batch
    return {"batch": batch, "steps": args.steps, "median_s": statistics.median(times), "device_s": device_s,
            "mean_s": statistics.fmean(times), "min_s": min(times), "max_s": max(times),
            "mean_context": counts["decode_context_tokens"] / max(1, counts["decode_tokens"]), "pure_decode": pure}


def device_time_per_step(engine, steps: int, device) -> float | None:
    """Mean GPU kernel time of a decode step, from torch.profiler over `steps` more steps. Beside the wall-clock
    step time it says how busy the GPU is: a step far longer than its kernels is held up by host work."""
    import torch
    if steps <= 0 or torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step(final_only=True)
            torch.cuda.synchronize(device)
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    except Exception as e:  # the profiler is a diagnostic: never lose the timing over it
        print(f"profiler failed: {type(e).__name__}: {e}")
        return None
    micros = sum(e.self_device_time_total for e in kernels)
    # A decode step runs several kernels per layer; far fewer means the profiler missed the graph's kernels.
    print(f"profiled {steps} steps: {sum(e.count for e in kernels) / steps:.0f} GPU kernels and "
          f"{micros / 1e3 / steps:.2f} ms of kernel time per step", flush=True)
    return micros / 1e6 / steps if micros else None


def print_decode_table(rows: list[dict]) -> None:
    from benchlib import print_table
    decode = [r for r in rows if r.get("kind") == "decode" and "median_s" in r]
    bw = next((r for r in rows if r.get("kind") == "bandwidth"), None)
    if bw:
        print(f"\ncopy bandwidth (read + write): {bw['bytes_per_s'] / 1e9:.0f} GB/s on {bw['device']}")
    print("Byte model per step: all weights once + every sequence's K/V context; 'roofline' = weights only.")
    print("GPU busy = kernel time per step (torch.profiler) / wall-clock step time.")
    print_table(["shape", "config", "quant", "batch", "step ms (median)", "mean ms", "tok/s", "step MB", "% copy BW",
                 "roofline %", "GPU busy", "pure", "start-up s"],
                [[r["shape"], r["config"], r.get("quantization", "none"), r["batch"], 1e3 * r["median_s"], 1e3 * r["mean_s"], r["tokens_per_s"],
                  r["step_bytes"] / 1e6, f"{100 * r['bandwidth_fraction']:.0f}%",
                  f"{100 * r['roofline_fraction']:.0f}%",
                  f"{100 * r['device_s'] / r['median_s']:.0f}%" if r.get("device_s") else "-",
                  "yes" if r["pure_decode"] else "NO", r["startup_s"]] for r in decode])
    for r in rows:
        if "error" in r:
            print(f"{r['shape']} {r['config']}: {r['error']}")


# ---------------------------------------------------------------------------------------------------------------
# startup
# ---------------------------------------------------------------------------------------------------------------

def cmd_startup(args) -> None:
    from benchlib import make_shape_dir, write_json
    model_dir = make_shape_dir(args.shape)
    cache = tempfile.mkdtemp(prefix="inductor-cache-")  # empty: the first run compiles from scratch
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    rows = []
    for label in ["cold", "warm"]:
        cmd = [sys.executable, __file__, "startup-child", "--model-dir", model_dir, "--device", args.device,
               "--config", args.config, "--max-model-len", str(args.max_model_len), "--max-num-seqs",
               str(args.max_num_seqs)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, code = f"{e.stdout or ''}{e.stderr or ''}", "timeout"
        wall = time.perf_counter() - start
        print(f"--- {label} start-up child output (tail) ---\n" + "\n".join(str(out).splitlines()[-25:]), flush=True)
        result = next((json.loads(line.split(" ", 1)[1]) for line in str(out).splitlines()
                       if line.startswith("STARTUP_JSON ")), {})
        rows.append({"kind": "startup", "shape": args.shape, "config": args.config, "run": label, "exit": code,
                     "process_s": wall, **result})
    write_json(args.json, "gpu_bench startup", args, rows, cache_dir=cache)
    print_startup_table(rows)


def cmd_startup_child(args) -> None:
    start = time.perf_counter()
    import torch  # noqa: F401  (timed: part of a real start-up)
    from nanoserve import LLM, SamplingParams
    from benchlib import log_engine_info, sync
    log_engine_info()
    imported = time.perf_counter()
    extra = {} if args.config == "default" else CONFIGS[args.config]
    llm = LLM(args.model_dir, device=args.device, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, **extra)
    sync(args.device)
    built = time.perf_counter()
    # A first request after start-up: prefill and decode paths must already be compiled (a recompile shows here).
    llm.generate([[1, 2, 3, 4] * 8, [5, 6, 7] * 30], SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)
    sync(args.device)
    done = time.perf_counter()
    print("STARTUP_JSON " + json.dumps({"import_s": imported - start, "llm_s": built - imported,
                                        "first_generate_s": done - built}), flush=True)


def print_startup_table(rows: list[dict]) -> None:
    from benchlib import print_table
    print_table(["shape", "config", "run", "LLM() s", "first generate s", "imports s", "process s", "exit"],
                [[r["shape"], r["config"], r["run"], r.get("llm_s"), r.get("first_generate_s"), r.get("import_s"),
                  r["process_s"], r["exit"]] for r in rows])


# ---------------------------------------------------------------------------------------------------------------
# merge and summary
# ---------------------------------------------------------------------------------------------------------------

def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            data = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}")
            continue
        runs += data["runs"] if "runs" in data else [data]
    return runs


def cmd_merge(args) -> None:
    runs = load_runs(args.files)
    with open(args.out, "w") as f:
        json.dump({"runs": runs}, f, indent=2, default=str)
    print(f"merged {len(runs)} result files into {args.out}")


def cmd_summary(args) -> None:
    """Headline figures against the issue's targets, from whatever the JSON files hold."""
    from benchlib import print_table
    runs = load_runs(args.files)
    rows = [dict(r, _env=run.get("env", {})) for run in runs for r in run.get("rows", [])]
    out = []
    env = next((r["_env"] for r in rows if r["_env"]), {})
    bw = [r for r in rows if r.get("kind") == "bandwidth"]
    if bw:
        out.append(["copy bandwidth GB/s (read+write)", f"{max(r['bytes_per_s'] for r in bw) / 1e9:.0f}",
                    "-", bw[0]["device"]])
    offline = [r for r in rows if r.get("kind") == "offline"]
    nano = {r["workload"]: r for r in offline if r["engine"] == "nanoserve"}
    full = max(nano.values(), key=lambda r: r["requests"], default=None)
    if full:
        out.append([f"B {full.get('model')} offline output tok/s ({full['requests']} req)",
                    f"{full['output_tokens_per_s']:,.0f}", f">= {TARGETS['offline_tok_s']:,}",
                    ok(full["output_tokens_per_s"] >= TARGETS["offline_tok_s"])])
        out.append(["B offline total tok/s", f"{full['total_tokens_per_s']:,.0f}", "-",
                    f"{full['seconds']:.1f} s, start-up {full.get('startup_s')} s"])
        out.append(["B steps (with decodes), preemptions", f"{full['steps']:,} ({full['decode_steps']:,}), "
                    f"{full['preemptions']}", "-", "complete" if full["complete"] else "OUTPUTS SHORT"])
        if "bandwidth_fraction" in full:
            out.append(["B bytes moved (byte model) / floor", f"{full['bytes_model'] / 1e9:,.0f} GB / "
                        f"{full['floor_s']:.1f} s", "-", f"{100 * full['bandwidth_fraction']:.0f}% of copy BW"])
    for r in offline:
        if r["engine"] != "nanoserve" and r["workload"] in nano:
            ratio = nano[r["workload"]]["output_tokens_per_s"] / r["output_tokens_per_s"]
            out.append([f"E nanoserve / {r['engine']} ({r['requests']} req)", f"{ratio:.1f}x "
                        f"({r['output_tokens_per_s']:,.0f} tok/s)", f">= {TARGETS['hf_ratio']:.0f}x",
                        ok(ratio >= TARGETS["hf_ratio"])])
    decode = [r for r in rows if r.get("kind") == "decode" and "median_s" in r]
    quantized = [r for r in decode if r.get("quantization", "none") != "none"]  # issue 12: no target, as measured
    decode = [r for r in decode if r not in quantized]
    for r in quantized:
        out.append([f"Q {r['shape']} {r['quantization']} batch {r['batch']} tok/s", f"{r['tokens_per_s']:,.0f}", "-",
                    f"roofline {100 * r['roofline_fraction']:.0f}% of {r['weight_bytes'] / 1e9:.2f} GB"])
    for r in decode:
        if r["batch"] == 1 and r["shape"] == "llama-3.1-8b":
            out.append([f"C llama-3.1-8b batch-1 tok/s ({r['config']})", f"{r['tokens_per_s']:.0f}",
                        f">= {TARGETS['batch1_tok_s']}", ok(r["tokens_per_s"] >= TARGETS["batch1_tok_s"])])
            out.append([f"C roofline fraction ({r['config']})", f"{100 * r['roofline_fraction']:.0f}%",
                        f">= {100 * TARGETS['roofline']:.0f}%", ok(r["roofline_fraction"] >= TARGETS["roofline"])])
    for r in decode:
        if r["shape"] != "llama-3.1-8b":
            busy = f", GPU busy {100 * r['device_s'] / r['median_s']:.0f}%" if r.get("device_s") else ""
            out.append([f"D {r['shape']} {r['config']} batch {r['batch']} step ms", f"{1e3 * r['median_s']:.2f}",
                        "-", f"{r['tokens_per_s']:,.0f} tok/s{busy}" + ("" if r["pure_decode"] else " NOT PURE")])
    for r in rows:
        if r.get("kind") == "startup":
            limit = TARGETS["cold_s"] if r["run"] == "cold" else TARGETS["warm_s"]
            value = r.get("llm_s")
            out.append([f"F start-up {r['run']} LLM() s ({r['shape']})", "failed" if value is None else
                        f"{value:.1f} (+{r.get('first_generate_s', 0):.1f} first gen)", f"<= {limit:.0f}",
                        ok(value is not None and value <= limit)])
    for r in rows:
        if "error" in r:
            out.append([f"{r.get('shape')} {r.get('config')}", "ERROR", "-", r["error"]])
    print(f"\nSummary ({env.get('time', '?')}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
          f"flashinfer {env.get('flashinfer', '-')})")
    print_table(["metric", "value", "target", "met"], out)


def ok(flag: bool) -> str:
    return "yes" if flag else "NO"


# ---------------------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ["decode", "decode-one"]:
        p = sub.add_parser(name)
        p.add_argument("--shape", default="qwen3-0.6b")
        p.add_argument("--device", default="cuda")
        p.add_argument("--batch-sizes", default="1,16,64,256")
        p.add_argument("--steps", type=int, default=50, help="timed steps per batch size")
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--profile-steps", type=int, default=5, help="steps profiled for GPU busy time (0: none)")
        p.add_argument("--prompt-len", type=int, default=32)
        p.add_argument("--max-model-len", type=int, default=2048)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quantization", default="none", choices=["none", "int8", "fp8", "w4a16"],
                       help="int8/fp8: on the fly from the dummy weights; w4a16: a random 4-bit checkpoint")
        p.add_argument("--json")
        if name == "decode":
            p.add_argument("--configs", default="eager,compile,graphs")
        else:
            p.add_argument("--config", choices=sorted(CONFIGS), required=True)
    p = sub.add_parser("startup")
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default="default", choices=["default", *sorted(CONFIGS)])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--child-timeout", type=float, default=240)
    p.add_argument("--json")
    p = sub.add_parser("startup-child")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default="default")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    for name in ["summary", "merge"]:
        p = sub.add_parser(name)
        p.add_argument("files", nargs="+")
        if name == "merge":
            p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"decode": cmd_decode, "decode-one": cmd_decode_one, "startup": cmd_startup, "startup-child": cmd_startup_child,
     "summary": cmd_summary, "merge": cmd_merge}[args.cmd](args)


if __name__ == "__main__":
    main()
