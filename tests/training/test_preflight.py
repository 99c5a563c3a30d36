"""splice.training.preflight: offloaded checkpoints whose pinned layer inputs cannot fit the machine's
memory are refused in one line, before any weight loads, counting 8-bit offload_compression's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splice.core.errors import UsageError
from splice.memory import offload
from splice.training.config import TrainConfig
from splice.training.preflight import preflight


def _llama_folder(root: Path, *, hidden: int, layers: int) -> Path:
    """A model folder with only its config.json (preflight reads no weights)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 101, "max_position_embeddings": 1 << 22}))
    return root


def test_inputs_past_the_machines_memory_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _llama_folder(tmp_path / "m", hidden=8192, layers=80)  # Llama-3-70B's inputs
    monkeypatch.setattr(offload, "host_memory", lambda available=False: 128 << 30)  # the H200 host
    config = TrainConfig(model=str(folder), device="cpu", precision="fp32", offload_checkpoints=True,
                         batch_size=1, max_length=131072)
    # fp32 on the CPU: 131,072 x 8,192 x 4 bytes x 80 layers = 320 GiB; fp8: 80 GiB
    with pytest.raises(UsageError) as refused:
        preflight(config)
    assert str(refused.value) == (
        "offload_checkpoints (--offload-checkpoints) keeps each of the model's 80 layer inputs in pinned host "
        "memory: 131,072 tokens (1 x 131072) x 8192 x 80 layers = 320 GiB, more than this machine's 128 GiB; "
        "add --offload-compression fp8 (80 GiB) or lower --max-length or --batch-size")
    preflight(TrainConfig(model=str(folder), device="cpu", precision="fp32", offload_checkpoints=True,
                          batch_size=1, max_length=131072, offload_compression="fp8"))  # 80 GiB fits
    with pytest.raises(UsageError, match=r"\(2 x 262144\) x 8192 x 80 layers = 320 GiB, more than this machine's 128 GiB; lower --max-length"):
        preflight(TrainConfig(model=str(folder), device="cpu", offload_checkpoints=True, batch_size=2,
                              max_length=262144, offload_compression="int8"))
    preflight(TrainConfig(model=str(folder), device="cpu", offload_checkpoints=True, batch_size=1,
                          max_length=131072, pack=False))  # unpacked rows may all be short: not refused


def test_nothing_is_refused_within_the_real_memory(tmp_path: Path) -> None:
    folder = _llama_folder(tmp_path / "m", hidden=64, layers=2)
    preflight(TrainConfig(model=str(folder), device="cpu", offload_checkpoints=True, max_length=4096))
    assert offload.host_memory() is None or offload.host_memory() > 0
