"""splice.export.gguf: a merged tiny Llama written as GGUF and read back by splice's GGUF loader
(transformers) gives the same greedy text; a GGUF LoRA holds exactly llama.cpp's W + alpha/r B A."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from splice.export.gguf import _permute, export_gguf, export_lora_gguf
from splice.generation.generate import generate
from splice.lora.apply import add_lora, merge
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.models.loading import load_model
from tests.tiny import randomize_lora

PROMPTS = ["the return name", "def f():\n  return"]


@pytest.fixture
def adapted(tiny_llama):
    """The tiny Llama with a random non-zero rank-4 LoRA on every linear layer."""
    with torch.no_grad():  # a sharper head: greedy text that depends on the weights
        tiny_llama.lm_head.weight.mul_(25)
    tiny_llama.base_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    add_lora(tiny_llama, LoraConfig(rank=4, alpha=8.0, targets="all-linear"))
    randomize_lora(tiny_llama)
    return tiny_llama


@pytest.mark.parametrize("outtype", ["f16"])  # f32 (exact) is the CLI test's
def test_merged_model_round_trips_through_gguf(adapted, tiny_tokenizer, tmp_path, monkeypatch, outtype) -> None:
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    merge(adapted, unload=True)
    expected = generate(adapted, tiny_tokenizer, PROMPTS, max_new_tokens=12)
    path = export_gguf(adapted, tiny_tokenizer, tmp_path / "model.gguf", outtype=outtype)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" in names and "output.weight" in names and "token_embd.weight" in names
    loaded, tokenizer = load_model(path)  # transformers' GGUF reader, un-permuting q/k
    assert tokenizer("the return name")["input_ids"] == tiny_tokenizer("the return name")["input_ids"]
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    for key, value in adapted.state_dict().items():
        atol = 0 if outtype == "f32" else 2e-3
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-3, atol=atol, msg=key)
    assert generate(loaded, tokenizer, PROMPTS, max_new_tokens=12) == expected


def test_lora_gguf_is_llama_cpp_delta(adapted, tiny_tokenizer, tmp_path) -> None:
    save_adapter(adapted, tmp_path / "adapter")
    path = export_lora_gguf(adapted, tmp_path / "adapter", tmp_path / "lora.gguf", outtype="f32")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: np.array(t.data).reshape(list(reversed(t.shape))) for t in reader.tensors}
    base = adapted.base_state
    merge(adapted, unload=True)
    merged = adapted.state_dict()
    heads = {"q_proj": 4, "k_proj": 2}
    checked = 0
    for hf_name, gguf_name in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                               ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"),
                               ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        a, b = tensors[gguf_name + ".lora_a"], tensors[gguf_name + ".lora_b"]
        delta = (alpha / a.shape[0]) * (b @ a)  # what llama.cpp adds to the (permuted) weight
        want = (merged[hf_name + ".weight"] - base[hf_name + ".weight"]).numpy()
        kind = hf_name.rsplit(".", 1)[-1]
        if kind in heads:
            want = _permute(want, heads[kind])
        np.testing.assert_allclose(delta, want, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == 3


def test_refusals(adapted, tiny_tokenizer, tmp_path, tiny_gpt2) -> None:
    with pytest.raises(ValueError, match="still carries LoRA wrappers"):
        export_gguf(adapted, tiny_tokenizer, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="supports model types.*not 'gpt2'"):
        export_gguf(tiny_gpt2, tiny_tokenizer, tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="is a folder"):
        merge(adapted, unload=True)
        export_gguf(adapted, tiny_tokenizer, tmp_path)


def test_tied_head_is_not_written_and_reloads_tied(make_tiny_llama, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model = make_tiny_llama(tie_word_embeddings=True)  # as SmolLM2 is
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "tied.gguf", outtype="f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    loaded, tokenizer = load_model(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert generate(loaded, tokenizer, PROMPTS, max_new_tokens=8) == generate(model, tiny_tokenizer, PROMPTS,
                                                                             max_new_tokens=8)
