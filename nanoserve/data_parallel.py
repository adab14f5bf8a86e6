"""Data parallelism: N engine replicas behind one HTTP server (`--data-parallel-size N`).

Replica 0 is the server's own `AsyncLLMEngine` (async_engine.py); its `LLMEngine` also tokenizes and validates
requests for the server. Replicas 1..N-1 each run a whole engine in a child process (`_replica_main`, spawned),
reached through a pipe by a `RemoteEngine`, which has the `AsyncLLMEngine` methods the server uses: `generate`
returns a `RequestStream` that the pipe's reader thread fills. `DataParallelEngine` puts them behind that same
interface:
- routing: each request goes to the replica with the fewest requests in flight (running plus waiting); among
  equals, to the one that last served the same prompt prefix (a small LRU of prefix hashes), so that its prefix
  cache hits, else to the one that has been sent the fewest requests (turns, when the server is not busy);
- metrics: `stats` adds the replicas' counters and gauges (the KV-cache usage is their mean);
- health: ready while every replica is; a replica that dies makes the whole server unhealthy and exit (its
  orchestrator restarts it), as one engine's death does.
"""
import asyncio
import collections
import contextlib
import hashlib
import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future
from dataclasses import replace

from .async_engine import AsyncLLMEngine, EngineUnavailable, RequestStream

logger = logging.getLogger("nanoserve")
PREFIX_TOKENS = 32  # the prompt tokens that identify a shared prefix (a system prompt is usually longer)
PREFIX_LRU_SIZE = 4096


class DataParallelEngine:
    def __init__(self, replicas: list):
        self.replicas = replicas
        self.engine = replicas[0].engine  # the local LLMEngine: tokenizer, config, validation
        self.last_served = collections.OrderedDict()  # prefix hash -> replica, least recently used first
        self.routed = [0] * len(replicas)  # requests sent to each replica, ever

    async def generate(self, prompt, params, request_id: str, lora_request=None) -> RequestStream:
        """Add the request to the replica `_route` picks; its stream aborts there if the client goes away."""
        index = self._route(prompt.get("prompt_token_ids") or [])
        return await self.replicas[index].generate(prompt, params, request_id, lora_request)

    def _route(self, token_ids: list[int]) -> int:
        in_flight = [r.num_in_flight for r in self.replicas]
        candidates = [i for i, n in enumerate(in_flight) if n == min(in_flight)]
        key = hashlib.blake2b(repr(token_ids[:PREFIX_TOKENS]).encode(), digest_size=8).digest()
        index = self.last_served.get(key)
        if index not in candidates:  # no replica of the least loaded saw this prefix: take turns among them
            index = min(candidates, key=lambda i: self.routed[i])
        self.routed[index] += 1
        self.last_served[key] = index
        self.last_served.move_to_end(key)
        if len(self.last_served) > PREFIX_LRU_SIZE:
            self.last_served.popitem(last=False)
        return index

    @property
    def stats(self) -> dict:
        """The replicas' numbers added up; the KV-cache usage and rates are recomputed over all of them."""
        all_stats = [r.stats for r in self.replicas]
        total = {k: sum(s.get(k, 0) for s in all_stats) for k, v in all_stats[0].items()
                 if isinstance(v, (int, float))}
        total["kv_cache_usage_perc"] = total["kv_cache_usage_perc"] / len(all_stats)
        total["spec_decode_acceptance_rate"] = total["spec_decode_num_accepted_tokens"] / max(
            1, total["spec_decode_num_draft_tokens"])
        total["spec_decode_mean_accepted_length"] = total["spec_decode_num_accepted_tokens"] / max(
            1, total["spec_decode_num_drafts"])
        return total

    @property
    def is_alive(self) -> bool:
        return all(r.is_alive for r in self.replicas)

    @property
    def is_ready(self) -> bool:
        return all(r.is_ready for r in self.replicas)

    @property
    def error(self):
        return next((r.error for r in self.replicas if r.error is not None), None)

    def stop_accepting(self) -> None:
        for r in self.replicas:
            r.stop_accepting()

    def fail_all(self, message: str) -> None:
        for r in self.replicas:
            r.fail_all(message)

    def shutdown(self) -> None:
        for r in self.replicas:
            r.shutdown()


class RemoteEngine:
    """An engine replica in a child process, with the AsyncLLMEngine methods the server calls. Messages over the
    pipe: to the child ("generation_config", dict), ("add", request id, prompt, params, lora), ("abort", request
    id), ("fail_all", message), None (stop); from the child ("added", id, error or None), ("out", id,
    RequestOutput or exception), ("stats", dict)."""

    def __init__(self, config, index: int, on_fatal=None):
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        config = replace(config, trace_path=None)  # one timeline file is the server's own replica's
        self.process = context.Process(target=_replica_main, args=(config, child_end),
                                       daemon=True, name=f"nanoserve-dp{index}")
        self.process.start()
        child_end.close()
        self.on_fatal, self.error, self.draining = on_fatal, None, False
        self.streams: dict[str, RequestStream] = {}
        self.pending: dict[str, Future] = {}
        self.send_lock = threading.Lock()

    def wait_ready(self, generation_config: dict) -> "RemoteEngine":
        """Block until the child has built its engine (started first, so replicas load side by side), then give
        it the server's generation defaults (--override-generation-config and the like)."""
        try:
            kind, self.stats = self.pipe.recv()
        except EOFError:
            raise RuntimeError(f"Data-parallel replica {self.process.name} failed to start (see its log)") from None
        self._send(("generation_config", generation_config))
        threading.Thread(target=self._read, name=f"{self.process.name}-reader", daemon=True).start()
        return self

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    @property
    def is_ready(self) -> bool:
        return self.is_alive and not self.draining

    async def generate(self, prompt, params, request_id: str, lora_request=None) -> RequestStream:
        if not self.is_alive:
            raise EngineUnavailable("The engine is not running")
        if self.draining:
            raise EngineUnavailable("The server is shutting down")
        stream = RequestStream(request_id, self)
        self.streams[request_id] = stream
        self.pending[request_id] = added = Future()
        self._send(("add", request_id, prompt, params, lora_request))
        try:
            await asyncio.wrap_future(added)  # a bad request raises here, as with a local engine
        except BaseException:
            self.streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is not None and self.is_alive:
            self._send(("abort", request_id))

    def stop_accepting(self) -> None:
        self.draining = True

    def fail_all(self, message: str) -> None:
        if self.is_alive:
            self._send(("fail_all", message))

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    def _send(self, message) -> None:
        with self.send_lock:
            self.pipe.send(message)

    def _read(self) -> None:
        """The reader thread: hand each message to its stream or future until the pipe closes."""
        try:
            while True:
                kind, *rest = self.pipe.recv()
                if kind == "stats":
                    self.stats = rest[0]
                elif kind == "added":
                    request_id, error = rest
                    future = self.pending.pop(request_id)
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
                else:
                    request_id, item = rest
                    stream = self.streams.get(request_id)
                    if stream is not None:
                        if isinstance(item, BaseException) or item.finished:
                            self.streams.pop(request_id, None)
                        stream.token_times.append(time.monotonic())
                        stream.scheduled_time = stream.scheduled_time or stream.token_times[0]
                        stream.put(item)
        except (EOFError, OSError) as exc:
            self.error = self.error or exc
        for future in self.pending.values():
            with contextlib.suppress(Exception):
                future.set_exception(EngineUnavailable("The engine is not running"))
        for stream in self.streams.values():
            stream.put(EngineUnavailable("The engine stopped"))
        self.streams.clear()
        if self.on_fatal is not None and not self.draining:
            logger.error("Data-parallel replica %s exited", self.process.name)
            self.on_fatal()


def _replica_main(config, pipe) -> None:
    """A replica's process: its own engine, driven by the messages from the server's process."""
    from .engine import LLMEngine  # noqa: PLC0415 (a fresh interpreter: import here, after spawn)
    logging.basicConfig(level=logging.WARNING)
    engine = AsyncLLMEngine(LLMEngine(config))
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            pipe.send(message)

    send(("stats", engine.stats))
    asyncio.run(_serve_pipe(engine, pipe, send))
    engine.shutdown()


async def _serve_pipe(engine: AsyncLLMEngine, pipe, send) -> None:
    loop, streams = asyncio.get_running_loop(), {}

    async def add(request_id, prompt, params, lora):
        try:
            stream = await engine.generate(prompt, params, request_id, lora)
        except Exception as exc:
            send(("added", request_id, exc))
            return
        send(("added", request_id, None))
        streams[request_id] = stream
        try:
            async for out in stream:
                send(("out", request_id, out))
        except Exception as exc:
            send(("out", request_id, exc))
        finally:
            streams.pop(request_id, None)

    async def report_stats():
        while True:
            await asyncio.sleep(0.25)
            send(("stats", engine.stats))

    reporter = loop.create_task(report_stats())
    tasks = set()
    while True:
        message = await loop.run_in_executor(None, _recv, pipe)
        if message is None:
            break
        kind, *rest = message
        if kind == "add":
            task = loop.create_task(add(*rest))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "abort" and rest[0] in streams:
            await streams.pop(rest[0]).aclose()
        elif kind == "fail_all":
            engine.fail_all(rest[0])
        elif kind == "generation_config":  # before any request: the server sends it when this replica is ready
            engine.engine.generation_config = rest[0]
    reporter.cancel()


def _recv(pipe):
    try:
        return pipe.recv()
    except (EOFError, OSError):
        return None  # the server's process is gone: stop
