"""splice.models.gguf_header: scalars (the context length, token ids) read from GGUF headers the ``gguf`` package
writes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from splice.models.gguf_header import gguf_context_length, gguf_scalars


def _write(path: Path, *, context: int | None, arch: str = "llama") -> Path:
    """A GGUF file whose context length (if any) comes after keys of every kind the scan must skip:
    strings, arrays of numbers and of strings, 8- to 64-bit scalars, and one tensor after the keys."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a longer token"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25])
    writer.add_uint8("test.u8", 7)
    writer.add_int64("test.i64", -3)
    writer.add_float64("test.f64", 0.5)
    writer.add_bool("test.flag", True)
    if context is not None:
        writer.add_context_length(context)
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("context", [1, 4096, 131072, 2**32 - 1])
def test_reads_the_context_length_past_other_keys(tmp_path: Path, context: int) -> None:
    assert gguf_context_length(_write(tmp_path / "m.gguf", context=context)) == context


def test_the_architecture_prefix_does_not_matter(tmp_path: Path) -> None:
    assert gguf_context_length(_write(tmp_path / "q.gguf", context=2048, arch="qwen2")) == 2048


def test_a_64_bit_or_zero_context_length(tmp_path: Path) -> None:
    for value, want in ((2**40, 2**40), (0, None)):  # u64 is read as well; 0 means no limit known
        writer = gguf.GGUFWriter(str(tmp_path / "u64.gguf"), "llama")
        writer.add_uint64("llama.context_length", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        assert gguf_context_length(tmp_path / "u64.gguf") == want


def test_none_when_absent_not_gguf_truncated_or_missing(tmp_path: Path) -> None:
    assert gguf_context_length(_write(tmp_path / "none.gguf", context=None)) is None
    whole = _write(tmp_path / "cut.gguf", context=4096).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:60])  # inside the key-value section
    assert gguf_context_length(cut) is None
    (tmp_path / "text.gguf").write_text("not a gguf file")
    assert gguf_context_length(tmp_path / "text.gguf") is None
    assert gguf_context_length(tmp_path / "absent.gguf") is None


def test_the_scalars_asked_for_and_only_those(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.gguf", context=4096)
    got = gguf_scalars(path, lambda name: name.startswith("test.") or name == "tokenizer.ggml.tokens")
    assert got == {"test.u8": 7, "test.i64": -3, "test.f64": 0.5, "test.flag": True}  # the array is no scalar
    assert gguf_scalars(path, lambda name: False) == {}
    assert gguf_scalars(tmp_path / "absent.gguf", lambda name: True) == {}
