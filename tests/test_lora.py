"""Multi-LoRA against PEFT itself: adapters made with PEFT on the tiny models (B non-zero, different ranks,
alphas, rslora, target sets); every request of a mixed batch (base and three adapters, prompt chunks,
preemption, prefix-cache hits) must give the greedy tokens of transformers + PEFT running it alone (fp32)."""
import functools
import gc

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from conftest import hf_greedy
from nanoserve import LLM, LoRARequest, SamplingParams
from test_generate import random_prompts

ADAPTERS = {  # name: (rank, alpha, rslora, targets)
    "attn": (4, 8, False, ["q_proj", "v_proj"]),
    "all": (8, 16, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": (2, 4, False, ["gate_proj", "down_proj"]),
}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make_adapter(base: str, path, seed: int, rank: int, alpha: int, rslora: bool, targets: list[str]) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                        init_lora_weights=False)  # B random, not zero: a zero B would make every test pass
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(str(path))
    return str(path)


@functools.lru_cache(maxsize=16)
def peft_model(base: str, adapter: str):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


@torch.no_grad()
def peft_greedy(base: str, adapter: str, ids: list[int], max_new_tokens: int = 10) -> list[int]:
    model = peft_model(base, adapter)
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=[],
                         max_new_tokens=max_new_tokens, pad_token_id=1, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def adapters(qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: LoRARequest(name, i + 1, make_adapter(qwen2_dir, root / name, i, *spec))
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def test_mixed_batch_matches_peft(qwen2_dir, adapters):
    """Base and three adapters in one batch, prompts in chunks of 7, a pool small enough to preempt."""
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=3, max_lora_rank=8, block_size=4, max_num_batched_tokens=7,
              num_gpu_blocks_override=40, max_model_len=96)
    prompts = random_prompts(llm.get_tokenizer(), 8, seed=41, min_len=5, max_len=30)
    choice = [None, adapters["attn"], adapters["all"], adapters["mlp"]] * 2
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=choice)
    for ids, lora, out in zip(prompts, choice, outputs):
        want = hf_greedy(qwen2_dir, [ids], 10, ignore_eos=True)[0] if lora is None else \
            peft_greedy(qwen2_dir, lora.lora_path, ids)
        assert out.outputs[0].token_ids == want, lora and lora.lora_name
    assert llm.engine.scheduler.block_manager.num_free_blocks == 40


def test_same_prompt_two_adapters_never_share_cached_blocks(qwen2_dir, adapters):
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4)
    ids = random_prompts(llm.get_tokenizer(), 1, seed=42, min_len=24, max_len=24)[0]
    first = llm.generate([ids], GREEDY, use_tqdm=False, lora_request=adapters["all"])[0]
    second = llm.generate([ids], GREEDY, use_tqdm=False, lora_request=adapters["attn"])[0]
    again = llm.generate([ids], GREEDY, use_tqdm=False, lora_request=adapters["all"])[0]
    assert second.num_cached_tokens == 0 and again.num_cached_tokens > 0  # cached per adapter
    assert first.outputs[0].token_ids != second.outputs[0].token_ids
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == peft_greedy(qwen2_dir, adapters["all"].lora_path, ids)
    assert second.outputs[0].token_ids == peft_greedy(qwen2_dir, adapters["attn"].lora_path, ids)


def test_slots_are_reused_least_recently_used_first(qwen2_dir, adapters):
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    ids = [10, 20, 30, 40]
    for name in ("attn", "mlp", "attn"):  # one slot: each adapter evicts the other
        out = llm.generate([ids], GREEDY, use_tqdm=False, lora_request=adapters[name])[0]
        assert out.outputs[0].token_ids == peft_greedy(qwen2_dir, adapters[name].lora_path, ids)


def test_more_adapters_than_slots_wait_for_one(qwen2_dir, adapters):
    """One slot, three adapters and the base in one call: the requests whose adapter finds the slot held wait
    (as in vLLM) instead of failing, and every one ends with PEFT's tokens; an aborted waiting request leaves
    nothing behind."""
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=1, max_lora_rank=8)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=46, min_len=4, max_len=15)
    choice = [adapters["attn"], adapters["mlp"], None, adapters["all"], adapters["attn"], adapters["mlp"]]
    for ids, lora, out in zip(prompts, choice, llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=choice)):
        want = hf_greedy(qwen2_dir, [ids], 10, ignore_eos=True)[0] if lora is None else \
            peft_greedy(qwen2_dir, lora.lora_path, ids)
        assert out.outputs[0].token_ids == want, lora and lora.lora_name
    engine = llm.engine
    engine.add_request("runs", prompts[0], GREEDY, adapters["attn"])
    engine.add_request("waits", prompts[1], GREEDY, adapters["mlp"])
    engine.step()
    info = engine.stats()["lora_requests_info"]
    assert (info["running"], info["waiting"]) == ("attn", "mlp")
    engine.abort_request("waits")
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.lora_waiting and engine.stats()["num_requests_waiting"] == 0


def test_bad_adapters(qwen2_dir, adapters, tmp_path):
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match="exceeds max_lora_rank=4"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False, lora_request=adapters["all"])
    odd = make_adapter(qwen2_dir, tmp_path / "odd", 9, 2, 4, False, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="Unsupported LoRA adapter"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False, lora_request=LoRARequest("odd", 9, odd))
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLM(qwen2_dir).generate([[1, 2]], GREEDY, use_tqdm=False, lora_request=adapters["mlp"])


# ---------------------------------------------------------------------------------------------------------------
# The server: adapters by name, /v1/models, loading and unloading at run time
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(qwen2_dir, adapters):
    import openai
    from test_server import serving
    from nanoserve.async_engine import AsyncLLMEngine
    from nanoserve.config import EngineConfig
    from nanoserve.engine import LLMEngine
    from nanoserve.server import build_app
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=qwen2_dir, served_model_name="base", enable_lora=True,
                                                   max_loras=2, max_lora_rank=8)))
    app = build_app(engine, "base", lora_modules={"attn": adapters["attn"].lora_path},
                    allow_runtime_lora_updating=True)
    with serving(app) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    engine.shutdown()


def test_server_serves_adapters_by_name(lora_server, qwen2_dir, adapters):
    import httpx
    url, client = lora_server
    ids = [11, 22, 33, 44, 55]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "attn"} and models["attn"].model_extra["parent"] == "base"
    got = client.completions.create(model="attn", prompt=ids, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    offline = LLM(qwen2_dir, enable_lora=True, max_lora_rank=8)  # equal to PEFT: test_mixed_batch_matches_peft
    assert got == offline.generate([ids], GREEDY, use_tqdm=False, lora_request=adapters["attn"])[0].outputs[0].text
    assert got != offline.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].text
    # Run-time loading, with vLLM's errors.
    load = {"lora_name": "mlp", "lora_path": adapters["mlp"].lora_path}
    assert httpx.post(url + "/v1/load_lora_adapter", json=load).status_code == 200
    again = httpx.post(url + "/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    assert "mlp" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="mlp", prompt=ids, max_tokens=2).choices
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 200
    gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "mlp"})
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]
    missing = httpx.post(url + "/v1/completions", json={"model": "mlp", "prompt": "hi"})
    assert missing.status_code == 404


@functools.lru_cache(maxsize=256)
def reference(base: str, adapter: str | None, ids: tuple) -> list[int]:
    if adapter is None:
        return hf_greedy(base, [list(ids)], 10, ignore_eos=True)[0]
    return peft_greedy(base, adapter, list(ids))


def test_drawn_mixes_match_peft(qwen2_dir, adapters):
    """Hypothesis draws which adapter each of six requests uses, the prefill chunk size and the pool size."""
    from hypothesis import given, settings, strategies as st
    names = [None, "attn", "all", "mlp"]
    from transformers import AutoTokenizer
    pool = random_prompts(AutoTokenizer.from_pretrained(qwen2_dir), 6, seed=43, min_len=3, max_len=25)

    @settings(max_examples=6, deadline=None)
    @given(st.lists(st.sampled_from(names), min_size=6, max_size=6), st.sampled_from([5, 16, 64]),
           st.sampled_from([24, 200]))
    def check(choice, chunk, blocks):
        llm = LLM(qwen2_dir, enable_lora=True, max_loras=3, max_lora_rank=8, block_size=4,
                  max_num_batched_tokens=chunk, num_gpu_blocks_override=blocks, max_model_len=96)
        loras = [adapters[n] if n else None for n in choice]
        for ids, lora, out in zip(pool, loras, llm.generate(pool, GREEDY, use_tqdm=False, lora_request=loras)):
            assert out.outputs[0].token_ids == reference(qwen2_dir, lora and lora.lora_path, tuple(ids))
    check()



def test_lora_requests_info_metric(lora_server):
    import httpx
    url, _ = lora_server
    text = httpx.get(url + "/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="2"' in line and 'running_lora_adapters=""' in line


def test_beam_search_and_embeddings_take_the_adapter(qwen2_dir, adapters):
    """An adapter applies to every kind of request: a beam of width 1 is the adapter's greedy output, and the
    embedding of a prompt changes with the adapter."""
    from nanoserve import BeamSearchParams
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=2, max_lora_rank=8)
    ids = [12, 24, 36, 48]
    beam = llm.beam_search([ids], BeamSearchParams(1, 10, ignore_eos=True), lora_request=adapters["all"])[0]
    assert beam.sequences[0].tokens[len(ids):] == peft_greedy(qwen2_dir, adapters["all"].lora_path, ids)
    embedder = LLM(qwen2_dir, runner="pooling", enable_lora=True, max_lora_rank=8)
    base, adapted = (embedder.embed([ids], use_tqdm=False, lora_request=lora)[0].outputs.embedding
                     for lora in (None, adapters["all"]))
    assert base != adapted


def test_compiled_lora_is_one_graph_for_any_mix_of_adapters(qwen2_dir, adapters):
    """Under torch.compile LoRA runs in its static form: a mixed batch, a base-only one and another mix of
    adapters all run the same compiled graph (no recompilation), with PEFT's tokens."""
    gc.collect()  # earlier engines' attention backend ids are constants in a graph until collected
    counters.clear()
    llm = LLM(qwen2_dir, enable_lora=True, max_loras=3, max_lora_rank=8, block_size=4,
              compilation_config={"mode": 3})
    assert llm.engine.runner.lora.static
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=44, min_len=5, max_len=20)
    for choice in ([None, adapters["attn"], adapters["all"], adapters["mlp"]], [None] * 4,
                   [adapters["mlp"], adapters["mlp"], None, adapters["attn"]]):
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=choice)
        for ids, lora, out in zip(prompts, choice, outputs):
            want = hf_greedy(qwen2_dir, [ids], 10, ignore_eos=True)[0] if lora is None else \
                peft_greedy(qwen2_dir, lora.lora_path, ids)
            assert out.outputs[0].token_ids == want, lora and lora.lora_name
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_batch_matches_peft_on_llama_and_qwen3(arch, tiny_model_factory, tmp_path):
    """The other two architectures (Qwen3's q/k norms, Llama's tied embeddings), base and two adapters in one
    batch, prompts in chunks."""
    base = tiny_model_factory(arch)
    loras = [LoRARequest(name, i + 1, make_adapter(base, tmp_path / name, 10 + i, *ADAPTERS[name]))
             for i, name in enumerate(["all", "attn"])]
    llm = LLM(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4, max_num_batched_tokens=9)
    prompts = random_prompts(llm.get_tokenizer(), 6, seed=45, min_len=5, max_len=25)
    choice = [None, *loras] * 2
    for ids, lora, out in zip(prompts, choice, llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=choice)):
        want = hf_greedy(base, [ids], 10, ignore_eos=True)[0] if lora is None else peft_greedy(base, lora.lora_path, ids)
        assert out.outputs[0].token_ids == want, (arch, lora and lora.lora_name)


def test_adapters_on_a_quantized_model(tmp_path, monkeypatch):
    """LoRA on a 4-bit GPTQ checkpoint whose layers run the int4 kernel (no weight of their own): the adapters
    add to the kernel's output, as PEFT adds them to the dequantized weights' (vLLM serves LoRA on AWQ/GPTQ)."""
    from nanoserve import quantization
    from quant_tools.dequant import dequantize_checkpoint
    from conftest import quant_checkpoint
    monkeypatch.setattr(quantization, "KERNEL_DEVICES", ("cuda", "cpu"))
    quantized = quant_checkpoint("qwen3-gptq-w4-g32-asym", tmp_path / "q")
    reference = dequantize_checkpoint(quantized, str(tmp_path / "ref"))
    lora = LoRARequest("all", 1, make_adapter(reference, tmp_path / "all", 7, *ADAPTERS["all"]))
    llm = LLM(quantized, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=4)
    assert set(llm.engine.runner.quant_method.placed.values()) == {"Int4Kernel"}
    prompts = random_prompts(llm.get_tokenizer(), 4, seed=47, min_len=5, max_len=25)
    choice = [None, lora] * 2
    for ids, req, out in zip(prompts, choice, llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=choice)):
        want = hf_greedy(reference, [ids], 10, ignore_eos=True)[0] if req is None else \
            peft_greedy(reference, req.lora_path, ids)
        assert out.outputs[0].token_ids == want, req
