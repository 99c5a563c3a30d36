"""QLoRA through the command line: `splice train --quantize`, config files, and merge."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from splice.cli import main

FLAGS = ["--prompt-template", "Q: {question}\nA: ", "--response-template", "{answer}",
         "--max-length", "64", "--lr", "1e-2", "--eval-samples", "0", "--warmup-steps", "1"]


def test_train_quantized_from_a_config_file_then_merge(tiny_run_inputs, tmp_path, capsys) -> None:
    model, data = tiny_run_inputs
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = 6\nrank = 4\nquantize = "nf4"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--model", str(model), "--data", str(data),
                 "--output-dir", str(out), *FLAGS]) == 0
    assert json.loads((out / "run_config.json").read_text())["quantize"] == "nf4"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model), "--adapter", str(out / "adapter"), "--quantize", "nf4",
                 "--output", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # the merged weights are the dequantized NF4 base plus the adapter (what training saw)
    import splice
    from splice import load_adapter
    from splice.core.device import resolve_device
    from splice.models.loading import load_model

    # merge ran where the command runs by default (bf16 on a GPU, fp32 on the CPU): mirror it
    device = resolve_device("auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapted, _ = load_model(model, quantize="nf4", device=device, dtype=dtype)
    load_adapter(adapted, out / "adapter")
    _, wrapper, layer = next(item for item in splice.lora_modules(adapted) if item[0].endswith("0.mlp.up_proj"))
    base = wrapper.base.dequantize()
    assert base.dtype == dtype
    expected = (base + layer.delta_weight().to(dtype)).to(torch.bfloat16).cpu()
    merged_weight = plain.model.layers[0].mlp.up_proj.weight
    assert torch.equal(merged_weight, expected)
    assert not torch.equal(merged_weight, base.to(torch.bfloat16).cpu())  # the adapter is in


def test_flag_and_bad_value(tiny_run_inputs, tmp_path, capsys) -> None:
    model, data = tiny_run_inputs
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--quantize", "nf3", "--steps", "1", *FLAGS]) == 2
    assert "quantize must be nf4, int8 or fp8" in capsys.readouterr().err
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "i8"),
                 "--quantize", "int8", "--steps", "2", *FLAGS]) == 0
