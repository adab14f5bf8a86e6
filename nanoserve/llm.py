"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `llm.chat(messages)`.

It adds every prompt to an `LLMEngine` and steps it until all are done, showing a progress bar with the output
token rate; continuous batching inside the engine does the rest. Outputs come back in input order.
"""
import sys
import time

from tqdm.auto import tqdm

from .config import EngineConfig
from .engine import LLMEngine, RequestOutput
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .pooling import PoolingParams, PoolingRequestOutput
from .sampling import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._next_id = 0

    def close(self) -> None:
        """Finish the trace file (`trace_path`); garbage collection and interpreter exit also do it."""
        if self.engine.tracer is not None:
            self.engine.tracer.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """As in vLLM: empty the prefix cache; False (and nothing changes) while requests hold KV blocks."""
        return self.engine.scheduler.block_manager.reset_prefix_cache()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """`prompts`: a string, a list of token ids, a dict, or a list of these."""
        if self.engine.is_pooling:
            raise ValueError("LLM.generate() is only supported for generative models. This one runs with "
                             "runner=\"pooling\": use LLM.embed(), or pass runner=\"generate\".")
        return self._submit(prompts, sampling_params, use_tqdm, lora_request)

    def embed(self, prompts, pooling_params: PoolingParams | list[PoolingParams] | None = None,
              use_tqdm: bool = True, lora_request=None) -> list[PoolingRequestOutput]:
        """One embedding per prompt (`output.outputs.embedding`), as vLLM's `LLM.embed`."""
        if not self.engine.is_pooling:
            raise ValueError("LLM.embed() is only supported for pooling models: build the LLM with "
                             "runner=\"pooling\"")
        if not isinstance(pooling_params, list):
            pooling_params = pooling_params or PoolingParams()
        return self._submit(prompts, pooling_params, use_tqdm, lora_request)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False,
                    lora_request=None) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: for each prompt, the best `beam_width` hypotheses, best first; each
        `BeamSearchSequence` holds the prompt's and the output's tokens. The beams of all prompts run together,
        continuously batched like any other requests."""
        if self.engine.is_pooling:
            raise ValueError("LLM.beam_search() is only supported for generative models")
        outputs = []
        for out in self._submit(prompts, params, use_tqdm, lora_request):
            outputs.append(BeamSearchOutput([BeamSearchSequence(
                out.prompt_token_ids + o.token_ids, o.logprobs, o.cumulative_logprob, o.text, o.finish_reason,
                o.stop_reason) for o in out.outputs]))
        return outputs

    def _submit(self, prompts, params, use_tqdm: bool, lora_request=None) -> list:
        """Add every prompt (with its params and LoRA adapter: one for all or a list), run to the end."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(str(self._next_id))
                self._next_id += 1
                self.engine.add_request(ids[-1], prompt, p, lora)
            return self._run(ids, use_tqdm)
        finally:  # an exception (bad prompt, Ctrl-C) must not leave requests holding KV blocks
            for request_id in ids:
                self.engine.abort_request(request_id)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        # A live bar on a terminal; elsewhere (a log file, CI) one summary line instead of carriage-return spray.
        interactive = use_tqdm and sys.stderr.isatty()
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not interactive)
        generated, start = 0, time.perf_counter()
        while self.engine.has_unfinished_requests():
            finished = [out for out in self.engine.step(final_only=True) if out.finished]
            if not finished:
                continue
            for out in finished:
                done[out.request_id] = out
                generated += sum(len(o.token_ids) for o in out.outputs) if isinstance(out, RequestOutput) else 0
            rate = generated / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)  # shown by the update just below
            bar.update(len(finished))
        bar.close()
        if use_tqdm and not interactive:
            seconds = time.perf_counter() - start
            print(f"Generated {len(ids)} requests, {generated} tokens in {seconds:.1f} s "
                  f"({generated / max(seconds, 1e-9):.1f} tok/s)", file=sys.stderr)
        return [done[i] for i in ids]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """`messages`: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template_kwargs)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation, add_generation_prompt=True, chat_template_kwargs=None) -> list[int]:
        if self.engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer: this LLM was built with skip_tokenizer_init=True")
        text = self.engine.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
        # The template already wrote the special tokens; adding a BOS again would change the prompt.
        return self.engine.tokenizer(text, add_special_tokens=False).input_ids
