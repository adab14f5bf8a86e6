"""nanoserve: a small, readable LLM inference and serving engine in the style of vLLM."""
from .config import EngineConfig
from .engine import CompletionOutput, LLMEngine, RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "LLMEngine", "RequestOutput", "CompletionOutput"]
