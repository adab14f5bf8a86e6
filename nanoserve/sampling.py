"""Sampling: the per-request `SamplingParams` and the batched sampler that turns logits into tokens.

Params come from the user (offline API or the server's JSON body); fields left as None are filled from the
model's generation_config.json and then OpenAI's defaults (`resolve`). The runner calls `sample()` once per
step with one logits row per sequence that produces a token; it returns the chosen ids and, when asked,
their log-probabilities.
"""
from dataclasses import dataclass, field, replace

import torch

GREEDY_EPS = 1e-5  # temperatures below this mean greedy, as in vLLM
MAX_LOGPROBS = 20  # top log-probabilities per position, at most (vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float | None = None  # None: generation_config, else 1.0
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 disable
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top log-probabilities returned beside the sampled token
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (see runner.py)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit before sampling (OpenAI's)

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.n >= 1, "n must be at least 1", "n")
        _check(self.temperature is None or self.temperature >= 0, "temperature must be non-negative", "temperature")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p")
        _check(self.top_k is None or self.top_k >= -1, "top_k must be -1 (disable), 0 (disable) or at least 1", "top_k")
        _check(self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2 <= getattr(self, name) <= 2, f"{name} must be in [-2, 2]", name)
        _check(self.repetition_penalty is None or self.repetition_penalty > 0,
               "repetition_penalty must be greater than zero", "repetition_penalty")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
        _check(self.min_tokens >= 0, "min_tokens must be non-negative", "min_tokens")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               "min_tokens must be less than or equal to max_tokens", "min_tokens")
        _check(all(self.stop), "stop cannot contain an empty string", "stop")
        for name in ("logprobs", "prompt_logprobs"):  # vLLM's limit (max_logprobs) and wording
            k = getattr(self, name)
            _check(k is None or k <= MAX_LOGPROBS, f"Requested {'sample' if name == 'logprobs' else 'prompt'} "
                   f"logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}", name)
            _check(k is None or k >= 0, f"`{name}` must be a positive value.", name)
        _check(self.seed is None or -2**63 <= self.seed < 2**64, "seed must fit in 64 bits", "seed")
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()} or None
        _check(all(-100 <= b <= 100 for b in (self.logit_bias or {}).values()),
               "logit_bias values must be in [-100, 100]", "logit_bias")

    def resolve(self, generation_config: dict) -> "SamplingParams":
        """Fill unset fields from the model's generation_config, then from OpenAI's defaults. As in vLLM, the
        config's `max_new_tokens` is the default `max_tokens`; as in transformers, `do_sample: false` is greedy."""
        defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        config = dict(generation_config)
        if config.get("do_sample") is False:
            config["temperature"] = 0.0
        filled = {name: fallback if config.get(name) is None else config[name] for name, fallback in defaults.items()
                  if getattr(self, name) is None}
        if self.max_tokens is None and isinstance(config.get("max_new_tokens"), int):
            filled["max_tokens"] = config["max_new_tokens"]
        return replace(self, **filled)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)


class ParamError(ValueError):
    """A bad sampling parameter; `param` names the field so the server can report it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps `param` when a data-parallel replica sends the error to the server's process
        return ParamError, (str(self), self.param)


def _check(ok: bool, message: str, param: str):
    if not ok:
        raise ParamError(message, param)


@dataclass
class SampleRequest:
    """What the sampler needs to know about one row of logits."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    banned_token_ids: list[int] = field(default_factory=list)  # stop tokens masked while below min_tokens


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the sampled token, its rank, [(token_id, logprob) of the top-k]) or None
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]


def sample(logits: torch.Tensor, rows: list[SampleRequest], generator: torch.Generator | None = None) -> SampleResult:
    """Choose one token per row. `generator` draws noise for rows without their own seed."""
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
    logits = _penalize(logits, rows)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(random_rows) == len(rows):  # the common case needs no argmax, no row gather, no index on the GPU
        chosen = _sample_random(logits, rows, generator)
    else:
        chosen = logits.argmax(dim=-1)
        if random_rows:
            chosen[random_rows] = _sample_random(logits[random_rows], [rows[i] for i in random_rows], generator)
    token_ids = chosen.tolist()
    logprobs = [None] * len(rows)
    if raw_logprobs is not None:
        logprobs = [logprob_entry(raw_logprobs[i], token_ids[i], r.params.logprobs)
                    if r.params.logprobs is not None else None for i, r in enumerate(rows)]
    return SampleResult(token_ids, logprobs)


def target_probs(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """The distribution each row samples from, after every rule (greedy rows: one-hot on the argmax).
    Speculative decoding verifies drafts against it."""
    logits = _penalize(logits.float(), rows)
    probs = torch.empty_like(logits)
    for i, row in enumerate(rows):
        if row.params.greedy:
            probs[i] = torch.nn.functional.one_hot(logits[i].argmax(), logits.shape[-1])
        else:
            probs[i] = torch.softmax(_filter(logits[i] / row.params.temperature, row.params), dim=-1)
    return probs


def _penalize(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Penalties, logit bias and banned tokens, on a copy: the caller's raw logits still serve for logprobs
    (as in vLLM, logprobs describe the model's distribution, before any of these)."""
    if not any(row.params.has_penalties or row.banned_token_ids or row.params.logit_bias for row in rows):
        return logits  # nothing to change: skip the copy of a [rows, vocab] tensor
    logits = _apply_penalties(logits.to(torch.float32, copy=True), rows)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            bias = row.params.logit_bias
            logits[i, list(bias)] += torch.tensor(list(bias.values()), device=logits.device)
        if row.banned_token_ids:
            logits[i, row.banned_token_ids] = float("-inf")
    return logits


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Repetition penalty (HF/vLLM style, over prompt and output), presence and frequency (output only)."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                dtype=torch.long, device=logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros_like(logits[i]).scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _sample_random(logits: torch.Tensor, rows: list[SampleRequest], generator) -> torch.Tensor:
    # From pinned memory without waiting: a plain host-to-GPU copy would first wait for the forward pass.
    on_gpu = logits.device.type == "cuda"
    temperature = torch.tensor([r.params.temperature for r in rows], pin_memory=on_gpu)
    temperature = temperature.to(logits.device, non_blocking=on_gpu).unsqueeze(1)
    logits = logits / temperature
    for i, row in enumerate(rows):  # filters are per row; most rows use none, and those cost no kernel launch
        if _has_filter(row.params):
            logits[i] = _filter(logits[i], row.params)
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p. The rows without a seed share one
    # draw from the shared generator (one kernel, not one per row); each seeded request draws its row from its
    # own generator, so its samples do not depend on what else is in the batch.
    seeded = [i for i, row in enumerate(rows) if row.generator is not None]
    if not seeded:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    else:
        noise = torch.empty_like(probs)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            noise[shared] = torch.empty_like(probs[shared]).exponential_(generator=generator)
        for i in seeded:
            noise[i].exponential_(generator=rows[i].generator)
    return (probs / noise).argmax(dim=-1)


def _has_filter(p: SamplingParams) -> bool:
    return bool(p.top_k and 0 < p.top_k) or p.top_p < 1.0 or p.min_p > 0.0


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    if p.top_k and p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def logprob_entries(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> list:
    """Per row of raw logprobs: (logprob of token `targets[i]`, its rank, the top-k (token, logprob) pairs)."""
    chosen = logprobs.gather(1, targets[:, None])
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    top = torch.topk(logprobs, k) if k > 0 else None
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([[]] * len(ranks),) * 2
    return [(lp, rank, list(zip(ids, values)))
            for lp, rank, ids, values in zip(chosen[:, 0].tolist(), ranks, top_ids, top_values)]


def logprob_entry(logprobs: torch.Tensor, token_id: int, k: int):
    """`logprob_entries` for one row."""
    return logprob_entries(logprobs[None], torch.tensor([token_id], device=logprobs.device), k)[0]
