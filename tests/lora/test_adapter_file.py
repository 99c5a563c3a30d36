"""splice.lora.adapter_file: the one adapter reader. Pattern keys match as real peft matches them;
rsLoRA and per-module scales; the init; one clear line naming the file for each broken folder."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from splice.lora.adapter_file import AdapterError, read_adapter
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from tests import tiny

PATTERNS = [
    {"q_proj": 1},
    {"self_attn.q_proj": 2, "mlp.up_proj": 3},
    {r"layers\.1\..*_proj": 4},
    {r"self_attn\.(k|v)_proj": 5, "down_proj": 6},
    {"model.layers.0.mlp.gate_proj": 7},
    {"proj": 8, "layers.0": 9, "q": 10},  # a key matches a whole path segment at the end, never a part
    {"(q|k)_proj": 11, "q_proj": 12},  # the first key that matches wins
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_keys_match_as_peft_matches_them(pattern: dict[str, int]) -> None:
    config = LoraConfig(rank=16, alpha=32.0, rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in
                                                                                 pattern.items()})
    paths = [name for name, _ in tiny.llama().named_modules() if name]
    hits = 0
    for path in paths:
        want = pattern.get(get_pattern_key(pattern.keys(), path), 16)
        assert config.rank_for(path) == want, path
        assert config.alpha_for(path) == float(pattern.get(get_pattern_key(pattern.keys(), path), 32.0)), path
        hits += want != 16
    assert hits > 0 or pattern == PATTERNS[5]


def _saved(folder: Path, **config: object) -> Path:
    model = tiny.llama()
    add_lora(model, LoraConfig(**config))  # type: ignore[arg-type]
    tiny.randomize_lora(model)
    save_adapter(model, folder, base_model="tiny-llama")
    return folder


def test_fields_scales_and_init(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "rs", targets=("q_proj", "v_proj"), rank=4, alpha=8, rslora=True,
                    rank_pattern={"model.layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    adapter = read_adapter(folder)
    assert adapter.directory == folder and adapter.base_model == "tiny-llama"
    assert adapter.target_modules == ["q_proj", "v_proj"] and adapter.init == "default"
    assert not adapter.needs_residual_base and adapter.rank == 4
    v1, q0 = adapter.modules["model.layers.1.self_attn.v_proj"], adapter.modules["model.layers.0.self_attn.q_proj"]
    assert (v1.rank, v1.alpha, v1.scale) == (2, 8.0, pytest.approx(8 / math.sqrt(2)))
    assert (q0.rank, q0.alpha, q0.scale) == (4, 3.0, pytest.approx(3 / 2))
    assert set(q0.parts()) == {"lora_A", "lora_B"} and q0.a.shape == (4, 32)

    pissa = read_adapter(_saved(tmp_path / "pissa", targets=("q_proj",), rank=4, init="pissa"))
    assert pissa.init == "pissa" and pissa.needs_residual_base
    emb = read_adapter(_saved(tmp_path / "emb", targets=("embed_tokens",), rank=2, use_dora=False))
    assert set(emb.modules["model.embed_tokens"].parts()) == {"lora_embedding_A", "lora_embedding_B"}


def _edit_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config[key] = value
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _drop_b(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")


def _truncate(folder: Path) -> None:
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


BROKEN: list[tuple[Callable[[Path], None], type[Exception], str, str]] = [
    (lambda f: (f / "adapter_config.json").unlink(), FileNotFoundError, "", "missing adapter_config.json"),
    (_pickle_only, FileNotFoundError, "", "missing adapter_model.safetensors.*a pickle, which splice never loads"),
    (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), AdapterError, "adapter_config.json",
     "holds a JSON list; it must be a JSON object"),
    (lambda f: (f / "adapter_config.json").write_text("{"), AdapterError, "adapter_config.json",
     "is not valid JSON"),
    (_truncate, AdapterError, "adapter_model.safetensors", "not a readable safetensors file.*truncated or empty"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), AdapterError, "adapter_model.safetensors",
     r"\(0 bytes.*truncated or empty"),
    (_drop_b, AdapterError, "adapter_model.safetensors",
     "model.layers.0.self_attn.q_proj has lora_A but no lora_B"),
    (_edit_config("r", 8), AdapterError, "adapter_model.safetensors",
     "q_proj has rank 4 but the config gives it 8"),
    (_edit_config("alpha_pattern", {"q_proj[": 2}), AdapterError, "adapter_config.json",
     "alpha_pattern key 'q_proj\\[' is not a valid regular expression"),
    (_edit_config("rank_pattern", {"q_proj": 2.5}), AdapterError, "adapter_config.json", "an integer rank"),
    (_edit_config("init_lora_weights", "loftq"), AdapterError, "adapter_config.json", "'loftq' is not supported"),
    (_edit_config("use_dora", True), AdapterError, "adapter_model.safetensors", "lacks a lora_magnitude_vector"),
    (_edit_config("lora_alpha", "8"), AdapterError, "adapter_config.json", "lora_alpha is '8'; it must be"),
]


@pytest.mark.parametrize(("damage", "kind", "file", "message"), BROKEN)
def test_broken_folders_raise_one_line_naming_the_file(tmp_path: Path, damage, kind, file, message) -> None:  # type: ignore[no-untyped-def]
    folder = _saved(tmp_path / "adapter", targets=("q_proj",), rank=4)
    damage(folder)
    with pytest.raises(kind, match=message) as caught:
        read_adapter(folder)
    text = str(caught.value)
    assert "\n" not in text and str(folder / file) in text


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "adapter", targets=("q_proj",), rank=4)
    with pytest.raises(AdapterError, match="is a file; pass the adapter directory"):
        read_adapter(folder / "adapter_model.safetensors")
    assert torch.equal(read_adapter(folder).modules["model.layers.1.self_attn.q_proj"].b,
                       load_file(folder / "adapter_model.safetensors")[
                           "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"])


def test_an_adapter_for_another_base_is_refused_naming_the_first_module(tmp_path: Path) -> None:
    from splice.lora.adapter_file import check_adapter_fits

    adapter = read_adapter(_saved(tmp_path / "adapter", targets=("q_proj", "v_proj"), rank=4))
    check_adapter_fits(adapter, tiny.llama())  # its own base
    # wider: every module's in differs; the first one (in the file) is named, the rest counted
    with pytest.raises(AdapterError) as caught:
        check_adapter_fits(adapter, tiny.llama(hidden=48))
    text = str(caught.value)
    assert "\n" not in text and str(tmp_path / "adapter") in text
    assert ("the adapter does not fit this model: model.layers.0.self_attn.q_proj: lora_A (4, 32) / lora_B (32, 4) "
            "do not fit in=48 out=48 (and 3 more). Load it into the base model it was trained on (tiny-llama)") in text
    # fewer layers: the modules of layer 1 are not there; a GPT-2 has none of them
    with pytest.raises(AdapterError, match=r"fit this model: module 'model.layers.1.self_attn.q_proj' is not in "
                                           r"the model \(and 1 more\)"):
        check_adapter_fits(adapter, tiny.llama(layers=1))
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.q_proj' is not in the model \(and 3"):
        check_adapter_fits(adapter, tiny.gpt2())


def test_another_base_name_with_fitting_shapes_is_a_warning(tmp_path: Path) -> None:
    from splice.lora.adapter_file import check_adapter_fits

    adapter = read_adapter(_saved(tmp_path / "adapter", targets=("q_proj",), rank=4))  # base "tiny-llama"
    model = tiny.llama()
    for same in ("tiny-llama", "/models/tiny-llama/", "someone/Tiny-Llama", "/gguf/tiny-llama.Q8_0.gguf"):
        model.config._name_or_path = same
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_adapter_fits(adapter, model)
    model.config._name_or_path = "/models/tiny-llama-instruct"
    with pytest.warns(UserWarning, match="was trained on tiny-llama, not /models/tiny-llama-instruct; its shapes fit"):
        check_adapter_fits(adapter, model)
