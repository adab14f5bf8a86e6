"""The OpenAI-compatible HTTP server (Starlette), following vLLM's contract (docs: shared/notes/vllm-contract.md).

A JSON body comes in; it is checked and turned into token ids and `SamplingParams` here, on the event loop;
`AsyncLLMEngine.generate` hands it to the engine thread and returns a stream of `RequestOutput`s, which are
rendered either as one JSON response or as Server-Sent Events. A client that goes away aborts its requests.
The same streams feed the Prometheus histograms served at /metrics.
"""
import asyncio
import hmac
import itertools
import json
import time
import uuid

from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import __version__
from .async_engine import AsyncLLMEngine, RequestStream
from .engine import Logprob, RequestOutput
from .metrics import Metrics
from .sampling import ParamError, SamplingParams

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
# Body fields passed to SamplingParams as they are, with the JSON type each must have.
SAMPLING_FIELDS = {"n": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
                   "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
                   "min_tokens": int, "include_stop_str_in_output": bool, "ignore_eos": bool,
                   "skip_special_tokens": bool}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None) -> Starlette:
    api = OpenAIServer(engine, served_model_name)
    routes = [Route("/v1/models", api.models), Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]), Route("/health", api.health),
              Route("/version", api.version), Route("/tokenize", api.tokenize, methods=["POST"]),
              Route("/detokenize", api.detokenize, methods=["POST"]), Route("/metrics", api.metrics)]
    handlers = {APIError: _api_error, ParamError: _api_error, Exception: _internal_error}
    middleware = [Middleware(ApiKeyMiddleware, api_key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status", 400)
    return JSONResponse(error_body(str(exc), status, exc.param), status_code=status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", 500), status_code=500)


class ApiKeyMiddleware:
    """401 on /v1/* without `Authorization: Bearer <key>`; the other routes stay open, as in vLLM."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no key guessing by timing
                return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class OpenAIServer:
    def __init__(self, engine: AsyncLLMEngine, served_model_name: str):
        self.engine, self.core, self.name = engine, engine.engine, served_model_name
        self.tokenizer, self.max_model_len = self.core.tokenizer, self.core.max_model_len
        self.registry = Metrics(served_model_name)

    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "nanoserve",
                "root": self.core.config.model or self.name, "parent": None, "max_model_len": self.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self.engine.is_alive else 503)

    async def version(self, request: Request) -> JSONResponse:
        return JSONResponse({"version": __version__})

    async def metrics(self, request: Request) -> Response:
        return Response(self.registry.render(self.engine.stats), media_type="text/plain; version=0.0.4")

    async def tokenize(self, request: Request) -> JSONResponse:
        body = await _json_body(request)
        if "messages" in body:
            ids = self._chat_prompt(body, add_special_tokens=_get(body, "add_special_tokens", bool, False))
        else:
            prompt = _get(body, "prompt", str, None)
            if prompt is None:
                raise APIError("Either prompt or messages is required", param="prompt")
            ids = self.tokenizer(prompt, add_special_tokens=_get(body, "add_special_tokens", bool, True)).input_ids
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> JSONResponse:
        ids = self._vocab_ids((await _json_body(request)).get("tokens"), "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    def _vocab_ids(self, ids, name: str) -> list[int]:
        if not _all(ids, int) or any(not 0 <= t < self.core.vocab_size for t in ids):
            raise APIError(f"{name} must be a list of token ids in [0, {self.core.vocab_size})", param=name)
        return ids

    async def completions(self, request: Request) -> Response:
        body = await _json_body(request)
        self._check_model(body)
        prompts = [self._prompt(p) for p in _completion_prompts(body.get("prompt"))]
        logprobs = _get(body, "logprobs", int, None)
        echo = _get(body, "echo", bool, False)
        if echo and logprobs is not None:
            raise APIError("echo with logprobs needs prompt logprobs, which nanoserve does not compute yet",
                           param="echo")
        params = [self._params(body, len(ids), 16, logprobs) for _, ids in prompts]
        render = CompletionRender(self.tokenizer, prompts, echo, params[0].n)
        return await self._serve(request, body, f"cmpl-{uuid.uuid4().hex}", prompts, params, render)

    async def chat(self, request: Request) -> Response:
        body = await _json_body(request)
        self._check_model(body)
        ids = self._chat_prompt(body, add_special_tokens=False)  # the template already wrote special tokens
        self.core.validate_prompt(ids)
        want, top = _get(body, "logprobs", bool, False), _get(body, "top_logprobs", int, None)
        if top is not None and not want:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        params = self._params(body, len(ids), None, (top or 0) if want else None)
        render = ChatRender(params.n, top or 0)
        return await self._serve(request, body, f"chatcmpl-{uuid.uuid4().hex}", [(None, ids)], [params], render)

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.name:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model")

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        text, ids = self.core.tokenize(prompt)
        self.core.validate_prompt(ids)  # empty, too long, out-of-vocab: ParamError -> 400
        return text, ids

    def _chat_prompt(self, body: dict, add_special_tokens: bool) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError("messages must be a non-empty list of objects", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(
                [_flatten_content(m) for m in messages], tokenize=False,
                add_generation_prompt=_get(body, "add_generation_prompt", bool, True),
                **_get(body, "chat_template_kwargs", dict, {}))
        except (ValueError, TypeError, KeyError, TemplateError) as exc:  # no template, or the template refuses
            raise APIError(f"Cannot apply the chat template: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def _params(self, body: dict, prompt_len: int, default_max: int | None, logprobs: int | None) -> SamplingParams:
        fields = {name: _get(body, name, kind, None) for name, kind in SAMPLING_FIELDS.items()}
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or _all(stop, str)):
            raise APIError("stop must be a string or a list of strings", param="stop")
        fields.update(stop=stop, stop_token_ids=self._vocab_ids(body.get("stop_token_ids") or [], "stop_token_ids"))
        if fields["seed"] is not None and not -2**63 <= fields["seed"] < 2**64:  # torch's range; else the step fails
            raise APIError("seed must fit in 64 bits", param="seed")
        requested = _get(body, "max_completion_tokens", int, None)
        requested = requested if requested is not None else _get(body, "max_tokens", int, None)
        if requested is not None and prompt_len + requested > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {requested} output tokens and your prompt contains {prompt_len} input "
                           f"tokens, for a total of {prompt_len + requested} tokens. Please reduce the length "
                           "of the input prompt or the number of requested output tokens.", param="max_tokens")
        if requested is None and default_max is not None:  # the default shrinks to fit; an explicit value does not
            requested = min(default_max, self.max_model_len - prompt_len)
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None}, max_tokens=requested,
                              logprobs=logprobs)

    async def _serve(self, request, body, request_id, prompts, params, render) -> Response:
        stream, options = _get(body, "stream", bool, False), _get(body, "stream_options", dict, None)
        if options is not None and not stream:
            raise APIError("stream_options can only be set when stream is true", param="stream_options")
        streams = await self._start(request_id, prompts, params)
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
        choices = [render.choice(i * render.n + o.index, i, o) for i, out in enumerate(finals) for o in out.outputs]
        return JSONResponse({**meta, "object": render.object, "choices": choices, "usage": _usage(finals)})

    async def _start(self, request_id: str, prompts, params) -> list[RequestStream]:
        streams = []
        try:
            for i, ((text, ids), p) in enumerate(zip(prompts, params)):
                streams.append(await self.engine.generate({"prompt_token_ids": ids}, p, f"{request_id}-{i}"))
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
            yield _sse(error_body(str(exc), 400 if isinstance(exc, ValueError) else 500))
        finally:
            await self._close(streams)
        yield "data: [DONE]\n\n"


class Render:
    """Turns one endpoint's engine outputs into response choices (`choice`) or stream chunks (`deltas`)."""

    def __init__(self, n: int):
        self.n, self.sent = n, {}  # choice index -> (characters, tokens) already streamed; -1: finished

    def opening(self):
        return []

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        choices = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            chars, tokens = self.sent.get(index, (0, 0))
            text, new_tokens = o.text[chars:], o.token_ids[tokens:]
            if chars < 0 or not (text or o.finish_reason or (o.logprobs is not None and new_tokens)):
                continue
            entries = o.logprobs[tokens:len(o.token_ids)] if o.logprobs is not None else None  # a live list
            choices.append(self.delta(index, prompt_index, index not in self.sent, text, entries, new_tokens, o))
            self.sent[index] = (-1 if o.finish_reason else len(o.text), len(o.token_ids))
        return choices


class CompletionRender(Render):
    """/v1/completions: `text` (after the prompt with `echo`) and the legacy logprobs layout."""
    object = chunk_object = "text_completion"

    def __init__(self, tokenizer, prompts, echo: bool, n: int):
        super().__init__(n)
        self.prefixes = [(text if text is not None else tokenizer.decode(ids)) if echo else "" for text, ids in prompts]
        self.offsets = {}  # choice index -> characters streamed so far, for logprobs' text_offset

    def choice(self, index: int, prompt_index: int, o) -> dict:
        return self.delta(index, prompt_index, True, o.text, o.logprobs, o.token_ids, o)

    def delta(self, index, prompt_index, first, text, entries, token_ids, o) -> dict:
        prefix = self.prefixes[prompt_index] if first else ""
        offset = self.offsets.get(index, 0) + len(prefix)
        logprobs = _legacy_logprobs(entries, token_ids, offset) if entries is not None else None
        self.offsets[index] = offset + len(text)
        return {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason}


class ChatRender(Render):
    """/v1/chat/completions: an assistant message; a stream opens with a role chunk per choice."""
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, n: int, top_logprobs: int):
        super().__init__(n)
        self.top = top_logprobs

    def opening(self):
        return [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}] for i in range(self.n)]

    def choice(self, index: int, prompt_index: int, o) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": o.text},
                "logprobs": self._logprobs(o.logprobs, o.token_ids), "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason}

    def delta(self, index, prompt_index, first, text, entries, token_ids, o) -> dict:
        return {"index": index, "delta": {"content": text}, "logprobs": self._logprobs(entries, token_ids),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}

    def _logprobs(self, entries, token_ids) -> dict | None:
        if entries is None:
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


def _legacy_logprobs(entries, token_ids, offset: int) -> dict:
    tokens = [entry[t].decoded_token or "" for entry, t in zip(entries, token_ids)]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[:len(tokens)]
    return {"text_offset": offsets, "tokens": tokens,
            "token_logprobs": [_finite(entry[t].logprob) for entry, t in zip(entries, token_ids)],
            "top_logprobs": [{lp.decoded_token: _finite(lp.logprob) for lp in entry.values()} for entry in entries]}


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


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:  # also bad UTF-8
        raise APIError(f"Malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise APIError("The JSON body must be an object")
    return body


def _get(body: dict, name: str, kind: type, default):
    """body[name] checked against a JSON type (int is not bool; float accepts int); None means unset."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise APIError(f"{name} must be of type {kind.__name__}, got {value!r}", param=name)
    return value


def _all(values, kind) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def _completion_prompts(prompt) -> list:
    """A string, a list of strings, a list of token ids or a list of such lists -> a list of prompts."""
    if isinstance(prompt, str) or (_all(prompt, int) and prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_all(p, int) and p) for p in prompt):
        return prompt
    raise APIError("prompt must be a non-empty string, list of strings, list of token ids or list of lists of "
                   "token ids", param="prompt")


def _flatten_content(message: dict) -> dict:
    """OpenAI content parts [{"type": "text", "text": ...}] -> one string, which chat templates expect."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return {**message, "content": content if content is not None else ""}
