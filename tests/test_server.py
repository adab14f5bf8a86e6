"""The OpenAI-compatible server, end to end: a real uvicorn server on a free loopback port, serving a tiny
random-weight model, driven by the official `openai` client and by raw HTTP (httpx).

Greedy outputs over HTTP are compared with the offline `LLM.generate` on the same model, so a wrong prompt,
wrong sampling defaults or a broken stream show up as a mismatch, not only as a malformed response.
"""
import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from nanoserve import LLM, SamplingParams
from nanoserve.async_engine import AsyncLLMEngine
from nanoserve.config import EngineConfig
from nanoserve.engine import LLMEngine
from nanoserve.server import build_app

from conftest import top2_gap

NAME = "tiny-llama"
KEY = "sk-test-key"
PROMPTS = ["The cat eats", "café naïve résumé", "日本語のテキスト", "A robot builds the red house",
           "emoji 🙂 and", "x = [1, 2, 3]\nfor i in x:", "Привет, мир", "Every student"]
UNICODE_PROMPTS = ["café naïve", "日本語の", "emoji 🙂", "Ünïcödé straße", "Привет", "résumé", "🚀"]


@contextlib.contextmanager
def serving(app):
    """Run `app` under uvicorn in a thread on a loopback port the OS picks; yield the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_engine(model_dir: str) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(EngineConfig(model=model_dir, served_model_name=NAME, max_num_seqs=64)))


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = make_engine(llama_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serving(build_app(engine, NAME)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def same_text(got: str, want, model_dir: str, tokenizer) -> bool | str:
    """True if the HTTP text equals the offline output; else a message with the top-2 logit gap where they part,
    so that a near-tie (two equally good tokens) is never mistaken for a bug, nor a bug for a tie."""
    ids = want.outputs[0].token_ids
    if got == want.outputs[0].text:
        return True
    k = max(k for k in range(len(ids) + 1) if got.startswith(tokenizer.decode(ids[:k], skip_special_tokens=True)))
    gap = top2_gap(model_dir, want.prompt_token_ids + ids[:k])
    return f"differs after {k} tokens (top-2 logit gap there: {gap:.2e}): {got!r} != {want.outputs[0].text!r}"


def test_models_health_version(client, url):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].max_model_len == 512
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/health").content == b""
    assert httpx.get(url + "/version").json()["version"]


def test_completions_match_offline(client, offline, llama_dir):
    expected = offline.generate(PROMPTS, greedy(12), use_tqdm=False)
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        choice = got.choices[0]
        assert same_text(choice.text, want, llama_dir, offline.get_tokenizer()) is True
        assert choice.finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.id.startswith("cmpl-") and got.model == NAME


def test_completion_prompt_forms(client, offline):
    """A string, a list of strings, token ids and a list of token-id lists all give the same greedy text."""
    texts = [o.outputs[0].text for o in offline.generate(PROMPTS[:3], greedy(6), use_tqdm=False)]
    ids = [offline.get_tokenizer()(p).input_ids for p in PROMPTS[:3]]
    for prompt in (PROMPTS[:3], ids):
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in got.choices] == [0, 1, 2]
        assert [c.text for c in got.choices] == texts
        assert got.usage.prompt_tokens == sum(len(i) for i in ids)
    one = client.completions.create(model=NAME, prompt=ids[1], max_tokens=6, temperature=0)
    assert one.choices[0].text == texts[1]


def test_default_max_tokens_is_16(client):
    got = client.completions.create(model=NAME, prompt="The cat", temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 16 and got.choices[0].finish_reason == "length"


def test_echo(client, offline):
    want = offline.generate("The cat eats", greedy(5), use_tqdm=False)[0].outputs[0].text
    got = client.completions.create(model=NAME, prompt="The cat eats", max_tokens=5, temperature=0, echo=True)
    assert got.choices[0].text == "The cat eats" + want


def test_chat_matches_offline(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The old man reads"}]
    want = offline.chat(messages, greedy(10), use_tqdm=False)[0]
    got = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    legacy = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert legacy.choices[0].message.content == want.outputs[0].text


def test_chat_default_max_tokens_runs_to_context(client):
    messages = [{"role": "user", "content": "hi"}]
    got = client.chat.completions.create(model=NAME, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.total_tokens == 512 and got.choices[0].finish_reason == "length"


def test_streaming_completion_with_usage(client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert len(content) > 1
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_streaming_chat(client):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    plain = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason is not None


def test_sse_wire_format(url):
    body = {"model": NAME, "prompt": "We", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_two(client):
    got = client.completions.create(model=NAME, prompt="A robot", max_tokens=8, n=2, temperature=1.0, seed=3,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in got.choices) == [0, 1]
    assert got.choices[0].text != got.choices[1].text
    assert got.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, stream=True, seed=1))
    finished = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [0, 1]


def test_completion_logprobs(client):
    got = client.completions.create(model=NAME, prompt="The cat", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        assert value == pytest.approx(max(top.values()))  # greedy picked the most likely token
        assert top[token] == pytest.approx(value)


def test_chat_logprobs(client):
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Nobody"}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_stop_strings_and_tokens(client, offline):
    base = client.completions.create(model=NAME, prompt="The cat eats", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[3:5]
    got = client.completions.create(model=NAME, prompt="The cat eats", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == text[:text.find(stop)]
    assert got.choices[0].finish_reason == "stop" and got.choices[0].model_extra["stop_reason"] == stop
    want = offline.generate("The cat eats", greedy(12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    got = client.completions.create(model=NAME, prompt="The cat eats", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [want[2]]})
    assert got.usage.completion_tokens == want.index(want[2]) + 1
    assert got.choices[0].finish_reason == "stop" and got.choices[0].model_extra["stop_reason"] == want[2]


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
    ({"extra_body": {"top_k": -2}}, "top_k"), ({"extra_body": {"min_p": 2}}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2, "extra_body": {"min_tokens": 3}}, "min_tokens"), ({"n": 0}, "n"), ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"), ({"temperature": "hot"}, "temperature"), ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": [10**6]}, "prompt"), ({"max_tokens": 600}, "max_tokens"),
])
def test_invalid_completion_fields(client, kwargs, param):
    kwargs = {"model": NAME, "prompt": "hi", "max_tokens": 3, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    assert info.value.body["param"] == param and info.value.body["code"] == 400


def test_context_length_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=NAME, prompt=[5] * 600, max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model=NAME, prompt=[5] * 500, max_tokens=20)
    got = client.completions.create(model=NAME, prompt=[5] * 505, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 7  # the default 16 shrinks to fit the context
    with pytest.raises(openai.BadRequestError, match="maximum context length is"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi " * 600}])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist."):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, "messages"),
    ("/v1/completions", {"model": NAME}, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": ["a"]}, "stop_token_ids"),
])
def test_error_envelope(url, path, body, param):
    r = httpx.post(url + path, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(url, content):
    r = httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_unknown_fields_are_ignored(client):
    got = client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"no_such_field": 1},
                                    user="me")
    assert got.usage.completion_tokens >= 1


def test_tokenize_detokenize_round_trip(url, offline):
    text = "café naïve 日本語 🙂"
    r = httpx.post(url + "/tokenize", json={"model": NAME, "prompt": text}).json()
    assert r["tokens"] == offline.get_tokenizer()(text).input_ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    assert httpx.post(url + "/detokenize", json={"model": NAME, "tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(url + "/tokenize", json={"model": NAME, "messages": messages}).json()
    assert chat["tokens"] == offline.apply_chat_template(messages)
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format: `# ...` comments, else `name{labels} value`. Returns {"name{labels}": value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert not line or line.startswith(("# TYPE ", "# HELP ")), line
            continue
        key, value = line.rsplit(" ", 1)
        assert key.startswith("vllm:") and 'model_name="tiny-llama"' in key, line
        samples[key] = float(value)
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    matches = [v for k, v in samples.items() if k.split("{")[0] == name
               and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())]
    assert len(matches) == 1, (name, labels)
    return matches[0]


def test_metrics(url, client):
    before = parse_metrics(httpx.get(url + "/metrics").text)
    got = client.completions.create(model=NAME, prompt="The cat eats", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = parse_metrics(r.text)
    diff = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert diff("vllm:prompt_tokens_total") == got.usage.prompt_tokens
    assert diff("vllm:generation_tokens_total") == 5
    assert diff("vllm:request_success_total", finished_reason="length") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert diff(f"vllm:{name}_count") == 1 and diff(f"vllm:{name}_bucket", le="+Inf") == 1
    assert diff("vllm:inter_token_latency_seconds_count") == 4
    assert diff("vllm:request_generation_tokens_sum") == 5
    assert diff("vllm:request_generation_tokens_bucket", le="5.0") == 1
    assert diff("vllm:request_generation_tokens_bucket", le="2.0") == 0
    e2e, ttft = (metric(after, f"vllm:{n}_seconds_sum") for n in ("e2e_request_latency", "time_to_first_token"))
    assert e2e >= ttft > 0
    for gauge in ("num_requests_running", "num_requests_waiting"):
        assert metric(after, f"vllm:{gauge}") == 0
    assert 0 <= metric(after, "vllm:kv_cache_usage_perc") <= 1
    assert metric(after, "vllm:prefix_cache_queries_total") >= metric(after, "vllm:prefix_cache_hits_total")


def wait_until_idle(engine, timeout=10.0):
    blocks = engine.engine.scheduler.block_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if blocks.num_free_blocks == blocks.num_blocks and not engine.stats["num_requests_running"]:
            return True
        time.sleep(0.02)
    return False


def test_stream_disconnect_frees_blocks(url, engine):
    blocks, generated = engine.engine.scheduler.block_manager, engine.stats["generation_tokens"]
    aborted = metric(parse_metrics(httpx.get(url + "/metrics").text), "vllm:request_success_total",
                     finished_reason="abort")
    body = {"model": NAME, "prompt": "The cat eats", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert blocks.num_free_blocks < blocks.num_blocks  # the request holds blocks while it runs
    assert wait_until_idle(engine), "aborted request still holds KV blocks"
    assert engine.stats["generation_tokens"] - generated < 500  # it was cut short, not run to the end
    after = metric(parse_metrics(httpx.get(url + "/metrics").text), "vllm:request_success_total",
                   finished_reason="abort")
    assert after == aborted + 1


def test_non_streaming_disconnect_frees_blocks(url, engine):
    generated = engine.stats["generation_tokens"]
    body = {"model": NAME, "prompt": "The cat eats", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.2))
    assert wait_until_idle(engine), "aborted request still holds KV blocks"
    assert engine.stats["generation_tokens"] - generated < 500


def test_concurrent_clients_match_offline(client, offline, llama_dir):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    expected = offline.generate(prompts, greedy(10), use_tqdm=False)

    def ask(i):
        if i % 2:
            return client.completions.create(model=NAME, prompt=prompts[i], max_tokens=10, temperature=0)
        chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    for i, (got, want) in enumerate(zip(results, expected)):
        text = got if isinstance(got, str) else got.choices[0].text
        assert same_text(text, want, llama_dir, offline.get_tokenizer()) is True


def test_streamed_utf8_is_never_split(client, offline):
    """Streamed deltas must add up to the plain decode of the generated tokens: a delta cut inside a multi-byte
    character would put U+FFFD into the text where the decode has the real character."""
    tokenizer, saw_split = offline.get_tokenizer(), False
    for i, prompt in enumerate(UNICODE_PROMPTS * 2):
        params = dict(max_tokens=24, temperature=0.0 if i < len(UNICODE_PROMPTS) else 1.0, seed=i)
        ids = offline.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids
        chunks = client.completions.create(model=NAME, prompt=prompt, stream=True, **params)
        deltas = [c.choices[0].text for c in chunks]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), prompt
        saw_split |= any("\ufffd" in tokenizer.decode(ids[j:j + 1]) and "\ufffd" not in tokenizer.decode(ids[j:j + k])
                         for j in range(len(ids)) for k in (2, 3, 4) if j + k <= len(ids))
    assert saw_split, "no character was split across tokens: the test proved nothing"


def test_api_key(engine):
    with serving(build_app(engine, NAME, api_key=KEY)) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(base + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert httpx.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 401
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(base + path).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_engine_step_error_fails_requests_and_keeps_serving(client, url, engine, monkeypatch):
    real_step, calls = engine.engine.step, []

    def flaky_step():  # the second step of each of the next two requests fails
        calls.append(1)
        if len(calls) in (2, 4):
            raise RuntimeError("boom")
        return real_step()
    monkeypatch.setattr(engine.engine, "step", flaky_step)
    with pytest.raises(openai.APIError, match="The engine failed while processing this request"):
        for _ in client.completions.create(model=NAME, prompt="hi", max_tokens=20, stream=True):
            pass
    body = {"model": NAME, "prompt": "hi", "max_tokens": 20, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "boom" not in error["message"]  # the client learns that it failed, not our internals
    assert error["type"] == "InternalServerError" and error["code"] == 500
    assert wait_until_idle(engine)
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    assert httpx.get(url + "/health").status_code == 200


def test_dead_engine_loop_reports_503(llama_dir):
    engine = make_engine(llama_dir)

    def fatal(*args):
        raise SystemError("engine broken beyond repair")
    engine.engine.step = engine.engine.abort_request = fatal
    with serving(build_app(engine, NAME)) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model=NAME, prompt="hi", max_tokens=3)
        assert httpx.get(base + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError):  # later requests fail fast instead of hanging
            c.completions.create(model=NAME, prompt="hi", max_tokens=3)
