"""The `nanoserve` command line: help, argument errors, and the real console script serving and generating.

Parsing and error paths run in-process (`cli.main(argv)`); the console script itself runs as subprocesses,
started together because each one spends seconds importing torch.
"""
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import httpx
import pytest

from nanoserve import cli

SCRIPT = shutil.which("nanoserve", path=os.path.dirname(sys.executable)) or shutil.which("nanoserve")


@pytest.fixture(autouse=True)
def restore_logger():
    """cli.main configures the "nanoserve" logger for a terminal; put it back for the other tests."""
    logger = logging.getLogger("nanoserve")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def run_main(capsys, argv) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse exits for --help and bad flags
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_vllm_flags(capsys):
    code, out, _ = run_main(capsys, ["--help"])
    assert code == 0
    for flag in ("--port", "--host", "--api-key", "--served-model-name", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--gpu-memory-utilization", "--dtype", "--seed", "--enforce-eager",
                 "--no-enable-prefix-caching", "--generation-config", "--chat-template", "nanoserve chat",
                 "nanoserve generate"):
        assert flag in out, flag
    for command in ("chat", "generate", "serve"):
        code, out, _ = run_main(capsys, [command, "--help"])
        assert code == 0 and "--max-model-len" in out


@pytest.mark.parametrize("argv", [["--bogus"], ["--port", "eighty"], ["generate"], ["chat", "--log-level", "loud"],
                                  ["--speculative-config", "{bad json"]])
def test_bad_arguments_fail_in_one_line(capsys, argv):
    code, out, err = run_main(capsys, argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("nanoserve")


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model/dir"], "does not exist"),
    (["generate", "./missing-model", "hello"], "does not exist"),
    (["MODEL_DIR", "--max-num-seqs", "0"], "max_num_seqs"),
    (["MODEL_DIR", "--dtype", "float8"], "dtype"),
    (["MODEL_DIR", "--max-model-len", "100000"], "max_model_len"),
    (["MODEL_DIR", "--tensor-parallel-size", "3"], "tensor_parallel_size=3 must divide"),
    (["MODEL_DIR", "--data-parallel-size", "0"], "data-parallel-size"),
])
def test_bad_values_fail_fast_in_one_line(capsys, llama_dir, argv, message):
    if argv[0] == "MODEL_DIR":  # these start `serve`: never on a fixed port
        argv = [llama_dir, *argv[1:], "--host", "127.0.0.1", "--port", "0"]
    code, out, err = run_main(capsys, argv)
    assert code == 1 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # INFO lines may come before
    assert errors == [err.strip().splitlines()[-1]] and errors[0].startswith("nanoserve: error:")
    assert message in errors[0]


def test_busy_port_fails_fast(capsys, llama_dir):
    sock = cli._bind("127.0.0.1", 0)
    sock.listen()
    code, _, err = run_main(capsys, [llama_dir, "--host", "127.0.0.1", "--port", str(sock.getsockname()[1])])
    sock.close()
    assert code == 1 and "Cannot listen on 127.0.0.1" in err


def test_generate_model_or_prompt(tmp_path):
    assert cli._is_model(["Qwen/Qwen2.5-0.5B-Instruct", "hi"])
    assert cli._is_model([str(tmp_path), "hi"]) and cli._is_model(["./dir", "hi"])
    assert not cli._is_model(["Qwen/Qwen2.5-0.5B-Instruct"])  # one argument is always the prompt
    assert not cli._is_model(["What is 1/2?", "hi"]) and not cli._is_model(["hello", "world"])


def test_generation_config_and_chat_template_flags(tmp_path):
    engine = types.SimpleNamespace(generation_config={"temperature": 0.7}, tokenizer=types.SimpleNamespace())
    args = types.SimpleNamespace(generation_config="auto", chat_template=None)
    assert cli._customized(engine, args).generation_config == {"temperature": 0.7}
    (tmp_path / "generation_config.json").write_text('{"top_k": 5}')
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    args = types.SimpleNamespace(generation_config=str(tmp_path), chat_template=str(tmp_path / "t.jinja"))
    cli._customized(engine, args)
    assert engine.generation_config == {"top_k": 5} and engine.tokenizer.chat_template == "{{ messages }}"
    cli._customized(engine, types.SimpleNamespace(generation_config="vllm", chat_template="{{ 'inline' }}"))
    assert engine.generation_config == {} and engine.tokenizer.chat_template == "{{ 'inline' }}"


def test_chat_keeps_history(capsys, monkeypatch, llama_dir):
    from nanoserve import LLM, SamplingParams
    lines = iter(["The cat eats", "  ", "A robot"])

    def fake_input(prompt):
        print(prompt, end="")
        return next(lines)  # StopIteration -> EOFError below: the user pressed Ctrl-D
    monkeypatch.setattr("builtins.input", lambda p: _or_eof(fake_input, p))
    code, out, _ = run_main(capsys, ["chat", llama_dir, "--max-tokens", "6", "--temperature", "0"])
    assert code == 0
    replies = [r.rstrip("\n") for r in out.split("> ")[1:] if r.strip()]
    llm, params = LLM(llama_dir), SamplingParams(temperature=0, max_tokens=6)
    first = [{"role": "user", "content": "The cat eats"}]
    want1 = llm.chat(first, params, use_tqdm=False)[0].outputs[0].text
    second = first + [{"role": "assistant", "content": want1}, {"role": "user", "content": "A robot"}]
    want2 = llm.chat(second, params, use_tqdm=False)[0].outputs[0].text
    assert replies == [want1, want2]


def _or_eof(fn, prompt):
    try:
        return fn(prompt)
    except StopIteration:
        raise EOFError from None


@pytest.fixture(scope="module")
def processes(llama_dir):
    """Start the three console-script runs at once; yields the Popen objects by name."""
    assert SCRIPT, "the nanoserve console script is not installed (pip install -e .)"
    run = lambda *argv: subprocess.Popen([SCRIPT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa
                                         text=True)
    procs = {"generate": run("generate", llama_dir, "hello", "--max-tokens", "5", "--temperature", "0"),
             "missing": run(os.path.join(llama_dir, "does-not-exist")),
             "serve": run(llama_dir, "--host", "127.0.0.1", "--port", "0", "--served-model-name", "tiny")}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_generate_prints_text(processes, llama_dir):
    from nanoserve import LLM, SamplingParams
    want = LLM(llama_dir).generate("hello", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    out, err = processes["generate"].communicate(timeout=120)
    assert processes["generate"].returncode == 0, err
    assert out == want[0].outputs[0].text + "\n" and out.strip()


def test_missing_model_dir_exits_with_one_line(processes):
    out, err = processes["missing"].communicate(timeout=120)
    assert processes["missing"].returncode == 1 and out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("nanoserve: error: Model directory")


def test_serve_prints_address_and_serves(processes):
    proc = processes["serve"]
    banner = proc.stdout.readline()  # printed once uvicorn listens
    match = re.search(r"at (http://127\.0\.0\.1:(\d+)/v1) \(ready in [\d.]+ s\)", banner)
    assert match, banner + proc.stderr.read() if proc.poll() is not None else banner
    base = match.group(1)
    assert httpx.get(base.removesuffix("/v1") + "/health").status_code == 200
    assert httpx.get(base + "/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(base + "/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, then exits as interrupted
    assert proc.wait(timeout=60) in (0, 130)
    assert "Traceback" not in proc.stderr.read()


def test_override_generation_config_flag():
    args = cli.build_parser("serve").parse_args(["--override-generation-config", '{"max_new_tokens": 5, "top_k": 2}'])
    engine = types.SimpleNamespace(generation_config={"temperature": 0.7, "top_k": 9}, tokenizer=None)
    assert cli._customized(engine, args).generation_config == {"temperature": 0.7, "top_k": 2, "max_new_tokens": 5}
    bad = cli.build_parser("serve").parse_args(["--override-generation-config", "[1]"])
    with pytest.raises(ValueError, match="JSON object"):
        cli._customized(engine, bad)
