"""Out of GPU memory in a training step: one line with the step, the batch and the fixes."""

from __future__ import annotations

import pytest
import torch

from splice.core.errors import RunError
from splice.training.config import TrainConfig
from splice.training.loop import train
from splice.training.oom import CardMemory, out_of_memory
from splice.training.state import latest_checkpoint
from tests.numerics import DEVICES
from tests.tiny import run_config

GIB = 2**30
# The first line of torch's caching-allocator message (torch 2.11), as the error carries it.
TORCH_MESSAGE = ("CUDA out of memory. Tried to allocate 2.75 GiB. GPU 0 has a total capacity of 139.81 GiB of "
                 "which 1.06 GiB is free.\nOf the allocated memory 70.1 GiB is allocated by PyTorch")


def test_message_names_step_batch_card_and_only_the_options_not_on() -> None:
    config = TrainConfig(gradient_checkpointing=True, quantize="nf4", batch_size=8, max_length=4096)
    error = out_of_memory(torch.OutOfMemoryError(TORCH_MESSAGE), step=7, rows=8, tokens=4096, device="cuda:0",
                          memory=CardMemory(allocated=70 * GIB, reserved=72 * GIB, total=80 * GIB), config=config)
    text = str(error)
    assert isinstance(error, RunError) and error.exit_code == 1
    assert "\n" not in text
    assert text.startswith("out of GPU memory on cuda:0 in step 7 allocating 2.75 GiB (micro-batch 8 x 4096 tokens; "
                           "70.0 GiB in use, 72.0 GiB reserved of 80.0 GiB)")
    assert "--offload-checkpoints" in text and "--batch-size (now 8)" in text and "--max-length (now 4096)" in text
    # already on: not suggested; 2 of 80 GiB reserved but unused is not fragmentation
    assert "--gradient-checkpointing" not in text and "--quantize" not in text and "expandable" not in text


def test_fragmentation_puts_expandable_segments_first(monkeypatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    fragmented = CardMemory(allocated=60 * GIB, reserved=79 * GIB, total=80 * GIB)
    error = out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), step=1, rows=1, tokens=372736,
                          device="cuda:0", memory=fragmented, config=TrainConfig())
    fixes = str(error).split("Lower the peak with: ")[1].split("; ")
    assert fixes[0] == ("start with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                        "(19.0 GiB was reserved but unused: fragmentation)")
    assert fixes[1:4] == ["--gradient-checkpointing", "--offload-checkpoints", "--quantize nf4"]
    assert " allocating" not in str(error)  # torch's message gave no size
    # already on (as the splice program sets it): the other fixes only
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    again = str(out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), step=1, rows=1, tokens=372736,
                              device="cuda:0", memory=fragmented, config=TrainConfig()))
    assert "expandable" not in again and again.split("Lower the peak with: ")[1].startswith("--gradient-checkpointing")


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_in_a_step_stops_with_the_line_and_keeps_the_checkpoint(
        tiny_run_inputs, tmp_path, monkeypatch, device: str) -> None:
    import splice.training.setup as loop_module

    real = loop_module.train_step_loss
    calls = {"n": 0}

    def runs_out(model, batch, *, device, static_shapes=False):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: a real oversized allocation on the GPU; torch's error on the CPU
            if device.type == "cuda":
                torch.empty(4 * torch.cuda.get_device_properties(device).total_memory, dtype=torch.uint8,
                            device=device)
            raise torch.OutOfMemoryError(TORCH_MESSAGE)
        return real(model, batch, device=device, static_shapes=static_shapes)

    monkeypatch.setattr(loop_module, "train_step_loss", runs_out)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"^out of GPU memory on \S+ in step 5 allocating [0-9.]+ GiB "
                                       r"\(micro-batch 4 x \d+ tokens;") as caught:
        train(run_config(tiny_run_inputs, out, device=device, save_every=2, cuda_graphs=False))
    assert "\n" not in str(caught.value) and "--max-length (now 64)" in str(caught.value)
    assert latest_checkpoint(out / "checkpoints").name == "step-000004"  # nothing written is lost
