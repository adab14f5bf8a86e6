"""The step timeline: what the engine did, step by step, as a Chrome trace-event JSON file for ui.perfetto.dev.

On when `EngineConfig.trace_path` is set (`LLM(..., trace_path=...)`, `nanoserve --trace FILE`): the engine hands
each `step()` to `StepTracer.step`, which runs it and writes a track of steps (nested: schedule, prepare, forward,
sample, output), a track per sequence (waiting, prefill chunks, decoding, preempted, finished) and counters.

Its data is state the engine keeps anyway: the `Batch` from `schedule()`, each `Sequence`'s status (one that was
computing and is WAITING after `schedule()` was preempted), `engine.seq_owner`, the scheduler's counters. Phase
times come from timing wrappers set on this engine's scheduler and runner objects (removed by `close()`), so an
untraced engine runs its own code: off costs one `is None` check per step. Events are streamed, written as each
step ends in the JSON Array Format (Perfetto also reads a file cut short, without its `]`): memory stays bounded.
`close()` ends the array; so do LLM.close(), garbage collection of the engine and interpreter exit.
"""
import json
import time
import weakref
from dataclasses import dataclass, field

import torch

from .scheduler import Sequence, SeqStatus

PID, STEP_TID = 1, 0  # one process; track 0 holds the steps, sequence i is track i + 1
_dumps = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps would build one per event


@dataclass
class _Track:
    """A live sequence: its phase, since when (None: no open slice) and tokens computed since admission."""
    tid: int
    seq: Sequence
    phase: str
    since: float | None
    computed: int = 0
    args: dict = field(default_factory=dict)


class StepTracer:
    def __init__(self, path: str, engine):
        self.engine, self.origin = engine, time.monotonic()
        self.file = open(path, "w")
        self._finalizer = weakref.finalize(self, _end_array, self.file)  # holds the file, not the tracer
        self.tracks: dict[int, _Track] = {}
        self.next_seq_id = 0  # seq ids only grow: a finished sequence, still in seq_owner, is not tracked again
        self.num_steps = self.preempted = 0
        self.step_start = self.flushed_at = self.origin
        self.marks, self.items, self.installed = {}, [], []  # this step's phase times and batch; our wrappers
        self.file.write("[\n" + _dumps(_meta("process_name", STEP_TID, "nanoserve")))
        self.pending = [_meta("thread_name", STEP_TID, "engine steps")]  # events of the step under way
        runner = engine.runner
        self._time(engine.scheduler, "schedule", then=self._scheduled)
        self._time(runner, "execute")
        self._time(runner, "_host_inputs")  # "prepare": the step's inputs (ids, positions, slots) as host lists
        # A GPU runs the forward pass asynchronously: without waiting for it, its time would show up in sample.
        wait = (lambda: torch.cuda.synchronize(runner.device)) if runner.device.type == "cuda" else None
        self._time(runner, "_forward", wait=wait)

    def step(self, run_step, final_only: bool):
        """Run one engine step (`run_step`) and record it."""
        self.step_start, self.marks, self.items, self.preempted = time.monotonic(), {}, [], 0
        outputs = run_step(final_only)
        end = time.monotonic()
        if self.items:  # something ran (an empty batch returns at once)
            self._record_step(self.step_start, end)
        self._sync(end)  # sequences that finished in this step, beams it forked
        self._flush()
        return outputs

    def close(self) -> None:
        """End the file, open slices now; the engine runs untraced from here on."""
        if not self._finalizer.alive:
            return
        now = time.monotonic()
        self._sync(now)
        for track in self.tracks.values():
            self._close(track, now)
        self._flush()
        for obj, name in self.installed:
            delattr(obj, name)  # the class's method shows through again
        self.engine.tracer = None
        self._finalizer()

    def _time(self, obj, name: str, then=None, wait=None) -> None:
        """Shadow `obj.name` on this one object with a call that records its start and end in `self.marks`."""
        inner = getattr(obj, name)

        def timed(*args):
            start = time.monotonic()
            result = inner(*args)
            if wait is not None:
                wait()
            self.marks[name] = (start, time.monotonic())
            if then is not None:  # after the mark: the tracer's own work is not charged to the engine's phases
                then(result)
            return result
        setattr(obj, name, timed)
        self.installed.append((obj, name))

    def _scheduled(self, batch) -> None:
        """Right after `schedule()`, before the runner and `update()` change the sequences: preemptions, counters,
        and whether each item is a decode (its last known token) or a prompt chunk (a recompute too)."""
        self._sync(self.step_start)
        s, ts = self.engine.scheduler, self._us(self.step_start)
        bm = s.block_manager
        for name, values in [("KV blocks in use", {"blocks": bm.num_blocks - bm.num_free_blocks}),
                             ("prefix cache hits", {"tokens": s.prefix_cache_hits}),
                             ("sequences", {"running": len(s.running), "waiting": len(s.waiting)})]:
            self.pending.append({"name": name, "ph": "C", "ts": ts, "pid": PID, "tid": STEP_TID, "args": values})
        self.items = [(x.seq.seq_id, x.num_new_tokens, x.start == x.seq.num_tokens - 1 and
                       x.seq.num_output_tokens > 0) for x in batch.scheduled]

    def _record_step(self, start: float, end: float) -> None:
        total = sum(n for _, n, _ in self.items)
        prefill = sum(n for _, n, decode in self.items if not decode)
        self._slice(STEP_TID, "step", start, end, {
            "step": self.num_steps, "tokens": total, "batch_size": len(self.items), "prefill_tokens": prefill,
            "decode_tokens": total - prefill, "preemptions": self.preempted})
        self.num_steps += 1
        m = self.marks
        self._slice(STEP_TID, "schedule", *m["schedule"])
        if "execute" in m:  # else the model step failed (the engine failed its requests)
            prepared, forwarded, executed = m["_host_inputs"][1], m["_forward"][1], m["execute"][1]
            for name, a, b in [("prepare", m["_host_inputs"][0], prepared), ("forward", prepared, forwarded),
                               ("sample", forwarded, executed), ("output", executed, end)]:
                self._slice(STEP_TID, name, a, b)
        self._advance_tracks(start, end)

    def _advance_tracks(self, start: float, end: float) -> None:
        """A prompt chunk is a slice of its own; a decode opens (or continues) the decoding slice."""
        for seq_id, tokens, decode in self.items:
            track = self.tracks.get(seq_id)
            if track is None:
                continue
            track.computed += tokens
            if not decode:
                self._close(track, start)
                self._slice(track.tid, "prefill", start, end, {"tokens": tokens})
                track.phase = "prefill"
            elif track.phase != "decoding":
                self._close(track, start)
                track.phase, track.since = "decoding", start

    def _sync(self, at: float) -> None:
        """Bring the tracks up to date with the sequences: new ones, preempted ones, finished ones."""
        owners = self.engine.seq_owner
        fresh = [seq_id for seq_id in owners if seq_id >= self.next_seq_id]
        for seq_id in fresh:
            req = owners[seq_id][0]
            seq = next(s for s in req.seqs if s.seq_id == seq_id)  # (a beam's index in seq_owner says nothing)
            forked = seq.num_output_tokens > 0  # a new beam: it starts now, decoding if its parent runs
            phase = "decoding" if forked and seq.status is SeqStatus.RUNNING else "waiting"
            self.tracks[seq_id] = _Track(seq_id + 1, seq, phase, at if forked else req.arrival_time)
            self.pending.append(_meta("thread_name", seq_id + 1, f"req {req.request_id} (seq {seq_id})"))
        self.next_seq_id = max(fresh, default=self.next_seq_id - 1) + 1
        for seq_id, track in list(self.tracks.items()):
            if track.seq.status is SeqStatus.FINISHED:
                self._close(track, at)
                self.pending.append({"name": "finished", "ph": "i", "s": "t", "ts": self._us(at), "pid": PID,
                                     "tid": track.tid, "args": {"reason": track.seq.finish_reason}})
                del self.tracks[seq_id]
            elif track.seq.status is SeqStatus.WAITING and track.phase in ("prefill", "decoding"):
                self._close(track, at)
                track.phase, track.since, track.args = "preempted", at, {"dropped_tokens": track.computed}
                track.computed = 0
                self.preempted += 1

    def _close(self, track: _Track, at: float) -> None:
        """End the track's open slice (waiting, decoding or preempted) at `at`."""
        if track.since is not None:
            self._slice(track.tid, track.phase, track.since, at, track.args)
            track.since, track.args = None, {}

    def _slice(self, tid: int, name: str, start: float, end: float, args: dict | None = None) -> None:
        ts = self._us(start)  # whole microseconds: a nested slice cannot poke out of its parent by rounding
        event = {"name": name, "ph": "X", "ts": ts, "dur": self._us(end) - ts, "pid": PID, "tid": tid}
        if args:
            event["args"] = args
        self.pending.append(event)

    def _us(self, t: float) -> int:
        return int((t - self.origin) * 1e6)

    def _flush(self) -> None:
        if self.pending:
            self.file.write(",\n" + _dumps(self.pending)[1:-1])  # a line per step; one call encodes it faster
            # To disk every second and whenever the engine goes idle (not every step: the system call costs as
            # much as encoding the events), so a server killed by a signal loses at most the last second.
            if time.monotonic() - self.flushed_at > 1.0 or not self.engine.has_unfinished_requests():
                self.file.flush()
                self.flushed_at = time.monotonic()
            self.pending.clear()


def _meta(kind: str, tid: int, name: str) -> dict:
    return {"name": kind, "ph": "M", "ts": 0, "pid": PID, "tid": tid, "args": {"name": name}}


def _end_array(file) -> None:
    if not file.closed:
        file.write("\n]\n")
        file.close()
