"""Data parallelism: a real server with two engine replicas (`--data-parallel-size 2`, one in the server's process,
one in a child), driven by the official openai client: 64 concurrent streams all complete with the tokens each
prompt gets alone, /metrics adds up both replicas, routing prefers the least loaded replica and then the one that
saw the prefix, and a dead replica or a SIGTERM ends everything without orphans."""
import asyncio
import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace

import httpx
from openai import AsyncOpenAI

from nanoserve.data_parallel import DataParallelEngine
from test_tensor_parallel import _children, _port, _wait_healthy, sigterm_ends_every_child
from test_cli import SCRIPT


def _server(model_dir: str, port: int, *flags) -> subprocess.Popen:
    return subprocess.Popen([SCRIPT, model_dir, "--port", str(port), "--data-parallel-size", "2", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _started(model_dir: str) -> tuple[str, subprocess.Popen]:
    port = _port()
    server = _server(model_dir, port)
    _wait_healthy(f"http://127.0.0.1:{port}", server)
    return f"http://127.0.0.1:{port}", server


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


async def _stream(client, model, prompt) -> tuple[str, int]:
    text, tokens = "", 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens + chunk.usage.prompt_tokens
    return text, tokens


def test_two_replicas_serve_64_concurrent_streams(llama_dir):
    url, server = _started(llama_dir)
    try:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY")
        prompts = [f"The cat number {i} eats" for i in range(64)]

        async def run():
            alone = [await _stream(client, llama_dir, p) for p in prompts]  # one at a time
            together = await asyncio.gather(*(_stream(client, llama_dir, p) for p in prompts))
            return alone, together
        alone, together = asyncio.run(run())
        assert len(together) == 64 and all(text for text, _ in together)
        assert [t for t, _ in together] == [t for t, _ in alone]
        want = sum(n for _, n in alone) + sum(n for _, n in together)
        deadline = time.monotonic() + 5  # a child replica reports its counters four times a second
        while True:
            metrics = httpx.get(f"{url}/metrics").text
            counted = _metric(metrics, "vllm:prompt_tokens_total") + _metric(metrics, "vllm:generation_tokens_total")
            if counted == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counted == want  # both replicas' tokens (each served some of the 64): the sum, not one of them
        assert _metric(metrics, "vllm:num_requests_running") == 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_routing_balances_then_follows_the_prefix():
    replicas = [SimpleNamespace(num_in_flight=0, engine=None) for _ in range(3)]
    router = DataParallelEngine(replicas)
    shared = list(range(40))
    assert router._route(shared) == 0  # all idle: the first
    replicas[0].num_in_flight = 1
    assert router._route([7, 8, 9]) == 1  # the least loaded
    replicas[1].num_in_flight = 1
    assert router._route(shared + [1]) == 2  # replica 0 saw the prefix but is busier
    replicas[2].num_in_flight = 1
    assert router._route(shared + [2]) == 2  # a tie: the replica that served this prefix last
    assert router._route([7, 8, 9]) == 1  # the same prompt again: where it went before


def test_dead_replica_makes_the_server_exit_and_sigterm_leaves_no_orphans(llama_dir):
    _, server = _started(llama_dir)
    try:
        replicas = [p for p in _children(server.pid) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(replicas) == 1
        os.kill(replicas[0], signal.SIGKILL)
        assert server.wait(timeout=30) == 1  # unhealthy, then exits for its orchestrator to restart it
    finally:
        server.kill()

    port = _port()
    sigterm_ends_every_child(_server(llama_dir, port), f"http://127.0.0.1:{port}")
