"""The `splice` command end to end on a tiny model, and its answers to bad input."""

from __future__ import annotations

import argparse
import json
import math
import os
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
    assert "base model on 4 held-out examples" in printed.out  # 9 held out, --eval-samples 4
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


# ----------------------------------------------------------------------------- issue 17: user data, eval, export


def test_version_and_a_torch_free_command_line(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and re.fullmatch(r"splice \S+\n", capsys.readouterr().out)
    # --help is fast when the command line imports no torch/transformers at module level
    import ast

    import splice.cli as cli

    tree = ast.parse(Path(cli.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("torch", "transformers")], names


def test_the_program_sets_expandable_segments_unless_the_user_chose(monkeypatch) -> None:
    import tomllib

    from splice.cli import entry

    # the program is entry (console script and python -m splice), not main
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"splice": "splice.cli:entry"}
    assert "entry()" in (Path(__file__).parents[1] / "splice" / "__main__.py").read_text()
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so the test's changes are undone after it
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit):
        entry(["--version"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    with pytest.raises(SystemExit):
        entry(["--version"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"


def _parsed(*argv: str):
    from splice.cli import build_parser
    from splice.commands import train_config

    return train_config(build_parser().parse_args(["train", *argv]))


def test_epochs_without_steps_zero(tmp_path) -> None:
    assert _parsed("--epochs", "3").steps is None and _parsed("--epochs", "3").epochs == 3
    assert _parsed("--steps", "0", "--epochs", "2").steps is None
    assert _parsed("--steps", "0").epochs == 1.0  # --steps 0 alone: one epoch
    assert _parsed().steps is None and _parsed().epochs is None  # the loop's DEFAULT_STEPS
    assert _parsed("--steps", "7").steps == 7
    with pytest.raises(ValueError, match="both steps \\(5\\) and epochs \\(2.0\\) given in the flags"):
        _parsed("--steps", "5", "--epochs", "2")
    config = tmp_path / "c.toml"
    config.write_text("epochs = 2\n")
    assert _parsed("--config", str(config)).steps is None
    config.write_text("epochs = 2\nsteps = 9\n")
    with pytest.raises(ValueError, match="given in the config file"):
        _parsed("--config", str(config))
    assert _parsed("--config", str(config), "--epochs", "1").steps is None  # a flag beats the file
    config.write_text("epochs = 2\n")
    assert _parsed("--config", str(config), "--steps", "3").epochs is None  # so does --steps


def test_data_objects_are_logged_as_a_summary() -> None:
    from splice.training.config import TrainConfig

    rows = [{"prompt": str(i), "completion": "x"} for i in range(48)]
    saved = TrainConfig(data=rows).to_dict()  # type: ignore[arg-type]
    assert saved["data"] == "list of 48 rows" and json.dumps(saved)


@pytest.fixture
def adapter_dir(tiny_run_inputs, tmp_path) -> Path:
    """A random non-zero LoRA adapter for the tiny model (no training needed to compare)."""
    from splice.lora.apply import add_lora
    from splice.lora.layers import LoraConfig
    from splice.lora.peft_io import save_adapter
    from splice.models.loading import load_model
    from tests.tiny import randomize_lora

    model, _ = load_model(tiny_run_inputs[0])
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter")


def _pc_data(path: Path) -> Path:
    with path.open("w") as f:
        for a, b in [("alpha", "beta"), ("gamma", "delta"), ("omega", "theta")]:
            f.write(json.dumps({"prompt": f"{a} then {b}?\n", "completion": f"{b} {a}"}) + "\n")
    return path


def test_eval_data_base_vs_adapter(tiny_run_inputs, adapter_dir, tmp_path, capsys) -> None:
    data = _pc_data(tmp_path / "held.jsonl")
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(tiny_run_inputs[0]), "--adapter", str(adapter_dir), "--data", str(data),
                 "--samples", "2", "--max-new-tokens", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 rows, 2 scored by generation" in printed and "perplexity" in printed and "change" in printed
    report = json.loads(out.read_text())
    assert report["rows"] == 3 and set(report) == {"data", "rows", "base", "adapter"}
    for side in ("base", "adapter"):
        scores = report[side]
        assert set(scores) == {"val_loss", "perplexity", "exact_match", "word_f1"}
        assert scores["perplexity"] == pytest.approx(math.exp(scores["val_loss"]), rel=1e-9)
    assert report["base"]["val_loss"] != pytest.approx(report["adapter"]["val_loss"])
    # the base column is the plain model's loss, computed independently
    from splice.data.formats import choose_template
    from splice.data.rows import read_rows, tokenize_rows
    from splice.models.loading import load_model
    from splice.training.validate import validation_loss

    model, tokenizer = load_model(tiny_run_inputs[0])
    rows = read_rows(data)
    examples = tokenize_rows(rows, tokenizer, template=choose_template(set(rows[0])), max_length=352).examples
    plain = validation_loss(model, examples, batch_size=16, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    assert report["base"]["val_loss"] == pytest.approx(plain, rel=1e-5)


def test_eval_samples_0_is_loss_only_with_or_without_data(tiny_run_inputs, adapter_dir, tmp_path, capsys) -> None:
    model = str(tiny_run_inputs[0])
    for name, data in (("data", ["--data", str(_pc_data(tmp_path / "held.jsonl"))]), ("split", ["--split", "validation"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", model, "--adapter", str(adapter_dir), *data, "--samples", "0",
                     "--json", str(out)]) == 0, name
        report = json.loads(out.read_text())
        assert "scored by generation" in capsys.readouterr().out and report["rows"] > 0
        for side in ("base", "adapter"):
            assert set(report[side]) == {"val_loss", "perplexity"}, name  # no generation metrics
    from splice.data.function_names import build_function_names

    # without --data, the loss covers the whole split (its size follows the interpreter's standard library)
    assert report["rows"] == len(build_function_names()["validation"])


def test_generate_below_the_temperature_floor_is_greedy(tiny_run_inputs, capsys) -> None:
    model = str(tiny_run_inputs[0])
    outputs = []
    for temperature in ("0", "1e-40", "1e-300"):
        assert main(["generate", "--model", model, "--prompt", "alpha then", "--max-new-tokens", "6",
                     "--temperature", temperature, "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].strip()


def test_eval_writes_each_rows_answers(tiny_run_inputs, adapter_dir, tmp_path, capsys) -> None:
    data = _pc_data(tmp_path / "held.jsonl")
    out = tmp_path / "answers.jsonl"
    model = str(tiny_run_inputs[0])
    assert main(["eval", "--model", model, "--adapter", str(adapter_dir), "--data", str(data),
                 "--samples", "2", "--max-new-tokens", "4", "--predictions", str(out)]) == 0
    assert f"2 answers (prompt, reference, base, adapter) written to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["reference"]) for r in rows] == [("alpha then beta?\n", "beta alpha"),
                                                            ("gamma then delta?\n", "delta gamma")]
    for row in rows:  # each answer is what `splice generate` says to the prompt, with and without the adapter
        for side, adapter in (("base", []), ("adapter", ["--adapter", str(adapter_dir)])):
            assert main(["generate", "--model", model, *adapter, "--prompt", row["prompt"],
                         "--max-new-tokens", "4"]) == 0
            assert capsys.readouterr().out == row[side] + "\n"
    assert rows[0]["base"] != rows[0]["adapter"]


def test_eval_data_errors_before_the_model_loads(tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "a", "reply": "b"}) + "\n")
    assert main(["eval", "--model", str(tmp_path / "absent"), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert "cannot tell prompt from answer" in error and "sharegpt" in error and "absent" not in error


def test_data_preview_marks_trained_tokens(tiny_run_inputs, tmp_path, capsys) -> None:
    data = _pc_data(tmp_path / "d.jsonl")
    assert main(["data", str(data), "--model", str(tiny_run_inputs[0]), "--rows", "2", "--no-color"]) == 0
    printed = capsys.readouterr().out
    assert "2 of 3 rows, prompt/completion; trained tokens in [[ ]]" in printed
    assert "alpha then beta?\n[[beta alpha<|im_end|>]]" in printed and "--- row 2:" in printed
    assert main(["data", str(data), "--model", str(tiny_run_inputs[0]), "--chat", "--tokens", "--rows", "1",
                 "--no-color"]) == 0
    printed = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[beta alpha<|im_end|>]]" in printed and "/-100" in printed


def test_data_preview_names_the_shape(tiny_run_inputs, tmp_path, capsys) -> None:
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Capital of France?", "input": "", "output": "Paris"},
                                {"instruction": "Translate", "input": "cat", "output": "chat"}]))
    assert main(["data", str(data), "--model", str(tiny_run_inputs[0]), "--no-color"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("2 of 2 rows, Alpaca (instruction/input/output); trained tokens")
    assert "### Input:\ncat" in printed  # rendered as the Alpaca prompt it names
    assert main(["data", str(data), "--model", str(tiny_run_inputs[0]), "--no-color", "--chat"]) == 0
    assert "rows, Alpaca (instruction/input/output), through the chat template;" in capsys.readouterr().out


def test_export_gguf_merged_and_adapter(tiny_run_inputs, adapter_dir, tmp_path, capsys, monkeypatch) -> None:
    import gguf

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    model = str(tiny_run_inputs[0])
    assert main(["export", "--model", model, "--adapter", str(adapter_dir), "--output",
                 str(tmp_path / "m.gguf"), "--outtype", "f32"]) == 0
    assert main(["export", "--model", model, "--adapter", str(adapter_dir), "--adapter-only",
                 "--output", str(tmp_path / "lora.gguf")]) == 0
    assert "GGUF LoRA adapter written" in capsys.readouterr().out
    lora = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert any(t.name == "blk.0.attn_q.weight.lora_b" for t in lora.tensors)
    # the GGUF loads back through splice as the merged model does
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "alpha then", "--max-new-tokens", "5"]) == 0
    from_gguf = capsys.readouterr().out
    assert main(["generate", "--model", model, "--adapter", str(adapter_dir), "--prompt", "alpha then",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == from_gguf


def test_model_folder_without_tokenizer_files(tiny_run_inputs, tmp_path, capsys) -> None:
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run_inputs[0] / name, folder / name)
    assert main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    assert "has no tokenizer files" in _error(capsys)


def test_report_to_csv_from_the_command_line(tiny_run_inputs, tmp_path) -> None:
    out = tmp_path / "run"
    assert _train(tiny_run_inputs, out, "--steps", "2", "--report-to", "csv", "--eval-samples", "0",
                  "--no-compare-base") == 0
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["kind"] for r in rows[:2]] == ["train", "train"] and rows[-1]["kind"] == "summary"


def test_help_names_every_data_file_type() -> None:
    from splice.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    data_help = next(a.help for a in train._actions if "--data" in a.option_strings)
    assert all(kind in data_help for kind in (".jsonl", ".json,", ".csv", ".parquet", "save_to_disk"))


def test_every_help_renders(capsys) -> None:
    for command in ("train", "generate", "eval", "data", "export", "merge", "serve"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 5%, at least 20 rows" in printed and "--predictions" in printed
