"""The OpenAI-compatible HTTP server (Starlette), following vLLM's contract (docs: shared/notes/vllm-contract.md).

A request body arrives (bounded in size); a worker thread parses and checks it (protocol.py) and turns it into
token ids and `SamplingParams`, so that JSON parsing, chat templates and tokenization never stall the event loop.
`AsyncLLMEngine.generate` hands each prompt to the engine thread and returns a stream of `RequestOutput`s, which
are rendered either as one JSON response or as Server-Sent Events. A client that goes away aborts its requests.
The same streams feed the Prometheus metrics served at /metrics.

Errors are OpenAI-style JSON with the right status; a 500 says nothing about the server's internals (the
traceback goes to the log). On shutdown (`Server`), running requests get a grace period, then a 503.
"""
import asyncio
import base64
import hmac
import itertools
import json
import logging
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import __version__
from .async_engine import AsyncLLMEngine, EngineUnavailable, RequestFailed, RequestStream
from .engine import Logprob, RequestOutput
from .metrics import Metrics
from .beam_search import BeamSearchParams
from .lora import LoRARequest, check_adapter
from .pooling import PoolingParams
from .protocol import (APIError, Limits, all_of, chat_messages, check_unsupported, clip, completion_prompts,
                       error_body, get, parse_body, sampling_fields, template_kwargs)
from .sampling import ParamError, SamplingParams

logger = logging.getLogger("nanoserve")
# Routes that stay open with --api-key: probes and scrapers. Everything else, /tokenize and /detokenize included
# (they run the tokenizer and the chat template), needs the key.
OPEN_ROUTES = ("/health", "/metrics", "/version")


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              limits: Limits = Limits(), trust_request_chat_template: bool = False,
              lora_modules: dict[str, str] | None = None, allow_runtime_lora_updating: bool = False) -> Starlette:
    api = OpenAIServer(engine, served_model_name, limits, trust_request_chat_template)
    for name, path in (lora_modules or {}).items():
        api.add_lora(name, path)
    api.allow_lora_updates = allow_runtime_lora_updating
    routes = [Route("/v1/models", api.models), Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]), Route("/health", api.health),
              Route("/v1/embeddings", api.embeddings, methods=["POST"]),
              Route("/v1/load_lora_adapter", api.load_lora, methods=["POST"]),
              Route("/v1/unload_lora_adapter", api.unload_lora, methods=["POST"]),
              Route("/version", api.version), Route("/tokenize", api.tokenize, methods=["POST"]),
              Route("/detokenize", api.detokenize, methods=["POST"]), Route("/metrics", api.metrics)]
    handlers = {cls: _error_response for cls in (APIError, ParamError, EngineUnavailable, RequestFailed, Exception)}
    middleware = [Middleware(ApiKeyMiddleware, api_key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


def _error_of(exc: Exception) -> tuple[str, int, str | None]:
    """(message, status, param) for a client: what went wrong in its terms, never our internals."""
    if isinstance(exc, (APIError, ParamError)):
        return str(exc), getattr(exc, "status", 400), exc.param
    if isinstance(exc, EngineUnavailable):
        return str(exc), 503, None
    if isinstance(exc, RequestFailed):
        return str(exc), 500, None
    return "Internal server error", 500, None


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    message, status, param = _error_of(exc)
    return JSONResponse(error_body(message, status, param), status_code=status)


class ApiKeyMiddleware:
    """401 without `Authorization: Bearer <key>` on every route but OPEN_ROUTES."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no key guessing by timing
                return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class Workers:
    """A small thread pool for request preparation (JSON, chat template, tokenizer), with a bounded queue: past
    `max_pending` waiting jobs a request gets a 503 at once instead of piling up memory and latency. The counter
    is only touched on the event loop, so it needs no lock."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nanoserve-prepare")
        self.pending, self.max_pending = 0, max_pending

    async def run(self, fn, *args):
        if self.pending >= self.max_pending:
            raise APIError("The server is busy preparing other requests; retry later", status=503)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1


class Server(uvicorn.Server):
    """uvicorn with a graceful shutdown. On SIGTERM it stops accepting connections and requests (/health turns
    503), lets running requests finish for `grace` seconds, then ends the rest cleanly: a JSON 503, or an error
    event and `data: [DONE]` on a stream, instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace: float):
        config.timeout_graceful_shutdown = grace + 5  # time for the ended requests to send their last bytes
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop_accepting()
        logger.info("Shutting down: %d requests running get %.0f s to finish",
                    self.engine.stats["num_requests_running"] + self.engine.stats["num_requests_waiting"], self.grace)
        end = asyncio.get_running_loop().call_later(self.grace, self.engine.fail_all, "The server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            end.cancel()


class OpenAIServer:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, limits: Limits,
                 trust_request_chat_template: bool):
        self.engine, self.core, self.name = engine, engine.engine, served_model_name
        self.tokenizer, self.max_model_len = self.core.tokenizer, self.core.max_model_len
        self.limits, self.trust_template = limits, trust_request_chat_template
        self.registry = Metrics(served_model_name)
        self.workers = Workers()
        self.loras: dict[str, LoRARequest] = {}  # adapter name -> request, served as its own model name
        self.allow_lora_updates = False

    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "nanoserve",
                "root": self.core.config.model or self.name, "parent": None, "max_model_len": self.max_model_len,
                "quantization": method.describe() if (method := self.core.runner.quant_method) else None}
        adapters = [{**card, "id": name, "root": lora.lora_path, "parent": self.name}
                    for name, lora in self.loras.items()]
        return JSONResponse({"object": "list", "data": [card, *adapters]})

    def add_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at `path` as model `name` (checked now: a bad adapter fails here)."""
        if self.core.runner.lora is None:
            raise ValueError("LoRA adapters need --enable-lora")
        check_adapter(path, self.core.config.max_lora_rank)
        ids = [lora.lora_int_id for lora in self.loras.values()]
        self.loras[name] = LoRARequest(name, max(ids, default=0) + 1, path)

    async def load_lora(self, request: Request) -> JSONResponse:
        """vLLM's runtime adapter loading, behind --allow-runtime-lora-updating, with its error wording."""
        body = await self._lora_body(request)
        name, path = get(body, "lora_name", str, None), get(body, "lora_path", str, None)
        if not name or not path:
            raise APIError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
        if name in self.loras:
            raise APIError(f"The lora adapter '{clip(name)}' has already been loaded.", param="lora_name")
        try:
            await self.workers.run(self.add_lora, name, path)
        except (OSError, ValueError, KeyError) as exc:
            raise APIError(f"Failed to load LoRA adapter '{clip(name)}': {clip(str(exc), 200)}",
                           param="lora_path") from None
        return JSONResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: Request) -> JSONResponse:
        name = get(await self._lora_body(request), "lora_name", str, None)
        if name not in self.loras:
            raise APIError(f"The lora adapter '{clip(str(name))}' cannot be found.", status=404, param="lora_name")
        del self.loras[name]
        return JSONResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _lora_body(self, request: Request) -> dict:
        if not self.allow_lora_updates:
            raise APIError("Loading and unloading LoRA adapters at run time needs --allow-runtime-lora-updating",
                           status=404)
        return parse_body(await request.body())

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.engine.is_ready else 503)

    async def version(self, request: Request) -> JSONResponse:
        return JSONResponse({"version": __version__})

    async def metrics(self, request: Request) -> Response:
        return Response(self.registry.render(self.engine.stats), media_type=self.registry.content_type)

    async def _prepare(self, request: Request, prepare):
        """Read the body (bounded), then run `prepare(raw_body)` on a worker thread."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = APIError(f"The request body exceeds {limit} bytes", status=413)
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return await self.workers.run(prepare, b"".join(chunks))

    async def tokenize(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._prepare(request, self._tokenize))

    def _tokenize(self, raw: bytes) -> dict:
        body = parse_body(raw)
        if "messages" in body:
            ids = self._chat_prompt(body, add_special_tokens=get(body, "add_special_tokens", bool, False))
        else:
            prompt = get(body, "prompt", str, None)
            if prompt is None:
                raise APIError("Either prompt or messages is required", param="prompt")
            ids = self.tokenizer(prompt, add_special_tokens=get(body, "add_special_tokens", bool, True)).input_ids
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, request: Request) -> JSONResponse:
        return JSONResponse(await self._prepare(request, self._detokenize))

    def _detokenize(self, raw: bytes) -> dict:
        ids = self._vocab_ids(parse_body(raw).get("tokens"), "tokens")
        return {"prompt": self.tokenizer.decode(ids)}

    def _vocab_ids(self, ids, name: str) -> list[int]:
        if not all_of(ids, int) or any(not 0 <= t < self.core.vocab_size for t in ids):
            raise APIError(f"{name} must be a list of token ids in [0, {self.core.vocab_size})", param=name)
        return ids

    def _serves(self, api: str, pooling: bool) -> None:
        """A generating model has no embeddings API and a pooling model no completions (vLLM's wording)."""
        if self.core.is_pooling != pooling:
            raise APIError(f"The model does not support {api} API")

    async def completions(self, request: Request) -> Response:
        self._serves("Completions", pooling=False)
        body, prompts, params, echo, prompt_only = await self._prepare(request, self._prepare_completion)
        render = CompletionRender(self.tokenizer, prompts, echo, prompt_only, params[0])
        return await self._serve(request, body, f"cmpl-{uuid.uuid4().hex}", prompts, params, render)

    def _prepare_completion(self, raw: bytes):
        body = self._checked_body(raw)
        prompts = [self._prompt(p) for p in completion_prompts(body.get("prompt"), self.limits)]
        logprobs, echo = get(body, "logprobs", int, None), get(body, "echo", bool, False)
        prompt_logprobs = self._prompt_logprobs(body)
        if echo and logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = logprobs  # as vLLM: echoed prompt tokens carry logprobs like the generated ones
        # echo with max_tokens 0 (how evaluation harnesses score a text): generate one token, return the prompt
        prompt_only = echo and get(body, "max_tokens", int, None) == 0
        params = [self._beam_params(body, 16, len(ids)) or
                  self._params(body, len(ids), 16, logprobs, prompt_logprobs, prompt_only) for _, ids in prompts]
        return body, prompts, params, echo, prompt_only

    def _beam_params(self, body: dict, default_max: int | None, prompt_len: int) -> BeamSearchParams | None:
        """`use_beam_search` (vLLM's extension): `n` is the beam width; the answer comes whole, never streamed."""
        if not get(body, "use_beam_search", bool, False):
            return None
        if get(body, "stream", bool, False):
            raise APIError("Streaming is not supported for beam search.", param="stream")
        ignored = [name for name in ("logprobs", "top_logprobs", "prompt_logprobs", "stop", "stop_token_ids", "seed")
                   if body.get(name) not in (None, False, [])]
        if ignored:  # beam search has none of these: refuse rather than answer as if they applied
            raise APIError(f"{', '.join(ignored)} cannot be combined with use_beam_search", param=ignored[0])
        plain = self._params(body, prompt_len, default_max, None)  # the usual checks of n, max_tokens, context
        return BeamSearchParams(beam_width=plain.n, max_tokens=plain.max_tokens or self.max_model_len - prompt_len,
                                ignore_eos=plain.ignore_eos, temperature=get(body, "temperature", float, None) or 0.0,
                                length_penalty=get(body, "length_penalty", float, 1.0),
                                include_stop_str_in_output=plain.include_stop_str_in_output)

    def _prompt_logprobs(self, body: dict) -> int | None:
        k = get(body, "prompt_logprobs", int, None)
        if k is not None and k > 0 and get(body, "stream", bool, False):
            raise APIError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        return k

    async def chat(self, request: Request) -> Response:
        self._serves("Chat Completions", pooling=False)
        body, ids, params, top = await self._prepare(request, self._prepare_chat)
        render = ChatRender(params.n, params.logprobs)
        return await self._serve(request, body, f"chatcmpl-{uuid.uuid4().hex}", [(None, ids)], [params], render)

    def _prepare_chat(self, raw: bytes):
        body = self._checked_body(raw)
        ids = self._chat_prompt(body, add_special_tokens=False)  # the template already wrote special tokens
        self.core.validate_prompt(ids)
        want, top = get(body, "logprobs", bool, False), get(body, "top_logprobs", int, None)
        if top is not None and not want:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        params = (self._beam_params(body, None, len(ids)) or
                  self._params(body, len(ids), None, (top or 0) if want else None, self._prompt_logprobs(body)))
        return body, ids, params, top

    async def embeddings(self, request: Request) -> Response:
        """/v1/embeddings: one vector per input, as floats or as base64 of little-endian float32 (the openai
        client asks for base64 by default and decodes it)."""
        self._serves("Embeddings", pooling=True)
        prompts, params, encoding = await self._prepare(request, self._prepare_embedding)
        request_id = f"embd-{uuid.uuid4().hex}"
        streams = await self._start(request_id, prompts, [params] * len(prompts))
        try:
            finals = await _unless_disconnected(request, self._collect_embeddings(streams))
        finally:
            await self._close(streams)
        if finals is None:
            return Response(status_code=499)
        data = [{"index": i, "object": "embedding", "embedding": _encode_embedding(out.outputs.embedding, encoding)}
                for i, out in enumerate(finals)]
        tokens = sum(len(out.prompt_token_ids) for out in finals)
        return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()), "model": self.name,
                             "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                     "completion_tokens": 0}})

    def _prepare_embedding(self, raw: bytes):
        body = self._checked_body(raw)
        prompts = [self._prompt(p) for p in completion_prompts(body.get("input"), self.limits, "input")]
        encoding = get(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise APIError("encoding_format must be \"float\" or \"base64\"", param="encoding_format")
        params = PoolingParams(dimensions=get(body, "dimensions", int, None))
        self.core.runner.pooler.check(params, self.name)
        return prompts, params, encoding

    async def _collect_embeddings(self, streams: list[RequestStream]) -> list:
        finals = []
        for stream in streams:
            async for out in stream:
                if out.finished and isinstance(out, RequestOutput):  # a pooling request ends as one only on failure
                    raise RequestFailed("The engine failed while processing this request")
                final = out
            finals.append(final)
        return finals

    def _checked_body(self, raw: bytes) -> dict:
        body = parse_body(raw)
        model = body.get("model")
        if model is not None and not (model == self.name or isinstance(model, str) and model in self.loras):
            raise APIError(f"The model `{clip(str(model), 100)}` does not exist.", status=404, param="model")
        check_unsupported(body)
        if get(body, "stream_options", dict, None) is not None and not get(body, "stream", bool, False):
            raise APIError("stream_options can only be set when stream is true", param="stream_options")
        return body

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        text, ids = self.core.tokenize(prompt)
        self.core.validate_prompt(ids)  # empty, too long, out-of-vocab: ParamError -> 400
        return text, ids

    def _chat_prompt(self, body: dict, add_special_tokens: bool) -> list[int]:
        messages, kwargs = chat_messages(body), template_kwargs(body, self.trust_template)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=get(body, "add_generation_prompt", bool, True),
                continue_final_message=get(body, "continue_final_message", bool, False), **kwargs)
        except Exception as exc:  # no template, or the template refuses these messages: the request's fault
            raise APIError(f"Cannot apply the chat template: {clip(str(exc), 300)}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def _params(self, body: dict, prompt_len: int, default_max: int | None, logprobs: int | None,
                prompt_logprobs: int | None = None, prompt_only: bool = False) -> SamplingParams:
        fields = sampling_fields(body, self.limits, self.max_model_len)
        requested = get(body, "max_completion_tokens", int, None)
        requested = requested if requested is not None else get(body, "max_tokens", int, None)
        requested = 1 if prompt_only else requested  # echo with max_tokens 0: one token, then dropped
        if requested is not None and prompt_len + requested > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {requested} output tokens and your prompt contains {prompt_len} input "
                           f"tokens, for a total of {prompt_len + requested} tokens. Please reduce the length "
                           "of the input prompt or the number of requested output tokens.", param="max_tokens")
        if requested is None and default_max is not None:  # the default shrinks to fit; an explicit value does not
            requested = min(default_max, self.max_model_len - prompt_len)
        params = SamplingParams(**fields, max_tokens=requested, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        self.core.validate_params(params)  # n, vocabulary: checked before anything is queued
        return params

    async def _serve(self, request, body, request_id, prompts, params, render) -> Response:
        stream, options = get(body, "stream", bool, False), get(body, "stream_options", dict, None)
        lora = self.loras.get(body.get("model")) if isinstance(body.get("model"), str) else None
        streams = await self._start(request_id, prompts, params, lora)
        meta = {"id": request_id, "created": int(time.time()), "model": self.name}
        if stream:
            events = self._events(streams, render, meta, bool((options or {}).get("include_usage")))
            return StreamingResponse(events, media_type="text/event-stream",
                                     background=BackgroundTask(self._close, streams))
        try:
            finals = await _unless_disconnected(request, self._collect(streams))
        finally:
            await self._close(streams)
        if finals is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        choices = [render.choice(i * render.n + o.index, i, o, out) for i, out in enumerate(finals) for o in out.outputs]
        return JSONResponse({**meta, "object": render.object, "choices": choices, "usage": _usage(finals),
                             **render.extra(finals)})

    async def _start(self, request_id: str, prompts, params, lora: LoRARequest | None = None) -> list[RequestStream]:
        streams = []
        try:
            for i, ((text, ids), p) in enumerate(zip(prompts, params)):
                streams.append(await self.engine.generate({"prompt_token_ids": ids}, p, f"{request_id}-{i}", lora))
        except BaseException:  # a later prompt failed: the earlier ones must not keep running
            await self._close(streams)
            raise
        return streams

    async def _close(self, streams: list[RequestStream]) -> None:
        """Abort what has not finished (the client left, or another prompt failed); safe to repeat."""
        for stream in streams:
            if not stream.finished:
                self.registry.count_abort()
            await stream.aclose()

    async def _collect(self, streams: list[RequestStream]) -> list[RequestOutput]:
        finals = [None] * len(streams)
        async for i, out in self._merged(streams):
            finals[i] = out
        return finals

    async def _merged(self, streams: list[RequestStream]):
        """Yield (stream index, output) as outputs arrive from any of the streams."""
        pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    out = future.result()  # an engine error raises here
                    if out.finished:
                        self.registry.observe(streams[i], out)
                        if any(o.finish_reason == "error" for o in out.outputs):
                            raise RequestFailed("The engine failed while processing this request")
                    else:
                        pending[asyncio.ensure_future(anext(streams[i]))] = i
                    yield i, out
        finally:
            for future in pending:
                future.cancel()

    async def _events(self, streams, render, meta: dict, include_usage: bool):
        chunk = {**meta, "object": render.chunk_object}
        try:
            for choices in render.opening():
                yield _sse({**chunk, "choices": choices})
            finals = [None] * len(streams)
            async for i, out in self._merged(streams):
                finals[i] = out
                choices = render.deltas(i, out)
                if choices:
                    yield _sse({**chunk, "choices": choices})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(finals)})
        except Exception as exc:  # headers are sent: the error can only travel as an event
            message, status, param = _error_of(exc)
            if status == 500 and not isinstance(exc, RequestFailed):
                logger.exception("Stream %s failed", meta["id"])
            yield _sse(error_body(message, status, param))
        finally:
            await self._close(streams)
        yield "data: [DONE]\n\n"


class Render:
    """Turns one endpoint's engine outputs into response choices (`choice`) or stream chunks (`deltas`)."""

    def __init__(self, n: int):
        self.n, self.sent = n, {}  # choice index -> (characters, tokens) already streamed; -1: finished

    def opening(self):
        return []

    def extra(self, finals: list[RequestOutput]) -> dict:
        return {}

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        choices = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            chars, tokens = self.sent.get(index, (0, 0))
            text, new_tokens = o.text[chars:], o.token_ids[tokens:]
            if chars < 0 or not (text or o.finish_reason or (o.logprobs is not None and new_tokens)):
                continue
            entries = o.logprobs[tokens:len(o.token_ids)] if o.logprobs is not None else None  # a live list
            choices.append(self.delta(index, prompt_index, index not in self.sent, text, entries, new_tokens, o, out))
            self.sent[index] = (-1 if o.finish_reason else len(o.text), len(o.token_ids))
        return choices


class CompletionRender(Render):
    """/v1/completions: `text` and the legacy logprobs layout. With `echo` the prompt comes first, in the text and,
    with `logprobs`, in the logprobs (its first token has none); `prompt_only` (echo with max_tokens 0) returns
    the prompt alone, dropping the one token generated. Logprobs are sent when the request asked for them."""
    object = chunk_object = "text_completion"

    def __init__(self, tokenizer, prompts, echo: bool, prompt_only: bool, params: SamplingParams):
        super().__init__(params.n)
        self.tokenizer, self.prompts, self.echo, self.top = tokenizer, prompts, echo, params.logprobs
        self.prompt_only = prompt_only
        self.prefixes = [(text if text is not None else tokenizer.decode(ids)) if echo else "" for text, ids in prompts]
        self.offsets = {}  # choice index -> characters sent so far, for logprobs' text_offset

    def choice(self, index: int, prompt_index: int, o, out) -> dict:
        return self.delta(index, prompt_index, True, o.text, o.logprobs, o.token_ids, o, out)

    def delta(self, index, prompt_index, first, text, entries, token_ids, o, out) -> dict:
        if self.prompt_only:
            text, entries, token_ids = "", entries and [], []
        prefix = self.prefixes[prompt_index] if first else ""
        if first and self.echo:
            token_ids = self.prompts[prompt_index][1] + list(token_ids)
            if entries is not None:
                entries = (out.prompt_logprobs or [None] * len(self.prompts[prompt_index][1])) + list(entries)
        start = self.offsets.get(index, 0)
        logprobs = self._logprobs(entries, token_ids, start) if self.top is not None else None
        self.offsets[index] = start + len(prefix) + len(text)
        choice = {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": o.finish_reason,
                  "stop_reason": o.stop_reason}
        if first and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs_json(out.prompt_logprobs)
        return choice

    def _logprobs(self, entries, token_ids, offset: int) -> dict:
        """vLLM's legacy layout: per token its text, logprob, and {text: logprob} of it and the top `logprobs`
        (None for the prompt's first token); text_offset counts the characters of the tokens before it."""
        tokens, token_logprobs, top_logprobs = [], [], []
        for entry, token in zip(entries, token_ids):
            if entry is None:
                tokens.append(self.tokenizer.decode([token]))
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            tokens.append(entry[token].decoded_token or "")
            token_logprobs.append(_finite(entry[token].logprob))
            top = itertools.islice(entry.values(), self.top + 1)  # the token itself, then the top k by rank
            top_logprobs.append({lp.decoded_token: _finite(lp.logprob) for lp in top})
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[:len(tokens)]
        return {"text_offset": offsets, "tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs}


class ChatRender(Render):
    """/v1/chat/completions: an assistant message; a stream opens with a role chunk per choice."""
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, n: int, top_logprobs: int | None):
        super().__init__(n)
        self.top = top_logprobs

    def opening(self):
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}] for i in range(self.n)]

    def extra(self, finals: list[RequestOutput]) -> dict:
        prompt_logprobs = finals[0].prompt_logprobs
        return {} if prompt_logprobs is None else {"prompt_logprobs": _prompt_logprobs_json(prompt_logprobs)}

    def choice(self, index: int, prompt_index: int, o, out) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": o.text},
                "logprobs": self._logprobs(o.logprobs, o.token_ids), "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason}

    def delta(self, index, prompt_index, first, text, entries, token_ids, o, out) -> dict:
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(entries, token_ids),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    def _logprobs(self, entries, token_ids) -> dict | None:
        if self.top is None:  # the request asked for none
            return None
        content = []
        for entry, token in zip(entries, token_ids):
            top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= self.top),
                         key=lambda lp: lp.rank)[:self.top]
            content.append({**_chat_token(entry[token]), "top_logprobs": [_chat_token(lp) for lp in top]})
        return {"content": content}


def _chat_token(lp: Logprob) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": _finite(lp.logprob), "bytes": list(token.encode())}


def _prompt_logprobs_json(entries) -> list:
    """vLLM's `prompt_logprobs` field: per prompt token None (the first) or {token id: {logprob, rank, text}}."""
    return [None if entry is None else {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in entries]


def _encode_embedding(vector: list[float], encoding: str):
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # little-endian float32


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf; vLLM sends -9999.0


def _usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(o.token_ids) for out in finals for o in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


async def _unless_disconnected(request: Request, work):
    """Run `work`; if the client disconnects first, cancel it and return None."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None
