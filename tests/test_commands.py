"""splice.commands, through the command line: export never overwrites without --overwrite (checked before
the model loads), refuses an adapter made for another base and load-time --quantize types, quantizes to
GGUF blocks; a corrupt safetensors file is named; merge follows the umask; --max-line-bytes reaches the
data reader of train, data and eval."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gguf
import pytest

from splice.cli import main
from tests import tiny


def _adapter(folder: Path, *, vocab: int, **model: int) -> Path:
    from splice.lora.apply import add_lora
    from splice.lora.layers import LoraConfig
    from splice.lora.peft_io import save_adapter

    base = tiny.llama(vocab=vocab, **model)
    add_lora(base, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj")))
    tiny.randomize_lora(base)
    return save_adapter(base, folder, base_model="tiny-llama")


def _vocab(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line the command printed (beside Hugging Face's loading bars)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def test_export_keeps_an_existing_file_unless_overwrite(tiny_run_inputs, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    # the model does not exist: the output is checked before it would load
    assert main(["export", "--model", str(tmp_path / "no-model"), "--output", str(data)]) == 2
    assert f"--output {data} already exists; pass --overwrite" in _error(capsys)
    assert data.read_text() == '{"a": 1}\n'
    assert main(["export", "--model", str(tiny_run_inputs[0]), "--output", str(data), "--overwrite",
                 "--quantize", "q8_0"]) == 0
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(data)).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 32 values: one block
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temporary file left


def test_export_quantize_takes_gguf_types_only(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", "--quantize", "nf4", "--output", str(tmp_path / "m.gguf")])
    assert exited.value.code == 2
    assert "argument --quantize: invalid choice: 'nf4'" in _error(capsys)  # choose from q8_0, q4_k


def test_export_refuses_an_adapter_for_another_base(tiny_run_inputs, tmp_path, capsys) -> None:
    model = tiny_run_inputs[0]
    adapter = _adapter(tmp_path / "wide", vocab=_vocab(model), intermediate=96)
    for only in (["--adapter-only"], []):  # as a GGUF LoRA, and merged (as splice merge checks it)
        assert main(["export", "--model", str(model), "--adapter", str(adapter), *only,
                     "--output", str(tmp_path / "out.gguf")]) == 2
        assert ("the adapter does not fit this model: model.layers.0.mlp.down_proj: lora_A (4, 96) / lora_B (32, 4) "
                "do not fit in=64 out=32 (and 1 more)") in _error(capsys)
    assert not list(tmp_path.glob("*.gguf"))


def test_a_corrupt_safetensors_file_is_named(tiny_run_inputs, tmp_path, capsys) -> None:
    import shutil

    adapter = _adapter(tmp_path / "adapter", vocab=_vocab(tiny_run_inputs[0]))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["export", "--model", str(tiny_run_inputs[0]), "--adapter", str(adapter), "--adapter-only",
                 "--output", str(tmp_path / "lora.gguf")]) == 2
    assert f"{weights} is not a readable safetensors file (100 bytes" in _error(capsys)
    model = shutil.copytree(tiny_run_inputs[0], tmp_path / "model")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5000])
    assert main(["export", "--model", str(model), "--output", str(tmp_path / "m.gguf")]) == 2
    assert f"{model / 'model.safetensors'} (5000 bytes) is not a readable safetensors file" in _error(capsys)
    assert not list(tmp_path.glob("*.gguf"))


def test_merged_model_follows_the_umask(tiny_run_inputs, tmp_path) -> None:
    adapter = _adapter(tmp_path / "adapter", vocab=_vocab(tiny_run_inputs[0]))
    old = os.umask(0o022)
    try:
        assert main(["merge", "--model", str(tiny_run_inputs[0]), "--adapter", str(adapter),
                     "--output", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755


@pytest.mark.parametrize("command", [["train", "--data"], ["data"], ["eval", "--data"]])
def test_max_line_bytes_reaches_the_data_reader(tiny_run_inputs, tmp_path, capsys, command) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "p" * 10, "completion": "c"}) + "\n"
                    + json.dumps({"prompt": "p" * 100, "completion": "c"}) + "\n")
    model = ["--model", str(tiny_run_inputs[0])]
    extra = ["--output-dir", str(tmp_path / "run"), "--max-length", "64"] if command[0] == "train" else []
    assert main([*command, str(data), *model, *extra, "--max-line-bytes", "64"]) == 2
    assert f"{data}, line 2: longer than 64 bytes" in _error(capsys)
