"""Tensor parallelism on the CPU (gloo, 2 processes): the same numbers as one process, under every scheduling trick,
and loud failures instead of hangs. Each TP engine spawns a worker process (a few seconds), so engines are shared
where the scheduling settings allow."""
import gc
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from nanoserve import LLM, SamplingParams
from test_generate import assert_same, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited: only its exit status is left to collect
        return f.read().split(")")[-1].split()[0] != "Z"


def _worker_pids(llm) -> list[int]:
    return [w.pid for w in llm.engine.runner.workers]


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                             ("llama", {"num_key_value_heads": 1}), ("mixtral", {}),
                                             ("qwen2_moe", {})],
                         ids=["llama", "qwen2", "qwen3", "replicated-kv-head", "mixtral", "qwen2-moe-shared-expert"])
def test_tp2_equals_tp1_under_teacher_forcing_and_scheduling(tiny_model_factory, arch, overrides):
    """Prompt logprobs (every prompt position scored: teacher forcing) within 1e-4 of one process, and greedy
    tokens equal to transformers', with chunks of 7 tokens, a KV pool small enough to preempt, then prefix hits.
    With one KV head each rank holds a copy of it."""
    model_dir = tiny_model_factory(arch, **overrides)
    args = dict(block_size=4, max_num_batched_tokens=7, num_gpu_blocks_override=24, max_model_len=96)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=3)
    single = LLM(model_dir, **args)
    shared = random_prompts(single.get_tokenizer(), 1, seed=20, min_len=16, max_len=16)[0]
    prompts = [shared + tail for tail in random_prompts(single.get_tokenizer(), 5, seed=21, min_len=2, max_len=12)]
    expected = single.generate(prompts, params, use_tqdm=False)
    del single
    tp = LLM(model_dir, tensor_parallel_size=2, **args)
    got = tp.generate(prompts, params, use_tqdm=False)
    assert tp.engine.scheduler.num_preemptions > 0
    for want, out in zip(expected, got):
        for a, b in zip(want.prompt_logprobs[1:], out.prompt_logprobs[1:]):
            assert a.keys() == b.keys()
            assert max(abs(a[t].logprob - b[t].logprob) for t in a) < 1e-4
    assert_same(model_dir, prompts, got, max_tokens=16)
    again = tp.generate(prompts, GREEDY, use_tqdm=False)  # no prompt logprobs: prefix-cache hits this time
    assert any(out.num_cached_tokens for out in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in got]


def test_tp2_speculative_decoding_and_workers_end_with_the_engine(llama_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    llm = LLM(llama_dir, block_size=4, tensor_parallel_size=2, speculative_config=spec)
    prompts = [p + p[:8] for p in random_prompts(llm.get_tokenizer(), 4, seed=22, min_len=10, max_len=30)]
    assert_same(llama_dir, prompts, llm.generate(prompts, GREEDY, use_tqdm=False), max_tokens=16)
    pids = _worker_pids(llm)
    assert pids and all(_alive(pid) for pid in pids)
    del llm
    gc.collect()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a worker outlived its engine"


def test_tp_refuses_what_it_does_not_cover(llama_dir):
    with pytest.raises(ValueError, match="LoRA"):
        LLM(llama_dir, tensor_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="must divide"):
        LLM(llama_dir, tensor_parallel_size=3)


def test_killed_worker_fails_requests_instead_of_hanging(llama_dir):
    llm = LLM(llama_dir, block_size=4, tensor_parallel_size=2)
    prompts = random_prompts(llm.get_tokenizer(), 2, seed=23)
    llm.generate(prompts, GREEDY, use_tqdm=False)  # warm: the ranks are in step
    os.kill(_worker_pids(llm)[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(Exception, match="worker|rank|Connection|closed|peer"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 30


def _server(model_dir: str, port: int) -> subprocess.Popen:
    script = shutil.which("nanoserve", path=os.path.dirname(sys.executable)) or shutil.which("nanoserve")
    return subprocess.Popen([script, model_dir, "--port", str(port),
                             "--tensor-parallel-size", "2", "--block-size", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not healthy")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_with_killed_worker_turns_unhealthy_and_sigterm_ends_children(llama_dir):
    """A TP=2 server: a normal request; SIGKILL the worker; the next request ends with an error (not a hang) and
    /health says 503 (then the server exits, for its orchestrator to restart it). A second server: SIGTERM ends
    it and every child process within 10 s."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    server = _server(llama_dir, port)
    try:
        _wait_healthy(url, server)
        body = {"model": llama_dir, "prompt": "The cat", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        workers = [pid for pid in _children(server.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert workers, "no worker process"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 503, reply.text  # the engine stopped; not a hang
        try:
            assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass  # the server has already exited (code 1), for its orchestrator to restart it
        assert server.wait(timeout=30) == 1
    finally:
        server.kill()

    port = _port()
    url = f"http://127.0.0.1:{port}"
    sigterm_ends_every_child(_server(llama_dir, port), url)


def sigterm_ends_every_child(server: subprocess.Popen, url: str) -> None:
    """Once healthy, SIGTERM ends the server within 10 s and every process it started within 10 s more."""
    try:
        _wait_healthy(url, server)
        children = _children(server.pid)
        assert children
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "a child process outlived the server"
    finally:
        server.kill()

