"""Property: no request body, however hostile, gets a 5xx or hangs the server (issue 9).

Hypothesis builds request bodies with JSON values of every type in every field the server knows: huge integers,
NaN and Infinity, deep nesting, lone surrogates, wrong types, plausible values near the limits; and sometimes
bytes that are not JSON or not UTF-8 at all. Each one goes over real HTTP to a real uvicorn server and must get an
answer below 500 (a stream must not carry a server error either) within a bounded time. After the run the server
is healthy, a normal request succeeds and no KV block is held.
"""
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoserve.server import build_app

from test_server import NAME, make_engine, serving, wait_until_idle

PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "n", "best_of", "temperature", "top_p",
          "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
          "stop", "stop_token_ids", "logit_bias", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
          "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "add_special_tokens",
          "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs",
          "response_format", "tools", "tool_choice", "suffix", "user", "tokens", "model"]
PER_REQUEST_SECONDS = 60

huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**30, 10**400, -1, 0])
hostile_texts = st.text(st.characters(codec=None, categories=["L", "N", "P", "Zs", "Cs", "Cc", "So"]), max_size=20)
texts = st.one_of(st.text(max_size=30), st.text(max_size=30), hostile_texts)  # mostly valid Unicode
scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), huge_ints,
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=12)
small_ints = st.integers(-2, 8)
floats = st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True))
content = st.one_of(texts, json_values, st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "image_url"]), "text": texts}), max_size=3))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", 7]),
                                           "content": content}), max_size=3)
plausible = {
    "prompt": st.one_of(texts, st.lists(st.integers(-5, 900), max_size=8), st.lists(texts, max_size=3)),
    "messages": messages, "max_tokens": small_ints, "max_completion_tokens": small_ints, "n": small_ints,
    "best_of": small_ints, "top_k": small_ints, "seed": st.one_of(small_ints, huge_ints), "min_tokens": small_ints,
    "logprobs": st.one_of(small_ints, st.booleans()), "top_logprobs": small_ints,
    **{name: floats for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                 "repetition_penalty")},
    **{name: st.booleans() for name in ("echo", "stream", "ignore_eos", "include_stop_str_in_output",
                                        "skip_special_tokens", "add_special_tokens", "add_generation_prompt",
                                        "continue_final_message")},
    "stop": st.one_of(texts, st.lists(texts, max_size=3)), "stop_token_ids": st.lists(st.integers(-5, 900), max_size=3),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 900).map(str), texts), st.floats(-150, 150), max_size=3),
    "tokens": st.lists(st.one_of(st.integers(-5, 900), huge_ints), max_size=5),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "model": st.just(NAME),
}
# A valid request per route, then a few fields replaced: plausible values (often valid, so the request gets deep
# into the engine) or any JSON value at all.
VALID = {"/v1/completions": {"model": NAME, "prompt": "The cat", "max_tokens": 4},
         "/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
         "/tokenize": {"prompt": "The cat"}, "/detokenize": {"tokens": [5, 6]}}
overrides = st.lists(st.sampled_from(FIELDS), max_size=4, unique=True).flatmap(lambda names: st.fixed_dictionaries(
    {name: st.one_of(plausible[name], plausible[name], json_values) if name in plausible else json_values
     for name in names}))


def encode(body: dict, mode: str, junk: bytes) -> bytes:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python's json writes them
    if mode == "nested":
        return raw[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return junk if mode == "junk" else raw


@pytest.fixture(scope="module")
def url(llama_dir):
    engine = make_engine(llama_dir)
    with serving(build_app(engine, NAME)) as base:
        yield base, engine
    engine.shutdown()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS[:2] * 3 + PATHS), changes=overrides, mode=st.sampled_from(["json"] * 10 + ["nested", "junk"]),
       junk=st.binary(max_size=64))
def test_no_body_gets_a_server_error(url, path, changes, mode, junk):
    base, _ = url
    body = {**VALID[path], **changes}
    for name in ("max_tokens", "max_completion_tokens"):  # bounded time: long generations are not the point here
        if isinstance(body.get(name), int) and body[name] > 64:
            body[name] = 64
    started = time.monotonic()
    with httpx.stream("POST", base + path, content=encode(body, mode, junk), timeout=PER_REQUEST_SECONDS,
                      headers={"content-type": "application/json"}) as r:
        text = r.read().decode(errors="replace")
    assert r.status_code < 500, (r.status_code, text[:500])
    assert time.monotonic() - started < PER_REQUEST_SECONDS
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e[:10]]
        assert all(e["code"] < 500 for e in errors), errors


def test_after_the_fuzzing_the_server_is_whole(url):
    """Runs after the property (file order): the server is healthy, serves, and holds no KV block."""
    base, engine = url
    assert httpx.get(base + "/health").status_code == 200
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "The cat", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert wait_until_idle(engine), "KV blocks leaked"
    assert not engine.engine.requests
