"""Shared fixtures: tiny random-weight Hugging Face models built on disk.

The test machine has no Hugging Face hub access, so tests cannot download a
model. Instead we build our own: a small byte-level BPE tokenizer trained on a
generated corpus, and 2-layer Llama / Qwen2 / Qwen3 models with random weights,
saved exactly like hub checkpoints (config.json, safetensors, tokenizer files,
chat template, generation_config.json). The engine loads them like any model,
and `hf_greedy` gives the transformers reference output to compare against.

Provides:
  make_tiny_model(path, arch, **overrides) -> str
  hf_greedy(model_dir, prompt_token_ids_list, max_new_tokens, ignore_eos=False)
  top2_gap(model_dir, token_ids) -> float
  fixtures: tokenizer_dir, tiny_model_factory, llama_dir, qwen2_dir, qwen3_dir,
            any_model_dir (parametrized over the three archs)
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GenerationConfig, LlamaConfig,
                          MistralConfig, MixtralConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
ARCHS = list(CONFIG_CLASSES)  # the three that every engine test runs on
# The other families (tests/test_model_families.py): each with the config fields that make it differ, at tiny size.
FAMILIES = {
    "mistral": (MistralConfig, dict(sliding_window=8)),
    "gemma2": (Gemma2Config, dict(sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=3.0)),
    "gemma3": (Gemma3TextConfig, dict(sliding_window=8, query_pre_attn_scalar=24, num_hidden_layers=3,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                       "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
    "phi3": (Phi3Config, dict(sliding_window=12)),
    "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                       norm_topk_prob=True)),
    "qwen2_moe": (Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, mlp_only_layers=[1])),
}
INIT_STD = 0.3  # large on purpose: clear top-1 margins and varied greedy output


def _corpus(n: int = 600) -> list[str]:
    """Varied English sentences plus non-ASCII text, so multi-byte UTF-8
    characters end up split across tokens (detokenization must handle that)."""
    rng = random.Random(0)
    subjects = ["The cat", "A robot", "My friend", "The old man", "Every student", "She",
                "We", "Nobody", "The quick brown fox", "Our teacher", "A tiny model", "They"]
    verbs = ["eats", "builds", "reads", "paints", "finds", "loves", "counts", "writes",
             "jumps over", "remembers", "explains", "throws", "measures", "borrows"]
    objects = ["an apple", "the red house", "many books", "a small boat", "the lazy dog",
               "code", "a question", "strange numbers", "the mountain", "her umbrella",
               "seventeen oranges", "the server", "a long sentence", "yesterday's news"]
    tails = ["today.", "in the morning!", "with care?", "because it rains.", "— slowly.",
             "", "and then sleeps.", "near the river,", "(again).", "at 3:45 pm;"]
    lines = [" ".join([rng.choice(subjects), rng.choice(verbs), rng.choice(objects),
                       rng.choice(tails)]) for _ in range(n)]
    lines += [f"{rng.randint(0, 10**6)} + {rng.random():.3f} = ?" for _ in range(50)]
    lines += ["café naïve résumé", "日本語のテキスト", "emoji 🙂 and 🚀", "Ünïcödé straße",
              "Привет, мир", "print('hello, world')", "x = [1, 2, 3]\nfor i in x:\n    pass",
              "def f(a, b):\n    return {'sum': a + b}"] * 3
    return lines


@functools.lru_cache(maxsize=None)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the shared tokenizer once per process (well under a second)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, chat_template=CHAT_TEMPLATE)
    return hf_tok


def _reinit_(model: torch.nn.Module, std: float) -> None:
    """HF's default init (std 0.02) gives near-uniform logits: greedy decoding
    then hinges on near-ties and tests get flaky. Bigger weights fix that."""
    for name, p in model.named_parameters():
        if "norm" in name:  # RMSNorm gains (incl. qwen3 q_norm/k_norm): around 1
            torch.nn.init.uniform_(p, 0.8, 1.2)
        elif name.endswith("bias"):  # qwen2 qkv bias
            torch.nn.init.normal_(p, std=0.1)
        else:
            torch.nn.init.normal_(p, std=std)


def make_tiny_model(path, arch: str, *, generation_config_overrides: dict | None = None,
                    seed: int = 0, init_std: float = INIT_STD, **overrides) -> str:
    """Write a tiny random `arch` model (+ tokenizer) to `path`; returns path.
    `overrides` go to the config, e.g. rope_parameters={...} or tie_word_embeddings."""
    path = str(path)
    tok = build_tokenizer()
    tok.save_pretrained(path)
    kwargs = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=(arch != "qwen2"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, dtype="float32")
    config_class, family = CONFIG_CLASSES.get(arch), {}
    if config_class is None:
        config_class, family = FAMILIES[arch]
    kwargs.update(family)
    kwargs.update(overrides)
    config = config_class(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, init_std)
    if config.tie_word_embeddings:  # insurance: lm_head must stay the embedding tensor
        model.tie_weights()
    model.save_pretrained(path, safe_serialization=True)
    gen = GenerationConfig(**{"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                              "bos_token_id": tok.bos_token_id, **(generation_config_overrides or {})})
    gen.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    # Cached per dir: model dirs are written once and never rebuilt in place.
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model_dir, prompt_token_ids_list, max_new_tokens: int,
              ignore_eos: bool = False) -> list[list[int]]:
    """Reference greedy output from transformers: the new tokens only, ending
    with (and including) eos when it is produced, as vLLM reports it.
    One prompt at a time, so no padding can perturb the numerics."""
    model = _load(str(model_dir))
    eos = model.generation_config.eos_token_id
    outs = []
    for ids in prompt_token_ids_list:
        x = torch.tensor([list(ids)])
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=model.config.pad_token_id,
            # An empty eos list disables stopping without masking eos (like vLLM's
            # ignore_eos); min_new_tokens would mask it and change the argmax.
            eos_token_id=[] if ignore_eos else eos,
            temperature=None, top_p=None, top_k=None)
        outs.append(out[0, x.shape[1]:].tolist())
    return outs


@torch.no_grad()
def top2_gap(model_dir, token_ids) -> float:
    """Logit gap between the top-2 tokens after `token_ids` (near-tie check)."""
    logits = _load(str(model_dir))(torch.tensor([list(token_ids)])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Call as tiny_model_factory(arch, **overrides); built once per distinct args."""
    cache: dict = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, json.dumps(overrides, sort_keys=True, default=repr))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **overrides)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def qwen2_dir(tiny_model_factory) -> str:
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_factory) -> str:
    return tiny_model_factory("qwen3")


@pytest.fixture(params=ARCHS)
def any_model_dir(request, tiny_model_factory) -> str:
    return tiny_model_factory(request.param)


# Quantized checkpoints written by the formats' own tools (tests/test_quantization.py says which and how).
# All 45 variants: `python tests/quant_tools/make_checkpoints.py DIR` (in the venv its docstring names), then
# NANOSERVE_QUANT_CHECKPOINTS=DIR python -m pytest tests/test_quantization.py
QUANT_DATA = os.environ.get("NANOSERVE_QUANT_CHECKPOINTS") or os.path.join(os.path.dirname(__file__), "data", "quant")
QUANT_PROMPTS = [[5, 9, 33, 71, 102, 7, 250], [300, 301, 302, 303], [42] * 9]


def quant_checkpoint(name: str, dst) -> str:
    """A copy of quantized checkpoint `name` at `dst`, with the tokenizer they share."""
    tokenizer = os.path.join(os.path.dirname(__file__), "data", "quant", "tokenizer")
    shutil.copytree(os.path.join(QUANT_DATA, name), dst)
    for file in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, file), dst)
    return str(dst)
