"""The scheduler: which tokens of which sequences run in each step, and where their KV cache lives.

One file, three parts:
- `Sequence`: a prompt plus the tokens generated so far, and how many of them already have K/V in the cache.
- `BlockManager`: the paged KV cache's bookkeeping. The pool is `num_blocks` blocks of `block_size` token slots.
  Blocks are reference-counted; a full block is named by a SHA-256 digest chained over its whole prefix, so a
  later sequence with the same prefix reuses it (prefix caching). Free blocks keep their contents and hash until
  they are handed out again, least recently freed first.
- `Scheduler`: continuous batching. Each step it spends a token budget (`max_num_batched_tokens`) on running
  sequences, decodes first and then prompt chunks (chunked prefill), then admits waiting sequences. When blocks
  run out it preempts the most recently admitted sequence: its blocks are freed and it is recomputed later.

The engine feeds it (`add`, `abort`), the runner executes the `Batch` that `schedule()` returns, and `update()`
takes the sampled tokens back. Nothing here knows about torch or the model: it is plain bookkeeping, which is
what lets the property tests drive it with thousands of random operations.
"""
import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    params: object  # SamplingParams: max_tokens, min_tokens, stop_token_ids, ignore_eos
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained digest of each full block, filled lazily
    num_committed_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on admission
    num_draft_computed: int = 0  # tokens whose K/V are in the draft model's cache (speculative decoding)
    waits_for: "Sequence | None" = None  # n > 1: wait until this sibling has computed the shared prompt
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None
    generator: object = None  # the sampler's per-request random generator; never touched here
    paused: bool = False  # beam search: waits, not scheduled, until its beam group chooses (beam_search.py)
    lora_id: int = 0  # the LoRA adapter's id (0: the base model); part of every block hash
    lora_slot: int = -1  # where the runner holds that adapter (lora.py); -1: none
    pools: bool = False  # an embedding request: its prompt's hidden states are pooled and nothing is sampled
    pooled: object = None  # the pooler's running state (pooling.py); never touched here

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def needs_prompt_logits(self) -> bool:
        return getattr(self.params, "prompt_logprobs", None) is not None and self.num_output_tokens == 0

    @property
    def computes_whole_prompt(self) -> bool:
        """Prompt logprobs and pooling read every prompt position's output, so such a sequence computes its
        whole prompt: a prefix-cache hit would skip positions (vLLM does the same)."""
        return self.pools or self.needs_prompt_logits


_ROOT_HASH = bytes(32)  # the parent of a sequence's first block


def _root_hash(lora_id: int) -> bytes:
    """The chain's start: K/V depend on the LoRA adapter too, so the same prompt under two adapters (or an
    adapter and the base) must never share a cached block."""
    return _ROOT_HASH if not lora_id else hashlib.sha256(b"lora" + lora_id.to_bytes(8, "little")).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self._pack_block = struct.Struct(f"<{block_size}q").pack  # a full block's token ids as int64, for hashing
        # Free blocks in eviction order (front first). An OrderedDict gives O(1) removal when a cached free
        # block is claimed again by a prefix hit.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.copies: list[tuple[int, int]] = []  # (source, destination) block copies for the next step

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`. At least one token is always left to compute, because the
        step that computes it is the one that produces the next token's logits."""
        if not self.enable_prefix_caching or seq.computes_whole_prompt:
            return []
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.block_of_hash.get(self._block_hash(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> int:
        """Free blocks consumed to admit `hits` (cached blocks nobody holds sit in the free pool), to copy a
        shared block before writing it, and to give `seq` room for `num_new_tokens` more tokens."""
        have = len(seq.block_table) + len(hits)
        computed = seq.num_computed_tokens + len(hits) * self.block_size
        fresh = max(0, -(-(computed + num_new_tokens) // self.block_size) - have)
        return fresh + sum(1 for b in hits if self.ref_counts[b] == 0) + self._shared_tail(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Beam search: `child` continues `parent`'s computed tokens. It takes the same blocks, one reference
        more on each: the prompt and the common past are never copied. Only the partly filled block both
        would write next is copied, by whichever writes it first while it is shared (`allocate`)."""
        computed = parent.num_computed_tokens
        child.block_table = parent.block_table[:-(-computed // self.block_size)]
        for block in child.block_table:
            self.ref_counts[block] += 1
        child.num_computed_tokens = child.num_cached_tokens = computed
        child.block_hashes = parent.block_hashes[:computed // self.block_size]
        child.num_committed_blocks = min(parent.num_committed_blocks, computed // self.block_size)

    def _shared_tail(self, seq: Sequence) -> bool:
        """The block the next token's K/V goes into is partly filled and held by another sequence too (a
        forked beam): writing it in place would change the other's cache."""
        position = seq.num_computed_tokens
        index = position // self.block_size
        return (position % self.block_size != 0 and index < len(seq.block_table)
                and self.ref_counts[seq.block_table[index]] > 1)

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        if self._shared_tail(seq):  # copy-on-write: the runner copies the block's K/V before the step
            index = seq.num_computed_tokens // self.block_size
            shared, copy = seq.block_table[index], self._take_free()
            self.copies.append((shared, copy))
            self._release(shared)
            seq.block_table[index] = copy
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old_hash = self.hash_of_block[block]
        if old_hash is not None:  # evict its cached contents
            del self.block_of_hash[old_hash]
            self.hash_of_block[block] = None
        self.ref_counts[block] = 1
        return block

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that the first `num_tokens` tokens fill, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        for i in range(seq.num_committed_blocks, num_tokens // self.block_size):
            block, h = seq.block_table[i], self._block_hash(seq, i)
            if h not in self.block_of_hash:  # a duplicate of a cached block stays private
                self.block_of_hash[h] = block
                self.hash_of_block[block] = h
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_tokens // self.block_size)

    def trim(self, seq: Sequence) -> None:
        """Give back blocks reserved for drafts that were rejected: keep those the known tokens need."""
        keep = -(-seq.num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free_blocks(self, seq: Sequence) -> None:
        # Tail blocks first, so the end of a sequence is evicted before the prefix others are likely to share.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (benchmarks use it between runs); refused while any sequence holds blocks."""
        if len(self.free) != self.num_blocks:
            return False
        self.block_of_hash.clear()
        self.hash_of_block = [None] * self.num_blocks
        return True

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.hash_of_block[block] is None:  # holds nothing reusable: hand it out first
                self.free.move_to_end(block, last=False)

    def _block_hash(self, seq: Sequence, index: int) -> bytes:
        """SHA-256 over the parent block's digest (32 bytes; `_ROOT_HASH` for the first block) and the block's
        token ids as little-endian int64, so block `index`'s digest covers the whole prefix through it. Computed
        once per block and kept in `seq.block_hashes`.

        Why not Python's `hash((parent, tuple(tokens)))`, as before: it is 64 bits and not collision resistant,
        and ints are not salted (the only unknown was hash(None) at the root, a constant since Python 3.12), so
        colliding prompts can be searched for offline. A prompt whose block collides with another user's cached
        prefix is handed that user's K/V blocks: its output then depends on, and can leak, their context (vLLM's
        advisory GHSA-rm76-4mrf-v9r8). Here that takes a SHA-256 collision."""
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else _root_hash(seq.lora_id)
            tokens = self._pack_block(*seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(hashlib.sha256(parent + tokens).digest())  # fixed-size parent: unambiguous
        return seq.block_hashes[index]


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: positions [start, start + num_new_tokens) of the sequence's tokens
    followed by its draft tokens (speculative decoding) are computed."""
    seq: Sequence
    start: int
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """A chunk that reaches the end of the known tokens produces the next token (and verifies the drafts);
        an earlier prompt chunk only fills the cache."""
        return self.start + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Positions whose logits are needed: the last one, plus one per draft the target verifies."""
        if not self.samples or self.seq.pools:
            return 0
        return min(self.num_new_tokens, self.start + self.num_new_tokens - self.seq.num_tokens + 1)

    @property
    def token_ids(self) -> list[int]:
        end = self.start + self.num_new_tokens
        return (self.seq.token_ids[self.start:end] if not self.draft_token_ids
                else (self.seq.token_ids + self.draft_token_ids)[self.start:end])


@dataclass
class Batch:
    scheduled: list[ScheduledSeq]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # done by the runner before the step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config, num_blocks: int, eos_token_ids: set[int], proposer=None):
        self.proposer = proposer  # speculative decoding: NgramProposer, DraftModelProposer or None
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = self.prefix_cache_hits = 0  # in tokens, as vLLM counts them
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget, scheduled = self.max_num_batched_tokens, []
        preempted = False
        # Decodes (one token left) first, prompt chunks after: a long prompt never stalls generation.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING or seq.paused:  # preempted earlier in this loop, or a beam
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens + self._num_draft_slots(seq), budget)
            while self.block_manager.blocks_needed(seq, n) > self.block_manager.num_free_blocks:
                preempted = True
                taken = {x.seq.seq_id for x in scheduled}
                # The most recently admitted goes first; a paused beam (idle anyway) before anyone.
                candidates = [s for s in reversed(self.running) if s.seq_id not in taken]
                victim = next((s for s in candidates if s.paused), candidates[0])
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                scheduled.append(self._run(seq, n))
                budget -= n
        if not preempted:  # admitting while preempting would only thrash
            budget = self._admit_waiting(budget, scheduled)
        if not scheduled and not preempted and self.waiting and any(s.paused for s in self.running):
            # Only paused beams hold the blocks the queue needs: they give them back and recompute later.
            for seq in [s for s in self.running if s.paused]:
                self._preempt(seq)
            self._admit_waiting(budget, scheduled)
        batch = Batch(scheduled, self.block_manager.copies)
        self.block_manager.copies = []
        if self.proposer is not None:
            self.proposer.propose(batch)
        return batch

    def _num_draft_slots(self, seq: Sequence) -> int:
        """Room reserved for draft tokens: only a decoding sequence speculates, and never past its limits."""
        if self.proposer is None or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        left = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(self.proposer.k, left))

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        bm = self.block_manager
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._waits_for_sibling(seq) or seq.paused:
                continue
            hits = bm.lookup_prefix(seq)
            n = min(seq.num_tokens - len(hits) * bm.block_size, budget)
            if bm.blocks_needed(seq, n, hits) > bm.num_free_blocks:
                break  # first come, first served: nobody overtakes the head of the queue
            bm.admit(seq, hits)
            seq.num_draft_computed = seq.num_computed_tokens  # the draft model's K/V share the cached blocks
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            scheduled.append(self._run(seq, n))
            budget -= n
        return budget

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """Parallel samples (n > 1) of one prompt wait for the first to compute it, then share its blocks
        through the prefix cache instead of each computing the prompt again."""
        first = seq.waits_for
        return (first is not None and first.status is not SeqStatus.FINISHED
                and first.num_computed_tokens < first.num_prompt_tokens)

    def fork(self, parent: Sequence, token_ids: list[int], seq_id: int) -> Sequence:
        """A new sequence that shares `parent`'s computed tokens and blocks and continues with `token_ids`
        (beam search: one more continuation of a beam)."""
        child = Sequence(seq_id, token_ids, parent.num_prompt_tokens, parent.params, status=parent.status,
                         lora_id=parent.lora_id, lora_slot=parent.lora_slot)
        if parent.status is SeqStatus.RUNNING:
            self.block_manager.fork(parent, child)
            self.running.append(child)
        else:  # preempted while it waited for its group: computed again from the start, like its parent
            self.waiting.appendleft(child)
        return child

    def _run(self, seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        self.block_manager.allocate(seq, num_new_tokens)
        return ScheduledSeq(seq, seq.num_computed_tokens, num_new_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the sequence's cache; it re-enters the queue at the front and its
        prompt and generated tokens are computed again (often from the prefix cache) when there is room."""
        self.block_manager.free_blocks(seq)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: Batch, sampled: list[list[int]]) -> list[Sequence]:
        """Record a finished step: `sampled[i]` holds the new tokens of `batch.scheduled[i]`: none for a prompt
        chunk that does not sample, one for a decode, the kept drafts and one new token under speculation.
        Returns the sequences that finished by a token rule."""
        finished = []
        for item, tokens in zip(batch.scheduled, sampled):
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            # Rejected drafts' K/V stay in their slots as garbage, past num_computed_tokens: overwritten later.
            num_rejected = len(item.draft_token_ids) - max(0, len(tokens) - 1) if tokens else 0
            if item.draft_token_ids:
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += len(item.draft_token_ids)
                self.spec_num_accepted_tokens += len(item.draft_token_ids) - num_rejected
            reason = None
            for token in tokens:
                seq.token_ids.append(token)
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    break  # tokens after a stop are dropped, and so is their K/V
            seq.num_computed_tokens = min(item.start + item.num_new_tokens - num_rejected, seq.num_tokens)
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
            # After the tokens are appended: a block filled by accepted drafts is hashed from its whole content.
            self.block_manager.commit(seq, self._cached_upto(seq))
            if reason is not None:
                self.finish(seq, *reason)
                finished.append(seq)
            else:
                self.block_manager.trim(seq)
        return finished

    def _cached_upto(self, seq: Sequence) -> int:
        """Tokens whose K/V every cache holds: a draft model's cache lags the target's by a token or two, and a
        block enters the prefix cache only once both are complete, so a later hit can trust both."""
        if getattr(self.proposer, "has_kv_cache", False):
            return min(seq.num_computed_tokens, seq.num_draft_computed)
        return seq.num_computed_tokens

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop rule, stop string or abort) and return its blocks at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason


# ---------------------------------------------------------------------------------------------------------------
# Speculative decoding: a cheap proposer guesses the next k tokens of each decoding sequence; the target model
# scores all of them in the same forward pass (one position per draft plus a bonus position); `rejection_sample`
# keeps the longest prefix the target agrees with. Kept tokens are exactly distributed as the target's own
# samples, so speculation changes speed, never output distribution (greedy output is token-identical).
# ---------------------------------------------------------------------------------------------------------------


def _draft_room(item: ScheduledSeq) -> int:
    """Draft slots the scheduler reserved for this item (0 unless it is a decoding sequence)."""
    return item.start + item.num_new_tokens - item.seq.num_tokens


class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens (longest n first)
    and propose the tokens that followed it. Costs no model; shines when the output repeats its input."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4):
        self.k, self.min_n, self.max_n = num_speculative_tokens, prompt_lookup_min, prompt_lookup_max

    def propose(self, batch: Batch) -> None:
        for item in batch.scheduled:
            room = _draft_room(item)
            if room > 0:
                item.draft_token_ids = self.lookup(item.seq.token_ids, room)
                item.num_new_tokens = 1 + len(item.draft_token_ids)  # unused reserved slots are trimmed later

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(token_ids) - 1), self.min_n - 1, -1):
            suffix = token_ids[-n:]
            for start in range(len(token_ids) - n - 1, -1, -1):
                if token_ids[start:start + n] == suffix:
                    return token_ids[start + n:start + n + k]
        return []


class DraftModelProposer:
    """A smaller model with the target's tokenizer guesses k tokens greedily, one forward pass per token.

    Its KV cache has the target's block layout: block b of the draft cache holds the draft's K/V for the same
    tokens as block b of the target cache. So the target's block tables, prefix cache, preemption and rollback
    keep both caches in step, and `Sequence.num_draft_computed` only tracks how far the draft has caught up.
    `runner.greedy_next(batch)` (the runner's job: it owns the model) returns the draft's argmax per item."""

    has_kv_cache = True  # the scheduler caches a block only once the draft's K/V for it are complete too

    def __init__(self, runner, num_speculative_tokens: int):
        self.runner, self.k = runner, num_speculative_tokens

    def propose(self, batch: Batch) -> None:
        # Pass 1: everything the target computes this step that the draft has not (prompt chunks, last step's
        # accepted tokens); for a decoding sequence it yields the first draft.
        catch_up = []
        for item in batch.scheduled:
            seq, end = item.seq, min(item.start + item.num_new_tokens, item.seq.num_tokens)
            if end > seq.num_draft_computed:
                catch_up.append(ScheduledSeq(seq, seq.num_draft_computed, end - seq.num_draft_computed))
                seq.num_draft_computed = end
        first = dict(zip((x.seq.seq_id for x in catch_up), self.runner.greedy_next(Batch(catch_up))))
        drafting = [item for item in batch.scheduled if _draft_room(item) > 0]
        for item in drafting:
            item.draft_token_ids = [first[item.seq.seq_id]]
        # Passes 2..k: one more token for every sequence that still has room.
        for i in range(1, self.k):
            step = [item for item in drafting if _draft_room(item) > i]
            if not step:
                break
            drafts = self.runner.greedy_next(Batch(
                [ScheduledSeq(x.seq, x.seq.num_tokens + i - 1, 1, list(x.draft_token_ids)) for x in step]))
            for item, token in zip(step, drafts):
                item.draft_token_ids.append(token)
                item.seq.num_draft_computed += 1
        for item in drafting:
            item.num_new_tokens = 1 + len(item.draft_token_ids)


def rejection_sample(target_probs, draft_token_ids: list[int], draft_probs=None, generator=None) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one sequence.

    target_probs: [k + 1, vocab] the target's distribution at each draft position and the bonus position.
    draft_probs: [k, vocab] the proposer's distribution for each draft, or None for deterministic proposals
    (a one-hot q). Draft i is kept with probability min(1, p_i(d) / q_i(d)); at the first rejection the token is
    drawn from the residual max(p_i - q_i, 0), renormalized, and the rest is dropped; if every draft is kept,
    a bonus token is drawn from p_k. Returns the kept drafts followed by that one new token.
    """
    import torch  # only here: the rest of the scheduler is plain Python bookkeeping

    k = len(draft_token_ids)
    drafts = torch.tensor(draft_token_ids, dtype=torch.long, device=target_probs.device)
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:k]).scatter_(1, drafts[:, None], 1.0)
    rows = torch.arange(k, device=target_probs.device)
    p, q = target_probs[rows, drafts], draft_probs[rows, drafts]
    uniform = torch.rand(k, generator=generator, device=target_probs.device)
    rejected = (uniform * q >= p).tolist()  # u < p / q, without dividing by zero
    kept = rejected.index(True) if True in rejected else k
    if kept < k:
        residual = (target_probs[kept] - draft_probs[kept]).clamp_min(0)
        last = torch.multinomial(residual / residual.sum(), 1, generator=generator)
    else:
        last = torch.multinomial(target_probs[k], 1, generator=generator)
    return draft_token_ids[:kept] + [int(last)]
