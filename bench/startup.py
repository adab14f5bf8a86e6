"""Start-up benchmark: how long from `nanoserve` on the command line to the first streamed token, with the model
already in the cache (issue 10's target: at most 10 s on the project's 2-core machine).

Each run starts a fresh `nanoserve [MODEL] --port P` process, polls until `/health` answers (the server is ready),
then sends one streaming /v1/completions request (`max_tokens: 1`) and stops the clock at its first `data:` line.
So a run counts Python and torch import, model load, KV cache allocation, warm-up, and one prefill.

Peer, in the same run: transformers, in a fresh `python -c` process that imports torch and transformers, loads the
same model directory with `AutoModelForCausalLM.from_pretrained` and tokenizer, and greedily generates one token.
That is the floor a user pays without any server at all.

    python bench/startup.py                      # the embedded SmolLM2-135M-Instruct (converted on first use)
    python bench/startup.py --runs 5 --json bench/results/cpu-startup-smollm2.json
"""
import argparse
import os
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import print_table, write_json  # noqa: E402
from nanoserve.default_model import default_model_dir  # noqa: E402

HF_ONE_TOKEN = """
import sys, torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=1, do_sample=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nanoserve_run(model: str | None) -> dict:
    """Seconds to /health and to the first streamed token, for one fresh server process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["nanoserve", *([model] if model else []), "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_for_health(url, server, start)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "prompt": "Hello", "max_tokens": 1, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
            reply.raise_for_status()
            next(line for line in reply.iter_lines() if line.startswith("data:"))
        return {"health_s": ready, "first_token_s": time.perf_counter() - start}
    finally:
        server.terminate()
        server.wait()


def wait_for_health(url: str, server: subprocess.Popen, start: float, limit: float = 600) -> float:
    while time.perf_counter() - start < limit:
        if server.poll() is not None:
            raise RuntimeError(f"nanoserve exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("nanoserve was not ready in time")


def transformers_run(model_dir: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", HF_ONE_TOKEN, model_dir], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model directory; default: the embedded model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    nanoserve_runs = [nanoserve_run(args.model) for _ in range(args.runs)]
    model_dir = args.model or default_model_dir()  # converted by the first nanoserve run
    rows = [{"engine": "nanoserve (server, first streamed token)", "run": i, "ready_s": r["health_s"],
             "first_token_s": r["first_token_s"]} for i, r in enumerate(nanoserve_runs)]
    if not args.no_peer:
        rows += [{"engine": "transformers (load + generate 1 token, no server)", "run": i, "ready_s": None,
                  "first_token_s": transformers_run(model_dir)} for i in range(args.runs)]
    print_table(["engine", "run", "server ready s", "first token s"],
                [[r["engine"], r["run"], r["ready_s"] if r["ready_s"] is not None else "-", r["first_token_s"]]
                 for r in rows], title=f"Start-up to the first token, model cached ({model_dir})")
    write_json(args.json, "startup", args, rows)


if __name__ == "__main__":
    main()
