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


# Both freeze tests run in a fresh interpreter that first freezes a few objects itself, as the device's Python does at
# start-up (375 objects; gc.get_freeze_count() is not 0 there before any server): frozen_heap once read that as an
# outer block and never unfroze, and a pytest worker on the device went on with 757,095 frozen objects.
_FROZEN_HEAP = """
import gc, weakref
from splice.serve.server import frozen_heap

class Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it

gc.freeze()  # what the environment froze before any server
assert gc.get_freeze_count() > 0
before = Node()
gone = weakref.ref(before)
with frozen_heap():
    assert gc.get_freeze_count() > 0
    del before
    made = Node()
    made_ref = weakref.ref(made)
    del made
    gc.collect()
    assert made_ref() is None  # what serving creates is still collected
    assert gone() is not None  # what existed at start-up is not walked
    with frozen_heap():  # nested (a server inside a server's block): the inner end unfreezes nothing
        pass
    assert gc.get_freeze_count() > 0
assert gc.get_freeze_count() == 0
gc.collect()
assert gone() is None  # the collector has it back
print("ok")
"""

_RUNNING_SERVER = """
import gc, openai
from splice.serve.server import running
from splice.serve.service import Service
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

tokenizer = build_tiny_tokenizer()
service = Service(build_tiny_llama(len(tokenizer)), tokenizer, model_name="tiny", max_batch=2, max_len=32)
gc.freeze()  # what the environment froze before any server
frozen = gc.get_freeze_count()
with running(service) as url:
    assert gc.get_freeze_count() > frozen
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert client.completions.create(model="tiny", prompt="the cat", max_tokens=2).choices[0].text
assert gc.get_freeze_count() == 0
print("ok")
"""


def _fresh_python(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_frozen_heap_keeps_what_existed_out_of_collections_until_the_outermost_block_ends() -> None:
    _fresh_python(_FROZEN_HEAP)


def test_a_running_server_freezes_the_start_up_heap_and_gives_it_back() -> None:
    _fresh_python(_RUNNING_SERVER)
