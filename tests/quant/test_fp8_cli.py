"""`splice train --quantize fp8`: one clear line before the model loads where FP8 cannot run (FSDP2 over FP8
weights: tests/distributed/test_wrap.py)."""

from __future__ import annotations

import pytest
import torch

from splice.cli import main
from splice.core.errors import UsageError
from splice.training.config import TrainConfig
from splice.training.preflight import preflight

FLAGS = ["--prompt-template", "Q: {question}\nA: ", "--response-template", "{answer}", "--max-length", "64",
         "--eval-samples", "0", "--steps", "2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_fp8_on_the_cpu_is_one_line_before_the_model_loads(tiny_run_inputs, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model, data = tiny_run_inputs
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                 "--quantize", "fp8", *FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "quantize (--quantize) fp8: FP8 base weights (quantize fp8) need a CUDA GPU with FP8 tensor cores" in err
    assert "this run's device is cpu: use quantize nf4 or int8 here" in err
    assert not out.exists()  # refused before the run directory, the data or the model
    config = TrainConfig(model=str(model), data=str(data), quantize="fp8", device="cpu")
    with pytest.raises(UsageError, match="compute capability 8.9"):
        preflight(config)
