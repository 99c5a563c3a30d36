"""splice.serve.server and ``splice serve``: the command starts a server the openai client can use."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from splice.cli import main
from splice.generation.generate import generate
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from splice.serve.server import parse_adapters
from tests import tiny
from tests.tiny import free_port, subprocess_env


def test_bad_adapter_specs_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters(["just-a-path"])
    assert main(["serve", "--adapter", f"x={tmp_path}"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_splice_serve_command_answers_like_generate(tmp_path: Path, tiny_model_dir: Path, make_tiny_llama,
                                                    tiny_tokenizer) -> None:
    trained = make_tiny_llama()
    add_lora(trained, LoraConfig(name="sql", targets=("q_proj", "v_proj"), rank=4))
    tiny.randomize_lora(trained, seed=21)
    save_adapter(trained, tmp_path / "sql", name="sql")
    port = free_port()
    env = subprocess_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "splice", "serve", "--model", str(tiny_model_dir), "--adapter",
         f"sql={tmp_path / 'sql'}", "--port", str(port), "--max-len", "128"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for _ in range(240):
            try:
                names = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                time.sleep(0.25)
        else:
            raise AssertionError("splice serve did not start")
        assert names == [tiny_model_dir.name, "sql"]
        expected_model = make_tiny_llama()
        load_adapter(expected_model, tmp_path / "sql", name="sql")
        want = generate(expected_model, tiny_tokenizer, "hello world", max_new_tokens=8)[0]
        got = client.completions.create(model="sql", prompt="hello world", max_tokens=8, temperature=0)
        assert got.choices[0].text == want
    finally:
        process.terminate()
        process.wait(timeout=30)
