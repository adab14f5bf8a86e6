"""Bounded soak test of the nanoserve server: mixed traffic for `--duration` seconds, then checks that nothing leaked.

It launches nanoserve itself on a free loopback port (`--model` passed through; none = the embedded
SmolLM2-135M-Instruct; `--server-args` appended), warms it up, reads the server's RSS (/proc/PID/status VmRSS), then
runs `--workers` concurrent clients (httpx, loopback only) for `--duration` seconds (at most `--max-requests`
requests; each request bounded by `--request-timeout`). Each worker draws one request at a time:
- completion / completion_stream / chat / chat_stream: n = 1..3, max_tokens 1..`--max-tokens`, temperature
  0, 0.7 or 1, text or token-id prompts; streams sometimes with `stream_options.include_usage`. The reply is checked:
  n choices each with a finish_reason, usage consistent; a stream must end with `data: [DONE]` and carry no error
  event;
- abort_stream: a long streaming request the client closes after 0..3 chunks (a disconnect the server must notice);
- abort_timeout: a long non-streaming request with a client timeout of 20..300 ms (the client hangs up);
- invalid: one of a list of bad requests from the vLLM contract (temperature < 0, top_p 0, n 0, max_tokens 0,
  min_tokens > max_tokens, logprobs 21, stream_options without stream, empty prompt, prompt longer than the
  context, malformed JSON, unknown model); each must get a 4xx.
Unexpected errors (lost requests): any 5xx, a 4xx on a valid request, a 2xx on an invalid one, a malformed
reply, or any exception that is not a deliberate abort (including a timeout of a valid request).

At the end: wait up to `--settle-timeout` s until /metrics shows vllm:num_requests_running, num_requests_waiting
and kv_cache_usage_perc all 0 (no leaked requests or KV blocks), check that /health is 200 and one normal request
succeeds, read the RSS again, stop the server with SIGTERM and expect a clean exit (0, or -15: uvicorn re-raises
the signal once it has shut down). Passes when all of that holds,
there were no unexpected errors and the RSS grew by at most `--max-rss-growth-mb`. Prints the counts by kind and
the checks and the server log's ERROR and Traceback lines (reported, not judged), writes `--json`, exits 1 on
failure.

    python bench/soak.py                                       # embedded SmolLM2-135M, 180 s
    python bench/soak.py --model /tmp/tiny-llama --duration 30 # smoke test on a tiny model
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import time

import httpx

from benchlib import print_table, write_json
from serve import WORDS, TOKEN_ID_BOUND, launch_nanoserve, local_model_dir

KINDS = {"completion": 2, "completion_stream": 2, "chat": 2, "chat_stream": 2, "abort_stream": 1,
         "abort_timeout": 1, "invalid": 1}
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args, base_url: str, model: str, max_model_len: int, vocab: int):
        self.args, self.base, self.model = args, base_url, model
        self.max_model_len, self.bound = max_model_len, min(vocab, TOKEN_ID_BOUND)
        self.long_tokens = max(8, min(256, max_model_len // 2))  # abort requests: long enough not to finish first
        self.stats = {k: {"sent": 0, "completed": 0, "aborted": 0, "rejected_4xx": 0, "unexpected": 0} for k in KINDS}
        self.errors: list[str] = []
        self.sent = 0

    # -- request bodies --------------------------------------------------------------------------------------
    def words(self, rng, lo=3, hi=20) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    def completion_body(self, rng, stream: bool, max_tokens: int) -> dict:
        ids = [rng.randrange(self.bound) for _ in range(rng.randint(4, 48))]
        prompt = self.words(rng) if rng.random() < 0.7 else ids
        return self.common(rng, stream, max_tokens) | {"prompt": prompt}

    def chat_body(self, rng, stream: bool, max_tokens: int) -> dict:
        messages = [{"role": "user", "content": self.words(rng)}]
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": self.words(rng, 2, 8)}] + messages
        key = "max_completion_tokens" if rng.random() < 0.5 else "max_tokens"
        body = self.common(rng, stream, max_tokens) | {"messages": messages}
        body[key] = body.pop("max_tokens")
        return body

    def common(self, rng, stream: bool, max_tokens: int) -> dict:
        body = {"model": self.model, "n": rng.randint(1, 3), "max_tokens": max_tokens,
                "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": stream}
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.3:
            body["ignore_eos"] = True
        return body

    def invalid(self, rng) -> tuple[str, str, bytes | dict, int]:
        """(name, path, body, expected status)."""
        c, ch = "/v1/completions", "/v1/chat/completions"
        good = {"model": self.model, "prompt": "hello", "max_tokens": 4}
        chat = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        cases = [("temperature<0", c, good | {"temperature": -1}, 400),
                 ("top_p=0", c, good | {"top_p": 0}, 400),
                 ("n=0", c, good | {"n": 0}, 400),
                 ("max_tokens=0", c, good | {"max_tokens": 0}, 400),
                 ("min_tokens>max_tokens", ch, chat | {"min_tokens": 10}, 400),
                 ("logprobs=21", c, good | {"logprobs": 21}, 400),
                 ("stream_options without stream", c, good | {"stream_options": {"include_usage": True}}, 400),
                 ("empty prompt", c, good | {"prompt": ""}, 400),
                 ("prompt too long", c, good | {"prompt": [1] * (self.max_model_len + 1)}, 400),
                 ("malformed JSON", c, b'{"model": "x", "prompt": ', 400),
                 ("unknown model", ch, chat | {"model": "no-such-model"}, 404)]
        return rng.choice(cases)

    # -- one request -------------------------------------------------------------------------------------------
    async def one(self, client: httpx.AsyncClient, rng: random.Random, kind: str) -> None:
        st = self.stats[kind]
        st["sent"] += 1
        self.sent += 1
        try:
            outcome = await asyncio.wait_for(self.dispatch(client, rng, kind), self.args.request_timeout)
        except asyncio.TimeoutError:
            outcome = f"no reply within {self.args.request_timeout} s"
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a reply that is not JSON
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome in ("completed", "aborted", "rejected_4xx"):
            st[outcome] += 1
        else:
            st["unexpected"] += 1
            self.errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {outcome}"[:400])

    async def dispatch(self, client, rng, kind: str) -> str:
        a = self.args
        if kind == "invalid":
            name, path, body, expected = self.invalid(rng)
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = await client.post(self.base + path, **kw)
            if 400 <= r.status_code < 500:
                if r.status_code != expected:
                    self.errors.append(f"note: invalid request {name!r} got {r.status_code}, expected {expected}")
                return "rejected_4xx"
            return f"invalid request {name!r} got HTTP {r.status_code}: {r.text[:200]}"
        if kind == "abort_timeout":
            body = self.completion_body(rng, False, self.long_tokens) | {"ignore_eos": True}
            try:
                r = await client.post(self.base + "/v1/completions", json=body,
                                      timeout=httpx.Timeout(rng.uniform(0.02, 0.3), connect=10))
            except httpx.ReadTimeout:
                return "aborted"
            return self.check_json(r, body)
        if kind == "abort_stream":
            body = self.completion_body(rng, True, self.long_tokens) | {"ignore_eos": True}
            if rng.random() < 0.5:
                body = self.chat_body(rng, True, self.long_tokens) | {"ignore_eos": True}
                path = "/v1/chat/completions"
            else:
                path = "/v1/completions"
            return await self.stream(client, path, body, close_after=rng.randint(0, 3))
        max_tokens = rng.randint(1, a.max_tokens)
        stream = kind.endswith("_stream")
        if kind.startswith("chat"):
            body, path = self.chat_body(rng, stream, max_tokens), "/v1/chat/completions"
        else:
            body, path = self.completion_body(rng, stream, max_tokens), "/v1/completions"
        if stream:
            return await self.stream(client, path, body)
        return self.check_json(await client.post(self.base + path, json=body), body)

    def check_json(self, r: httpx.Response, body: dict) -> str:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        data = r.json()
        n = body.get("n", 1)
        choices = data.get("choices") or []
        if sorted(c.get("index") for c in choices) != list(range(n)):
            return f"expected choices 0..{n - 1}, got {[c.get('index') for c in choices]}"
        if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
            return f"finish_reason {[c.get('finish_reason') for c in choices]}"
        usage = data.get("usage") or {}
        limit = n * max(body.get("max_tokens") or 0, body.get("max_completion_tokens") or 0)
        if not 0 < usage.get("completion_tokens", 0) <= limit:
            return f"usage {usage} for n={n}, max_tokens {limit // n}"
        return "completed"

    async def stream(self, client, path: str, body: dict, close_after: int | None = None) -> str:
        n, finished, chunks, usage, done = body.get("n", 1), set(), 0, None, False
        async with client.stream("POST", self.base + path, json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            if close_after == 0:
                return "aborted"  # hang up right after the headers
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return f"error event: {json.dumps(event['error'])[:200]}"
                for c in event.get("choices") or []:
                    if c.get("finish_reason"):
                        if c["finish_reason"] not in ("stop", "length"):
                            return f"finish_reason {c['finish_reason']!r}"
                        finished.add(c.get("index"))
                usage = event.get("usage") or usage
                chunks += 1
                if close_after is not None and chunks > close_after:
                    return "aborted"  # leaving the block closes the connection mid-stream
        if not done:
            return "stream ended without [DONE]"
        if finished != set(range(n)):
            return f"finish_reason for choices {sorted(finished)}, expected 0..{n - 1}"
        if (body.get("stream_options") or {}).get("include_usage") and not usage:
            return "no usage chunk despite include_usage"
        return "completed"

    # -- the run -----------------------------------------------------------------------------------------------
    async def worker(self, client, wid: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + wid)
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline and self.sent < self.args.max_requests:
            await self.one(client, rng, rng.choices(kinds, weights)[0])

    async def run(self, pid: int) -> list[tuple[float, float]]:
        limits = httpx.Limits(max_connections=self.args.workers + 4)
        timeout = httpx.Timeout(self.args.request_timeout, connect=10)
        samples = []
        async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
            start = time.monotonic()
            deadline = start + self.args.duration
            workers = [asyncio.create_task(self.worker(client, w, deadline)) for w in range(self.args.workers)]
            while not all(w.done() for w in workers):  # RSS samples while the workers run
                samples.append((round(time.monotonic() - start, 1), rss_mb(pid)))
                await asyncio.wait(workers, timeout=5)
            for w in workers:
                w.result()  # a bug in this script should not pass silently
        return samples


def server_log_errors(path: str) -> list[str]:
    """Lines of the server's log that report an error or a traceback (shown, and kept in --json)."""
    with open(path, errors="replace") as f:
        return [line.rstrip()[:300] for line in f if " ERROR " in line or "Traceback" in line]


async def scrape(client: httpx.AsyncClient, base: str) -> dict:
    text = (await client.get(f"{base}/metrics")).text
    values = {}
    for name in GAUGES:
        m = re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        values[name] = float(m.group(1)) if m else None
    m = re.search(r'^vllm:request_success_total\{finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
    values["server_aborts"] = float(m.group(1)) if m else None
    return values


async def final_checks(args, base: str, model: str) -> dict:
    out = {}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        start = time.monotonic()
        gauges = await scrape(client, base)
        while time.monotonic() - start < args.settle_timeout and any(gauges[g] != 0 for g in GAUGES):
            await asyncio.sleep(0.5)
            gauges = await scrape(client, base)
        out["gauges"] = gauges
        out["settled"] = all(gauges[g] == 0 for g in GAUGES)
        out["settle_s"] = round(time.monotonic() - start, 1)
        out["health"] = (await client.get(f"{base}/health")).status_code
        r = await client.post(f"{base}/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                                              "max_tokens": 8, "temperature": 0})
        out["final_request"] = r.status_code
        out["final_request_ok"] = r.status_code == 200 and bool(r.json().get("choices"))
        gauges = await scrape(client, base)
        out["gauges_after_final"] = gauges
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or hub id (default: the embedded SmolLM2)")
    p.add_argument("--server-args", default="", help="more nanoserve flags, e.g. '--max-num-seqs 16'")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--duration", type=float, default=180, help="seconds of traffic (default: 180)")
    p.add_argument("--workers", type=int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=48, help="normal requests draw max_tokens in 1..N")
    p.add_argument("--request-timeout", type=float, default=120, help="a valid request without a reply by then "
                   "is lost")
    p.add_argument("--settle-timeout", type=float, default=15, help="seconds for the gauges to return to 0")
    p.add_argument("--max-rss-growth-mb", type=float, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not (0 < args.duration <= 24 * 3600 and 1 <= args.workers <= 64 and args.max_tokens >= 1):
        p.error("--duration in (0, 86400], --workers in [1, 64], --max-tokens >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = local_model_dir(args.model)
    vocab = TOKEN_ID_BOUND
    if model_dir and os.path.exists(os.path.join(model_dir, "config.json")):
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f).get("vocab_size") or vocab
    server = launch_nanoserve(args.model, args.server_args, health_timeout=args.startup_timeout)
    base, pid = server.base_url, server.pid
    result, exit_code = {}, None
    try:
        with httpx.Client(trust_env=False, timeout=30) as c:
            card = c.get(f"{base}/v1/models").json()["data"][0]
        soak = Soak(args, base, card["id"], card.get("max_model_len") or 2048, vocab)
        warm = Soak(args, base, card["id"], soak.max_model_len, vocab)  # counted apart from the soak

        async def warm_up():
            async with httpx.AsyncClient(trust_env=False, timeout=args.request_timeout) as client:
                rng = random.Random(-1)
                for kind in ["completion", "completion_stream", "chat", "chat_stream"] * 2:
                    await warm.one(client, rng, kind)
        asyncio.run(warm_up())
        rss_start = rss_mb(pid)
        print(f"warm-up done ({sum(s['completed'] for s in warm.stats.values())}/8 ok); server RSS {rss_start:.0f} MB; "
              f"soaking for {args.duration:.0f} s with {args.workers} workers", flush=True)
        t0 = time.monotonic()
        samples = asyncio.run(soak.run(pid))
        soak_s = time.monotonic() - t0
        checks = asyncio.run(final_checks(args, base, card["id"]))
        rss_end = rss_mb(pid)
        alive = server.proc.poll() is None
    finally:
        exit_code = server.stop()
    log_errors = server_log_errors(server.log.name)
    growth = rss_end - rss_start if rss_end is not None and rss_start is not None else None
    unexpected = sum(s["unexpected"] for s in soak.stats.values())
    verdicts = [
        ("no unexpected errors", unexpected, "0", unexpected == 0),
        ("warm-up requests ok", sum(s["completed"] for s in warm.stats.values()), "8",
         sum(s["completed"] for s in warm.stats.values()) == 8),
        ("gauges back to 0 (running, waiting, KV usage)",
         " / ".join(f"{checks['gauges'][g]:g}" if checks["gauges"][g] is not None else "?" for g in GAUGES)
         + f" after {checks['settle_s']} s", f"0 within {args.settle_timeout:g} s", checks["settled"]),
        ("/health after the soak", checks["health"], "200", checks["health"] == 200),
        ("one normal request after the soak", checks["final_request"], "200", checks["final_request_ok"]),
        ("server alive at the end", alive, "True", alive),
        ("RSS growth MB (start after warm-up -> end)",
         f"{rss_start:.0f} -> {rss_end:.0f} = {growth:+.0f}" if growth is not None else "?",
         f"<= {args.max_rss_growth_mb:g}", growth is not None and growth <= args.max_rss_growth_mb),
        ("exit code after SIGTERM", exit_code, "0 or -15", exit_code in (0, -signal.SIGTERM)),
    ]
    passed = all(v[3] for v in verdicts)
    totals = {k: sum(s[k] for s in soak.stats.values()) for k in ("sent", "completed", "aborted", "rejected_4xx",
                                                                     "unexpected")}
    rows = [{"kind": k, **s} for k, s in soak.stats.items()] + [{"kind": "total", **totals}]
    result = {"passed": passed, "soak_s": soak_s, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
              "rss_growth_mb": growth, "rss_peak_mb": max((r for _, r in samples if r), default=None),
              "rss_samples": samples, "checks": checks, "server_exit_code": exit_code,
              "verdicts": [{"check": c, "value": v, "bound": b, "pass": ok} for c, v, b, ok in verdicts],
              "errors": soak.errors[:50], "warmup": warm.stats, "server_log": server.log.name,
              "server_log_errors": log_errors}
    write_json(args.json, "soak", args, rows, **result)

    print(f"\n{card['id']}: {soak_s:.0f} s, {args.workers} workers, {totals['sent']} requests "
          f"({totals['sent'] / soak_s:.1f}/s); server-side aborts counted in /metrics: "
          f"{checks['gauges_after_final'].get('server_aborts')}; server log: {server.log.name}")
    print_table(["kind", "sent", "completed", "aborted on purpose", "rejected 4xx", "unexpected"],
                [[r["kind"], r["sent"], r["completed"], r["aborted"], r["rejected_4xx"], r["unexpected"]]
                 for r in rows])
    print_table(["check", "value", "bound", "result"], [[c, str(v), b, "pass" if ok else "FAIL"]
                                                       for c, v, b, ok in verdicts], title="Checks")
    if soak.errors:
        print(f"\nFirst errors and notes ({len(soak.errors)} in all):")
        for e in soak.errors[:15]:
            print("  " + e)
    if log_errors:
        print(f"\nServer log lines with ERROR or Traceback ({len(log_errors)}; not a failure by themselves):")
        for line in log_errors[:10]:
            print("  " + line)
    print(f"\nsoak {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
