"""Online serving benchmark in the style of `vllm bench serve`, against any OpenAI-compatible server.

What is measured: `--num-prompts` streaming POST /v1/completions requests (`stream_options.include_usage`), sent
all at once (`--request-rate inf`, the default) or as a seeded Poisson process at `--request-rate` requests per
second, with at most `--max-concurrency` in flight (an asyncio semaphore). Per request, on the client clock:
- TTFT: time to the first chunk with non-empty `choices`;
- ITL: gaps between successive chunks that carry text, pooled over all requests;
- TPOT: (latency - TTFT) / (output tokens - 1), per request with at least two output tokens;
- E2E: time to the end of the stream; output tokens from the usage chunk (else the number of text chunks).
Per run: successful and failed requests, duration (first send to last reply), request throughput, output and total
(prompt + output) token throughput, and mean / median / p99 of TTFT, TPOT, ITL and E2E in ms, as a table and in
`--json`. One warm-up request (not timed) precedes each run; each run draws its own prompts (seed + run index), so
that a prefix cache cannot replay an earlier run's prompts.

Workload (vLLM's random dataset): input and output lengths uniform in [L * (1 - r), L * (1 + r)] for `--input-len`,
`--output-len`, `--range-ratio` r (0: exactly L). Prompts are lists of random token ids below min(10000, vocab size)
(vLLM's /v1/completions accepts token-id prompts); `--text-prompts` sends random English words instead, for servers
that only take strings. The model directory (vocabulary size, and the tokenizer that cuts text prompts to the input
length) is `--tokenizer`, else the directory `--launch` serves, else the `root` of `GET /v1/models` when it is a local
directory; without one, token ids stay below 10000 and a text prompt has one word per token. Every output runs to
its full length: `ignore_eos: true` and `max_tokens` = output length; temperature 0 unless `--temperature`.

Server: `--base-url` (default http://127.0.0.1:8000; the model name is `GET /v1/models` data[0].id unless
`--model-name`), or `--launch`: start nanoserve on a free loopback port (`--model` passed through; none = the
embedded SmolLM2-135M-Instruct; `--server-args` appended), wait for /health, run, stop it. Only loopback addresses
are accepted unless `--allow-non-loopback` (a load generator is aimed at someone else's server only on purpose).

`--concurrency-sweep 1,4,16` runs the benchmark once per max-concurrency value (`--num-prompts` each) against the
same server: one table row per value.

Peer: `--peer transformers` also launches `transformers serve MODEL_DIR --continuous-batching` (install
`transformers[serving]`; offline, HF_HUB_OFFLINE=1, the model given as a local directory, which is also the
request's `model`) on another loopback port after nanoserve has been stopped (the two never share the CPU), and
runs the same workload (same prompts, same sweep) on it. transformers serve takes only string prompts and
rejects unknown fields such as `ignore_eos` (422), so with a peer both engines get `--text-prompts`, and
transformers gets the equivalent of `ignore_eos` as `generation_config: {"min_new_tokens": N, "max_new_tokens": N}`
(a config without an EOS id). Its streams end without `data: [DONE]` and carry finish_reason and usage in a last
chunk with empty text; the client handles both layouts.

    python bench/serve.py --launch                                    # embedded SmolLM2-135M, CPU
    python bench/serve.py --launch --num-prompts 16 --input-len 128 --output-len 32 --concurrency-sweep 1,4,16 \\
        --peer transformers --json bench/results/cpu-serve-smollm2.json
    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4   # a running server
    python bench/serve.py --launch --model /tmp/tiny-llama --num-prompts 20 --input-len 32 --output-len 16 \\
        --concurrency-sweep 1,4                                       # CPU smoke test
"""
import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import httpx

from benchlib import print_table, write_json

WORDS = ("the of and to in is was for on that with as by at from his her an which have are this be or had not "
         "one but all were they she he their there been has when who will more no if out so said what up its about "
         "into than them can only other new some time could these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three house river garden window music").split()
TOKEN_ID_BOUND = 10000  # vLLM's random dataset draws prompt token ids below this


# ---------------------------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------------------------

def check_loopback(url: str, allow_non_loopback: bool = False) -> None:
    host = urlparse(url).hostname or ""
    if allow_non_loopback or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"error: {url} is not a loopback address (127.0.0.0/8, ::1, localhost); "
                     f"pass --allow-non-loopback to load a server elsewhere on purpose")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """A server subprocess on a loopback port; its output goes to a log file (shown in part if it fails)."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None):
        self.name, self.cmd, self.port = name, cmd, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        print(f"starting {name}: {shlex.join(cmd)} (log: {self.log.name})", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.pid = self.proc.pid

    def wait_healthy(self, timeout: float) -> float:
        start = time.monotonic()
        with httpx.Client(trust_env=False, timeout=5) as client:
            while time.monotonic() - start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was healthy:\n"
                                       + self.log_tail())
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        elapsed = time.monotonic() - start
                        print(f"{self.name} healthy after {elapsed:.1f} s", flush=True)
                        return elapsed
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy within {timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (the server drains, up to its grace period), then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def launch_nanoserve(model: str | None, server_args: str = "", port: int | None = None,
                     health_timeout: float = 900) -> Launched:
    port = port or free_port()
    cmd = [sys.executable, "-c", "import sys; from nanoserve.cli import main; sys.exit(main())", "serve"]
    cmd += ([model] if model else []) + ["--host", "127.0.0.1", "--port", str(port)] + shlex.split(server_args)
    server = Launched("nanoserve", cmd, port)
    server.startup_s = server.wait_healthy(health_timeout)
    return server


def launch_transformers(model_dir: str, peer_args: str = "", health_timeout: float = 600) -> Launched:
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    if not os.path.exists(exe):
        raise RuntimeError("the `transformers` command is missing: pip install 'transformers[serving]'")
    port = free_port()
    cmd = [exe, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--continuous-batching",
           "--log-level", "warning"] + shlex.split(peer_args)
    server = Launched("transformers", cmd, port, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                      "HF_HUB_DISABLE_TELEMETRY": "1"})
    server.startup_s = server.wait_healthy(health_timeout)
    return server


def local_model_dir(model: str | None) -> str | None:
    """The directory nanoserve serves for `model` (None: the embedded default, converted once), if local."""
    if model is None:
        from nanoserve.default_model import default_model_dir
        return default_model_dir()
    path = os.path.expanduser(model)
    return path if os.path.isdir(path) else None


def model_card(base_url: str) -> dict:
    with httpx.Client(trust_env=False, timeout=30) as client:
        r = client.get(f"{base_url}/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]


# ---------------------------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------------------------

def lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def make_requests(args, seed: int, n: int, vocab: int | None, tokenizer) -> list[dict]:
    """`n` requests: {prompt (token ids, or text with --text-prompts), input_len, output_len}."""
    rng = random.Random(seed)
    in_lens, out_lens = lengths(rng, n, args.input_len, args.range_ratio), lengths(rng, n, args.output_len,
                                                                                    args.range_ratio)
    bound = min(TOKEN_ID_BOUND, vocab or TOKEN_ID_BOUND)
    requests = []
    for il, ol in zip(in_lens, out_lens):
        if args.text_prompts:
            prompt = random_text(rng, il, tokenizer)
        else:
            prompt = [rng.randrange(bound) for _ in range(il)]
        requests.append({"prompt": prompt, "input_len": il, "output_len": ol})
    return requests


def random_text(rng: random.Random, length: int, tokenizer) -> str:
    """Random words; with a tokenizer, cut to `length` tokens (re-encoding may differ by a token or so)."""
    words = [rng.choice(WORDS) for _ in range(length if tokenizer is None else 2 * length + 8)]
    if tokenizer is None:  # common words are about one token each in most vocabularies
        return " ".join(words)
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    while len(ids) < length:  # a tokenizer that splits words into many tokens: add words
        words += [rng.choice(WORDS) for _ in range(length)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    return tokenizer.decode(ids[:length])


def payload(kind: str, model: str, req: dict, temperature: float) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["output_len"], "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if kind == "transformers":  # rejects unknown fields; a generation config without EOS runs to the length
        n = req["output_len"]
        body["generation_config"] = json.dumps({"min_new_tokens": n, "max_new_tokens": n,
                                                "do_sample": temperature > 1e-5, "temperature": temperature or 1.0})
    else:
        body["ignore_eos"] = True
    return body


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------

async def send(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> dict:
    """One streaming completion; returns its timings (seconds, client clock) or its error."""
    rec = {"ok": False, "ttft": None, "itl": [], "latency": None, "output_tokens": 0, "prompt_tokens": None,
           "error": None}
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, url, body, start, rec), timeout)
    except (httpx.HTTPError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return rec


async def _stream(client: httpx.AsyncClient, url: str, body: dict, start: float, rec: dict) -> None:
    last_text, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            rec["error"] = f"HTTP {resp.status_code}: {text[:300]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                rec["error"] = f"stream error: {json.dumps(event['error'])[:300]}"
                return
            choices = event.get("choices") or []
            if choices:
                if rec["ttft"] is None:
                    rec["ttft"] = now - start
                c = choices[0]
                text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if text:
                    if last_text is not None:
                        rec["itl"].append(now - last_text)
                    last_text, chunks = now, chunks + 1
            if event.get("usage"):
                usage = event["usage"]
    rec["latency"] = time.perf_counter() - start
    rec["output_tokens"] = (usage or {}).get("completion_tokens") or chunks
    rec["prompt_tokens"] = (usage or {}).get("prompt_tokens")
    rec["ok"] = rec["ttft"] is not None
    if not rec["ok"]:
        rec["error"] = "stream ended without a content chunk"


async def run_benchmark(base_url: str, kind: str, model: str, requests: list[dict], warmup: dict, args,
                        max_concurrency: int | None) -> dict:
    url = f"{base_url}/v1/completions"
    connections = max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=connections + 1, max_keepalive_connections=connections + 1)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        w = await send(client, url, payload(kind, model, warmup, args.temperature), args.request_timeout)
        if not w["ok"]:
            raise RuntimeError(f"warm-up request to {kind} failed: {w['error']}")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(args.seed)

        async def limited(body):
            if semaphore is None:
                return await send(client, url, body, args.request_timeout)
            async with semaphore:
                return await send(client, url, body, args.request_timeout)

        tasks = []
        start = time.perf_counter()
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(limited(payload(kind, model, req, args.temperature))))
            if args.request_rate != math.inf and i < len(requests) - 1:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(records, requests, duration, kind, max_concurrency, args)


def summarize(records, requests, duration, kind, max_concurrency, args) -> dict:
    import numpy as np
    ok = [(r, q) for r, q in zip(records, requests) if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r, _ in ok)
    in_tokens = sum(r["prompt_tokens"] if r["prompt_tokens"] is not None else q["input_len"] for r, q in ok)
    row = {"kind": "serve", "engine": kind, "max_concurrency": max_concurrency,
           "request_rate": None if args.request_rate == math.inf else args.request_rate,
           "num_prompts": len(requests), "completed": len(ok), "failed": len(records) - len(ok),
           "duration_s": duration, "request_throughput": len(ok) / duration,
           "output_throughput": out_tokens / duration, "total_token_throughput": (in_tokens + out_tokens) / duration,
           "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
           "requested_output_tokens": sum(q["output_len"] for _, q in ok),
           "short_outputs": sum(r["output_tokens"] < q["output_len"] for r, q in ok)}
    series = {"ttft": [r["ttft"] for r, _ in ok],
              "tpot": [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r, _ in ok if r["output_tokens"] > 1],
              "itl": [x for r, _ in ok for x in r["itl"]],
              "e2el": [r["latency"] for r, _ in ok]}
    for name, values in series.items():
        a = np.array(values) * 1000 if values else None
        row[f"mean_{name}_ms"] = float(a.mean()) if values else None
        row[f"median_{name}_ms"] = float(np.median(a)) if values else None
        row[f"p99_{name}_ms"] = float(np.percentile(a, 99)) if values else None
    row["errors"] = sorted({r["error"] for r in records if r["error"]})[:5]
    return row


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to load (without --launch)")
    p.add_argument("--allow-non-loopback", action="store_true", help="accept a --base-url off this machine")
    p.add_argument("--launch", action="store_true", help="start nanoserve on a free loopback port, stop it after")
    p.add_argument("--model", help="with --launch: model directory or hub id (default: the embedded SmolLM2)")
    p.add_argument("--server-args", default="", help="with --launch: more nanoserve flags, e.g. '--max-num-seqs 64'")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health (first start "
                   "of the embedded model converts it: minutes)")
    p.add_argument("--model-name", help="the request's model (default: GET /v1/models data[0].id)")
    p.add_argument("--tokenizer", help="tokenizer directory for --text-prompts and the token-id bound (default: the "
                   "launched model's directory, or the served model's `root` when it is a local directory)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]")
    p.add_argument("--text-prompts", action="store_true", help="random words instead of token ids")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: "
                   "inf, all at once)")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight (default: none)")
    p.add_argument("--concurrency-sweep", help="comma-separated max-concurrency values, one run each")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds per request before it counts as "
                   "failed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", choices=["transformers"], help="also run the workload on `transformers serve`")
    p.add_argument("--peer-model", help="model directory for the peer (default: the launched model's directory)")
    p.add_argument("--peer-args", default="", help="more `transformers serve` flags, e.g. '--device cpu'")
    p.add_argument("--json", metavar="PATH", help="write the rows here")
    args = p.parse_args(argv)
    if args.peer:
        args.text_prompts = True  # the peer takes only strings: both engines get the same text prompts
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or not 0 <= args.range_ratio < 1:
        p.error("--num-prompts, --input-len and --output-len must be positive, --range-ratio in [0, 1)")
    if not args.request_rate > 0:
        p.error("--request-rate must be positive (inf: all at once)")
    args.sweep = ([int(x) for x in args.concurrency_sweep.split(",") if x.strip()] if args.concurrency_sweep
                  else [args.max_concurrency])
    if any(c is not None and c < 1 for c in args.sweep):
        p.error("concurrency values must be at least 1")
    return args


def load_tokenizer(path: str | None):
    if not path:
        return None, None
    vocab = None
    try:
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f).get("vocab_size")
    except (OSError, ValueError):
        pass
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path), vocab


def run_engine(base_url: str, kind: str, args, tokenizer, vocab, rows: list[dict]) -> None:
    card = model_card(base_url)
    model = args.model_name if args.model_name and kind == "nanoserve" else card["id"]
    print(f"{kind}: model {model!r} at {base_url}", flush=True)
    for i, concurrency in enumerate(args.sweep):
        requests = make_requests(args, args.seed + 1 + i, args.num_prompts, vocab, tokenizer)
        warmup = make_requests(args, args.seed + 1000 + i, 1, vocab, tokenizer)[0]
        row = asyncio.run(run_benchmark(base_url, kind, model, requests, warmup, args, concurrency))
        row["model"] = model
        rows.append(row)
        print(f"{kind}, max concurrency {concurrency or 'none'}: {row['completed']}/{row['num_prompts']} ok, "
              f"{row['output_throughput']:.1f} output tok/s, median TTFT {row['median_ttft_ms'] or 0:.0f} ms"
              + (f"; errors: {row['errors']}" if row["errors"] else ""), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, servers = [], {}
    model_dir = None
    if args.launch:
        model_dir = local_model_dir(args.model)  # before the launch: converts the embedded model once
        server = launch_nanoserve(args.model, args.server_args, health_timeout=args.startup_timeout)
        base_url, servers["nanoserve"] = server.base_url, {"startup_s": server.startup_s}
    else:
        check_loopback(args.base_url, args.allow_non_loopback)
        base_url, server = args.base_url.rstrip("/"), None
        root = model_card(base_url).get("root")  # nanoserve and vLLM name the model's directory here
        model_dir = root if isinstance(root, str) and os.path.isfile(os.path.join(root, "config.json")) else None
    tokenizer, vocab = load_tokenizer(args.tokenizer or model_dir)
    try:
        run_engine(base_url, "nanoserve", args, tokenizer, vocab, rows)
    finally:
        if server:
            servers["nanoserve"]["exit_code"] = server.stop()
    if args.peer == "transformers":
        peer_dir = args.peer_model or model_dir
        if not peer_dir:
            raise SystemExit("error: --peer needs a local model directory: --peer-model DIR (or --launch --model DIR)")
        peer = launch_transformers(peer_dir, args.peer_args, health_timeout=args.startup_timeout)
        servers["transformers"] = {"startup_s": peer.startup_s}
        try:
            run_engine(peer.base_url, "transformers", args, tokenizer, vocab, rows)
        finally:
            servers["transformers"]["exit_code"] = peer.stop()
    saved = argparse.Namespace(**{k: (None if v == math.inf else v) for k, v in vars(args).items()})  # no Infinity
    write_json(args.json, "serve", saved, rows, servers=servers)
    print_tables(args, rows)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def print_tables(args, rows: list[dict]) -> None:
    rate = "inf" if args.request_rate == math.inf else f"{args.request_rate:g}/s"
    prompts = "text" if args.text_prompts else "token ids"
    print(f"\n{rows[0]['model'] if rows else ''}: {args.num_prompts} requests per run, input {args.input_len}, output "
          f"{args.output_len} tokens (range ratio {args.range_ratio}), {prompts} prompts, temperature "
          f"{args.temperature}, request rate {rate}")
    conc = lambda r: r["max_concurrency"] or "-"  # noqa: E731
    print_table(["engine", "max conc", "ok", "failed", "duration s", "req/s", "output tok/s", "total tok/s",
                 "short outputs"],
                [[r["engine"], conc(r), r["completed"], r["failed"], r["duration_s"], r["request_throughput"],
                  r["output_throughput"], r["total_token_throughput"], r["short_outputs"]] for r in rows])
    header = ["engine", "max conc"] + [f"{m} {s}" for m in ("TTFT", "TPOT", "ITL", "E2E") for s in
                                       ("mean", "med", "p99")]
    print_table(header, [[r["engine"], conc(r)] + [r[f"{s}_{m}_ms"] for m in ("ttft", "tpot", "itl", "e2el")
                                                   for s in ("mean", "median", "p99")] for r in rows],
                title="Latencies (ms)")
    for r in rows:
        if r["errors"]:
            print(f"errors ({r['engine']}, max concurrency {conc(r)}): {r['errors']}")


if __name__ == "__main__":
    sys.exit(main())
