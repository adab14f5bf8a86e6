"""The step timeline (trace.py): a valid Chrome trace-event file whose events agree with the engine's own counts,
under preemption and chunked prefill; nothing written and nothing changed when it is off; the CLI's --trace."""
import gc
import json
import logging
import random

import pytest

from nanoserve import LLM, SamplingParams, cli
from nanoserve.config import EngineConfig
from nanoserve.scheduler import Scheduler

PARAMS = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
# 24 blocks of 4 tokens cannot hold 6 sequences of ~50 tokens (preemption); 16 tokens a step (prompt chunks).
TIGHT = dict(block_size=4, num_gpu_blocks_override=24, max_model_len=96, max_num_batched_tokens=16)
ALLOWED = {"X": {"step", "schedule", "prepare", "forward", "sample", "output",
                 "waiting", "prefill", "decoding", "preempted"},
           "C": {"KV blocks in use", "prefix cache hits", "sequences"},
           "M": {"process_name", "thread_name"},
           "i": {"finished"}}
STEP_PHASES = {"schedule", "prepare", "forward", "sample", "output"}


def prompts(count=6, seed=5):
    rng = random.Random(seed)
    return [[rng.randrange(10, 700) for _ in range(rng.randint(20, 40))] for _ in range(count)]


def check_valid(events: list[dict]) -> None:
    """What Perfetto needs: every event has ph, ts, pid, tid (and a known name); X events a dur >= 0."""
    for e in events:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(e), e
        assert e["name"] in ALLOWED[e["ph"]], e
        assert isinstance(e["ts"], int) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], int) and e["dur"] >= 0, e


def by_track(events: list[dict]) -> dict[int, list[dict]]:
    tracks = {}
    for e in events:
        if e["ph"] != "M":
            tracks.setdefault(e["tid"], []).append(e)
    for track in tracks.values():  # by time; at equal times file order (an instant follows the slice it ends)
        track.sort(key=lambda e: e["ts"])
    return tracks


def test_trace_agrees_with_the_engine(qwen2_dir, tmp_path):
    path = tmp_path / "trace.json"
    llm = LLM(qwen2_dir, trace_path=str(path), **TIGHT)
    steps = []  # ground truth, counted beside the tracer: the tokens of every step that ran
    update = llm.engine.scheduler.update
    llm.engine.scheduler.update = lambda batch, sampled: (steps.append(batch.num_tokens), update(batch, sampled))[1]
    outputs = llm.generate(prompts(), PARAMS, use_tqdm=False)
    llm.close()
    events = json.loads(path.read_text())
    check_valid(events)
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0  # the workload does what it is meant to

    step_slices = [e for e in events if e["ph"] == "X" and e["name"] == "step"]
    assert len(step_slices) == len(steps)
    args = [e["args"] for e in step_slices]
    assert [a["tokens"] for a in args] == steps
    assert all(a["tokens"] == a["prefill_tokens"] + a["decode_tokens"] and a["batch_size"] >= 1 for a in args)
    assert sum(a["preemptions"] for a in args) == stats["num_preemptions"]
    # Every token computed is a prompt or generated token not yet cached, or one computed again after preemption.
    preempted = [e for e in events if e["name"] == "preempted"]
    assert len(preempted) == stats["num_preemptions"]
    recomputed = sum(e["args"]["dropped_tokens"] for e in preempted)
    needed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 - o.num_cached_tokens for o in outputs)
    assert sum(steps) == needed + recomputed

    tracks = by_track(events)
    steps_track = tracks.pop(0)
    for phase in STEP_PHASES:
        assert sum(e["name"] == phase for e in steps_track) == len(steps), phase
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in step_slices]
    for e in steps_track:  # phases nest inside their step
        if e["ph"] == "X" and e["name"] in STEP_PHASES:
            assert any(a <= e["ts"] and e["ts"] + e["dur"] <= b for a, b in spans), e
    assert len(tracks) == len(outputs)  # one track per sequence (n = 1)
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    for tid, track in tracks.items():
        assert names[tid].startswith("req ")
        assert track[-1]["name"] == "finished" and track[-1]["args"]["reason"] == "length"
        assert [e["name"] for e in track].count("finished") == 1
        assert track[0]["name"] == "waiting"
        assert sum(e["name"] == "prefill" for e in track) >= 2  # 20-40 token prompts in chunks of <= 16
        slices = [e for e in track if e["ph"] == "X"]
        for a, b in zip(slices, slices[1:]):  # a sequence is in one phase at a time
            assert a["ts"] + a["dur"] <= b["ts"], (a, b)
    counters = [e for e in events if e["ph"] == "C"]
    blocks = [e["args"]["blocks"] for e in counters if e["name"] == "KV blocks in use"]
    assert len(blocks) >= len(steps) and 0 < max(blocks) <= 24
    hits = [e["args"]["tokens"] for e in counters if e["name"] == "prefix cache hits"]
    assert hits == sorted(hits) and hits[-1] == stats["prefix_cache_hits"]
    assert max(e["args"]["waiting"] for e in counters if e["name"] == "sequences") > 0


def test_off_writes_nothing_and_changes_nothing(qwen2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = LLM(qwen2_dir, **TIGHT)
    assert plain.engine.tracer is None
    assert "schedule" not in vars(plain.engine.scheduler) and "execute" not in vars(plain.engine.runner)
    want = plain.generate(prompts(), PARAMS, use_tqdm=False)
    assert list(tmp_path.iterdir()) == []
    traced = LLM(qwen2_dir, trace_path="t.json", **TIGHT)
    got = traced.generate(prompts(), PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert plain.engine.scheduler.num_preemptions == traced.engine.scheduler.num_preemptions > 0


def test_close_and_garbage_collection_end_the_file(llama_dir, tmp_path):
    path = tmp_path / "t.json"
    llm = LLM(llama_dir, trace_path=str(path))
    llm.generate(prompts(2), SamplingParams(max_tokens=3), use_tqdm=False)
    text = path.read_text()  # streamed: already on disk, but not yet closed
    assert text.startswith("[") and not text.rstrip().endswith("]") and '"name":"finished"' in text
    del llm
    gc.collect()
    assert len([e for e in json.loads(path.read_text()) if e["name"] == "finished"]) == 2

    llm = LLM(llama_dir, trace_path=str(path))
    llm.generate(prompts(1), SamplingParams(max_tokens=3), use_tqdm=False)
    llm.close()
    llm.close()  # twice is fine
    size = path.stat().st_size
    assert llm.engine.tracer is None and "schedule" not in vars(llm.engine.scheduler)
    assert llm.engine.scheduler.schedule.__func__ is Scheduler.schedule
    llm.generate(prompts(1), SamplingParams(max_tokens=3), use_tqdm=False)  # untraced now
    assert path.stat().st_size == size
    check_valid(json.loads(path.read_text()))


def test_trace_directory_must_exist(tmp_path):
    with pytest.raises(ValueError, match="trace_path"):
        EngineConfig(trace_path=str(tmp_path / "missing" / "t.json"))


@pytest.fixture
def restore_logger():
    """cli.main configures the "nanoserve" logger for a terminal; put it back for the other tests."""
    logger = logging.getLogger("nanoserve")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_cli_trace_flag(llama_dir, tmp_path, capsys, restore_logger):
    path = tmp_path / "cli.json"
    argv = ["generate", llama_dir, "hello", "The cat", "--max-tokens", "5", "--temperature", "0", "--trace", str(path)]
    assert cli.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    events = json.loads(path.read_text())  # generate closed the file
    check_valid(events)
    assert sum(e["name"] == "step" for e in events) >= 5
    assert sum(e["name"] == "finished" for e in events) == 2
    assert "--trace FILE" in cli.build_parser("serve").format_help()
