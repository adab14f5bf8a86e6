"""The asyncio face of the engine: many concurrent clients, one engine thread.

The server (on the asyncio event loop) calls `generate()`, which queues an "add" for the engine thread and
returns a `RequestStream`. The engine thread owns the `LLMEngine` (which is not thread-safe): between two
`step()`s it applies queued adds and aborts, then runs a step and hands each `RequestOutput` to its stream
through `loop.call_soon_threadsafe`, so the event loop never waits for model work. It sleeps on a condition
when there is nothing to do. Closing a stream that has not finished (client disconnect) aborts its request,
which frees its KV blocks before the next step.

Faults: a bad add or abort fails only its caller; a request the engine fails (finish_reason "error") fails only
its stream; a step that raises outside the engine's own isolation fails the requests in flight and the loop goes
on. The loop gives up (`is_alive` False, `on_fatal` called, so the server exits and an orchestrator restarts it)
only when it cannot recover: cleaning up after a failure fails too, the device fails every step in a row, or the
engine says it is dead (`EngineDeadError`: a tensor-parallel worker died).
"""
import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future

from .engine import LLMEngine, RequestOutput
from .parallel import EngineDeadError

logger = logging.getLogger("nanoserve")
# A device that fails this many steps in a row (a CUDA error is sticky) will not recover: give up and be restarted.
MAX_CONSECUTIVE_FAILED_STEPS = 8


class EngineUnavailable(RuntimeError):
    """The engine takes no requests: it is shutting down or its loop died (HTTP 503)."""


class RequestFailed(RuntimeError):
    """The engine failed this request (HTTP 500). Details go to the server's log, not to the client."""


class RequestStream:
    """Async iterator over one request's outputs; also records the timings the server's metrics need."""

    def __init__(self, request_id: str, engine: "AsyncLLMEngine"):
        self.request_id, self._engine = request_id, engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False
        self.arrival_time = time.monotonic()
        self.scheduled_time: float | None = None  # start of the first step that computed this request
        self.token_times: list[float] = []  # when each output left the engine thread

    def put(self, item) -> None:  # called from the engine thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one is left to listen
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        """Abort the request unless it already finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_fatal=None):
        self.engine, self.on_fatal = engine, on_fatal  # on_fatal(): called on the engine thread if the loop dies
        self.stats = engine.stats()  # a snapshot refreshed by the engine thread, read by /metrics
        self._streams: dict[str, RequestStream] = {}
        self._ops: list = []  # (function, args, Future | None), applied by the engine thread between steps
        self._wakeup = threading.Condition()
        self._stopped = self.draining = False
        self.error: BaseException | None = None  # set if the engine thread died
        self._thread = threading.Thread(target=self._run, name="nanoserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def is_ready(self) -> bool:
        """Alive and taking new requests (not shutting down): what /health reports."""
        return self.is_alive and not self.draining

    @property
    def num_in_flight(self) -> int:
        """Requests added and not finished: how data_parallel.py balances replicas."""
        return len(self._streams)

    async def generate(self, prompt, params, request_id: str, lora_request=None) -> RequestStream:
        """Add a request and return the stream of its outputs. A bad prompt or parameter raises here
        (ParamError), before anything is streamed."""
        stream = RequestStream(request_id, self)
        await asyncio.wrap_future(self._submit(self._add, (stream, prompt, params, lora_request), Future()))
        return stream

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineUnavailable):  # a dead engine holds nothing to free
            self._submit(self._abort, (request_id,), None)

    def stop_accepting(self) -> None:
        """Shutdown begins: new requests get EngineUnavailable, running ones go on."""
        self.draining = True

    def fail_all(self, message: str) -> None:
        """End every running request with EngineUnavailable(message) (the shutdown grace period is over)."""
        with contextlib.suppress(EngineUnavailable):
            self._submit(self._fail_all, (message,), None)

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join()

    def _submit(self, fn, args, future: Future | None) -> Future | None:
        with self._wakeup:  # under the lock, so that a dying engine thread fails every queued future
            if self.error is not None or self._stopped:
                raise EngineUnavailable("The engine is not running")
            if self.draining and fn == self._add:
                raise EngineUnavailable("The server is shutting down")
            self._ops.append((fn, args, future))
            self._wakeup.notify()
        return future

    # Everything below runs on the engine thread.
    def _add(self, stream: RequestStream, prompt, params, lora_request=None) -> None:
        self.engine.add_request(stream.request_id, prompt, params, lora_request)
        self._streams[stream.request_id] = stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._streams.pop(request_id, None)

    def _fail_all(self, message: str) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            self._streams.pop(request_id)
            stream.put(EngineUnavailable(message))

    def _run(self) -> None:
        try:
            while self._apply_ops():
                self._step()
                self.stats = self.engine.stats()
                if self.engine.num_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                    raise RuntimeError(f"{self.engine.num_failed_steps} model steps failed in a row")
        except BaseException as exc:  # a broken engine must not die silently: fail everyone, /health says 503
            logger.exception("The engine loop died")
            with self._wakeup:
                self.error, ops, self._ops = exc, self._ops, []
            for _, _, future in ops:
                if future is not None:
                    future.set_exception(EngineUnavailable("The engine is not running"))
            self._fail_streams(EngineUnavailable("The engine stopped"))
            if self.on_fatal is not None:
                self.on_fatal()

    def _apply_ops(self) -> bool:
        with self._wakeup:
            while not (self._ops or self._stopped or self.engine.has_unfinished_requests()):
                self._wakeup.wait()
            ops, self._ops = self._ops, []
        for fn, args, future in ops:
            try:
                fn(*args)
            except Exception as exc:  # fails this one operation only (a bad request), never the loop
                if future is None:
                    logger.exception("Engine operation %s failed", fn.__name__)
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(None)
        self.stats = self.engine.stats()
        return not self._stopped

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise  # _run gives up: /health turns 503
        except Exception:  # outside the engine's own fault isolation: fail what is in flight, keep serving
            logger.exception("Engine step failed; failing %d requests", len(self._streams))
            for request_id in self._fail_streams(RequestFailed("The engine failed while processing this request")):
                self.engine.abort_request(request_id)  # if even this fails, _run marks the engine dead
            return
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if stream is None:  # aborted while the step ran
                continue
            stream.token_times.append(now)
            stream.scheduled_time = stream.scheduled_time or start
            stream.put(out)
        for request_id, stream in self._streams.items():
            # Queue time ends when a step first computes the request, which may be before it has a token.
            req = self.engine.requests.get(request_id)
            if stream.scheduled_time is None and req is not None and req.seqs[0].num_computed_tokens:
                stream.scheduled_time = start

    def _fail_streams(self, exc: BaseException) -> list[str]:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(exc)
        return list(streams)
