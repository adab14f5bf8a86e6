"""Beam search: the best beams equal transformers' `generate(num_beams=k)` (fp32, without EOS, where vLLM's rules
and transformers' agree) for k = 1, 2, 4; scores are the model's own log-probabilities; beams share their
prompt's blocks, run in the same steps as other requests, and give every block back; the server's
`use_beam_search` answers as the offline API does."""
import httpx
import pytest
import torch

from conftest import _load
from nanoserve import LLM, BeamSearchParams, SamplingParams
from nanoserve.engine import LLMEngine
from nanoserve.config import EngineConfig
from nanoserve.sampling import ParamError
from test_generate import random_prompts
from test_server import NAME, client, engine, url  # noqa: F401 (fixtures: a server on the tiny llama)


@torch.no_grad()
def hf_beams(model_dir, ids: list[int], k: int, max_new_tokens: int, length_penalty: float = 1.0):
    x = torch.tensor([ids])
    out = _load(str(model_dir)).generate(
        x, attention_mask=torch.ones_like(x), num_beams=k, num_return_sequences=k, do_sample=False,
        max_new_tokens=max_new_tokens, length_penalty=length_penalty, eos_token_id=[], pad_token_id=1,
        temperature=None, top_p=None, top_k=None)
    return [row[len(ids):].tolist() for row in out]


@torch.no_grad()
def hf_sum_logprob(model_dir, prompt: list[int], output: list[int]) -> float:
    logits = _load(str(model_dir))(torch.tensor([prompt + output])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(output))


def block_refs_match(engine) -> bool:
    """Every block's reference count is the number of live sequences holding it."""
    bm, counts = engine.scheduler.block_manager, [0] * engine.scheduler.block_manager.num_blocks
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        for block in seq.block_table:
            counts[block] += 1
    return counts == bm.ref_counts


@pytest.mark.parametrize("k", [1, 2, 4])
def test_best_beams_match_transformers(any_model_dir, k):
    llm = LLM(any_model_dir, block_size=4)
    prompts = random_prompts(llm.get_tokenizer(), 3, seed=31, min_len=3, max_len=20)
    params = BeamSearchParams(beam_width=k, max_tokens=8, ignore_eos=True, length_penalty=0.8)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    for ids, out in zip(prompts, outputs):
        assert [s.tokens[len(ids):] for s in out.sequences] == hf_beams(any_model_dir, ids, k, 8, 0.8)
        for s in out.sequences:
            assert s.tokens[:len(ids)] == ids and s.finish_reason == "length"
            assert s.cum_logprob == pytest.approx(hf_sum_logprob(any_model_dir, ids, s.tokens[len(ids):]), abs=1e-3)
            assert s.text == llm.get_tokenizer().decode(s.tokens[len(ids):])
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_eos_ends_hypotheses_and_length_penalty_ranks(qwen3_dir, tiny_model_factory):
    """With EOS, vLLM's rules: hypotheses that end in EOS (not in the text), scores cum / len ** penalty over
    prompt and output, best first; every score is the model's log-probability of the tokens."""
    # The random model seldom says its EOS: make the token it says most often the EOS (same weights).
    plain = LLM(qwen3_dir)
    prompts = random_prompts(plain.get_tokenizer(), 6, seed=32, min_len=2, max_len=10)
    said = [t for o in plain.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                      use_tqdm=False) for t in o.outputs[0].token_ids]
    eos_token = max(set(said), key=said.count)
    model_dir = tiny_model_factory("qwen3", generation_config_overrides={"eos_token_id": eos_token})
    llm = LLM(model_dir, block_size=4)
    eos = llm.engine.eos_token_ids
    assert eos == {eos_token}
    stops = {}  # length penalty -> hypotheses that ended in EOS among the returned ones
    for penalty in (0.0, 1.0, 2.0):
        outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12, length_penalty=penalty))
        for ids, out in zip(prompts, outputs):
            scores = []
            for s in out.sequences:
                output = s.tokens[len(ids):]
                assert not set(output) & eos  # the EOS is not kept (include_stop_str_in_output is off)
                assert (s.finish_reason == "stop") == (s.stop_reason in eos) and s.finish_reason in ("stop", "length")
                scored = output + [s.stop_reason] if s.finish_reason == "stop" else output
                assert s.cum_logprob == pytest.approx(hf_sum_logprob(model_dir, ids, scored), abs=1e-3)
                scores.append(s.cum_logprob / len(s.tokens) ** penalty)
            assert scores == sorted(scores, reverse=True)
        stops[penalty] = sum(s.finish_reason == "stop" for out in outputs for s in out.sequences)
    assert stops[0.0] > 0, "no EOS: the test is void"
    assert stops[0.0] >= stops[1.0] >= stops[2.0] and stops[0.0] > stops[2.0]  # a high penalty favours long beams


def test_beams_share_blocks_and_run_with_other_requests(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir, block_size=4))
    beam_prompt, plain_prompt = random_prompts(engine.tokenizer, 2, seed=33, min_len=17, max_len=17)
    engine.add_request("beam", beam_prompt, BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True))
    engine.add_request("plain", plain_prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    execute, batches = engine.runner.execute, []

    def recording_execute(batch):  # which requests each step computed
        batches.append({engine.seq_owner[item.seq.seq_id][0].request_id for item in batch.scheduled})
        return execute(batch)
    engine.runner.execute = recording_execute
    shared_prompt_block, outputs = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        assert block_refs_match(engine)
        beams = engine.requests["beam"].seqs if "beam" in engine.requests else []
        first_blocks = [seq.block_table[0] for seq in beams if seq.block_table]
        shared_prompt_block += len(first_blocks) > 1 and len(set(first_blocks)) == 1
    assert shared_prompt_block > 0, "forked beams never shared the prompt's first block"
    assert sum(b == {"beam", "plain"} for b in batches) >= 8, "the beams did not run with the other request"
    alone = LLM(llama_dir, block_size=4)
    want_plain = alone.generate([plain_prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                use_tqdm=False)[0]
    assert outputs["plain"].outputs[0].token_ids == want_plain.outputs[0].token_ids
    want_beams = alone.beam_search([beam_prompt], BeamSearchParams(4, 10, ignore_eos=True))[0]
    assert [o.token_ids for o in outputs["beam"].outputs] == [s.tokens[17:] for s in want_beams.sequences]
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_beams_survive_a_tight_pool(qwen2_dir):
    """Few blocks: beams are preempted (also while paused for their group) and recomputed; same answer."""
    llm = LLM(qwen2_dir, block_size=4, num_gpu_blocks_override=20, max_model_len=64)
    prompts = random_prompts(llm.get_tokenizer(), 3, seed=34, min_len=10, max_len=14)
    outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outputs):
        assert [s.tokens[len(ids):] for s in out.sequences] == hf_beams(qwen2_dir, ids, 4, 10)
    assert llm.engine.scheduler.block_manager.num_free_blocks == 20


def test_bad_beam_params():
    with pytest.raises(ParamError, match="beam_width must be in"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    with pytest.raises(ParamError, match="only temperature 0"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)


# ---------------------------------------------------------------------------------------------------------------
# The server's use_beam_search
# ---------------------------------------------------------------------------------------------------------------

def test_server_beam_search_equals_offline(client, llama_dir):
    want = LLM(llama_dir).beam_search(["The cat eats"], BeamSearchParams(3, 6, ignore_eos=True))[0].sequences
    got = client.completions.create(model=NAME, prompt="The cat eats", n=3, max_tokens=6,
                                    extra_body={"use_beam_search": True, "ignore_eos": True})
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [s.text for s in want]
    assert got.usage.completion_tokens == 18 and all(c.logprobs is None for c in got.choices)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2


@pytest.mark.parametrize("extra, message", [
    ({"stream": True}, "Streaming is not supported for beam search."),
    ({"temperature": 0.7}, "only temperature 0"),
    ({"n": 11}, "beam_width must be in"),
    ({"logprobs": 2, "stop": ["x"]}, "logprobs, stop cannot be combined with use_beam_search"),
])
def test_server_beam_search_errors(url, extra, message):
    body = {"model": NAME, "prompt": "hi", "use_beam_search": True, "max_tokens": 3, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
