"""GGUF files for llama.cpp and Ollama: a (merged) model, or a LoRA adapter alone.

Written with the ``gguf`` library the way llama.cpp's ``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py`` write them, for the Llama architecture (Llama, SmolLM, Mistral-style
models) with a byte-level BPE tokenizer:

- tensor names from ``gguf.get_tensor_name_map`` (``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``); a tied output head is not written (llama.cpp reuses ``token_embd``);
- q and k projections row-permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved one: rows ``(head, half, d)`` -> ``(head, d, half)`` (``_permute``);
- 2-D weights in ``outtype`` (f32, f16 or bf16), or with ``quantize`` in Q8_0 / Q4_K blocks
  (:mod:`splice.export.gguf_quants`) where a row divides into them (32 / 256 values; a weight whose
  rows do not stays in ``outtype``, as llama.cpp's quantizer falls back); 1-D tensors (norms,
  biases) in f32;
- the tokenizer as ``tokenizer.ggml.model = "gpt2"``: tokens by id (padded to the model's vocab
  with ``[PAD<i>]``), merges, token types (control for special tokens), the special ids (a BOS id always:
  the model config's or the EOS where the tokenizer has none) and the chat template.

A GGUF LoRA (``general.type = "adapter"``, ``adapter.type = "lora"``) holds ``<name>.lora_a``
(r, in) and ``<name>.lora_b`` (out, r) for each adapted weight, B permuted like its weight for q/k.
llama.cpp applies ``W + (alpha / r) * B @ A``; any other scale (rsLoRA, per-module rank or alpha)
is folded into B so that product is exact. The adapter is read by
:func:`splice.lora.adapter_file.read_adapter` (PEFT's scale rules; PiSSA/OLoRA converted to a plain
LoRA of the original base) and checked against the base as loading it is
(:func:`splice.lora.adapter_file.check_adapter_fits`).

The file is written under a temporary name beside ``path`` and renamed when complete
(:func:`splice.core.io.atomic_file`): a failure (a full disk) leaves no partial ``.gguf``. An
existing file is refused unless ``overwrite`` (:func:`check_output`, which the CLI calls before
loading the model).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from splice.core.errors import UsageError
from splice.core.io import atomic_file
from splice.core.progress import progress
from splice.export.gguf_quants import QUANT_TYPES, block_size, quantize
from splice.lora.adapter_file import check_adapter_fits, on_original_base, read_adapter, require_linear
from splice.lora.apply import lora_modules

__all__ = ["check_output", "export_gguf", "export_lora_gguf"]

_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
_OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_QUANT_FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """``path`` as a GGUF file to write, checked before any slow work: not a folder, and not an
    existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; give the .gguf file to write, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise UsageError(f"--output {path} already exists; pass --overwrite (overwrite=True) to replace it, "
                         "or choose another file")
    return path


def _check_types(outtype: str, quantize: str | None) -> None:
    if outtype not in _OUTTYPES:
        raise ValueError(f"outtype {outtype!r}; use one of {', '.join(_OUTTYPES)}")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize {quantize!r}: GGUF export quantizes to {' or '.join(QUANT_TYPES)} "
                         "(nf4/int8 are formats splice loads a base in, not GGUF types)")


def _architecture(config: Any) -> gguf.MODEL_ARCH:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"GGUF export supports model types {sorted(_ARCHITECTURES)}, not {model_type!r}; "
                         "for other models use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export writes plain RoPE; this model uses {rope['rope_type']!r} scaling. "
                         "Use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    return _ARCHITECTURES[model_type]


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows (heads * 2 * d) of a q/k projection from rotate-half to interleaved RoPE order."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _heads_of(gguf_name: str, config: Any) -> int | None:
    """Heads to permute a tensor's rows by: q and k projections only."""
    if ".attn_q." in gguf_name:
        return int(config.num_attention_heads)
    if ".attn_k." in gguf_name:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def _gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}; GGUF export knows Llama-architecture tensors only")
    return name


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray, outtype: str, quant: str | None) -> None:
    """2-D tensors in ``quant`` blocks where their rows divide into them, else in ``outtype``;
    everything else in f32 (as llama.cpp keeps norms)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    kind = _OUTTYPES[outtype][0] if array.ndim == 2 else gguf.GGMLQuantizationType.F32
    if array.ndim == 2 and quant is not None and array.shape[1] % block_size(QUANT_TYPES[quant]) == 0:
        kind = QUANT_TYPES[quant]
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)  # bytes: the shape is read from them


def _hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))


def _tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model (``config``: the model's)."""
    vocab_size = int(config.vocab_size)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen); this "
                         "tokenizer is not one. Use llama.cpp's convert_hf_to_gguf.py on the merged folder")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    special = set(tokenizer.all_special_ids)
    added = {index for index in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if index in special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "unk_token_id",
                                                          "pad_token_id")}
    if ids["bos_token_id"] is None:
        # Tokenizers without a BOS (Qwen2, the tests' tiny one): the model config's, as llama.cpp's converter
        # takes it, else the EOS (GPT-2's convention; add_bos_token is off, so it is never inserted). A file with
        # no BOS id does not load in transformers 5.17 (the device's: its GGUF tokenizer reads one unconditionally).
        ids["bos_token_id"] = getattr(config, "bos_token_id", None)
        if not isinstance(ids["bos_token_id"], int):
            ids["bos_token_id"] = ids["eos_token_id"]
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = ids[key]
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


@contextmanager
def _gguf_file(path: Path, arch: gguf.MODEL_ARCH, *, outtype: str, quant: str | None) -> Iterator[gguf.GGUFWriter]:
    """A writer to fill (keys, tensors); on leaving, the file is written beside ``path`` and
    renamed onto it; on a failure nothing is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        try:
            writer.add_file_type(_QUANT_FILE_TYPES[quant] if quant else _OUTTYPES[outtype][1])
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def export_gguf(model: nn.Module, tokenizer: Any, path: str | Path, *, outtype: str = "f16",
                quantize: str | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (a plain or merged Hugging Face causal LM, no LoRA wrappers) and its
    tokenizer as one GGUF file llama.cpp and Ollama load; returns the path. ``quantize``: "q8_0"
    or "q4_k" blocks for the 2-D weights whose rows divide into them (see module doc)."""
    _check_types(outtype, quantize)
    path = check_output(path, overwrite=overwrite)
    if lora_modules(model):
        raise ValueError("the model still carries LoRA wrappers: merge(model, unload=True) first, or "
                         "export the adapter alone with export_lora_gguf")
    config: Any = getattr(model, "config")  # noqa: B009 - a transformers config, typed loosely
    arch = _architecture(config)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with _gguf_file(path, arch, outtype=outtype, quant=quantize) as writer:
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "splice model"))
        _hparams(writer, config)
        _tokenizer(writer, tokenizer, config)
        for hf_name, tensor in progress(state.items(), desc="GGUF tensors", total=len(state), unit="tensor"):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            gguf_name = _gguf_name(names, hf_name)
            array = tensor.detach().to(torch.float32).cpu().numpy()
            heads = _heads_of(gguf_name, config)
            _add(writer, gguf_name, _permute(array, heads) if heads else array, outtype, quantize)
    return path


def export_lora_gguf(model: nn.Module, adapter: str | Path, path: str | Path, *, outtype: str = "f16",
                     quantize: str | None = None, overwrite: bool = False) -> Path:
    """Write the PEFT-format adapter folder ``adapter`` (trained on ``model``, checked by
    :func:`check_adapter_fits`) as a llama.cpp GGUF LoRA (``llama-cli -m base.gguf --lora
    adapter.gguf``); returns the path. ``quantize`` as for :func:`export_gguf` (lora_a rows are
    ``in`` long; lora_b rows only ``r``, so B stays in ``outtype`` unless r divides into blocks).

    ``model`` is the original base: a PiSSA/OLoRA adapter (whose A and B apply to the residual base)
    is written as the plain LoRA of its weights (:func:`splice.lora.adapter_file.on_original_base`).
    """
    _check_types(outtype, quantize)
    path = check_output(path, overwrite=overwrite)
    read = read_adapter(adapter)
    require_linear(read, holder="llama.cpp's GGUF LoRA", instead="export the merged model instead "
                   "(splice export --adapter ... without --adapter-only)")
    check_adapter_fits(read, model)
    read = on_original_base(read, model)
    config: Any = getattr(model, "config")  # noqa: B009 - a transformers config, typed loosely
    arch = _architecture(config)
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    alpha = read.config.alpha
    with _gguf_file(path, arch, outtype=outtype, quant=quantize) as writer:
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, lora in sorted(read.modules.items()):
            a, b = lora.a.to(torch.float32).numpy(), lora.b.to(torch.float32).numpy()
            b = b * (lora.scale * lora.rank / alpha)  # llama.cpp scales by alpha / r: fold in the rest
            gguf_name = _gguf_name(names, module + ".weight")
            heads = _heads_of(gguf_name, config)
            _add(writer, gguf_name + ".lora_a", a, outtype, quantize)
            _add(writer, gguf_name + ".lora_b", _permute(b, heads) if heads else b, outtype, quantize)
    return path
