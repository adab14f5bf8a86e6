"""Engine configuration: the knobs a user sets, with vLLM's names, checked once at construction.

`LLM(...)`, the CLI and the server all build one `EngineConfig`; every other module only reads it.
Settings that depend on the model (the context length) are resolved by `resolve_for_model` once the
model's `config.json` has been read.
"""
import os
from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    model: str | None = None  # local dir, hub id, or None for the embedded default
    tokenizer: str | None = None  # defaults to the model directory
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256  # sequences decoded together in one step
    max_num_batched_tokens: int = 2048  # tokens (prefill chunks + decodes) computed in one step
    block_size: int = 16  # tokens per KV-cache block
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # "auto": cuda if available, else cpu
    seed: int = 0
    enforce_eager: bool = False  # no torch.compile, no CUDA graphs (same as compilation_config={"mode": 0})
    # vLLM's names: "mode" 3 compiles the model with torch.compile, 0 runs it eagerly; "cudagraph_mode"
    # "FULL_DECODE_ONLY" replays decode steps from CUDA graphs captured at "cudagraph_capture_sizes".
    # Default: both on a GPU, neither on CPU.
    compilation_config: dict | None = None
    attention_backend: str = "auto"  # "auto": "flashinfer" on a GPU in bf16/fp16, else "torch" (the reference)
    load_format: str = "auto"  # "auto": read the checkpoint; "dummy": random weights (benchmarking a shape)
    skip_tokenizer_init: bool = False  # no tokenizer: prompts must be token ids and outputs carry no text
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # CPU default: 2 GiB; overrides gpu_memory_utilization
    num_gpu_blocks_override: int | None = None  # fix the KV pool size (tests use it to force preemption)
    speculative_config: dict | None = None
    served_model_name: str | None = None
    max_n_sequences: int = 64  # largest `n` one request may ask for (vLLM: VLLM_MAX_N_SEQUENCES)
    # "generate" samples tokens; "pooling" returns embeddings (pooling.py); "auto": pooling for a bare backbone
    # checkpoint (architectures such as "Qwen3Model"), else generate
    runner: str = "auto"
    pooler_config: dict | None = None  # {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": bool}
    # None: as the checkpoint says (config.json's quantization_config); "int8": quantize a full-precision
    # checkpoint at load (quantization.py); a checkpoint format's name must match the checkpoint's
    quantization: str | None = None
    enable_lora: bool = False  # LoRA adapters per request (lora.py)
    max_loras: int = 1  # adapters loaded at once (slots)
    max_lora_rank: int = 16
    tensor_parallel_size: int = 1  # processes that each hold 1/N of every layer (parallel.py)
    trace_path: str | None = None  # write a step timeline here (trace.py: Chrome trace JSON, for ui.perfetto.dev)

    def __post_init__(self):
        positive = ["max_num_seqs", "max_num_batched_tokens", "block_size", "max_n_sequences", "max_loras",
                    "max_lora_rank", "tensor_parallel_size"]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ["max_model_len", "num_gpu_blocks_override", "kv_cache_memory_bytes"]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.speculative_config is not None:
            self.speculative_config = self._check_speculative_config(dict(self.speculative_config))
        for name, allowed in [("attention_backend", ("auto", "torch", "flashinfer")), ("load_format", ("auto", "dummy")),
                              ("runner", ("auto", "generate", "pooling"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.compilation_config = self._check_compilation_config(dict(self.compilation_config or {}))
        if self.trace_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(self.trace_path))):
            raise ValueError(f"trace_path {self.trace_path!r}: its directory does not exist")  # fail before loading

    def _check_compilation_config(self, cc: dict) -> dict:
        unknown = set(cc) - {"mode", "cudagraph_mode", "cudagraph_capture_sizes"}
        if unknown:
            raise ValueError(f"compilation_config has unknown keys {sorted(unknown)}")
        if cc.get("mode", 3) not in (0, 3):
            raise ValueError(f"compilation_config mode must be 0 (eager) or 3 (torch.compile), got {cc['mode']!r}")
        if cc.get("cudagraph_mode", "NONE") not in ("NONE", "FULL_DECODE_ONLY"):
            raise ValueError("compilation_config cudagraph_mode must be \"NONE\" or \"FULL_DECODE_ONLY\"")
        sizes = cc.get("cudagraph_capture_sizes")
        if sizes is not None and not (isinstance(sizes, list) and sizes and
                                      all(isinstance(n, int) and n >= 1 for n in sizes)):
            raise ValueError("compilation_config cudagraph_capture_sizes must be a list of positive integers")
        return cc

    @property
    def compile_model(self) -> bool:
        """torch.compile the model: by default on a GPU only (on CPU, compiling costs more than it saves)."""
        default = 3 if self.torch_device.type == "cuda" else 0
        return not self.enforce_eager and self.compilation_config.get("mode", default) == 3

    @property
    def cudagraph_capture_sizes(self) -> list[int]:
        """Decode batch sizes to capture, ascending; [] when CUDA graphs are off. Every batch size up to the
        largest maps to the smallest captured size that holds it (the rest of the rows are padding)."""
        cc, on_gpu = self.compilation_config, self.torch_device.type == "cuda"
        mode = cc.get("cudagraph_mode", "FULL_DECODE_ONLY" if on_gpu else "NONE")
        if mode == "NONE" or self.enforce_eager:
            return []
        if not on_gpu:
            raise ValueError("CUDA graphs need a CUDA device: use compilation_config cudagraph_mode \"NONE\"")
        # vLLM's default sizes: 1, 2, 4, then every 8 up to 256 and every 16 beyond, capped at max_num_seqs.
        sizes = cc.get("cudagraph_capture_sizes") or [1, 2, 4, *range(8, 257, 8), *range(272, 1025, 16)]
        capped = sorted({n for n in sizes if n <= self.max_num_seqs})
        if not cc.get("cudagraph_capture_sizes") and (not capped or capped[-1] < min(self.max_num_seqs, 1024)):
            capped.append(min(self.max_num_seqs, 1024))
        return capped

    @staticmethod
    def _check_speculative_config(spec: dict) -> dict:
        """vLLM's form: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 5,
        "prompt_lookup_min": 2} or {"model": draft_path, "num_speculative_tokens": k}."""
        method = spec.get("method", "draft_model" if spec.get("model") else None)
        if method not in ("ngram", "draft_model"):
            raise ValueError("speculative_config needs \"method\": \"ngram\" or a draft \"model\"")
        if method == "draft_model" and not spec.get("model"):
            raise ValueError("speculative_config with method draft_model needs a \"model\"")
        k = spec.get("num_speculative_tokens")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be a positive integer, got {k!r}")
        if method == "ngram":  # as in vLLM, a bound that is not given takes the other's value
            low, high = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
            if low is None and high is None:
                low, high = 2, 5
            low, high = (high if low is None else low), (low if high is None else high)
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max")
            spec.update(prompt_lookup_min=low, prompt_lookup_max=high)
        return spec

    # torch is imported where it is used, so the CLI can parse arguments (and print --help) without loading it.
    @property
    def torch_device(self):
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self):
        import torch
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, DTYPES[self.dtype])

    def resolve_for_model(self, hf_config) -> None:
        """Fill in what depends on the model and check the user's value against it."""
        if self.runner == "auto":
            architectures = getattr(hf_config, "architectures", None) or []
            self.runner = "pooling" if architectures and architectures[0].endswith("Model") else "generate"
        if self.runner == "pooling" and self.speculative_config is not None:
            raise ValueError("speculative_config needs runner=\"generate\": a pooling model samples no tokens")
        limit = hf_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


DTYPES = {"auto": None, "float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
          "bfloat16": "bfloat16"}
