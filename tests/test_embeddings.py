"""Embeddings (`LLM(model, runner="pooling").embed`) equal transformers' final hidden states pooled by hand
(last token, mean, CLS; normalised or not) within 1e-5 in fp32, with prompts in chunks, in batches, and for a
bare backbone checkpoint; pooling is read from sentence-transformers files when the model has them."""
import base64
import json
import os
import struct
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from nanoserve import LLM, PoolingParams, SamplingParams
from nanoserve.sampling import ParamError
from test_generate import random_prompts

TOL = 1e-5


@torch.no_grad()
def hf_embedding(model_dir, ids: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    hidden = AutoModel.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([ids])).last_hidden_state[0]
    pooled = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def assert_close(got: list[float], want: torch.Tensor) -> None:
    assert len(got) == want.numel()
    assert torch.allclose(torch.tensor(got), want, atol=TOL, rtol=0), (torch.tensor(got) - want).abs().max()


@pytest.mark.parametrize("pooling, normalize", [("LAST", True), ("MEAN", False), ("MEAN", True), ("CLS", False)])
def test_pooling_matches_transformers(qwen3_dir, pooling, normalize):
    llm = LLM(qwen3_dir, runner="pooling", block_size=4, max_num_batched_tokens=7,  # prompts in chunks of <= 7
              pooler_config={"pooling_type": pooling, "normalize": normalize})
    prompts = random_prompts(llm.get_tokenizer(), 5, seed=21, min_len=1, max_len=30)
    for ids, out in zip(prompts, llm.embed(prompts, use_tqdm=False)):
        assert out.prompt_token_ids == ids
        assert_close(out.outputs.embedding, hf_embedding(qwen3_dir, ids, pooling, normalize))
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks


def test_text_prompts_and_default_last_token_normalised(llama_dir):
    llm = LLM(llama_dir, runner="pooling")
    texts = ["The cat eats", "A robot builds the red house"]
    for text, out in zip(texts, llm.embed(texts, use_tqdm=False)):
        ids = llm.get_tokenizer()(text).input_ids
        assert_close(out.outputs.embedding, hf_embedding(llama_dir, ids, "LAST", True))
        assert abs(torch.tensor(out.outputs.embedding).norm() - 1) < TOL


def test_sentence_transformers_config_and_bare_backbone(qwen2_dir, tmp_path):
    """An embedding checkpoint as they ship: the backbone alone ("Qwen2Model", no lm_head) with modules.json and
    1_Pooling/config.json saying mean pooling, and no Normalize module."""
    path = str(tmp_path / "embedder")
    AutoModel.from_pretrained(qwen2_dir, dtype=torch.float32).save_pretrained(path)
    for name in os.listdir(qwen2_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(qwen2_dir, name), path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}, f)
    llm = LLM(path)  # runner "auto": a bare backbone is a pooling model
    assert llm.engine.is_pooling and llm.engine.runner.pooler.pooling_type == "MEAN"
    ids = [10, 20, 30, 40, 50]
    assert_close(llm.embed([ids], use_tqdm=False)[0].outputs.embedding, hf_embedding(path, ids, "MEAN", False))


def test_matryoshka_dimensions(tiny_model_factory):
    model_dir = tiny_model_factory("llama", is_matryoshka=True)
    llm = LLM(model_dir, runner="pooling")
    ids = [7, 8, 9, 10]
    full = hf_embedding(model_dir, ids, "LAST", False)
    got = llm.embed([ids], PoolingParams(dimensions=16), use_tqdm=False)[0].outputs.embedding
    assert_close(got, F.normalize(full[:16], dim=-1))  # truncated first, then normalised (as vLLM)


def test_wrong_api_for_the_runner(llama_dir):
    pooling, generating = LLM(llama_dir, runner="pooling"), LLM(llama_dir)
    with pytest.raises(ValueError, match="only supported for generative models"):
        pooling.generate(["hi"], SamplingParams())
    with pytest.raises(ValueError, match="only supported for pooling models"):
        generating.embed(["hi"])
    with pytest.raises(ParamError, match="does not support matryoshka representation"):
        pooling.embed([[1, 2]], PoolingParams(dimensions=8))
    with pytest.raises(ParamError, match="Dimensions must be greater than 0"):
        PoolingParams(dimensions=0)
    assert pooling.engine.scheduler.block_manager.num_free_blocks == pooling.engine.scheduler.block_manager.num_blocks


# ---------------------------------------------------------------------------------------------------------------
# /v1/embeddings through a real server and the openai client
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedding_server(llama_dir):
    import openai
    from test_server import serving
    from nanoserve.async_engine import AsyncLLMEngine
    from nanoserve.config import EngineConfig
    from nanoserve.engine import LLMEngine
    from nanoserve.server import build_app
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=llama_dir, served_model_name="emb", runner="pooling")))
    with serving(build_app(engine, "emb")) as base:
        yield base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    engine.shutdown()


def test_openai_client_embeddings(embedding_server, llama_dir):
    _, client = embedding_server
    offline = LLM(llama_dir, runner="pooling")
    texts = ["The cat eats", "日本語のテキスト", "A robot builds the red house"]
    want = [o.outputs.embedding for o in offline.embed(texts, use_tqdm=False)]
    # Unless told otherwise the client asks for base64 and decodes it; "float" comes as JSON numbers.
    for kwargs in ({}, {"encoding_format": "float"}):
        got = client.embeddings.create(model="emb", input=texts, **kwargs)
        assert [d.index for d in got.data] == [0, 1, 2]
        for d, w in zip(got.data, want):
            assert d.embedding == pytest.approx(w, abs=1e-6)
    raw = client.embeddings.create(model="emb", input=texts[:1], encoding_format="base64").data[0].embedding
    decoded = struct.unpack(f"<{len(want[0])}f", base64.b64decode(raw))
    assert list(decoded) == pytest.approx(want[0], abs=1e-6)
    ids = offline.get_tokenizer()(texts[0]).input_ids
    one = client.embeddings.create(model="emb", input=ids)  # token ids
    assert one.data[0].embedding == pytest.approx(want[0], abs=1e-6)
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids)


def test_embedding_errors(embedding_server):
    import httpx
    base, _ = embedding_server
    cases = [({"input": "hi", "dimensions": 8}, "does not support matryoshka representation"),
             ({"input": []}, "input must be a non-empty string"),
             ({"input": "hi", "encoding_format": "int8"}, "encoding_format must be"),
             ({"input": "hi", "dimensions": 0}, "Dimensions must be greater than 0")]
    for body, message in cases:
        r = httpx.post(base + "/v1/embeddings", json={"model": "emb", **body}, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = httpx.post(base + "/v1/completions", json={"model": "emb", "prompt": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == "The model does not support Completions API"
    r = httpx.post(base + "/v1/chat/completions", json={"model": "emb", "messages": []}, timeout=30)
    assert r.json()["error"]["message"] == "The model does not support Chat Completions API"
