"""The `splice` command end to end on a tiny model, and its answers to bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from splice.cli import main

FLAGS = ["--prompt-template", "Q: {question}\nA: ", "--response-template", "{answer}",
         "--max-length", "64", "--lr", "1e-2", "--eval-samples", "4", "--warmup-steps", "2"]


def _train(inputs, out: Path, *extra: str) -> int:
    model, data = inputs
    return main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 *FLAGS, *extra])


def test_train_generate_merge(tiny_run_inputs, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(tiny_run_inputs, out, "--steps", "8") == 0
    printed = capsys.readouterr()
    assert "base model on 2 held-out examples" in printed.out
    assert "word_f1" in printed.out and (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0]

    model_dir = str(tiny_run_inputs[0])
    assert main(["generate", "--model", model_dir, "--adapter", str(out / "adapter"),
                 "--prompt", "Q: alpha then beta?\nA: ", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() != ""

    merged = tmp_path / "merged"
    assert main(["merge", "--model", model_dir, "--adapter", str(out / "adapter"),
                 "--output", str(merged)]) == 0
    from splice import load_adapter
    from splice.models.loading import load_model

    adapted, _ = load_model(model_dir)
    load_adapter(adapted, out / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(plain(ids).logits, adapted.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # merging into a non-empty directory is refused
    assert main(["merge", "--model", model_dir, "--adapter", str(out / "adapter"),
                 "--output", str(merged)]) == 2
    assert "not empty" in capsys.readouterr().err


def _error(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.with_suffix(".txt").write_text("hello"), "unknown|accepted|\\.txt"),
        (lambda p: p.write_text(""), "empty|no rows"),
        (lambda p: p.write_text('{"q": "a", "r": "b"}\n' * 20), "column 'question'"),
    ],
    ids=["unknown-type", "empty", "missing-column"],
)
def test_bad_data_is_a_clear_error(tiny_run_inputs, tmp_path, capsys, write, expected) -> None:
    data = tmp_path / "data.jsonl"
    write(data)
    target = data.with_suffix(".txt") if data.with_suffix(".txt").exists() else data
    code = main(["train", "--model", str(tiny_run_inputs[0]), "--data", str(target),
                 "--output-dir", str(tmp_path / "out"), *FLAGS, "--steps", "1"])
    assert code == 2
    assert re.search(expected, _error(capsys), re.I)


def test_missing_model_and_data_paths(tmp_path, capsys, tiny_run_inputs) -> None:
    assert main(["train", "--model", str(tmp_path / "nope"), "--data", str(tiny_run_inputs[1]),
                 "--output-dir", str(tmp_path / "o1"), *FLAGS]) == 2
    assert "nope" in _error(capsys)
    assert main(["train", "--model", str(tiny_run_inputs[0]), "--data", str(tmp_path / "x.jsonl"),
                 "--output-dir", str(tmp_path / "o2"), *FLAGS]) == 2
    assert "x.jsonl" in _error(capsys)


def test_prompts_longer_than_max_length(tiny_run_inputs, tmp_path, capsys) -> None:
    model, data = tiny_run_inputs
    code = main(["train", "--model", str(model), "--data", str(data), "--output-dir",
                 str(tmp_path / "o"), *FLAGS[:4], "--max-length", "8", "--steps", "1"])
    assert code == 2
    assert "max_length" in _error(capsys)


def test_used_output_dir_is_not_overwritten(tiny_run_inputs, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _train(tiny_run_inputs, out, "--steps", "1") == 2
    assert "already holds a run" in _error(capsys)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_config_file(tiny_run_inputs, tmp_path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = 2\nrank = 4\nbogus = 1\n')
    model, data = tiny_run_inputs
    assert main(["train", "--config", str(config), "--model", str(model), "--data", str(data),
                 "--output-dir", str(tmp_path / "o"), *FLAGS]) == 2
    assert "unknown options bogus" in _error(capsys)
    config.write_text('[train]\nsteps = 2\nrank = 4\n')
    assert main(["train", "--config", str(config), "--model", str(model), "--data", str(data),
                 "--output-dir", str(tmp_path / "o"), *FLAGS]) == 0
    saved = json.loads((tmp_path / "o" / "run_config.json").read_text())
    assert saved["rank"] == 4 and saved["steps"] == 2
