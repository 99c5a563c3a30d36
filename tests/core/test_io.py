"""splice.core.io: atomic writes follow the umask (adapters and checkpoints included), and the
line-length scan names the file and line of an over-long line, however the line falls in pieces."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splice.core import io
from splice.core.errors import UsageError
from splice.core.io import atomic_dir, atomic_file, check_line_lengths
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.training.state import TrainerState, save_checkpoint
from tests import tiny


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_file_and_dir_follow_the_umask(tmp_path: Path, umask: int) -> None:
    with atomic_file(tmp_path / "weights.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert _mode(tmp_path / "weights.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "model") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "weights.bin"]  # no temporaries left


def test_adapters_and_checkpoints_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = tiny.llama()
    add_lora(model, LoraConfig(rank=2, targets=("q_proj",)))
    save_adapter(model, tmp_path / "adapter")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = save_checkpoint(tmp_path / "checkpoints", model=model, optimizer=optimizer, scheduler=scheduler,
                           state=TrainerState(step=3))
    files = [*(tmp_path / "adapter").iterdir(), *step.iterdir()]
    assert {f.name for f in files} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert {f.name: _mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_a_failed_atomic_file_leaves_the_target_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "keep.txt") as tmp:
        tmp.write_text("new, half written")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("piece", [3, 5, 64])  # lines that start, end and straddle the read pieces
def test_check_line_lengths_names_the_first_long_line(tmp_path: Path, piece: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_SCAN_BYTES", piece)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"1234567890\n\n12345678901\n" + b"x" * 40)
    check_line_lengths(path, max_line_bytes=40)
    with pytest.raises(UsageError, match=r"rows.jsonl, line 3: longer than 10 bytes"):
        check_line_lengths(path, max_line_bytes=10)
    with pytest.raises(UsageError, match=r"rows.jsonl, line 4: longer than 39 bytes"):
        check_line_lengths(path, max_line_bytes=39)
