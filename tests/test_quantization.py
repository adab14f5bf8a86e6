"""Quantized checkpoints and int8 on the fly.

The checkpoints in tests/data/quant were written by the formats' own tools from tiny random Llama, Qwen2 and
Qwen3 models: llm-compressor 0.14 (compressed-tensors: W4A16 and W8A16 pack-quantized, GPTQ-made W4A16, W8A8
int, FP8 dynamic and static) and GPTQModel 7.6 (gptq 4/8-bit with and without act-order, AWQ GEMM); the
script is tests/quant_tools/make_checkpoints.py. The oracle is transformers running the same checkpoint's
weights dequantized by tests/quant_tools/dequant.py, which was checked bit-exact against transformers'
compressed-tensors loader (run_compressed=False) and, to fp16 rounding, against GPTQModel's own kernels.
nanoserve must give transformers' greedy tokens and logprobs within 1e-4."""
import json
import os
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _load, hf_greedy
from nanoserve import LLM, SamplingParams
from nanoserve.quantization import Int8Kernel
from quant_tools.dequant import dequantize_checkpoint
from test_hardening import launch

# All 45 variants: `python tests/quant_tools/make_checkpoints.py DIR` (in the venv its docstring names), then
# NANOSERVE_QUANT_CHECKPOINTS=DIR python -m pytest tests/test_quantization.py
DATA = os.environ.get("NANOSERVE_QUANT_CHECKPOINTS") or os.path.join(os.path.dirname(__file__), "data", "quant")
TOKENIZER = os.path.join(os.path.dirname(__file__), "data", "quant", "tokenizer")
CHECKPOINTS = sorted(d for d in os.listdir(DATA) if d != "tokenizer" and "-base" not in d)
PROMPTS = [[5, 9, 33, 71, 102, 7, 250], [300, 301, 302, 303], [42] * 9]


def with_tokenizer(src: str, dst) -> str:
    shutil.copytree(src, dst)
    for name in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, name), dst)
    return str(dst)


@torch.no_grad()
def reference_logprobs(model_dir, ids):
    return torch.log_softmax(_load(str(model_dir))(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_matches_its_dequantized_weights(name, tmp_path):
    quantized = with_tokenizer(os.path.join(DATA, name), tmp_path / "q")
    reference = dequantize_checkpoint(quantized, str(tmp_path / "ref"))
    llm = LLM(quantized, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference, PROMPTS, 10, ignore_eos=True)
    for ids, out in zip(PROMPTS, outputs):
        want = reference_logprobs(reference, ids)
        got = [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], ids[1:])]
        assert max(abs(g - want[p, t].item()) for p, (g, t) in enumerate(zip(got, ids[1:]))) < 1e-4


def test_int8_on_the_fly(llama_dir):
    """Weight-only int8 per output channel: every linear layer runs the int8 kernel, the weights take a quarter
    of the bytes, and the logprobs stay close to full precision."""
    full, int8 = LLM(llama_dir), LLM(llama_dir, quantization="int8")
    from nanoserve.linear import Linear
    layers = [m for m in int8.engine.runner.model.modules() if isinstance(m, Linear)]
    assert all(m.kernel is not None and m.weight is None for m in layers) and len(layers) == 2 * 4 + 1
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    a, b = (llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].prompt_logprobs for llm in (full, int8))
    deltas = [abs(x[t].logprob - y[t].logprob) for x, y, t in zip(a[1:], b[1:], PROMPTS[0][1:])]
    assert 0 < sum(deltas) / len(deltas) < 0.05 and max(deltas) < 0.2, deltas


def test_int8_kernel_computes_the_rounded_weights():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(5, 32)
    kernel = Int8Kernel(weight, bias)
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(weight / scale) * scale
    assert torch.allclose(kernel(x), torch.nn.functional.linear(x, rounded, bias), atol=1e-4)
    assert kernel.nbytes == 48 * 32 + 4 * 48


def corrupt(tmp_path, name: str, edit) -> str:
    """A copy of checkpoint `name` whose tensors `edit` changed."""
    path = with_tokenizer(os.path.join(DATA, name), tmp_path / "bad")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def test_bad_checkpoints_fail_at_start_up(tmp_path):
    scale = "layers.0.self_attn.k_proj.weight_scale"
    missing = corrupt(tmp_path / "a", "llama-ct-w4a16-g32-sym", lambda t: t.pop("model." + scale))
    with pytest.raises(ValueError, match="lacks the tensor 'weight_scale'"):
        LLM(missing)
    packed = "model.layers.1.mlp.down_proj.weight_packed"
    shape = corrupt(tmp_path / "b", "llama-ct-w4a16-g32-sym", lambda t: t.update({packed: t[packed][:5]}))
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj has tensors of the wrong shape"):
        LLM(shape)


def test_unsupported_schemes_are_named(tmp_path):
    path = with_tokenizer(os.path.join(DATA, "llama-gptq-w8-g32-sym"), tmp_path / "c")
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="Unsupported quantization method 'bitsandbytes'"):
        LLM(path)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "version": "gemv", "group_size": 32}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="Unsupported AWQ checkpoint"):
        LLM(path)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(with_tokenizer(os.path.join(DATA, "llama-ct-w8a8-int"), tmp_path / "d"), quantization="int8")
    with pytest.raises(ValueError, match="does not match"):
        LLM(with_tokenizer(os.path.join(DATA, "llama-ct-w8a8-int"), tmp_path / "e"), quantization="gptq")


def test_fp8_on_the_fly_is_refused_clearly(llama_dir):
    with pytest.raises(ValueError, match="fp8 on the fly .* not implemented yet"):
        LLM(llama_dir, quantization="fp8")


def test_fp8_format_per_tensor(tmp_path):
    """quant_method "fp8" (float8_e4m3fn weights, one weight_scale per tensor): the same tensors as
    llm-compressor's per-tensor FP8 checkpoint under the other format's name, so the same oracle applies."""
    source = with_tokenizer(os.path.join(DATA, "qwen3-ct-fp8-dynamic-tensor"), tmp_path / "ct")
    reference = dequantize_checkpoint(source, str(tmp_path / "ref"))
    path = with_tokenizer(os.path.join(DATA, "qwen3-ct-fp8-dynamic-tensor"), tmp_path / "fp8")
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    llm = LLM(path)
    assert llm.engine.runner.quant_method.name == "fp8"
    got = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(reference, PROMPTS, 10, ignore_eos=True)


def test_models_endpoint_names_the_quantization(llama_dir):
    proc, base = launch(llama_dir, "--quantization", "int8")
    try:
        card = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]
        assert card["quantization"].startswith("int8")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
