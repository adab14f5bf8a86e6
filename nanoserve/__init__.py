"""nanoserve: a small, readable LLM inference and serving engine in the style of vLLM."""
import importlib

__version__ = "0.1.0"
_EXPORTS = {"LLM": ".llm", "SamplingParams": ".sampling", "EngineConfig": ".config", "LLMEngine": ".engine",
            "RequestOutput": ".engine", "CompletionOutput": ".engine", "PoolingParams": ".pooling",
            "BeamSearchParams": ".beam_search", "LoRARequest": ".lora"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Exports load on first use: torch and transformers take seconds to import, `nanoserve --help` should not.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'nanoserve' has no attribute {name!r}")
