"""Hostile input and faults: one request must never take the server down (issue 9).

Each test is one bug a hostile-but-realistic client found, replayed through a real uvicorn server on loopback
(httpx and the official openai client): the request gets a clear 4xx, and the server goes on serving everyone
else with every KV block back in the pool. Engine faults are injected into the model step and into one
request's output processing; shutdown and engine death are checked on the real `nanoserve` process.
"""
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.protocol import Limits
from nanoserve.sampling import ParamError
from nanoserve.server import build_app

from conftest import _load, hf_greedy
from test_server import NAME, client, engine, serving, wait_until_idle  # noqa: F401 (fixtures)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(engine):  # `engine` and `client` come from test_server; this server has a 1 MiB body limit
    with serving(build_app(engine, NAME, limits=Limits(max_body_bytes=2**20))) as base:
        yield base


def post(url, path, body, headers=()):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **dict(headers)},
                      timeout=60)


def assert_healthy(url, client, engine):
    """The server still serves a normal request, and nothing holds a KV block once it is idle."""
    assert httpx.get(url + "/health").status_code == 200
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    assert wait_until_idle(engine), "KV blocks leaked"
    assert not engine.engine.requests and not engine.engine.seq_owner


def assert_400(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == param, error
    return error["message"]


# --- 1. a seed that overflows for a later sample used to kill the engine loop for good -------------------------

def test_seed_overflow_in_a_later_sample_is_a_400_and_the_engine_lives(url, client, engine):
    body = {"model": NAME, "prompt": "x", "max_tokens": 4, "n": 2, "seed": 2**64 - 1}
    assert_400(post(url, "/v1/completions", body), "seed")
    assert_400(post(url, "/v1/completions", {**body, "seed": 2**63}), "seed")  # int64, as vLLM
    assert_400(post(url, "/v1/completions", {**body, "seed": -2**63 - 1}), "seed")
    assert_healthy(url, client, engine)
    got = client.completions.create(model=NAME, prompt="x", max_tokens=4, n=2, seed=2**63 - 1)  # seed + 1 fits
    assert len(got.choices) == 2


def test_add_request_is_all_or_nothing(llama_dir):
    llm = LLM(llama_dir, max_n_sequences=4)
    with pytest.raises(ParamError, match="seed"):
        llm.generate("x", SamplingParams(n=2, seed=2**64 - 1, max_tokens=2), use_tqdm=False)
    with pytest.raises(ParamError, match="n must be at most 4"):
        llm.generate("x", SamplingParams(n=5, max_tokens=2), use_tqdm=False)
    engine = llm.engine
    assert not engine.requests and not engine.seq_owner and not engine.scheduler.has_unfinished()
    assert llm.generate("x", SamplingParams(n=4, max_tokens=2), use_tqdm=False)[0].outputs[3].token_ids


# --- 2. unbounded n ----------------------------------------------------------------------------------------------

def test_n_is_bounded(url, client, engine):
    for n in (2**63, 65, 10**30):
        started = time.monotonic()
        message = assert_400(post(url, "/v1/completions", {"model": NAME, "prompt": "x", "n": n}), "n")
        assert time.monotonic() - started < 5 and "at most" in message
    assert_400(post(url, CHAT, {"model": NAME, "messages": HI, "n": 1000}), "n")
    got = client.completions.create(model=NAME, prompt="x", max_tokens=2, n=64)  # the limit itself is fine
    assert len(got.choices) == 64
    assert_healthy(url, client, engine)


@pytest.mark.parametrize("field, value", [
    ("stop", ["s"] * 33), ("stop", ["x" * 1025]), ("stop_token_ids", [1] * 1025), ("prompt", ["x"] * 257),
    ("min_tokens", 10**6), ("temperature", 10**400),
])
def test_client_controlled_sizes_are_bounded(url, field, value):
    assert_400(post(url, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2, field: value}), field)


# --- 3. chat templates sent by clients run only when the operator trusts them ------------------------------------

EVIL = "{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x"


@pytest.mark.parametrize("path", ["/tokenize", CHAT])
@pytest.mark.parametrize("where", ["kwargs", "top"])
def test_request_chat_template_is_refused(url, path, where):
    body = {"model": NAME, "messages": HI, "max_tokens": 2}
    body.update({"chat_template_kwargs": {"chat_template": EVIL}} if where == "kwargs" else {"chat_template": EVIL})
    started = time.monotonic()
    message = assert_400(post(url, path, body), "chat_template")
    assert "--trust-request-chat-template" in message and time.monotonic() - started < 5


@pytest.mark.parametrize("key", ["tokenize", "return_tensors", "tools"])
def test_template_kwargs_cannot_change_the_call(url, key):
    body = {"model": NAME, "messages": HI, "chat_template_kwargs": {key: True}}
    assert_400(post(url, CHAT, body), "chat_template_kwargs")


def test_trusted_request_chat_template_is_used(engine):
    template = "Q: {{ messages[0]['content'] }} A:"
    tokenizer = engine.engine.tokenizer
    with serving(build_app(engine, NAME, trust_request_chat_template=True)) as base:
        body = {"messages": [{"role": "user", "content": "The cat"}], "chat_template": template}
        assert post(base, "/tokenize", body).json()["tokens"] == tokenizer("Q: The cat A:").input_ids


def test_api_key_guards_tokenizer_routes(engine):
    with serving(build_app(engine, NAME, api_key="k")) as base:
        for path in ("/tokenize", "/detokenize", "/v1/completions", "/no-such-route"):
            r = post(base, path, {"prompt": "x", "tokens": [1]})
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, path
        for path in ("/health", "/metrics", "/version"):
            assert httpx.get(base + path).status_code == 200
        auth = {"Authorization": "Bearer k"}
        assert post(base, "/tokenize", {"prompt": "x"}, headers=auth).json()["count"] >= 1


# --- 4. request size, and heavy work off the event loop ----------------------------------------------------------

def test_body_size_limit(url, client, engine):
    big = {"model": NAME, "prompt": "a " * 2**20, "max_tokens": 2}
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    chunked = httpx.post(url + "/tokenize", content=iter([b'{"prompt": "', b"a" * 2**20, b'"}']), timeout=60)
    assert chunked.status_code == 413  # no Content-Length to trust: counted as it streams in
    assert_healthy(url, client, engine)


def test_health_answers_while_a_big_prompt_is_tokenized(engine):
    with serving(build_app(engine, NAME)) as base:  # the default 8 MiB limit
        body = {"model": NAME, "prompt": "The cat eats an apple today. " * 150_000, "max_tokens": 2}
        worker = threading.Thread(target=post, args=(base, "/v1/completions", body))
        worker.start()
        latencies = []
        while worker.is_alive() and len(latencies) < 200:
            started = time.monotonic()
            assert httpx.get(base + "/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        worker.join()
    assert len(latencies) >= 5, "the prompt was tokenized too fast to prove anything"
    assert max(latencies) < 1.0, f"/health stalled for {max(latencies):.2f} s"


# --- 5. 400, not 500, for nesting and lone surrogates; 500s hide the internals -----------------------------------

@pytest.mark.parametrize("raw, paths", [
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ("/v1/completions", CHAT, "/tokenize")),
    (b'{"model": "tiny-llama", "prompt": "\\ud800", "max_tokens": 2}', ("/v1/completions", "/tokenize")),
    (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfff"}]}', (CHAT, "/tokenize")),
    (b'{"prompt": "x", "messages": [], "max_tokens": 2, "temperature": NaN}', ("/v1/completions", CHAT)),
    (b'{"prompt": "x", "max_tokens": 2, "top_p": Infinity}', ("/v1/completions",)),
])
def test_malformed_values_are_400(url, raw, paths, client, engine):
    for path in paths:
        r = post(url, path, raw)
        assert r.status_code == 400, (path, r.text)
    assert_healthy(url, client, engine)


# --- 6. parameters nanoserve does not implement are refused by name ----------------------------------------------

@pytest.mark.parametrize("path, extra, param", [
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages"),
    (CHAT, {"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages"),
])
def test_unsupported_parameters_are_named(url, path, extra, param):
    body = {"model": NAME, "prompt": "x", "messages": HI, "max_tokens": 2, **extra}
    message = assert_400(post(url, path, body), param)
    assert param.rstrip("s") in message or "not supported" in message


def test_no_op_values_of_unsupported_parameters_are_fine(client):
    got = client.chat.completions.create(model=NAME, messages=HI, max_tokens=2, response_format={"type": "text"},
                                         extra_body={"tools": [], "best_of": 1})
    assert got.choices[0].finish_reason
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}],
                                          max_tokens=2).usage.prompt_tokens == \
        client.chat.completions.create(model=NAME, messages=HI, max_tokens=2).usage.prompt_tokens


def test_logit_bias_matches_transformers_sequence_bias(url, client, llama_dir, engine):
    """OpenAI's logit_bias against transformers' own implementation of the same rule (`sequence_bias` with
    one-token sequences), greedy, token for token."""
    tokenizer = engine.engine.tokenizer
    prompt = tokenizer("The cat eats").input_ids
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    base_ids = hf_greedy(llama_dir, [prompt], 8, ignore_eos=True)[0]
    bias = {base_ids[0]: -100.0, base_ids[1]: 5.0, 7: 3.5}
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                    logit_bias={str(k): v for k, v in bias.items()}, extra_body={"ignore_eos": True})
    import torch
    model = _load(llama_dir)
    x = torch.tensor([prompt])
    want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8, eos_token_id=[],
                          pad_token_id=model.config.pad_token_id, sequence_bias={(k,): v for k, v in bias.items()},
                          temperature=None, top_p=None, top_k=None)[0, len(prompt):].tolist()
    assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert got.choices[0].text != plain.choices[0].text  # the bias changed the answer: the test can fail
    for key, value in (("x", 1), ("1", 101), (str(10**6), 1)):
        r = post(url, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2, "logit_bias": {key: value}})
        assert_400(r, "logit_bias")


# --- engine faults: a failed step or a failed request stays with the requests it touched -------------------------

def test_failed_model_step_fails_its_requests_only(url, client, engine, monkeypatch):
    runner, real = engine.engine.runner, engine.engine.runner.execute
    armed = threading.Event()

    def execute(batch):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("device exploded")
        return real(batch)
    monkeypatch.setattr(runner, "execute", execute)
    body = {"model": NAME, "prompt": "The cat", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        armed.set()
        events = [line for line in lines if line]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert events[-1] == "data: [DONE]" and error["code"] == 500 and "exploded" not in error["message"]
    armed.set()
    r = post(url, "/v1/completions", body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert "exploded" not in r.text and "RuntimeError" not in r.text
    assert_healthy(url, client, engine)


def test_failed_request_does_not_touch_its_neighbours(url, client, engine, monkeypatch):
    core, real = engine.engine, engine.engine._process_tokens

    def process(req, *args):
        if req.params.seed == 666:
            raise ValueError("this request is cursed")
        return real(req, *args)
    monkeypatch.setattr(core, "_process_tokens", process)
    want = client.completions.create(model=NAME, prompt="The cat", max_tokens=30, temperature=0).choices[0].text

    def ask(seed):
        return client.completions.create(model=NAME, prompt="The cat", max_tokens=30, temperature=0, seed=seed)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, seed) for seed in (1, 666, 2, 3)]
    with pytest.raises(openai.InternalServerError):
        futures[1].result()
    assert [futures[i].result().choices[0].text for i in (0, 2, 3)] == [want] * 3
    assert_healthy(url, client, engine)


# --- 7. shutdown, and an engine that cannot go on: the real `nanoserve` process ----------------------------------

def launch(model_dir, *flags, script=None):
    """Start `nanoserve` on a free loopback port; return (process, base URL) once it serves."""
    code = script or "import sys; from nanoserve.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, model_dir, "--host", "127.0.0.1", "--port", "0",
                             "--served-model-name", NAME, "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "serving" in line and "http://" in line:
            base = line.split(" at ")[1].split()[0].removesuffix("/v1")
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, base
    proc.wait()
    raise AssertionError(f"nanoserve did not start (exit code {proc.returncode})")


def test_sigterm_lets_running_streams_finish(llama_dir):
    proc, base = launch(llama_dir, "--shutdown-timeout", "60")
    try:
        body = {"model": NAME, "prompt": "The cat", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line]
        last = json.loads(events[-2].removeprefix("data: "))
        assert events[-1] == "data: [DONE]" and last["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        proc.kill()


def test_sigterm_after_the_grace_period_ends_requests_cleanly(llama_dir):
    proc, base = launch(llama_dir, "--shutdown-timeout", "0")
    try:
        body = {"model": NAME, "prompt": "The cat", "max_tokens": 500, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=60)
            time.sleep(0.3)
            with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                lines = r.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                events = [line for line in lines if line]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 503
            response = plain.result()
        assert response.status_code == 503 and response.json()["error"]["type"] == "ServiceUnavailableError"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


def test_dead_engine_exits_non_zero(llama_dir):
    script = ("import sys; from nanoserve import cli, engine\n"
              "def broken(*args, **kwargs): raise SystemError('engine broken beyond repair')\n"
              "engine.LLMEngine.step = engine.LLMEngine.abort_request = broken\n"
              "sys.exit(cli.main(sys.argv[1:]))")
    proc, base = launch(llama_dir, script=script)
    try:
        r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code in (500, 503) and "broken" not in r.text and "SystemError" not in r.text
        with contextlib.suppress(httpx.TransportError):  # unless it has already gone: then it is not serving either
            assert httpx.get(base + "/health", timeout=5).status_code == 503
        assert proc.wait(30) == 1
    finally:
        proc.kill()
