"""``iapt serve --engine vllm``: the command serves the project's API on vLLM; without vLLM it says what to do.

The server runs as its own process in vLLM's default layout (the engine core in a process of its own), so
this also covers VLLMEngine over vLLM's multiprocess client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from iapt import cli
from tests.tiny import tiny_tokenizer
from tests.vllm.test_plugin import folders, prompts, reference  # noqa: F401  (folders: a fixture)

KEYS = """
keys:
  sk-alice: {tenant: alice, adapters: [alice, lo]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_engine_vllm_answers_like_offline_generate(folders, tmp_path):  # noqa: F811
    from tests.vllm.test_lora import peft_reference, save_lora
    from tests.vllm.test_plugin import tiny_base

    base_dir, adapter_dirs = folders
    lora = save_lora(tiny_base(), tmp_path / "lo", seed=41)
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    command = [sys.executable, "-m", "iapt.cli", "serve", "--engine", "vllm", "--model", str(base_dir)]
    command += ["--adapters", str(adapter_dirs["alice"].parent), "--keys", str(keys), "--port", str(port)]
    command += ["--served-model-name", "tiny", "--max-model-len", "128", "--enforce-eager", "--log-level", "warning"]
    command += ["--lora-modules", f"lo={lora}"]  # a LoRA tenant beside the IAPT ones
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, f"the server exited: {server.stdout.read() if server.stdout else ''}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        headers = {"Authorization": "Bearer sk-alice"}
        for model, adapter in (("alice", adapter_dirs["alice"]), ("tiny", None), ("lo", lora)):
            prompt = prompts(1, seed=len(model))[0]
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            want = peft_reference(base_dir, lora, prompt)[0] if model == "lo" else reference(base_dir, adapter, prompt)
            assert r.json()["choices"][0]["text"] == tiny_tokenizer().decode(want, skip_special_tokens=True)
        r = httpx.post(url + "/v1/completions", json={**body, "model": "bob"}, headers=headers, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        children = descendants(server.pid)
        assert children, "vLLM's engine core runs in a process of its own"
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    # SIGTERM shuts the engine core down too: no process of the server outlives it
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in children if os.path.exists(f"/proc/{pid}")]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:  # the server's own children, left behind: end them, then fail
        os.kill(pid, 9)
    assert not alive, "the engine core outlived the server"


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            child, parent = map(int, line.split())
            children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_without_vllm_the_command_names_the_setup_script(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as where it is missing
    assert cli.main(["serve", "--engine", "vllm", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert "scripts/setup_vllm.sh" in err and "Traceback" not in err


def test_lora_modules_vllm_cannot_serve_stop_the_start_clearly(folders, tmp_path, capsys):  # noqa: F811
    """A PEFT method other than LoRA, and a LoRA adapter of another base: exit 2 with the reason, before vLLM
    starts (no engine is built)."""
    from tests.tiny import make_base
    from tests.vllm.test_lora import save_lora

    base_dir, _ = folders
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    other = save_lora(make_base("llama"), tmp_path / "other", seed=3)
    for entry, message in [(f"p={tmp_path / 'pt'}", "serves IAPT and LoRA adapters"), (f"o={other}", "another base")]:
        assert cli.main(["serve", "--engine", "vllm", "--model", str(base_dir), "--lora-modules", entry]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--max-model-len", "64"], ["--enforce-eager"]])
def test_vllm_options_need_the_vllm_engine(flag, capsys):
    assert cli.main(["serve", *flag]) == 2
    assert "options of --engine vllm" in capsys.readouterr().err
