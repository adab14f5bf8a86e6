"""Property tests for the pure-Python scheduler (no model, no torch work).

A hypothesis state machine adds sequences (prompts over a 3-token alphabet, so prefixes repeat and the prefix
cache really hits), steps the scheduler with fake sampled tokens, aborts sequences (also while a step "runs"),
and drains everything, on KV pools small enough that preemption is common. After every operation it checks the
block accounting, the prefix-cache maps, and a shadow of the KV cache: every slot records which token prefix its
K/V was computed from, so a block that is shared, reused from the cache, evicted or recycled while still needed
shows up as wrong attention input. Some runs speculate (n-gram drafts, or a draft model faked by
`FakeDraftRunner`, whose cache gets a shadow too), with random partial acceptance. Deterministic tests below pin
preemption, prefix-cache hits, the decodes-first policy and the stop rules.

Longer hunts: SCHED_EXAMPLES=5000 python -m pytest tests/test_scheduler.py -k Machine
"""
import hashlib
import itertools
import os
import random

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanoserve.config import EngineConfig
from nanoserve.sampling import SamplingParams
from nanoserve.scheduler import DraftModelProposer, NgramProposer, Scheduler, SeqStatus, Sequence

EOS = 3
PROMPT_ALPHABET = (0, 1, 2)
OUTPUT_ALPHABET = (0, 1, 2, EOS)  # EOS is one in four: sequences end by stop rules as well as by length
DRAIN_STEPS = 10_000


def make_scheduler(*, num_blocks, block_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64,
                   enable_prefix_caching=True, proposer=None):
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                          enable_prefix_caching=enable_prefix_caching)
    return Scheduler(config, num_blocks, {EOS}, proposer)


_ids = itertools.count()


def make_seq(prompt, **params):
    params.setdefault("temperature", 0.0)
    return Sequence(next(_ids), list(prompt), len(prompt), SamplingParams(**params))


def event(name):
    if currently_in_test_context():  # the machine also runs outside hypothesis, in deterministic tests
        hypothesis_event(name)


def run_step(sched, token=lambda seq: 7):
    """One engine step with a fixed fake sampler; returns the batch."""
    batch = sched.schedule()
    sampled = [[token(item.seq)] if item.samples else [] for item in batch.scheduled]
    sched.update(batch, sampled)
    return batch


def drain(sched, token=lambda seq: 7, limit=DRAIN_STEPS):
    for _ in range(limit):
        if not sched.has_unfinished():
            return
        run_step(sched, token)
    raise AssertionError(f"not finished after {limit} steps")


# --------------------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------------------

class FakeDraftRunner:
    """Stands in for the draft model's runner: checks that every position the draft attends to holds the K/V
    of the right token prefix in the draft's cache (same block tables as the target's), writes the new ones, and
    "predicts" a token that depends on the whole prefix."""

    def __init__(self, machine):
        self.machine = machine

    def greedy_next(self, batch):
        m, out = self.machine, []
        for item in batch.scheduled:
            seq, end = item.seq, item.start + item.num_new_tokens
            known = seq.token_ids + item.draft_token_ids
            assert end <= len(known) and len(seq.block_table) * m.bs >= end
            m.check_kv(seq, item.start, "draft model reads", item.draft_token_ids, cache=m.draft_kv)
            for pos in range(item.start, end):
                m.draft_kv[m.slot(seq, pos)] = tuple(known[:pos + 1])
            out.append(OUTPUT_ALPHABET[hash(tuple(known[:end])) % 3] if item.num_logits else None)
        return out


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), max_model_len=st.integers(2, 24),
                extra_blocks=st.sampled_from([0, 0, 1, 2, 4, 8]), max_num_seqs=st.integers(1, 6),
                max_num_batched_tokens=st.integers(1, 24), prefix_caching=st.booleans(),
                spec=st.sampled_from([None, None, None, "ngram", "draft"]), spec_k=st.sampled_from([1, 3]))
    def setup(self, block_size, max_model_len, extra_blocks, max_num_seqs, max_num_batched_tokens, prefix_caching,
              spec, spec_k):
        # The runner guarantees the pool holds one sequence of max_model_len tokens; more is up to the draw,
        # and few extra blocks means frequent preemption.
        self.num_blocks = -(-max_model_len // block_size) + extra_blocks
        self.bs, self.max_model_len = block_size, max_model_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.prefix_caching, self.spec_k = prefix_caching, spec_k if spec else 0
        # Speculative decoding: prompt-lookup drafts, or a draft model faked by FakeDraftRunner, whose KV cache
        # (sharing the target's block tables) gets a shadow of its own.
        self.draft_kv: dict[int, tuple] = {}
        proposer = {None: None, "ngram": NgramProposer(spec_k, 1, 2),
                    "draft": DraftModelProposer(FakeDraftRunner(self), spec_k)}[spec]
        self.sched = make_scheduler(num_blocks=self.num_blocks, block_size=block_size, max_model_len=max_model_len,
                                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                    enable_prefix_caching=prefix_caching, proposer=proposer)
        self.has_draft_model = spec == "draft"
        self.seqs: list[Sequence] = []
        self.kv: dict[int, tuple] = {}  # slot -> the token prefix whose last position's K/V the slot holds
        self.num_steps = 0

    # ---- helpers --------------------------------------------------------------------------------------------

    def live(self):
        return [s for s in self.seqs if s.status is not SeqStatus.FINISHED]

    def slot(self, seq, pos):
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def check_kv(self, seq, upto, what, drafts=(), cache=None):
        cache = self.kv if cache is None else cache
        known = seq.token_ids + list(drafts)
        for pos in range(upto):
            assert cache.get(self.slot(seq, pos)) == tuple(known[:pos + 1]), (
                f"{what}: seq {seq.seq_id} position {pos} (block {seq.block_table[pos // self.bs]}) holds K/V of "
                f"{cache.get(self.slot(seq, pos))}, expected {tuple(known[:pos + 1])}")

    def step(self, rng: random.Random, abort_pick: int | None = None, accept_all: bool = False):
        s = self.sched
        running_before, waiting_before = list(s.running), list(s.waiting)
        computed_before = {seq.seq_id: seq.num_computed_tokens for seq in running_before}
        had_work = any(not q.paused for q in itertools.chain(s.running, s.waiting))  # paused beams wait
        preemptions_before = s.num_preemptions

        batch = s.schedule()
        items = batch.scheduled
        preempted = s.num_preemptions > preemptions_before
        if preempted:
            event("preemption")
        if any(it.draft_token_ids for it in items):
            event(f"speculative drafts ({'draft model' if self.has_draft_model else 'n-gram'})")

        # Budget, batch size, no duplicates, no idle step while work is left.
        assert batch.num_tokens <= self.max_num_batched_tokens
        assert len(s.running) <= self.max_num_seqs
        assert len({id(it.seq) for it in items}) == len(items), "a sequence scheduled twice in one batch"
        assert items or not had_work, "an empty step while sequences are unfinished"
        for it in items:
            seq = it.seq
            assert seq.status is SeqStatus.RUNNING and seq in s.running
            assert it.num_new_tokens >= 1
            assert it.start == seq.num_computed_tokens, "a chunk must start at the computed tokens"
            assert it.start + it.num_new_tokens <= seq.num_tokens + len(it.draft_token_ids), (
                "computes past the known tokens")
            assert it.start + it.num_new_tokens <= self.max_model_len
            if it.draft_token_ids:  # only a decoding sequence speculates, within its limits
                assert seq.seq_id in computed_before and computed_before[seq.seq_id] + 1 == seq.num_tokens
                assert len(it.draft_token_ids) <= self.spec_k and it.samples
                if seq.params.max_tokens is not None:
                    assert seq.num_output_tokens + len(it.draft_token_ids) + 1 <= seq.params.max_tokens
            assert len(seq.block_table) * self.bs >= it.start + it.num_new_tokens, "no room for the chunk"
            if seq.seq_id in computed_before:
                assert it.start == computed_before[seq.seq_id]

        # Decodes first: with budget for every running sequence, a sequence with one token left to compute is
        # scheduled, unless it was preempted for blocks. Without preemption, all of them are scheduled.
        in_batch = {id(it.seq) for it in items}
        decodes = [q for q in running_before if q.num_tokens - computed_before[q.seq_id] == 1 and not q.paused]
        if self.max_num_batched_tokens >= len(running_before) * (1 + self.spec_k):  # drafts take budget too
            for q in decodes:
                assert id(q) in in_batch or q.status is SeqStatus.WAITING, f"decode of seq {q.seq_id} starved"
                if not preempted:
                    assert id(q) in in_batch
        # Among the sequences already running, decode items come before prompt chunks.
        kinds = [computed_before[it.seq.seq_id] + 1 == it.seq.num_tokens
                 for it in items if it.seq.seq_id in computed_before]
        assert kinds == sorted(kinds, reverse=True), "a prompt chunk was scheduled before a decode"

        # Preempted sequences: back at the front of the queue, with nothing computed and no blocks.
        for q in running_before:
            if q.status is SeqStatus.WAITING:
                assert q.num_computed_tokens == 0 and q.block_table == [] and q in s.waiting
                assert id(q) not in in_batch

        # Admission: first come first served (only a sibling waiting for its first may be passed), none while
        # preempting, and a prefix-cache hit never covers the whole sequence.
        waiting_ids = {id(q) for q in waiting_before}
        admitted = [it for it in items if id(it.seq) in waiting_ids]
        if preempted and any(not q.paused for q in running_before if q.status is SeqStatus.WAITING):
            assert not admitted, "admitted while preempting"  # (paused beams give way to a stuck queue)
        # Admitted in queue order; a sequence passed over is a sibling waiting for its first's prompt (which the
        # first may get from the prefix cache when admitted in the same step, so only the waiting is checked).
        order = {id(q): i for i, q in enumerate(waiting_before)}
        positions = [order[id(it.seq)] for it in admitted]
        assert positions == sorted(positions), "admission out of order"
        for q in waiting_before[:max(positions, default=0)]:
            if id(q) not in in_batch and not q.paused:
                assert q.waits_for is not None and q.waits_for.status is not SeqStatus.FINISHED, (
                    f"seq {q.seq_id} was overtaken at the head of the queue")
        for it in admitted:
            seq = it.seq
            assert it.start == seq.num_cached_tokens and seq.num_cached_tokens % self.bs == 0
            assert seq.num_cached_tokens <= seq.num_tokens - 1
            if seq.num_cached_tokens:
                event("prefix cache hit")
                assert self.prefix_caching

        # Execute the batch on the shadow KV cache: copy the blocks forked beams shared (copy-on-write), read
        # what attention reads, write the new K/V, and check that no item's writes clobbered what another item
        # of the same batch needs.
        copied = {dst: [self.kv.get(src * self.bs + i) for i in range(self.bs)] for src, dst in batch.block_copies}
        for dst, contents in copied.items():
            for i, value in enumerate(contents):
                self.kv[dst * self.bs + i] = value
        if batch.block_copies:
            event("copy-on-write of a forked block")
        for it in items:
            self.check_kv(it.seq, it.start, "before the step")
        for it in items:
            known = it.seq.token_ids + it.draft_token_ids
            for pos in range(it.start, it.start + it.num_new_tokens):
                self.kv[self.slot(it.seq, pos)] = tuple(known[:pos + 1])
        for it in items:
            self.check_kv(it.seq, it.start + it.num_new_tokens, "after the step", it.draft_token_ids)

        samples = [it.samples for it in items]  # before update: it appends tokens
        aborted = None
        if abort_pick is not None and items:  # a request aborted while its step runs (server between steps)
            aborted = items[abort_pick % len(items)].seq
            s.finish(aborted, "abort")
        sampled = []
        for it, smp in zip(items, samples):
            if not smp:
                sampled.append([])
            elif it.draft_token_ids:  # the target keeps a prefix of the drafts, then samples one more token
                kept = len(it.draft_token_ids) if accept_all else rng.randint(0, len(it.draft_token_ids))
                sampled.append(it.draft_token_ids[:kept] + [rng.choice(OUTPUT_ALPHABET)])
            else:
                sampled.append([rng.choice(OUTPUT_ALPHABET)])
        before = {id(it.seq): list(it.seq.token_ids) for it in items}
        finished = s.update(batch, sampled)
        self.num_steps += 1

        for it, new in zip(items, sampled):
            seq = it.seq
            if seq is aborted:
                assert seq.finish_reason == "abort" and seq.token_ids == before[id(seq)]
                assert seq not in finished
                continue
            kept, reason, stop_reason = self.expected_stop(seq, before[id(seq)], new)
            assert seq.token_ids == before[id(seq)] + new[:kept]
            assert (seq in finished) == (reason is not None) == (seq.status is SeqStatus.FINISHED)
            assert (seq.finish_reason, seq.stop_reason) == (reason, stop_reason)
            if reason is None:
                num_rejected = len(it.draft_token_ids) - (len(new) - 1) if new else 0
                assert seq.num_computed_tokens == it.start + it.num_new_tokens - num_rejected
                if new:  # the new token is the only one not computed
                    assert seq.num_tokens - seq.num_computed_tokens == 1
            if seq.params.max_tokens is not None:
                assert seq.num_output_tokens <= seq.params.max_tokens
            assert seq.num_tokens <= self.max_model_len

    def expected_stop(self, seq, before, new):
        """vLLM's stop rules, token by token: stop tokens count from min_tokens on and beat the length limits;
        tokens after the one that ends the sequence are dropped."""
        p = seq.params
        for j, token in enumerate(new):
            num_tokens = len(before) + j + 1
            num_output = num_tokens - seq.num_prompt_tokens
            if num_output >= p.min_tokens:
                if token == EOS and not p.ignore_eos:
                    return j + 1, "stop", None
                if token in p.stop_token_ids:
                    return j + 1, "stop", token
            if (p.max_tokens is not None and num_output >= p.max_tokens) or num_tokens >= self.max_model_len:
                return j + 1, "length", None
        return len(new), None, None

    # ---- rules ----------------------------------------------------------------------------------------------

    @rule(prompt=st.lists(st.sampled_from(PROMPT_ALPHABET), min_size=1, max_size=24),
          reuse=st.one_of(st.none(), st.integers(0, 10_000)),
          max_tokens=st.one_of(st.none(), st.integers(1, 12)), min_tokens=st.integers(0, 3),
          ignore_eos=st.booleans(), stop_token_ids=st.sampled_from([[], [2]]),
          n=st.sampled_from([1, 1, 1, 2, 3]), copies=st.sampled_from([1, 1, 2, 4]))
    def add(self, prompt, reuse, max_tokens, min_tokens, ignore_eos, stop_token_ids, n, copies):
        if reuse is not None and self.seqs:  # share a prefix (possibly with generated tokens) of an earlier seq
            other = self.seqs[reuse % len(self.seqs)]
            prompt = other.token_ids[:1 + reuse % other.num_tokens] + prompt[:reuse % 3]
        prompt = prompt[:self.max_model_len - 1]  # the engine rejects prompts of max_model_len tokens
        if max_tokens is not None:
            min_tokens = min(min_tokens, max_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens,
                                ignore_eos=ignore_eos, stop_token_ids=stop_token_ids, n=n)
        for _ in range(copies):  # several requests at once: the pool fills up and preemption starts
            first = None
            for i in range(n):
                seq = Sequence(next(_ids), list(prompt), len(prompt), params)
                if i == 0:
                    first = seq
                elif self.prefix_caching:  # as the engine does for n > 1
                    seq.waits_for = first
                self.seqs.append(seq)
                self.sched.add(seq)

    @rule(seed=st.integers(0, 2**32 - 1))
    def step_once(self, seed):
        self.step(random.Random(seed))

    @rule(seed=st.integers(0, 2**32 - 1), steps=st.integers(2, 8))
    def step_many(self, seed, steps):
        rng = random.Random(seed)
        for _ in range(steps):
            self.step(rng)
            self.check_state()

    @precondition(lambda self: self.sched.running)
    @rule(seed=st.integers(0, 2**32 - 1), pick=st.integers(0, 100))
    def step_with_abort_in_flight(self, seed, pick):
        self.step(random.Random(seed), abort_pick=pick)

    @precondition(lambda self: self.live())
    @rule(pick=st.integers(0, 10_000), reason=st.sampled_from(["abort", "stop"]))
    def abort(self, pick, reason):
        live = self.live()
        seq = live[pick % len(live)]
        self.sched.finish(seq, reason, "STOP" if reason == "stop" else None)  # "stop": a stop string matched
        assert seq.status is SeqStatus.FINISHED and seq.finish_reason == reason and seq.block_table == []
        assert seq not in self.sched.running and seq not in self.sched.waiting
        self.sched.finish(seq, "abort")  # a second finish is a no-op
        assert seq.finish_reason == reason

    @precondition(lambda self: not self.spec_k and  # the engine runs no beam search with speculative decoding
                  any(q.num_tokens - q.num_computed_tokens == 1 for q in self.sched.running))
    @rule(pick=st.integers(0, 10_000), token=st.sampled_from(OUTPUT_ALPHABET))
    def fork(self, pick, token):
        """Beam search forks a decoding sequence: the child shares its blocks and differs in the last token."""
        if len(self.sched.running) >= self.max_num_seqs:
            return
        parents = [q for q in self.sched.running if q.num_tokens - q.num_computed_tokens == 1]
        parent = parents[pick % len(parents)]
        child = self.sched.fork(parent, parent.token_ids[:-1] + [token], next(_ids))
        assert child.num_computed_tokens == parent.num_computed_tokens and child in self.sched.running
        self.seqs.append(child)
        event("fork")

    @precondition(lambda self: self.live())
    @rule(pick=st.integers(0, 10_000))
    def pause(self, pick):
        """A beam that has its next token waits, unscheduled, for the rest of its group; then it resumes. (Only
        such a sequence pauses: running with one token to compute, and no sibling waiting for its prompt.)"""
        paused = [q for q in self.live() if q.paused]
        if paused:
            paused[pick % len(paused)].paused = False
            return
        waited_for = {id(q.waits_for) for q in self.live()}
        ready = [q for q in self.sched.running if q.num_tokens - q.num_computed_tokens == 1 and id(q) not in waited_for]
        if ready:
            ready[pick % len(ready)].paused = True

    @rule(abort_all=st.booleans())
    def drain(self, abort_all):
        self.drain_all(abort_all)

    def drain_all(self, abort_all):
        for seq in self.seqs:
            seq.paused = False
        if abort_all:
            for seq in self.live():
                self.sched.finish(seq, "abort")
        rng = random.Random(self.num_steps)
        for _ in range(DRAIN_STEPS):
            if not self.sched.has_unfinished():
                break
            self.step(rng)
            self.check_state()
        else:
            raise AssertionError(f"not finished after {DRAIN_STEPS} steps: {self.describe()}")
        assert all(seq.finish_reason is not None for seq in self.seqs)
        assert self.sched.block_manager.num_free_blocks == self.num_blocks
        assert all(r == 0 for r in self.sched.block_manager.ref_counts)

    def describe(self):
        return [(q.seq_id, q.status.value, q.num_computed_tokens, q.num_tokens, q.block_table) for q in self.live()]

    # ---- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def check_state(self):
        s, bm = self.sched, self.sched.block_manager
        # Queues and statuses agree; no sequence in two places.
        assert len(s.running) <= self.max_num_seqs
        assert len({id(q) for q in s.running} | {id(q) for q in s.waiting}) == len(s.running) + len(s.waiting)
        assert all(q.status is SeqStatus.RUNNING for q in s.running)
        assert all(q.status is SeqStatus.WAITING for q in s.waiting)
        live = {id(q) for q in itertools.chain(s.running, s.waiting)}
        for q in self.seqs:
            if q.status is SeqStatus.FINISHED:
                assert id(q) not in live and q.block_table == [] and q.finish_reason is not None
            else:
                assert id(q) in live and q.finish_reason is None

        # Every block is free or owned, never both; refcounts count the live sequences holding it.
        owners = [0] * self.num_blocks
        for q in itertools.chain(s.running, s.waiting):
            assert len(set(q.block_table)) == len(q.block_table), f"seq {q.seq_id} holds a block twice"
            for b in q.block_table:
                owners[b] += 1
        assert bm.ref_counts == owners
        free = set(bm.free)
        assert len(free) == len(bm.free) == bm.num_free_blocks
        assert free == {b for b in range(self.num_blocks) if owners[b] == 0}
        assert bm.num_free_blocks + sum(1 for o in owners if o) == self.num_blocks

        # The prefix-cache maps are inverse maps; without prefix caching they stay empty.
        for h, b in bm.block_of_hash.items():
            assert bm.hash_of_block[b] == h
        assert sum(h is not None for h in bm.hash_of_block) == len(bm.block_of_hash)
        if not self.prefix_caching:
            assert not bm.block_of_hash

        for q in s.waiting:
            assert q.num_computed_tokens == 0 and q.block_table == []
        for q in s.running:
            # Enough blocks for the computed tokens (and not more than the next chunk could use), a token left
            # to compute, and a cache that holds exactly this sequence's prefix.
            assert len(q.block_table) * self.bs >= q.num_computed_tokens
            assert 1 <= q.num_tokens - q.num_computed_tokens
            assert len(q.block_table) <= -(-q.num_tokens // self.bs)
            self.check_kv(q, q.num_computed_tokens, "computed tokens")
            if self.has_draft_model:
                assert q.num_draft_computed <= q.num_computed_tokens
                self.check_kv(q, q.num_draft_computed, "draft model's computed tokens", cache=self.draft_kv)
            # A cached block is registered under the hash of the tokens it holds, hashed afresh here rather than
            # from the sequence's memo (under speculation, blocks filled by accepted drafts must be hashed after
            # the drafts are appended).
            fresh = Sequence(-1, q.token_ids, q.num_prompt_tokens, q.params)
            for i, b in enumerate(q.block_table[:q.num_computed_tokens // self.bs]):
                if bm.hash_of_block[b] is not None:
                    assert bm.hash_of_block[b] == bm._block_hash(fresh, i)

    def teardown(self):
        if getattr(self, "sched", None) is not None:
            self.drain_all(abort_all=False)


SchedulerMachine.TestCase.settings = settings(max_examples=int(os.environ.get("SCHED_EXAMPLES", 200)),
                                              stateful_step_count=50, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


# --------------------------------------------------------------------------------------------------------------
# Speculative decoding with a draft model: blocks enter the prefix cache only with the draft's K/V complete
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len, max_tokens", [(3, 8), (4, 8), (5, 7), (2, 9), (3, 5)])
@pytest.mark.parametrize("end", ["finish", "preempt"])
def test_draft_cache_complete_in_cached_blocks(prompt_len, max_tokens, end):
    """The draft's cache lags the target's by the last accepted draft. A sequence that ends (or is preempted)
    right after a step that accepted every draft leaves blocks whose draft K/V are incomplete; a later sequence
    hitting them in the prefix cache must not skip computing those draft K/V."""
    m = SchedulerMachine()
    m.setup(block_size=2, max_model_len=32, extra_blocks=16, max_num_seqs=4, max_num_batched_tokens=32,
            prefix_caching=True, spec="draft", spec_k=3)
    m.add(prompt=[0, 1, 2, 0, 1][:prompt_len], reuse=None, max_tokens=max_tokens, min_tokens=0, ignore_eos=True,
          stop_token_ids=[], n=1, copies=1)
    first = m.seqs[0]
    rng = random.Random(0)
    while first.status is not SeqStatus.FINISHED:
        m.step(rng, accept_all=True)
        m.check_state()
        if end == "preempt" and first.num_output_tokens >= 4 and first.status is SeqStatus.RUNNING:
            m.sched._preempt(first)  # what a tight pool does; the freed blocks keep their cache entries
            m.check_state()
            break
    m.add(prompt=list(first.token_ids), reuse=None, max_tokens=3, min_tokens=0, ignore_eos=True,
          stop_token_ids=[], n=1, copies=1)
    m.drain_all(abort_all=False)  # the draft's reads are checked in FakeDraftRunner
    assert m.seqs[1].num_cached_tokens > 0


# --------------------------------------------------------------------------------------------------------------
# Liveness from a generated workload, also when everything is aborted
# --------------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.lists(st.sampled_from(PROMPT_ALPHABET), min_size=1, max_size=15), min_size=1, max_size=8),
       block_size=st.sampled_from([1, 2, 4]), extra=st.integers(0, 3), budget=st.integers(1, 16),
       max_num_seqs=st.integers(1, 4), abort_after=st.one_of(st.none(), st.integers(0, 20)))
def test_every_sequence_finishes_and_frees_its_blocks(prompts, block_size, extra, budget, max_num_seqs, abort_after):
    max_model_len = 16
    num_blocks = -(-max_model_len // block_size) + extra
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [make_seq(p, max_tokens=None, ignore_eos=True) for p in prompts]  # run to max_model_len
    for seq in seqs:
        sched.add(seq)
    for i in itertools.count():
        if i == abort_after:
            for seq in seqs:
                sched.finish(seq, "abort")
        if not sched.has_unfinished():
            break
        assert i < DRAIN_STEPS
        run_step(sched)
    if sched.num_preemptions:
        event("preemption")
    assert sched.block_manager.num_free_blocks == num_blocks
    for seq in seqs:
        if seq.finish_reason != "abort":
            assert seq.finish_reason == "length" and seq.num_tokens == max_model_len
            assert seq.output_token_ids == [7] * (max_model_len - len(seq.prompt_token_ids))


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------

def test_tight_pool_preempts_and_recomputes():
    # 4 sequences of up to 16 tokens, 2-token blocks, room for 16 tokens in all: they cannot all stay resident.
    sched = make_scheduler(num_blocks=8, block_size=2, max_model_len=32, max_num_batched_tokens=64,
                           enable_prefix_caching=False)
    seqs = [make_seq([i, i + 1, i + 2, i + 3], max_tokens=12, ignore_eos=True) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    recomputed = []
    for _ in range(1000):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        # A preempted sequence comes back computing everything it had (prompt and generated tokens) from 0,
        # and samples only at the end of its known tokens.
        recomputed += [it for it in batch.scheduled if it.start == 0 and it.seq.num_output_tokens > 0]
        sched.update(batch, [[100 + it.seq.num_output_tokens] if it.samples else [] for it in batch.scheduled])
    assert sched.num_preemptions > 0
    assert recomputed
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == [100 + i for i in range(12)]
    assert sched.block_manager.num_free_blocks == 8


def test_preemption_takes_the_most_recently_admitted():
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, enable_prefix_caching=False)
    a, b = make_seq([1, 2, 3], max_tokens=5, ignore_eos=True), make_seq([4, 5, 6], max_tokens=5, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prompts: 2 blocks each, the pool is full
    assert sched.running == [a, b] and sched.block_manager.num_free_blocks == 0
    batch = run_step(sched)  # a and b decode at position 3: both still fit in their second blocks
    assert [it.seq for it in batch.scheduled] == [a, b]
    batch = sched.schedule()  # position 4 needs a third block for a: b goes
    assert [it.seq for it in batch.scheduled] == [a]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SeqStatus.WAITING


# --------------------------------------------------------------------------------------------------------------
# Prefix caching
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len, expected_cached", [(10, 8), (8, 4), (4, 0), (1, 0), (9, 8), (13, 12)])
def test_prefix_hit_leaves_at_least_one_token(prompt_len, expected_cached):
    sched = make_scheduler(num_blocks=32, block_size=4)
    prompt = [(i * 7) % 5 for i in range(prompt_len)]
    first = make_seq(prompt, max_tokens=4, ignore_eos=True)
    sched.add(first)
    run_step(sched)  # the whole prompt in one step: its full blocks are now in the cache
    assert first.num_computed_tokens == prompt_len
    second = make_seq(prompt, max_tokens=4, ignore_eos=True)
    sched.add(second)
    batch = sched.schedule()
    item = next(it for it in batch.scheduled if it.seq is second)
    assert second.num_cached_tokens == expected_cached
    assert item.start == expected_cached and item.num_new_tokens == prompt_len - expected_cached >= 1
    assert item.samples
    assert second.block_table[:expected_cached // 4] == first.block_table[:expected_cached // 4]
    assert sched.prefix_cache_queries == 2 * prompt_len and sched.prefix_cache_hits == expected_cached


def test_prefix_hit_after_the_first_sequence_finished():
    sched = make_scheduler(num_blocks=16, block_size=4)
    prompt = list(range(9))
    first = make_seq(prompt, max_tokens=2, ignore_eos=True)
    sched.add(first)
    drain(sched)
    cached_blocks = first.block_table  # emptied on finish
    assert cached_blocks == [] and sched.block_manager.num_free_blocks == 16
    second = make_seq(prompt + [42], max_tokens=1, ignore_eos=True)
    sched.add(second)
    sched.schedule()
    # first computed tokens 0-8 and its first output: blocks [0-3] and [4-7] are cached and shared; the third
    # block would hold first's output token, which second does not have.
    assert second.num_cached_tokens == 8


def test_generated_tokens_are_cached_too():
    sched = make_scheduler(num_blocks=16, block_size=4)
    first = make_seq([1, 2, 3], max_tokens=6, ignore_eos=True)
    sched.add(first)
    drain(sched)  # computes [1, 2, 3, 7, 7, 7, 7, 7] (the last sampled token is never computed)
    second = make_seq(first.token_ids, max_tokens=1, ignore_eos=True)
    sched.add(second)
    sched.schedule()
    assert second.num_cached_tokens == 8


def test_no_prefix_hits_without_prefix_caching():
    sched = make_scheduler(num_blocks=32, block_size=4, enable_prefix_caching=False)
    prompt = list(range(12))
    for _ in range(3):
        seq = make_seq(prompt, max_tokens=3, ignore_eos=True)
        sched.add(seq)
        run_step(sched)
        assert seq.num_cached_tokens == 0
    drain(sched)
    seq = make_seq(prompt, max_tokens=3, ignore_eos=True)
    sched.add(seq)
    batch = sched.schedule()
    assert seq.num_cached_tokens == 0 and batch.scheduled[0].start == 0
    assert sched.prefix_cache_hits == 0 and not sched.block_manager.block_of_hash


def test_cached_blocks_are_evicted_when_the_pool_needs_them():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    first = make_seq(list(range(8)), max_tokens=1, ignore_eos=True)
    sched.add(first)
    drain(sched)
    assert len(sched.block_manager.block_of_hash) == 2
    other = make_seq([50 + i for i in range(15)], max_tokens=1, ignore_eos=True)  # needs all 4 blocks
    sched.add(other)
    drain(sched)
    again = make_seq(list(range(8)), max_tokens=1, ignore_eos=True)
    sched.add(again)
    sched.schedule()
    assert again.num_cached_tokens == 0


def sha256_chain(tokens, block_size):
    """The expected block hashes, computed here with hashlib alone: block i's is SHA-256 over block i-1's digest
    (32 zero bytes for the first) followed by block i's token ids as little-endian int64."""
    parent, chain = bytes(32), []
    for i in range(len(tokens) // block_size):
        data = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[i * block_size:(i + 1) * block_size])
        parent = hashlib.sha256(parent + data).digest()
        chain.append(parent)
    return chain


def block_hashes(bm, tokens):
    seq = make_seq(tokens)
    return [bm._block_hash(seq, i) for i in range(len(tokens) // bm.block_size)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_hash_is_a_sha256_chain(block_size):
    bm = make_scheduler(num_blocks=4, block_size=block_size).block_manager
    rng = random.Random(block_size)
    tokens = [rng.randrange(151_936) for _ in range(5 * block_size + 1)] + [2**40, 0]  # wide ids are not truncated
    seq = make_seq(tokens)
    last = len(tokens) // block_size - 1
    assert bm._block_hash(seq, last) == sha256_chain(tokens, block_size)[-1]
    assert seq.block_hashes == sha256_chain(tokens, block_size)  # the memo holds the whole chain, as digests
    assert all(type(h) is bytes and len(h) == 32 for h in seq.block_hashes)


def test_block_hash_covers_the_whole_prefix():
    bm = make_scheduler(num_blocks=4, block_size=4).block_manager
    a = [5, 6, 7, 8, 1, 2, 3, 4, 9, 9, 9, 9]
    same_prefix = a[:8] + [0, 0, 0, 0]
    assert block_hashes(bm, same_prefix)[:2] == block_hashes(bm, a)[:2]  # equal prefixes: equal hashes
    assert block_hashes(bm, same_prefix)[2] != block_hashes(bm, a)[2]
    early_change = [5, 6, 7, 0] + a[4:]  # one token of the first block differs
    assert all(x != y for x, y in zip(block_hashes(bm, early_change), block_hashes(bm, a)))
    moved = a[4:8] + a[:4] + a[8:]  # the same blocks in another order: every block's prefix differs
    assert all(x != y for x, y in zip(block_hashes(bm, moved), block_hashes(bm, a)))
    other_parent = [7, 7, 7, 7] + a[4:]  # blocks 1 and 2 hold the same tokens after a different first block
    assert all(x != y for x, y in zip(block_hashes(bm, other_parent)[1:], block_hashes(bm, a)[1:]))
    # Blocks of the same tokens at different depths of one sequence differ too.
    assert len(set(block_hashes(bm, [3] * 16))) == 4


def test_prefix_cache_is_keyed_by_the_sha256_chain():
    sched = make_scheduler(num_blocks=32, block_size=4)
    prompt = [100 + i for i in range(10)]
    first = make_seq(prompt, max_tokens=2, ignore_eos=True)
    sched.add(first)
    run_step(sched)
    bm = sched.block_manager
    assert bm.block_of_hash == dict(zip(sha256_chain(prompt, 4), first.block_table))
    second = make_seq(prompt[:8] + [1, 2, 3], max_tokens=2, ignore_eos=True)
    sched.add(second)
    sched.schedule()
    assert second.num_cached_tokens == 8 and second.block_table[:2] == first.block_table[:2]


def test_parallel_siblings_wait_for_the_prompt_then_share_it():
    sched = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=4)
    prompt = list(range(10))
    first = make_seq(prompt, max_tokens=3, ignore_eos=True)
    siblings = [make_seq(prompt, max_tokens=3, ignore_eos=True) for _ in range(2)]
    later = make_seq([9, 9], max_tokens=3, ignore_eos=True)
    for sib in siblings:
        sib.waits_for = first
    for seq in [first, *siblings, later]:
        sched.add(seq)
    # Budget 4: first's prompt takes three steps (4 + 4 + 2); in the third, `later` passes the siblings,
    # which may not start while first's prompt is not computed.
    assert [[it.seq for it in run_step(sched).scheduled] for _ in range(3)] == [[first], [first], [first, later]]
    assert first.num_computed_tokens == len(prompt)
    assert all(s.status is SeqStatus.WAITING for s in siblings)
    batch = run_step(sched)
    assert [it.seq for it in batch.scheduled] == [first, later, siblings[0]]  # the budget: 1 + 1 + 2
    drain(sched)
    assert [s.num_cached_tokens for s in siblings] == [8, 8]  # the prompt's 2 full blocks, shared


# --------------------------------------------------------------------------------------------------------------
# Decodes first, chunked prefill
# --------------------------------------------------------------------------------------------------------------

def test_long_prompt_does_not_stall_decodes():
    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=200, max_num_batched_tokens=8)
    decoding = [make_seq([1, 2], max_tokens=40, ignore_eos=True) for _ in range(3)]
    for seq in decoding:
        sched.add(seq)
    run_step(sched)  # the three short prompts
    long = make_seq(list(range(100)), max_tokens=2, ignore_eos=True)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 100:
        batch = run_step(sched)
        by_seq = {id(it.seq): it for it in batch.scheduled}
        assert all(by_seq[id(seq)].num_new_tokens == 1 for seq in decoding)  # every step, every decode
        assert batch.num_tokens == 8
        chunks.append(by_seq[id(long)].num_new_tokens)
    assert chunks[:-1] == [5] * (len(chunks) - 1)  # the rest of the budget goes to the prompt, in chunks
    assert sum(chunks) == 100


def test_budget_of_one_token_still_finishes():
    sched = make_scheduler(num_blocks=16, block_size=2, max_model_len=16, max_num_batched_tokens=1)
    seqs = [make_seq([1, 2, 3, 4, 5], max_tokens=3, ignore_eos=True) for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        assert run_step(sched).num_tokens == 1
    assert all(seq.finish_reason == "length" and seq.num_output_tokens == 3 for seq in seqs)


def test_max_num_seqs_caps_running():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2)
    seqs = [make_seq([1, 2, 3], max_tokens=4, ignore_eos=True) for _ in range(5)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert [it.seq for it in batch.scheduled] == seqs[:2] and len(sched.waiting) == 3


# --------------------------------------------------------------------------------------------------------------
# Stop rules (the scheduler's part: tokens; stop strings are the engine's)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, tokens, reason, stop_reason, n_out", [
    (dict(max_tokens=5), [1, 2, 3, 1, 1], "stop", None, 3),  # EOS (3) stops, is kept in the output
    (dict(max_tokens=5, ignore_eos=True), [1, 3, 3, 3, 3, 3], "length", None, 5),
    (dict(max_tokens=5, min_tokens=3), [3, 3, 3, 3], "stop", None, 3),  # EOS counts from min_tokens on
    (dict(max_tokens=5, stop_token_ids=[2]), [1, 2], "stop", 2, 2),
    (dict(max_tokens=5, stop_token_ids=[2], min_tokens=2), [2, 1, 2], "stop", 2, 3),
    (dict(max_tokens=2, stop_token_ids=[2]), [1, 2], "stop", 2, 2),  # stop token on the last allowed one
    (dict(max_tokens=None, ignore_eos=True), [1] * 20, "length", None, 8),  # max_model_len 12, prompt 4
    (dict(max_tokens=3, ignore_eos=True, stop_token_ids=[3]), [3], "stop", 3, 1),  # ignore_eos: not stop_ids
])
def test_stop_rules(params, tokens, reason, stop_reason, n_out):
    sched = make_scheduler(num_blocks=16, block_size=4, max_model_len=12)
    seq = make_seq([5, 6, 7, 8], **params)
    sched.add(seq)
    feed = iter(tokens)
    drain(sched, token=lambda s: next(feed))
    assert (seq.finish_reason, seq.stop_reason, seq.num_output_tokens) == (reason, stop_reason, n_out)
    assert seq.output_token_ids == tokens[:n_out]
