"""``splice serve`` with a DoRA adapter saved by PEFT: a real server process driven by the real ``openai``
client answers as the model with the adapter merged (PEFT's merge), at start and loaded at run time,
next to a LoRA adapter and the base model in the same batches."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import LlamaForCausalLM

from splice.generation.generate import generate
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from tests import tiny
from tests.tiny import free_port, subprocess_env

PROMPTS = ["hello world", "once upon a", "xyz 123 abc"]


def _base() -> LlamaForCausalLM:
    """The tiny Llama with non-zero biases on the projections that read the residual stream (DoRA must
    leave them unscaled; biases writing into it would swamp its tiny activations) and a sharper head
    (clear argmax margins, as after training)."""
    model = tiny.llama(vocab=len(tiny.build_tiny_tokenizer()), attention_bias=True, mlp_bias=True, positions=256,
                       eos_token_id=2, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
        model.lm_head.weight.mul_(25)
    return model


def _peft_dora(folder: Path) -> LlamaForCausalLM:
    """A PEFT DoRA adapter (every linear, rank 4) saved to ``folder``; returns the model with it merged
    by PEFT (magnitudes spread as a trained adapter's: :func:`tests.tiny.spread_dora_magnitudes`)."""
    model = tiny.peft_lora(_base(), seed=9, r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    tiny.spread_dora_magnitudes(model, seed=9)
    model.save_pretrained(folder)
    return model.merge_and_unload()


def _wait_for(process: subprocess.Popen[str], client: openai.OpenAI) -> list[str]:
    for _ in range(480):
        try:
            return [m.id for m in client.models.list().data]
        except openai.APIConnectionError:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            time.sleep(0.25)
    raise AssertionError("splice serve did not start")


def test_splice_serve_answers_a_peft_dora_adapter_as_the_merged_model(tmp_path: Path) -> None:
    tokenizer = tiny.build_tiny_tokenizer()
    base = _base()
    base.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    adapters = tmp_path / "adapters"
    merged = _peft_dora(adapters / "dora")
    lora = _base()
    add_lora(lora, LoraConfig(name="lora", targets="all-linear", rank=8))
    tiny.randomize_lora(lora, seed=3)
    save_adapter(lora, adapters / "lora", name="lora")
    attached = _base()
    load_adapter(attached, adapters / "lora", name="lora")
    want = {name: [generate(model, tokenizer, p, max_new_tokens=12)[0] for p in PROMPTS]
            for name, model in (("dora", merged), ("lora", attached), ("model", base))}
    assert want["dora"] != want["model"]  # the adapter changes the answers

    port = free_port()
    env = subprocess_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "splice", "serve", "--model", str(tmp_path / "model"), "--adapter",
         f"dora={adapters / 'dora'}", "--adapter", f"lora={adapters / 'lora'}", "--allow-adapter-dir", str(adapters),
         "--port", str(port), "--max-len", "128", "--gpu-adapters", "2", "--dtype", "float32"],  # the references' dtype
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert _wait_for(process, client) == ["model", "dora", "lora"]
        with httpx.Client(base_url=url, timeout=60) as http:
            reply = http.post("/load_lora_adapter", json={"lora_name": "dora-again", "lora_path": "dora"})
            assert reply.status_code == 200, reply.text

        def answer(job: tuple[str, str]) -> str:
            name, prompt = job
            got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
            return got.choices[0].text

        jobs = [(name, p) for p in PROMPTS for name in ("dora", "lora", "model", "dora-again")]
        with ThreadPoolExecutor(len(jobs)) as pool:  # DoRA, LoRA and base rows in the same steps
            answers = dict(zip(jobs, pool.map(answer, jobs), strict=True))
        for (name, prompt), text in answers.items():
            assert text == want[name.removesuffix("-again")][PROMPTS.index(prompt)], (name, prompt)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("where", ["start", "run time"])
def test_a_dora_adapter_for_another_base_is_refused_in_one_line(tmp_path: Path, where: str) -> None:
    """Its magnitudes are checked against the served model's shapes before any norm is computed."""
    from splice.lora.adapter_file import AdapterError
    from splice.serve.service import ServeError, Service

    other = tiny.llama(vocab=len(tiny.build_tiny_tokenizer()), intermediate=40)
    add_lora(other, LoraConfig(targets=("up_proj",), rank=4, use_dora=True))
    save_adapter(other, tmp_path / "other")
    if where == "start":
        with pytest.raises(AdapterError, match="does not fit this model: model.layers.0.mlp.up_proj"):
            Service(_base(), tiny.build_tiny_tokenizer(), model_name="tiny", adapters={"other": tmp_path / "other"})
        return
    service = Service(_base(), tiny.build_tiny_tokenizer(), model_name="tiny", max_batch=2, max_len=64)
    with pytest.raises(ServeError, match="does not fit this model: model.layers.0.mlp.up_proj"):
        service.load_adapter("other", tmp_path / "other")
