"""Untrusted request bodies in, validated values out: the server's first line of defence.

Every request body is hostile until this module has checked it. `parse_body` turns raw bytes into a JSON object
(400 for bad JSON, bad UTF-8, lone surrogates or nesting too deep); the `get_*` helpers read one field and check
its JSON type and range; `check_unsupported` refuses the OpenAI parameters nanoserve does not implement (a 400
that names them, never a silent no-op); `sampling_fields` builds the keyword arguments of `SamplingParams`.
Every size a client controls is bounded here (`Limits`), so nothing unbounded reaches the engine thread.
The server (server.py) calls these on its worker threads, never on the event loop.
"""
import json
import math
from dataclasses import dataclass

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestEntityTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
INT64 = (-2**63, 2**63 - 1)
# Body fields passed to SamplingParams as they are, with the JSON type each must have.
# (seed and min_tokens are read apart: they have ranges to check.)
SAMPLING_FIELDS = {"n": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
                   "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
                   "include_stop_str_in_output": bool, "ignore_eos": bool, "skip_special_tokens": bool}
# apply_chat_template's own arguments: through chat_template_kwargs they would change what the call does (return
# tensors, tokenize, swap the template), not just feed the template a variable.
RESERVED_TEMPLATE_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (vLLM has VLLM_MAX_N_SEQUENCES and friends for the same reason)."""
    max_body_bytes: int = 8 * 2**20
    max_prompts: int = 256  # prompts in one /v1/completions list
    max_stop: int = 32  # stop strings
    max_stop_chars: int = 1024  # characters in one stop string
    max_token_list: int = 1024  # stop_token_ids and logit_bias entries


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8; RecursionError deep nesting
        raise APIError(f"Malformed JSON body: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError("The JSON body must be an object")
    _check_strings(body)
    return body


def _check_strings(value) -> None:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text can hold; the tokenizer would fail
    on it deep inside the engine. Walks the body without recursion (nesting depth is the client's choice)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise APIError("The body holds a string that is not valid Unicode (a lone surrogate)") from None


def get(body: dict, name: str, kind: type, default):
    """body[name] checked against a JSON type (int is not bool; float accepts int but must be finite);
    None means unset."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise APIError(f"{name} must be of type {kind.__name__}, got {clip(repr(value))}", param=name)
    if kind is float:
        try:
            value = float(value)  # a huge JSON integer does not fit a float
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise APIError(f"{name} must be a finite number", param=name)
    return value


def get_int(body: dict, name: str, default, low: int = INT64[0], high: int = INT64[1]):
    value = get(body, name, int, default)
    if value is not None and not low <= value <= high:
        raise APIError(f"{name} must be in [{low}, {high}], got {clip(repr(value))}", param=name)
    return value


def all_of(values, kind) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def clip(text: str, limit: int = 60) -> str:
    """A client's value quoted back in an error message, cut short: an error must not echo a megabyte."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_unsupported(body: dict) -> None:
    """OpenAI parameters nanoserve does not implement are refused by name: silently ignoring `tools` or
    `response_format` would hand the client an answer that looks right and is not what it asked for."""
    no_op = {"tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
             "response_format": ({"type": "text"},), "suffix": ("",), "modalities": (["text"],),
             "guided_json": (), "guided_regex": (),
             "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "prompt_embeds": (),
             "audio": (), "prediction": (), "truncate_prompt_tokens": ()}
    names = [name for name, allowed in no_op.items() if body.get(name) is not None and body[name] not in allowed]
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        names.append("best_of")
    if names:
        raise APIError(f"Unsupported parameter(s): {', '.join(names)}. nanoserve does not implement them.",
                       param=names[0])


def sampling_fields(body: dict, limits: Limits, max_model_len: int) -> dict:
    """Keyword arguments for SamplingParams from the body's fields (ranges SamplingParams checks itself)."""
    fields = {name: get(body, name, kind, None) for name, kind in SAMPLING_FIELDS.items()}
    fields.update(seed=get_int(body, "seed", None),  # torch's generator takes int64; seed + i must fit too
                  min_tokens=get_int(body, "min_tokens", None, 0, max_model_len))
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or all_of(stop, str)):
        raise APIError("stop must be a string or a list of strings", param="stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise APIError(f"stop takes at most {limits.max_stop} strings of at most {limits.max_stop_chars} "
                       "characters", param="stop")
    fields.update(stop=stop, stop_token_ids=_token_list(body, "stop_token_ids", limits),
                  logit_bias=_logit_bias(body, limits))
    return {k: v for k, v in fields.items() if v is not None}


def _token_list(body: dict, name: str, limits: Limits) -> list[int] | None:
    ids = body.get(name)
    if ids is None:
        return None
    if not all_of(ids, int) or len(ids) > limits.max_token_list:
        raise APIError(f"{name} must be a list of at most {limits.max_token_list} token ids", param=name)
    return ids


def _logit_bias(body: dict, limits: Limits) -> dict[int, float] | None:
    """OpenAI's {"token id as a string": bias in [-100, 100]}; the engine checks the ids against the vocabulary."""
    bias = get(body, "logit_bias", dict, None)
    if bias is None:
        return None
    if len(bias) > limits.max_token_list:
        raise APIError(f"logit_bias takes at most {limits.max_token_list} entries", param="logit_bias")
    parsed = {}
    for key, value in bias.items():
        if not (key.isascii() and key.strip().lstrip("-").isdigit() and len(key) < 20):
            raise APIError(f"logit_bias keys must be token ids, got {clip(repr(key))}", param="logit_bias")
        value = get({"logit_bias": value}, "logit_bias", float, None)
        if value is None or not -100 <= value <= 100:
            raise APIError("logit_bias values must be numbers in [-100, 100]", param="logit_bias")
        parsed[int(key)] = value
    return parsed


def completion_prompts(prompt, limits: Limits, name: str = "prompt") -> list:
    """A string, a list of strings, a list of token ids or a list of such lists -> a list of prompts."""
    if isinstance(prompt, str) or (all_of(prompt, int) and prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or (all_of(p, int) and p) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise APIError(f"{name} takes at most {limits.max_prompts} prompts", param=name)
        return prompt
    raise APIError(f"{name} must be a non-empty string, list of strings, list of token ids or list of lists of "
                   "token ids", param=name)


def chat_messages(body: dict) -> list[dict]:
    """The `messages`, with OpenAI content parts flattened to the one string chat templates expect."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError("messages must be a non-empty list of objects", param="messages")
    for m in messages:
        if not isinstance(m.get("role"), str):
            raise APIError("every message needs a string role", param="messages")
    return [_flatten_content(m) for m in messages]


def _flatten_content(message: dict) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                # An image the model never sees would get a made-up description: refuse instead.
                raise APIError(f"Content parts of type {clip(repr(kind))} are not supported: this model takes text "
                               "only", param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is not None and not isinstance(content, str):
        raise APIError("message content must be a string or a list of text parts", param="messages")
    return {**message, "content": content if content is not None else ""}


def template_kwargs(body: dict, trust_request_chat_template: bool) -> dict:
    """apply_chat_template's extra arguments from the body. A template sent by the client is code (Jinja loops can
    burn the CPU for as long as they like), so it is refused unless the operator opted in, as vLLM does."""
    kwargs = dict(get(body, "chat_template_kwargs", dict, {}))
    template = kwargs.pop("chat_template", None) or get(body, "chat_template", str, None)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
    if template is not None:
        if not trust_request_chat_template:
            raise APIError("Chat templates sent with a request are refused; the server must be started with "
                           "--trust-request-chat-template to accept them", param="chat_template")
        if not isinstance(template, str):
            raise APIError("chat_template must be a string", param="chat_template")
        kwargs["chat_template"] = template
    return kwargs
