"""Helpers shared by the benchmark scripts: model shapes with random weights, the memory-bandwidth ceiling, the
byte model of a decode step, a step counter hooked into the engine, tables and JSON files.

Shapes: a model directory holding only `config.json`, written with transformers' own config classes; nanoserve
loads it with `load_format="dummy"` (random weights) and `skip_tokenizer_init=True` (token-id prompts), and
transformers builds the same shape with `AutoModelForCausalLM.from_config`. No checkpoint or tokenizer needed.

Byte model (the floor of a memory-bound decode): a decode step reads every weight once, plus the whole K/V
context of each sequence it decodes. The embedding table of an untied model is not read whole (a step gathers
one row per token), so it is left out; a tied model's table is read whole, as the LM head. Of a mixture of
experts only the top_k experts a token is routed to count (the batch-1 read: a lower bound for a batch).
"""
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time

import torch

# Transformers' config classes name these; each shape is what the real model's config.json says.
SHAPES = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        architectures=["Qwen3ForCausalLM"], hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)),
    "llama-3.1-8b": ("LlamaConfig", dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])),
    # Mixtures of experts: the byte model counts the top_k experts a token is routed to (weight_bytes_per_step).
    "mixtral-8x7b": ("MixtralConfig", dict(
        architectures=["MixtralForCausalLM"], hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768,
        sliding_window=None, bos_token_id=1, eos_token_id=2)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)),
    # A Qwen3-MoE small enough for the CPU line: bench/results/cpu-moe-tiny.json, under a minute per engine on 2 cores.
    "tiny-moe": ("Qwen3MoeConfig", dict(
        architectures=["Qwen3MoeForCausalLM"], hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
        num_experts_per_tok=4, norm_topk_prob=True, vocab_size=8192, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1)),
    # A Qwen3-style model small enough for CPU smoke tests of every script.
    "tiny": ("Qwen3Config", dict(
        architectures=["Qwen3ForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)),
}


def make_shape_dir(name: str, root: str | None = None) -> str:
    """A model directory with only the shape's config.json (rewritten each time: it is cheap)."""
    import transformers
    class_name, kwargs = SHAPES[name]
    config = getattr(transformers, class_name)(**kwargs)
    root = root or os.environ.get("NANOSERVE_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "nanoserve-bench")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    return path


def write_random_w4a16(shape_dir: str, group_size: int = 128) -> str:
    """A copy of the shape as a compressed-tensors W4A16 checkpoint (symmetric int4, groups of `group_size`,
    lm_head kept) with random values: packed int32 codes, small scales, random bf16 for the rest. Its speed is a
    real checkpoint's; its output is noise. Written once per shape, next to the shape's directory."""
    import math

    import transformers
    from safetensors.torch import save_file
    config = transformers.AutoConfig.from_pretrained(shape_dir)
    with torch.device("meta"):
        names = {n: p.shape for n, p in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    group_size = math.gcd(group_size, *(s[1] for n, s in names.items() if n.endswith("proj.weight")))  # tiny shape
    path = shape_dir.rstrip("/") + f"-w4a16-g{group_size}"
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}}}}
    tensors, gen = {}, torch.Generator().manual_seed(0)
    for name, shape in names.items():
        if ".layers." in name and name.endswith("proj.weight"):
            out, n_in = shape
            base = name.removesuffix(".weight")
            tensors[f"{base}.weight_packed"] = torch.randint(-2**31, 2**31 - 1, (out, n_in // 8), generator=gen,
                                                             dtype=torch.int32)
            tensors[f"{base}.weight_scale"] = torch.rand(out, n_in // group_size, generator=gen) * 2e-3
            tensors[f"{base}.weight_shape"] = torch.tensor([out, n_in])
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Devices and the bandwidth ceiling
# ---------------------------------------------------------------------------------------------------------------

def sync(device) -> None:
    """Wait for the device: GPU work is asynchronous, so a host clock read without this times only launches."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Measured device-memory bandwidth: the best of `repeats` copies of one buffer into another, counting the
    bytes read plus the bytes written (2 * nbytes per copy). On a GPU it is timed with CUDA events on a 2 GiB
    buffer (far beyond the L2 cache); on a CPU (smoke runs) with the host clock on 256 MiB."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    nbytes = nbytes or ((2 << 30) if on_gpu else (256 << 20))
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)  # never time copies of zeros
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):  # two warm-up copies
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    assert torch.equal(dst[:4096], src[:4096]) and torch.equal(dst[-4096:], src[-4096:]), "copy wrote nothing"
    del src, dst
    if on_gpu:
        torch.cuda.empty_cache()  # give the 4 GiB back before an engine sizes its KV cache
    best = min(times)
    return {"kind": "bandwidth", "device": device_name(device), "bytes_per_copy": 2 * nbytes,
            "best_s": best, "median_s": sorted(times)[len(times) // 2], "bytes_per_s": 2 * nbytes / best}


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment() -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "flashinfer" in sys.modules:  # imported by the engine on a GPU only
        env["flashinfer"] = getattr(sys.modules["flashinfer"], "__version__", "?")
    return env


# ---------------------------------------------------------------------------------------------------------------
# The byte model
# ---------------------------------------------------------------------------------------------------------------

def weight_bytes_per_step(model: torch.nn.Module, hf_config) -> int:
    """Bytes of weights a decode step reads: every parameter once (tied ones once), less an untied embedding
    table, of which a step reads only one row per token. Of a mixture-of-experts block's stacked experts (`w13`,
    `w2`) only top_k / num_experts count: the batch-1 read, one token routed to top_k experts. A batch's tokens
    reach more distinct experts, so for a batch this is a lower bound."""
    from nanoserve.quantization import weight_bytes
    total = weight_bytes(model)  # quantized kernels at their packed size
    if not getattr(hf_config, "tie_word_embeddings", False):
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed_tokens
        total -= embed.weight.numel() * embed.weight.element_size()
    for m in model.modules():
        if hasattr(m, "top_k") and hasattr(m, "num_experts") and hasattr(m, "w13") and hasattr(m, "w2"):
            experts = sum(p.numel() * p.element_size() for p in (m.w13, m.w2))
            total -= experts - experts * m.top_k // m.num_experts
    return total


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """K and V of one token in every layer: 2 * layers * kv_heads * head_dim * bytes per element."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * dtype.itemsize


def decode_context_tokens(input_lens: list[int], output_lens: list[int]) -> int:
    """Tokens of K/V the workload's decode steps read, exactly. A request's first output token comes from its
    prompt's last chunk; each of the other L_out - 1 tokens is a decode step that attends over its whole
    context, L_in + j tokens for j = 1 .. L_out - 1 (its own new K/V included)."""
    return sum((n - 1) * i + (n - 1) * n // 2 for i, n in zip(input_lens, output_lens))


class StepCounter:
    """Counts what the engine actually ran, by wrapping its scheduler's `schedule()`: steps, steps with at least
    one decode (the byte model charges those a full read of the weights), decoded tokens and the K/V context
    those decodes read. While the engine runs it only keeps each batch (a list append: nothing that would show
    in the timing); `close()` does the counting. A decode is a one-token item past its sequence's prompt; it
    attends over start + 1 tokens."""

    def __init__(self, engine):
        self.scheduler, self.original = engine.scheduler, engine.scheduler.schedule
        self.batches = []
        self.scheduler.schedule = self._schedule

    def _schedule(self):
        batch = self.original()
        self.batches.append(batch.scheduled)
        return batch

    def close(self) -> dict:
        self.scheduler.schedule = self.original
        steps = decode_steps = decode_tokens = context = max_batch = 0
        for items in self.batches:
            decodes = [item.start + 1 for item in items
                       if item.num_new_tokens == 1 and item.start >= item.seq.num_prompt_tokens]
            steps += bool(items)
            decode_steps += bool(decodes)
            decode_tokens += len(decodes)
            context += sum(decodes)
            max_batch = max(max_batch, len(items))
        return {"steps": steps, "decode_steps": decode_steps, "decode_tokens": decode_tokens,
                "decode_context_tokens": context, "max_batch": max_batch}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def mean_us(fn, calls: int = 100) -> float:
    """Mean microseconds of `calls` calls of `fn`, after one warm-up call (microbenchmarks of a kernel)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def fingerprint(*parts) -> str:
    """A short hash of a workload, so rows from different processes can be matched to the same requests."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:10]


def print_table(header: list[str], rows: list[list], title: str | None = None) -> None:
    """A Markdown table; numbers right-aligned."""
    cells = [[_cell(x) for x in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    numeric = [all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(header))]
    if title:
        print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + (":" if n else "-") for w, n in zip(widths, numeric)) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)) + " |")
    sys.stdout.flush()


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or x is None


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def write_json(path: str | None, script: str, args, rows: list[dict], **extra) -> None:
    if not path:
        return
    data = {"script": script, "env": environment(), "args": vars(args) if args is not None else {}, "rows": rows,
            **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    print(f"wrote {path}")


def log_engine_info() -> None:
    """Show nanoserve's own start-up log (model load, KV cache size, compile and capture times) in the output."""
    logger = logging.getLogger("nanoserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s nanoserve: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def gib(nbytes: float) -> float:
    return nbytes / 2**30
