"""Beam search (`LLM.beam_search`, the server's `use_beam_search`), with vLLM's rules and scores.

A beam search request is a `BeamGroup` of live beams, each a `Sequence` the scheduler decodes like any other,
in the same steps as everyone else's. Every beam asks for its top 2 x beam_width logprobs; a beam that has
its next-token candidates is paused (not scheduled) until every beam of the group has them. Then `select`
ranks all candidates by cumulative logprob, as vLLM does:
- a candidate that is an EOS token (unless `ignore_eos`) ends a finished hypothesis;
- the best `beam_width` others are the next beams. The first continuation of a beam reuses its sequence (its
  last token, not yet computed, is swapped for the chosen one); each further one is a fork that shares the
  beam's blocks by reference count (scheduler.fork), so the prompt is computed once and never copied;
- a beam with no continuation is dropped and its blocks go back at once.
After `max_tokens` steps, the finished hypotheses and the live beams are ranked by
cum_logprob / len(prompt + output, without a final EOS) ** length_penalty, and the best `beam_width` returned.

Differences from transformers' `generate(num_beams=k)`, kept because vLLM has them: every EOS in a beam's top
2k ends a hypothesis (transformers: only those among the k best candidates), the length penalty counts the
prompt, and there is no early stopping. Without EOS the two agree (tests/test_beam_search.py).
The engine (engine.py) owns the groups and applies `select`'s choice to the scheduler.
"""
from dataclasses import dataclass, field

from .sampling import MAX_LOGPROBS, ParamError, SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        limit = MAX_LOGPROBS // 2  # each beam asks for 2 x beam_width logprobs (vLLM has the same bound)
        if not 1 <= self.beam_width <= limit:
            raise ParamError(f"beam_width must be in [1, {limit}], got {self.beam_width}", "n")
        if self.max_tokens < 1:
            raise ParamError("max_tokens must be at least 1", "max_tokens")
        if self.temperature != 0:
            raise ParamError("Beam search is deterministic here: only temperature 0 is supported", "temperature")

    @property
    def n(self) -> int:  # what the server's renderers read
        return self.beam_width

    logprobs = None  # beams' logprobs are returned offline (BeamSearchSequence), not in the server's choices

    def beam_params(self) -> SamplingParams:
        """What each beam's sequence decodes with: the argmax (replaced by `select` anyway) and the top 2k
        candidates; EOS never ends it (the group decides), max_tokens does, for all beams in the same step."""
        return SamplingParams(temperature=0.0, logprobs=2 * self.beam_width, ignore_eos=True,
                              max_tokens=self.max_tokens).resolve({})  # no penalties: raw model logprobs


@dataclass
class BeamSearchSequence:
    """One hypothesis, as vLLM's: `tokens` are the prompt's and the output's."""
    tokens: list[int]
    logprobs: list[dict]
    cum_logprob: float
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


@dataclass
class Beam:
    seq: object  # scheduler.Sequence
    cum_logprob: float
    logprobs: list[dict] = field(default_factory=list)


class BeamGroup:
    def __init__(self, params: BeamSearchParams, prompt_len: int, eos_token_ids: set[int], first):
        self.params, self.prompt_len = params, prompt_len
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.beams = [Beam(first, 0.0)]
        self.candidates: dict[int, dict] = {}  # seq id -> this step's logprob entry {token: Logprob}
        self.finished: list[BeamSearchSequence] = []
        self.num_steps = 0
        self.result: list[BeamSearchSequence] | None = None  # set when the search is over

    @property
    def seqs(self) -> list:
        return [beam.seq for beam in self.beams]

    def report(self, seq, entry: dict) -> bool:
        """A beam's candidates for this step; True once every live beam has reported."""
        self.candidates[seq.seq_id] = entry
        seq.paused = True
        return len(self.candidates) == len(self.beams)

    def select(self) -> list[tuple[Beam, list[int], Beam]]:
        """Rank this step's candidates. Returns (parent beam, its new token ids, the new beam without a
        sequence yet) for the best `beam_width`; finished hypotheses are kept aside; at the last step the
        search ends and `result` holds the ranked hypotheses."""
        ranked = []
        for beam in self.beams:
            entry, past = self.candidates[beam.seq.seq_id], beam.seq.token_ids[:-1]
            for token, lp in entry.items():
                cum = beam.cum_logprob + lp.logprob
                if token in self.eos:
                    tokens = past + [token] if self.params.include_stop_str_in_output else past
                    self.finished.append(BeamSearchSequence(tokens, beam.logprobs + [entry], cum, None, "stop", token))
                else:
                    ranked.append((cum, beam, past + [token], entry))
        ranked.sort(key=lambda c: -c[0])  # stable: ties keep beam order
        chosen = [(beam, tokens, Beam(None, cum, beam.logprobs + [entry]))
                  for cum, beam, tokens, entry in ranked[:self.params.beam_width]]
        self.candidates, self.num_steps = {}, self.num_steps + 1
        return chosen

    def finish(self, chosen: list[tuple[Beam, list[int], Beam]], decode) -> None:
        """The search is over: rank finished hypotheses and the last beams, keep the best beam_width."""
        hypotheses = self.finished + [BeamSearchSequence(tokens, new.logprobs, new.cum_logprob)
                                      for _, tokens, new in chosen]
        hypotheses.sort(key=self._score, reverse=True)
        self.result = hypotheses[:self.params.beam_width]
        for h in self.result:
            output = h.tokens[self.prompt_len:]
            h.text = decode(output[:-1] if output and output[-1] in self.eos else output)
            h.finish_reason = h.finish_reason or "length"

    def _score(self, h: BeamSearchSequence) -> float:
        length = len(h.tokens) - (1 if h.tokens[-1] in self.eos else 0)
        return h.cum_logprob / length ** self.params.length_penalty
