"""Accuracy check: lm-evaluation-harness scores through nanoserve's OpenAI server against lm-eval's own `hf` backend.

Task: `nanoserve_mc_local`, 40 simple four-way multiple-choice questions (arithmetic, capitals, colours,
opposites, ...) in bench/data/mc_local.jsonl, scored as lm-eval scores every multiple-choice task: the
loglikelihood of " <choice>" after "Question: <question>\\nAnswer:"; `acc` takes the best sum, `acc_norm` the best
sum per byte. The task YAML is written at run time into a temporary directory (its `data_files` must be an
absolute path) and loaded with `TaskManager(include_path=...)`. Everything is offline (HF_*_OFFLINE=1).

Backends, on the same model directory:
- `hf`: transformers in-process, float32 on the CPU: the reference;
- `local-completions` against `nanoserve serve MODEL --dtype float32` on a free loopback port, with
  `tokenized_requests=True` (token-id prompts) and `False` (text the server tokenizes again). lm-eval sends
  `echo: true, logprobs: 1, max_tokens: 1` and sums `token_logprobs[ctxlen:-1]` of the echoed prompt.
Pass: acc and acc_norm exactly equal to hf's, and every per-choice loglikelihood within `--tol` of hf's.
Exit status 1 otherwise. Server start-up is not in the seconds column; the hf model load is.

    python bench/lm_eval_check.py                          # embedded SmolLM2-135M-Instruct
    python bench/lm_eval_check.py --model DIR --limit 10   # any local model directory; first 10 questions
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# Before anything imports datasets or huggingface_hub: they read these once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchlib import print_table, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data", "mc_local.jsonl")
TASK = "nanoserve_mc_local"
# Strings go through json.dumps: JSON is YAML, so paths and "\n" need no YAML quoting rules of their own.
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: {text}
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(directory: str) -> None:
    text = TASK_YAML.format(task=TASK, data=json.dumps(DATA), text=json.dumps("Question: {{question}}\nAnswer:"))
    with open(os.path.join(directory, f"{TASK}.yaml"), "w") as f:
        f.write(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, name: str, port: int, log) -> subprocess.Popen:
    """`nanoserve serve` in a child process (the entry point via -c: nanoserve.cli has no __main__), fp32 on the
    CPU like the hf reference; returns once /health answers 200."""
    cmd = [sys.executable, "-c", "import sys; from nanoserve.cli import main; sys.exit(main())", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name, "--dtype", "float32",
           "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nanoserve exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:  # not listening yet, or 503 while loading
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("nanoserve did not become healthy within 600 s")


def evaluate(model: str, model_args: dict, tasks, batch_size: int, limit: int | None):
    """One lm-eval run: (acc, acc_norm, {doc_id: [loglikelihood per choice]}, seconds)."""
    import lm_eval
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=tasks,
                                  batch_size=batch_size, limit=limit, log_samples=True, bootstrap_iters=0,
                                  random_seed=0)
    seconds = time.perf_counter() - start
    metrics = out["results"][TASK]
    # filtered_resps: one (loglikelihood, is_greedy) per choice, in the task's choice order.
    logliks = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"][TASK]}
    return metrics["acc,none"], metrics["acc_norm,none"], logliks, seconds


def compare(ref: dict, got: dict) -> tuple[float, float]:
    """Max and mean |Δ loglikelihood| over every (question, choice) pair."""
    assert ref.keys() == got.keys(), "the two runs scored different questions"
    deltas = [abs(a - b) for d in ref for a, b in zip(ref[d], got[d], strict=True)]
    return max(deltas), sum(deltas) / len(deltas)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    parser.add_argument("--limit", type=int, help="score only the first N questions")
    parser.add_argument("--hf-batch-size", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-3, help="largest |Δ loglikelihood| allowed vs hf")
    parser.add_argument("--json", help="result file (default: bench/results/lm-eval-<model name>.json)")
    parser.add_argument("--server-log", help="keep nanoserve's output in this file (default: a temporary file)")
    args = parser.parse_args()

    from nanoserve.default_model import resolve_model
    model_dir = resolve_model(args.model)  # a local directory: the hf backend must not reach for the hub
    name = os.path.basename(os.path.normpath(model_dir))

    from lm_eval.tasks import TaskManager
    task_dir = tempfile.mkdtemp(prefix="nanoserve-lm-eval-")
    write_task(task_dir)
    tasks = TaskManager(include_path=task_dir, include_defaults=False)  # skip indexing lm-eval's ~10k YAMLs

    print(f"model {model_dir}")
    runs = {"hf": evaluate("hf", dict(pretrained=model_dir, dtype="float32", device="cpu"), tasks,
                           args.hf_batch_size, args.limit)}
    log = open(args.server_log, "w+") if args.server_log else tempfile.TemporaryFile("w+")
    port, t0 = free_port(), time.perf_counter()
    server = start_server(model_dir, name, port, log)
    startup = time.perf_counter() - t0
    print(f"nanoserve healthy on port {port} after {startup:.1f} s")
    try:
        for tokenized in (True, False):
            model_args = dict(base_url=f"http://127.0.0.1:{port}/v1/completions", model=name,
                              tokenizer_backend="huggingface", tokenizer=model_dir, tokenized_requests=tokenized,
                              num_concurrent=1, max_retries=1)
            runs[f"nanoserve tokenized={tokenized}"] = evaluate("local-completions", model_args, tasks, 1, args.limit)
    except Exception:
        log.seek(0)
        print("nanoserve's log, last 3000 characters:\n" + log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=60)

    ref_acc, ref_norm, ref_ll, _ = runs["hf"]
    rows, ok = [], True
    for backend, (acc, norm, logliks, seconds) in runs.items():
        worst, mean = compare(ref_ll, logliks) if backend != "hf" else (None, None)  # the reference: no Δ
        passed = acc == ref_acc and norm == ref_norm and (worst is None or worst <= args.tol)
        ok &= passed
        rows.append({"backend": backend, "questions": len(logliks), "acc": acc, "acc_norm": norm,
                     "max_abs_dloglik": worst, "mean_abs_dloglik": mean, "seconds": seconds, "pass": passed})
    # No "|" in headers: print_table writes Markdown.
    print_table(["backend", "acc", "acc_norm", "max abs Δ loglik vs hf", "mean abs Δ", "seconds", "pass"],
                [[r["backend"], r["acc"], r["acc_norm"], r["max_abs_dloglik"], r["mean_abs_dloglik"], r["seconds"],
                  r["pass"]] for r in rows],
                title=f"lm-eval {TASK} ({rows[0]['questions']} questions), {name}, tolerance {args.tol:g}")
    path = args.json or os.path.join(HERE, "results", f"lm-eval-{name}.json")
    write_json(path, "lm_eval_check", args, rows, model_dir=model_dir, server_startup_s=startup,
               loglikelihoods={backend: run[2] for backend, run in runs.items()})
    print("PASS" if ok else "FAIL: nanoserve's scores differ from the hf backend's")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
