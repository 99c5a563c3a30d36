"""splice.export.gguf: a merged tiny Llama written as GGUF and read back by splice's GGUF loader
(transformers) gives the same greedy text; a GGUF LoRA holds exactly llama.cpp's W + alpha/r B A, for
splice and PEFT adapters (rsLoRA, rank/alpha patterns) and PiSSA (as the delta on the original weights)."""

from __future__ import annotations

import copy
import errno
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from splice.core.errors import UsageError
from splice.export.gguf import _permute, export_gguf, export_lora_gguf
from splice.generation.generate import generate
from splice.lora.adapter_file import AdapterError
from splice.lora.apply import add_lora, merge
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.models.loading import load_model
from tests import tiny
from tests.tiny import peft_lora, randomize_lora

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


def _gguf_deltas(path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """``gguf name -> (alpha / r) * B @ A``: what llama.cpp adds to each (permuted) weight."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: np.array(t.data).reshape(list(reversed(t.shape))) for t in reader.tensors}
    return {name.removesuffix(".lora_a"): (alpha / a.shape[0]) * (tensors[name.replace(".lora_a", ".lora_b")] @ a)
            for name, a in tensors.items() if name.endswith(".lora_a")}


def _check_deltas(path, merged: dict, base: dict, modules: list[tuple[str, str]]) -> None:  # type: ignore[no-untyped-def]
    deltas = _gguf_deltas(path)
    heads = {"q_proj": 4, "k_proj": 2}
    for hf_name, gguf_name in modules:
        want = (merged[hf_name + ".weight"] - base[hf_name + ".weight"]).numpy()
        kind = hf_name.rsplit(".", 1)[-1]
        if kind in heads:
            want = _permute(want, heads[kind])
        np.testing.assert_allclose(deltas[gguf_name], want, rtol=1e-4, atol=1e-5, err_msg=hf_name)
        assert np.abs(want).max() > 1e-3


def test_lora_gguf_is_llama_cpp_delta(adapted, tiny_tokenizer, tmp_path) -> None:
    save_adapter(adapted, tmp_path / "adapter")
    path = export_lora_gguf(adapted, tmp_path / "adapter", tmp_path / "lora.gguf", outtype="f32")
    base = adapted.base_state
    merge(adapted, unload=True)
    _check_deltas(path, adapted.state_dict(), base, [
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
        ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"),
        ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")])


MODULES = [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
           ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"),
           ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"),
           ("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight")]


def test_peft_rslora_and_patterns_export_as_peft_merges(tiny_llama, tmp_path) -> None:
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = peft_lora(
        copy.deepcopy(tiny_llama), r=4, lora_alpha=8, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        rank_pattern={r"layers\.1\.self_attn\.(k|v)_proj": 2}, alpha_pattern={r"self_attn\.(q|v)_proj": 3.0})
    model.save_pretrained(tmp_path / "adapter")
    path = export_lora_gguf(tiny_llama, tmp_path / "adapter", tmp_path / "lora.gguf", outtype="f32")
    _check_deltas(path, model.merge_and_unload().state_dict(), base, MODULES)


def test_pissa_adapter_exports_as_the_delta_on_the_original_weights(tiny_llama, tmp_path) -> None:
    """The GGUF LoRA of a PiSSA adapter applies to the original base.gguf: W + delta = W_res + s B A."""
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    trained = copy.deepcopy(tiny_llama)
    add_lora(trained, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "up_proj"), init="pissa"))
    randomize_lora(trained)
    save_adapter(trained, tmp_path / "adapter")
    path = export_lora_gguf(tiny_llama, tmp_path / "adapter", tmp_path / "lora.gguf", outtype="f32")
    merge(trained, unload=True)
    _check_deltas(path, trained.state_dict(), base, MODULES)
    assert {k: torch.equal(v, base[k]) for k, v in tiny_llama.state_dict().items()} == dict.fromkeys(base, True)


def test_lora_gguf_refusals(tiny_llama, tmp_path) -> None:
    for folder, config in (("dora", LoraConfig(targets=("q_proj",), rank=4, use_dora=True)),
                           ("niter", LoraConfig(targets=("q_proj",), rank=4, init="pissa_niter_2"))):
        model = copy.deepcopy(tiny_llama)
        add_lora(model, config)
        save_adapter(model, tmp_path / folder)
    with pytest.raises(ValueError, match="DoRA adapter: llama.cpp's GGUF LoRA cannot hold one.*merged model"):
        export_lora_gguf(tiny_llama, tmp_path / "dora", tmp_path / "d.gguf")
    with pytest.raises(ValueError, match="pissa_niter_2.*randomised SVD.*convert_to_lora=True"):
        export_lora_gguf(tiny_llama, tmp_path / "niter", tmp_path / "n.gguf")
    assert not list(tmp_path.glob("*.gguf"))


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
    reader = gguf.GGUFReader(str(path))
    assert "output.weight" not in {t.name for t in reader.tensors}
    # the tiny tokenizer has no BOS (nor has the config): the EOS stands in, which transformers 5.17 needs
    assert tiny_tokenizer.bos_token_id is None and model.config.bos_token_id is None
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tiny_tokenizer.eos_token_id
    loaded, tokenizer = load_model(path)
    assert tokenizer.eos_token == tiny_tokenizer.eos_token
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert generate(loaded, tokenizer, PROMPTS, max_new_tokens=8) == generate(model, tiny_tokenizer, PROMPTS,
                                                                             max_new_tokens=8)


def test_an_existing_file_is_kept_unless_overwrite(adapted, tiny_tokenizer, tmp_path) -> None:
    merge(adapted, unload=True)
    target = tmp_path / "data.jsonl"
    target.write_text('{"a": 1}\n')
    with pytest.raises(UsageError, match=f"--output {target} already exists; pass --overwrite"):
        export_gguf(adapted, tiny_tokenizer, target)
    assert target.read_text() == '{"a": 1}\n'
    export_gguf(adapted, tiny_tokenizer, target, overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"


def test_a_failure_mid_write_leaves_no_partial_file(adapted, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    def disk_full(writer: gguf.GGUFWriter, **_: object) -> None:
        for fout in writer.fout or []:  # part of the tensors reach the disk, then the disk is full
            fout.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    merge(adapted, unload=True)
    save_adapter(tiny_llama_with_lora(), tmp_path / "adapter")
    (tmp_path / "old.gguf").write_bytes(b"GGUF old")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    for write in (lambda out, **kw: export_gguf(adapted, tiny_tokenizer, out, **kw),
                  lambda out, **kw: export_lora_gguf(adapted, tmp_path / "adapter", out, **kw)):
        for out, overwrite in ((tmp_path / "new.gguf", False), (tmp_path / "old.gguf", True)):
            with pytest.raises(OSError, match="No space left"):
                write(out, overwrite=overwrite)
            assert sorted(p.name for p in tmp_path.iterdir()) == before
            assert (tmp_path / "old.gguf").read_bytes() == b"GGUF old"


def tiny_llama_with_lora(**model: Any) -> torch.nn.Module:
    """A tiny.llama(**model) with a random rank-4 LoRA on q/v and down_proj."""
    llama = tiny.llama(**model)
    add_lora(llama, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    randomize_lora(llama)
    return llama


def test_lora_gguf_of_an_adapter_for_another_base_is_refused(tmp_path) -> None:
    save_adapter(tiny_llama_with_lora(), tmp_path / "adapter", base_model="tiny-llama")
    with pytest.raises(AdapterError, match=r"does not fit this model: model.layers.0.mlp.down_proj: lora_A "
                                           r"\(4, 64\) / lora_B \(32, 4\) do not fit in=96 out=32 \(and 1 more\)"):
        export_lora_gguf(tiny.llama(intermediate=96), tmp_path / "adapter", tmp_path / "lora.gguf")
    with pytest.raises(AdapterError, match="module 'model.layers.1.mlp.down_proj' is not in the model"):
        export_lora_gguf(tiny.llama(layers=1), tmp_path / "adapter", tmp_path / "lora.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def _written(path, want: dict[str, np.ndarray]) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:  # type: ignore[no-untyped-def]
    """``gguf name -> (type, dequantized (rows, cols))`` for the tensors of ``want``."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    return {name: (tensors[name].tensor_type,
                   gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(want[name].shape))
            for name in want}


def _sub_blocks(array: np.ndarray, size: int) -> np.ndarray:
    return array.reshape(-1, size)


@pytest.mark.parametrize("quantize", ["q8_0", "q4_k"])
def test_quantized_weights_read_back_within_the_format(tmp_path, tiny_tokenizer, quantize) -> None:
    """Weights whose rows divide into blocks (Q8_0: 32, Q4_K: 256 values) are stored as them, within
    half a step of the merged weights; the rest fall back to --outtype; norms stay f32."""
    model = tiny_llama_with_lora(vocab=len(tiny_tokenizer), intermediate=256)
    merge(model, unload=True)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", outtype="f32", quantize=quantize)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    want = {"blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],  # (32, 256): rows of 256
            "blk.1.attn_q.weight": _permute(state["model.layers.1.self_attn.q_proj.weight"], 4),  # (32, 32)
            "blk.0.ffn_up.weight": state["model.layers.0.mlp.up_proj.weight"],  # (256, 32)
            "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    got = _written(path, want)
    q8, q4, f32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.F32
    assert {name: kind for name, (kind, _) in got.items()} == {
        "blk.0.ffn_down.weight": q8 if quantize == "q8_0" else q4,
        "blk.1.attn_q.weight": q8 if quantize == "q8_0" else f32,
        "blk.0.ffn_up.weight": q8 if quantize == "q8_0" else f32,
        "blk.0.attn_norm.weight": f32}
    for name, (kind, values) in got.items():
        error = np.abs(values - want[name])
        if kind == f32:
            assert error.max() == 0, name
        elif kind == q8:  # d = max|x| / 127 per 32 values, q = round(x / d): |error| <= d / 2, plus
            # |q| <= 127 times d's rounding to f16 (2**-11 d)
            bound = np.abs(_sub_blocks(want[name], 32)).max(axis=1, keepdims=True) / 127 * (0.5 + 127 / 2**11)
            assert (_sub_blocks(error, 32) <= bound + 1e-7).all(), name
        else:  # per 32 values a step (range + dmin) / 15 (up to d, the super-block's step / 63), error <= step / 2
            sub = _sub_blocks(want[name], 32)
            span = np.maximum(sub.max(axis=1), 0) - np.minimum(sub.min(axis=1), 0)
            step = (span + np.repeat(span.reshape(-1, 8).max(axis=1), 8) / 63) / 15 * 1.002
            bound = 0.5 * (step + np.repeat(step.reshape(-1, 8).max(axis=1), 8) / 63)
            assert (_sub_blocks(error, 32) <= bound[:, None] + 1e-7).all(), name
            assert error.mean() > 0 and np.abs(values - want[name]).mean() < 0.1 * np.abs(want[name]).mean()
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].parts[-1][0] == (
        gguf.LlamaFileType.MOSTLY_Q8_0 if quantize == "q8_0" else gguf.LlamaFileType.MOSTLY_Q4_K_S)


def test_quantized_lora_gguf(tmp_path) -> None:
    """A GGUF LoRA in Q8_0: lora_a (r, in=32) rows are blocks; lora_b rows (r = 4) are not."""
    model = tiny_llama_with_lora()
    save_adapter(model, tmp_path / "adapter")
    path = export_lora_gguf(tiny.llama(), tmp_path / "adapter", tmp_path / "lora.gguf", outtype="f16", quantize="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_q.weight.lora_b"] == gguf.GGMLQuantizationType.F16
    with pytest.raises(ValueError, match="quantize 'nf4': GGUF export quantizes to q8_0 or q4_k"):
        export_lora_gguf(tiny.llama(), tmp_path / "adapter", tmp_path / "l2.gguf", quantize="nf4")


def test_a_tokenizer_without_bos_takes_the_configs(tiny_llama, tiny_tokenizer, tmp_path) -> None:
    """Qwen2-like: no BOS on the tokenizer, one in the model config (what llama.cpp's converter writes then)."""
    start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    tiny_llama.config.bos_token_id = start
    path = export_gguf(tiny_llama, tiny_tokenizer, tmp_path / "bos.gguf", outtype="f32")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.bos_token_id"].contents() == start != tiny_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tiny_tokenizer.eos_token_id
    assert not fields["tokenizer.ggml.add_bos_token"].contents()
