"""The engine: requests in, text out, one `step()` at a time.

`add_request` tokenizes a prompt, validates it, and hands one `Sequence` per parallel sample to the scheduler.
`step()` asks the scheduler for a batch, has the runner compute it, gives the sampled tokens back to the
scheduler, then turns tokens into text: incremental detokenization (never emitting half a UTF-8 character),
stop strings, log-probabilities. It returns a `RequestOutput` for every request that advanced. The offline
`LLM` and the server both drive this loop; neither knows about blocks or tensors.

Not thread-safe: a server calls `add_request`/`abort_request` between steps (see `async_engine.py`).
"""
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace

from transformers import AutoTokenizer

from .config import EngineConfig
from .default_model import resolve_model
from .beam_search import BeamGroup, BeamSearchParams
from .pooling import PoolingParams, PoolingRequestOutput, EmbeddingOutput
from .parallel import EngineDeadError
from .runner import ModelRunner
from .sampling import ParamError, SamplingParams
from .scheduler import DraftModelProposer, NgramProposer, Scheduler, Sequence
from .trace import StepTracer

logger = logging.getLogger("nanoserve")

# Prompt tokens kept as context so the first generated token decodes with its leading space.
DETOKENIZE_CONTEXT = 6


@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class Detokenizer:
    """Incremental detokenization: decode a window of recent tokens and emit only the text that became final.
    A window that ends in U+FFFD holds part of a multi-byte character, so nothing is emitted until the next
    token completes it."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_token_ids[-DETOKENIZE_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.tokenizer is None:  # skip_tokenizer_init: there is no text to make
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    seqs: list[Sequence]
    detokenizers: list[Detokenizer]
    logprobs: list[list[dict[int, Logprob]]]
    cumulative_logprobs: list[float]
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=lambda: [None])
    arrival_time: float = field(default_factory=time.monotonic)
    embedding: list[float] | None = None  # a pooling request's result
    beams: BeamGroup | None = None  # a beam search request's live beams and hypotheses
    failed: bool = False  # the engine could not process it: it ends with finish_reason "error"

    @property
    def finished(self) -> bool:
        if self.beams is not None and not self.failed:
            return self.beams.result is not None
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = resolve_model(config.model)
        self.tokenizer = None if config.skip_tokenizer_init else AutoTokenizer.from_pretrained(
            config.tokenizer or model_dir)
        self.generation_config = _read_generation_config(model_dir)
        self.eos_token_ids = _eos_token_ids(self.generation_config, self.tokenizer)
        self.runner = ModelRunner(config, model_dir, self.eos_token_ids)
        self.vocab_size = self.runner.hf_config.vocab_size
        self.scheduler = Scheduler(config, self.runner.num_blocks, self.eos_token_ids, self._make_proposer())
        self.requests: dict[str, _Request] = {}
        self.seq_owner: dict[int, tuple[_Request, int]] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.num_failed_steps = 0  # consecutive; the server gives up on a device that fails every step
        self.lora_requests: dict[int, object] = {}  # LoRA adapter id -> its LoRARequest (names for the metrics)
        self.lora_waiting: dict[str, _Request] = {}  # request id -> request whose adapter waits for a slot
        self.tracer = StepTracer(config.trace_path, self) if config.trace_path else None  # trace.py

    def _make_proposer(self):
        spec = self.config.speculative_config
        if spec is None:
            return None
        k = spec["num_speculative_tokens"]
        if spec.get("method") == "ngram":
            return NgramProposer(k, spec["prompt_lookup_min"], spec["prompt_lookup_max"])
        # The draft's cache gets the target's block count: the two share block tables (see DraftModelProposer).
        draft_config = replace(self.config, model=spec["model"], tokenizer=None, speculative_config=None,
                               num_gpu_blocks_override=self.runner.num_blocks, tensor_parallel_size=1)
        runner = ModelRunner(draft_config, resolve_model(spec["model"]), self.eos_token_ids)
        if runner.hf_config.vocab_size != self.vocab_size:
            raise ValueError(f"The draft model's vocabulary ({runner.hf_config.vocab_size}) differs from the "
                             f"target's ({self.vocab_size}): it must use the same tokenizer")
        return DraftModelProposer(runner, k)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt is text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...}."""
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParamError("Text prompts need a tokenizer (the engine runs with skip_tokenizer_init)", "prompt")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ParamError("A prompt must be a string or a list of token ids", "prompt")

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    lora_request=None) -> None:
        """Validate everything, then queue one sequence per sample. All or nothing: a request that fails a check
        leaves no trace, so no half-registered request can trip a later step."""
        if request_id in self.requests:
            raise ParamError(f"Request id {request_id!r} is already in use", "request_id")
        text, ids = self.tokenize(prompt)
        self.validate_prompt(ids)
        if self.is_pooling != isinstance(params, PoolingParams):
            raise ParamError("This model computes embeddings: give it PoolingParams (LLM.embed)" if self.is_pooling
                             else "This model generates text: PoolingParams need runner=\"pooling\"")
        lora = self._lora_slot(lora_request)  # (adapter id, slot): every kind of request can use an adapter
        if self.is_pooling:
            return self._add_pooling(request_id, text, ids, params, lora)
        if isinstance(params, BeamSearchParams):
            return self._add_beam_search(request_id, text, ids, params, lora)
        params = (params or SamplingParams()).resolve(self.generation_config)
        self.validate_params(params)
        # Seeded parallel samples must differ from each other, so each one gets its own seed; making them all here
        # checks every seed's range before anything is queued. The first sample alone computes prompt logprobs
        # (they are the request's, not a sample's); the others may then take the prompt from the prefix cache.
        children = [params if i == 0 else replace(params, prompt_logprobs=None) for i in range(params.n)]
        children = [p if p.seed is None else replace(p, seed=p.seed + i) for i, p in enumerate(children)]
        req = _Request(request_id, text, ids, params, [], [], [[] for _ in range(params.n)], [0.0] * params.n)
        for i, child in enumerate(children):
            seq = Sequence(next(self._seq_ids), list(ids), len(ids), child, lora_id=lora[0], lora_slot=lora[1])
            if i > 0 and self.config.enable_prefix_caching:
                seq.waits_for = req.seqs[0]
            req.seqs.append(seq)
            req.detokenizers.append(Detokenizer(self.tokenizer, ids, params.skip_special_tokens))
        self._register(req)

    def _register(self, req: _Request) -> None:
        """Queue a fully checked request's sequences (the last step of every add). One whose LoRA adapter has no
        slot yet (every slot is held) waits in `lora_waiting` until `_admit_lora_waiting` finds it one."""
        self.requests[req.request_id] = req
        if req.seqs[0].lora_slot is None:
            self.lora_waiting[req.request_id] = req
            return
        for i, seq in enumerate(req.seqs):
            self.seq_owner[seq.seq_id] = (req, i)
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(req.prompt_token_ids)

    def _admit_lora_waiting(self) -> None:
        """Requests waiting for a LoRA slot, oldest first, get one if a running request has let one go."""
        for req in list(self.lora_waiting.values()):
            slot = self._lora_slot(self.lora_requests[req.seqs[0].lora_id])[1]
            if slot is not None:
                del self.lora_waiting[req.request_id]
                for seq in req.seqs:
                    seq.lora_slot = slot
                self._register(req)

    def _lora_slot(self, lora_request) -> tuple[int, int]:
        """(adapter id, slot) for a request's LoRA adapter, loading it if needed; (0, -1) for the base model;
        slot None while running requests hold every slot."""
        if lora_request is None:
            return 0, -1
        if self.runner.lora is None:
            raise ParamError("LoRA adapters need an engine built with enable_lora=True", "model")
        if lora_request.lora_int_id < 1:
            raise ParamError("lora_int_id must be a positive integer", "model")
        self.lora_requests[lora_request.lora_int_id] = lora_request
        busy = {s.lora_id for r in self.requests.values() for s in r.seqs if s.finish_reason is None}
        return lora_request.lora_int_id, self.runner.lora.slot_for(lora_request, busy)

    def _add_pooling(self, request_id: str, text: str | None, ids: list[int], params: PoolingParams, lora) -> None:
        self.runner.pooler.check(params, self.config.served_model_name or self.config.model)
        seq = Sequence(next(self._seq_ids), list(ids), len(ids), params, pools=True, lora_id=lora[0], lora_slot=lora[1])
        self._register(_Request(request_id, text, ids, params, [seq], [], [[]], [0.0]))

    def _add_beam_search(self, request_id: str, text: str | None, ids: list[int], params: BeamSearchParams,
                         lora) -> None:
        if self.config.speculative_config is not None:
            raise ParamError("Beam search cannot run with speculative decoding", "use_beam_search")
        if params.beam_width > self.config.max_n_sequences:
            raise ParamError(f"n must be at most {self.config.max_n_sequences}, got {params.beam_width}", "n")
        seq = Sequence(next(self._seq_ids), list(ids), len(ids), params.beam_params(), lora_id=lora[0],
                       lora_slot=lora[1])
        req = _Request(request_id, text, ids, params, [seq], [], [[]], [0.0])
        req.beams = BeamGroup(params, len(ids), self.eos_token_ids, seq)
        self._register(req)

    def _advance_beams(self, req: _Request, seq: Sequence, entry) -> None:
        """A beam's candidates are in; once all are, choose the next beams (beam_search.py) and apply the choice:
        swap a reused beam's last token, fork further continuations, drop the rest (their blocks go back)."""
        group = req.beams
        self.num_generation_tokens += 1
        if not group.report(seq, self._logprob_dict(seq.token_ids[-1], entry)):
            return
        chosen = group.select()
        if group.num_steps == group.params.max_tokens or any(s.finish_reason for s in group.seqs):
            group.finish(chosen, lambda ids: self.tokenizer.decode(ids) if self.tokenizer else "")
            survivors = []
        else:
            survivors, reused = [], set()
            for parent, tokens, beam in chosen:
                if parent.seq.seq_id in reused:
                    beam.seq = self.scheduler.fork(parent.seq, tokens, next(self._seq_ids))
                    self.seq_owner[beam.seq.seq_id] = (req, 0)
                else:  # its last token is not computed yet, so it can still be swapped
                    reused.add(parent.seq.seq_id)
                    beam.seq, parent.seq.token_ids[-1] = parent.seq, tokens[-1]
                beam.seq.paused = False
                survivors.append(beam)
        kept = {beam.seq.seq_id for beam in survivors}
        for old in group.seqs:
            if old.seq_id not in kept:
                self.scheduler.finish(old, "length" if group.result is not None else "abort")
                self.seq_owner.pop(old.seq_id, None)
        group.beams = survivors
        req.seqs = group.seqs

    @property
    def is_pooling(self) -> bool:
        return self.runner.pooler is not None

    def validate_params(self, params: SamplingParams) -> None:
        """The checks that need the engine (vocabulary, limits); SamplingParams checks the rest itself."""
        if params.n > self.config.max_n_sequences:
            raise ParamError(f"n must be at most {self.config.max_n_sequences}, got {params.n}", "n")
        if params.stop and self.tokenizer is None:
            raise ParamError("Stop strings need a tokenizer (the engine runs with skip_tokenizer_init)", "stop")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ParamError(f"stop_token_ids must be token ids below {self.vocab_size}", "stop_token_ids")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias or {}):
            raise ParamError(f"logit_bias keys must be token ids below {self.vocab_size}", "logit_bias")

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ParamError("The prompt cannot be empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise ParamError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"request has {len(ids)} input tokens. Please reduce the length of the input.", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ParamError(f"Token id {bad[0]} is out of vocabulary (size {self.vocab_size})", "prompt")

    def abort_request(self, request_id: str) -> None:
        """Stop a request at once; its KV blocks go back to the pool before this returns."""
        req = self.requests.pop(request_id, None)
        waited = self.lora_waiting.pop(request_id, None)  # it never reached the scheduler
        if req is not None and waited is None:
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")
                self.seq_owner.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One scheduling + forward + sampling round: see `_step`."""
        if self.tracer is not None:  # the step timeline (trace.py) runs the same step, timed and recorded
            return self.tracer.step(self._step, final_only)
        return self._step(final_only)

    def _step(self, final_only: bool) -> list[RequestOutput]:
        """One scheduling + forward + sampling round. Returns an output for every request that advanced, or with
        `final_only` (the offline API) only for those that finished: building the others' outputs every step
        copies every sequence's tokens, a cost that grows with the batch and the output length.

        Faults stay with the requests they touch: if the model step fails, the requests in that batch end with
        finish_reason "error"; if one request's output processing fails, only that request does. Either way
        their blocks go back and the next step serves everyone else."""
        if self.lora_waiting:
            self._admit_lora_waiting()
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        try:
            result = self.runner.execute(batch)
            self.scheduler.update(batch, result.tokens)
        except EngineDeadError:  # not a fault of these requests: nothing more can run (the server exits)
            raise
        except Exception:
            self.num_failed_steps += 1
            owners = {}  # request id -> request, for every sequence in the failed batch
            for item in batch.scheduled:
                if item.seq.seq_id in self.seq_owner:
                    req = self.seq_owner[item.seq.seq_id][0]
                    owners[req.request_id] = req
            logger.exception("A model step failed; failing its %d requests", len(owners))
            for req in owners.values():
                self._fail(req)
            return self._outputs(list(owners.values()), final_only)
        self.num_failed_steps = 0
        touched = {}
        for item, new_tokens, entries, prompt_entries, pooled in zip(
                batch.scheduled, result.tokens, result.logprobs, result.prompt_logprobs, result.pooled):
            if (new_tokens or prompt_entries or pooled is not None) and item.seq.seq_id in self.seq_owner:
                req, index = self.seq_owner[item.seq.seq_id]
                try:
                    if pooled is not None:
                        touched[req.request_id] = req
                        req.embedding = self.runner.pooler.finish(pooled, req.params)
                        self.scheduler.finish(item.seq, "stop")
                    if prompt_entries:
                        self._record_prompt_logprobs(req, item.start + 1, prompt_entries)
                    if not new_tokens:
                        continue
                    if req.beams is not None:
                        self._advance_beams(req, item.seq, entries[0])
                        if req.beams.result is not None:
                            touched[req.request_id] = req
                        continue
                    touched[req.request_id] = req
                    self._process_tokens(req, index, item, new_tokens, entries)
                except Exception:
                    logger.exception("Processing the output of request %s failed", req.request_id)
                    self._fail(req)
        return self._outputs(list(touched.values()), final_only)

    def _outputs(self, reqs: list[_Request], final_only: bool) -> list[RequestOutput]:
        outputs = []
        for req in reqs:
            if final_only and not req.finished:
                continue
            try:
                outputs.append(self._output(req))
            except Exception:
                logger.exception("Building the output of request %s failed", req.request_id)
                self._fail(req)
                outputs.append(self._output(req))
            if req.finished:
                self._forget(req)
        return outputs

    def _fail(self, req: _Request) -> None:
        """End a request the engine could not process: finish_reason "error", blocks back to the pool now."""
        req.failed = True
        for seq in req.seqs:
            self.scheduler.finish(seq, "error")

    def _record_prompt_logprobs(self, req: _Request, first_token: int, entries: list) -> None:
        """Entries for prompt tokens first_token, first_token + 1, ...; a prompt computed again after a
        preemption repeats entries already recorded, which are skipped."""
        ids = req.prompt_token_ids
        for position, entry in enumerate(entries, start=first_token):
            if position == len(req.prompt_logprobs):
                req.prompt_logprobs.append(self._logprob_dict(ids[position], entry))

    def _logprob_dict(self, token: int, entry) -> dict[int, Logprob]:
        """{token: its Logprob, then each top-k token: its Logprob}, as vLLM's logprobs entries."""
        chosen, rank, top = entry
        result = {token: Logprob(chosen, rank, self._decode_one(token))}
        for r, (tid, lp) in enumerate(top, start=1):
            result.setdefault(tid, Logprob(lp, r, self._decode_one(tid)))
        return result

    def _process_tokens(self, req: _Request, index: int, item, new_tokens: list[int], entries: list) -> None:
        seq = item.seq
        # update() appended the new tokens up to the first one that ended the sequence by a token rule.
        kept = seq.num_tokens - (item.start + item.num_new_tokens - len(item.draft_token_ids))
        for j in range(kept):
            last = j == kept - 1
            num_output = seq.num_output_tokens - kept + j + 1  # counting this token
            if self._process_token(req, index, new_tokens[j], entries[j], last, num_output) and not last:
                del seq.token_ids[seq.num_tokens - kept + j + 1:]  # a stop string ended it before the others
                break

    def _process_token(self, req: _Request, index: int, token: int, logprob, last: bool, num_output: int) -> bool:
        """Detokenize one new token, record its logprobs, check stop strings; True if a stop string ended it."""
        seq, detok, p = req.seqs[index], req.detokenizers[index], req.params
        self.num_generation_tokens += 1
        if logprob is not None:
            req.logprobs[index].append(self._logprob_dict(token, logprob))
            req.cumulative_logprobs[index] += logprob[0]
        ended = last and seq.finish_reason is not None  # by a token rule, in the scheduler
        delta = "" if ended and seq.finish_reason == "stop" and not p.include_stop_str_in_output else detok.add(token)
        if ended:
            delta += detok.flush()
        # As in vLLM, stop strings count only once more than min_tokens tokens exist (stop tokens are masked
        # up to the min_tokens-th token, so they too can first end the sequence at token min_tokens + 1).
        return bool(p.stop) and num_output > p.min_tokens and self._check_stop_strings(seq, detok, p, len(delta))

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer else None

    def _check_stop_strings(self, seq: Sequence, detok: Detokenizer, p: SamplingParams, delta_len: int) -> bool:
        for stop in p.stop:
            # Only the new text and the stop string's length before it can contain a new match.
            at = detok.text.find(stop, max(0, len(detok.text) - delta_len - len(stop) + 1))
            if at != -1:
                detok.text = detok.text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
                if seq.finish_reason is None:
                    self.scheduler.finish(seq, "stop", stop)
                else:  # the same step also hit a token limit; the stop string came first
                    seq.finish_reason, seq.stop_reason = "stop", stop
                return True
        return False

    def _output(self, req: _Request) -> RequestOutput | PoolingRequestOutput:
        if isinstance(req.params, PoolingParams) and not req.failed:
            return PoolingRequestOutput(req.request_id, req.prompt_token_ids, EmbeddingOutput(req.embedding))
        if req.failed:  # no partial text: the caller reports an error, not a truncated answer
            outputs = [CompletionOutput(i, "", [], None, None, "error") for i in range(max(1, len(req.seqs)))]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, True)
        if req.beams is not None:
            outputs = [CompletionOutput(i, h.text, h.tokens[len(req.prompt_token_ids):], h.cum_logprob, h.logprobs,
                                        h.finish_reason, h.stop_reason) for i, h in enumerate(req.beams.result)]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, True)
        # While a sequence runs, hold back the characters that could still become the start of a stop string.
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        outputs = []
        for i, (seq, detok) in enumerate(zip(req.seqs, req.detokenizers)):
            text = detok.text if seq.finish_reason or not hold else detok.text[:max(0, len(detok.text) - hold)]
            want_logprobs = req.params.logprobs is not None
            outputs.append(CompletionOutput(
                i, text, seq.output_token_ids, req.cumulative_logprobs[i] if want_logprobs else None,
                req.logprobs[i] if want_logprobs else None, seq.finish_reason, seq.stop_reason))
        prompt_logprobs = req.prompt_logprobs if req.params.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, req.finished,
                             req.seqs[0].num_cached_tokens, prompt_logprobs)

    def _forget(self, req: _Request) -> None:
        self.requests.pop(req.request_id, None)
        for seq in req.seqs:
            self.seq_owner.pop(seq.seq_id, None)

    def _adapters(self, seqs) -> str:
        return ",".join(sorted({self.lora_requests[q.lora_id].lora_name for q in seqs if q.lora_id}))

    def stats(self) -> dict:
        s = self.scheduler
        waiting = [*s.waiting, *(seq for req in self.lora_waiting.values() for seq in req.seqs)]  # or for a LoRA slot
        lora = {}
        if self.runner.lora is not None:  # vLLM's lora_requests_info: which adapters run and wait
            lora = {"lora_requests_info": {"max_lora": self.config.max_loras, "running": self._adapters(s.running),
                                           "waiting": self._adapters(waiting)}}
        return {**lora, "num_requests_running": len(s.running), "num_requests_waiting": len(waiting),
                "kv_cache_usage_perc": s.block_manager.usage, "num_preemptions": s.num_preemptions,
                "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generation_tokens,
                "spec_decode_num_drafts": s.spec_num_drafts, "spec_decode_num_draft_tokens": s.spec_num_draft_tokens,
                "spec_decode_num_accepted_tokens": s.spec_num_accepted_tokens,
                "spec_decode_acceptance_rate": s.spec_num_accepted_tokens / max(1, s.spec_num_draft_tokens),
                "spec_decode_mean_accepted_length": s.spec_num_accepted_tokens / max(1, s.spec_num_drafts)}


def _read_generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _eos_token_ids(generation_config: dict, tokenizer) -> set[int]:
    eos = generation_config.get("eos_token_id", tokenizer.eos_token_id if tokenizer else None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])
