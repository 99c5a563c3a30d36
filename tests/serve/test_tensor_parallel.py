"""``torchrun --nproc-per-node 2 -m splice serve``: two gloo ranks on the CPU answer the real ``openai``
client as one process does (float, or ``--quantize nf4`` as one process over the same quantized
slices), a drain finishes a running request, and every rank stops cleanly; bad input is one line
before any rank loads the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from splice.cli import main
from splice.models.loading import load_model
from splice.serve.server import running
from splice.serve.service import Service
from tests.distributed.tp_worker import sliced_quantized
from tests.tiny import free_port

ROOT = Path(__file__).resolve().parents[2]
QUERIES: list[dict[str, Any]] = [
    dict(prompt="the cat sat on", max_tokens=10, temperature=0),
    dict(prompt="once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, seed=42),
    dict(prompt="hello", max_tokens=6, temperature=0.8, seed=7, n=2),
]


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process looks like rank 0 of 2 started by torchrun (nothing listens on the port)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["serve", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_under_torchrun_is_one_line_before_the_model_loads(
        torchrun_env: None, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = ["--model", str(tiny_model_dir)]
    bnb = shutil.copytree(tiny_model_dir, tiny_model_dir.parent / "bnb-4bit")
    config = json.loads((bnb / "config.json").read_text())
    (bnb / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    assert _refused(capsys, "--model", str(bnb), "--quantize", "nf4", "--device", "cpu").endswith(
        "this one is pre-quantized (bitsandbytes): pass its float (bf16) checkpoint, with --quantize nf4 or int8 to "
        "quantize each rank's share")
    assert "each rank takes its own GPU (cuda:LOCAL_RANK)" in _refused(capsys, *model, "--device", "cuda:1")
    if torch.cuda.device_count() < 2:
        assert _refused(capsys, *model, "--device", "cuda").endswith(
            "torchrun started 2 ranks on this node and it has "
            f"{torch.cuda.device_count()} GPU(s), one per rank is needed: lower --nproc-per-node or pass --device cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _refused(capsys, *model, "--device", "cpu").endswith(
        "this model has 4 query and 2 key/value heads, so --nproc-per-node must divide both: use one of 1, 2")
    assert not torch.distributed.is_initialized()  # refused before the ranks meet


def _answers(url: str, name: str) -> list[list[str]]:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    found = [[c.text for c in client.completions.create(model=name, **q).choices] for q in QUERIES]
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi there"}],
                                          max_tokens=8, temperature=0)
    return [*found, [chat.choices[0].message.content or ""]]


def _logprobs(url: str, name: str) -> list[float]:
    """A greedy completion's token log-probabilities (they tell apart weights that give the same tokens)."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    choice = client.completions.create(model=name, prompt="the cat sat on", max_tokens=8, temperature=0,
                                       logprobs=1).choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    return [float(x) for x in choice.logprobs.token_logprobs]


def _rank0_pid(launcher: int) -> int:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=0" in environ:
            return int(pid)
    raise AssertionError(f"no rank 0 among torchrun's children {children}")


@pytest.mark.slow
@pytest.mark.parametrize(("target", "quantize"), [("rank0", None), ("torchrun", None), ("rank0", "nf4")])
def test_torchrun_two_ranks_serve_what_one_process_serves_and_stop_cleanly(tiny_model_dir: Path, target: str,
                                                                           quantize: str | None) -> None:
    """``quantize``: one process serves the base whose projections are the ranks' slices each
    quantized alone (what the two ranks compute with; one card's ``--quantize`` codes differ)."""
    base, tokenizer = load_model(tiny_model_dir)
    with running(Service(base, tokenizer, model_name=tiny_model_dir.name, max_len=256)) as url:
        floats = _logprobs(url, tiny_model_dir.name)
    base = load_model(tiny_model_dir)[0]  # (the first Service rewrote its model's linears)
    if quantize is not None:
        base = sliced_quantized(base, quantize=quantize)
    with running(Service(base, tokenizer, model_name=tiny_model_dir.name, max_len=256)) as url:
        expected, logprobs = _answers(url, tiny_model_dir.name), _logprobs(url, tiny_model_dir.name)
    assert (max(abs(a - b) for a, b in zip(logprobs, floats, strict=True)) > 1e-3) == (quantize is not None)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
               "-m", "splice", "serve", "--model", str(tiny_model_dir), "--port", str(port), "--device", "cpu",
               "--max-len", "256", "--drain-timeout", "20", *(["--quantize", quantize] if quantize else [])]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(960):
            try:
                if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1][-5000:]
                threading.Event().wait(0.25)
        assert _answers(f"{base_url}/v1", tiny_model_dir.name) == expected
        torch.testing.assert_close(torch.tensor(_logprobs(f"{base_url}/v1", tiny_model_dir.name)),
                                   torch.tensor(logprobs), rtol=0, atol=1e-5)
        body = {"model": tiny_model_dir.name, "prompt": "a long story", "max_tokens": 40, "temperature": 0,
                "stream": True}
        with httpx.Client(base_url=f"{base_url}/v1", timeout=120) as http, \
                http.stream("POST", "/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            signalled = time.monotonic()
            os.kill(_rank0_pid(process.pid) if target == "rank0" else process.pid, signal.SIGTERM)
            assert [line for line in lines if line][-1] == "data: [DONE]"  # drained across both ranks
        code = process.wait(timeout=60)
        _, stderr = process.communicate()
        assert time.monotonic() - signalled < 25  # every rank stopped on its own, before torchrun's SIGKILL
        assert "Unable to shutdown process" not in stderr and "splice serve: error" not in stderr, stderr[-5000:]
        # torchrun reports its workers: all exited 0; signalled itself, it ends by raising the signal
        assert code == (0 if target == "rank0" else 1), stderr[-5000:]
    finally:
        if process.poll() is None:  # a failed check: the ranks (in their own sessions, holding the pipes) too
            for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
