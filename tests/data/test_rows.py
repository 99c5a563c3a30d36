"""splice.data.rows and splice.data.batching: reading rows, templates, tokenization boundaries, batching
and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from splice.data.batching import batches
from splice.data.rows import (
    IGNORE_INDEX,
    ChatTemplate,
    Example,
    PromptTemplate,
    read_rows,
    split_rows,
    tokenize_rows,
)

ROWS = [{"q": "007", "a": "seven"}, {"q": "x y", "a": "z\u2028z"}]


# ----------------------------------------------------------------------------- read_rows


def test_read_rows_every_format_gives_the_same_rows(tmp_path: Path) -> None:
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n"  # raw U+2028 inside a string
    (tmp_path / "d.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text("q,a\n007,seven\nx y,z\u2028z\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ["d.jsonl", "d.json", "d.csv", "d.parquet"]:
        assert read_rows(tmp_path / name) == ROWS, name  # CSV keeps "007" as text
    assert read_rows(str(tmp_path / "d.jsonl")) == ROWS


def test_read_rows_duck_typed_sources() -> None:
    class FakeDataset:  # what datasets.Dataset offers
        def to_list(self) -> list[dict[str, str]]:
            return list(ROWS)

    assert read_rows(FakeDataset()) == ROWS
    assert read_rows(pa.Table.from_pylist(ROWS)) == ROWS
    assert read_rows(iter(ROWS)) == ROWS
    copied = read_rows(ROWS)
    copied[0]["q"] = "changed"
    assert ROWS[0]["q"] == "007"  # the caller's rows are not mutated


def test_read_rows_errors(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"unknown extension '\.txt'.*parquet.*\.jsonl.*\.csv"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("q,a\n")
    for name in ["empty.jsonl", "empty.csv", "header.csv"]:
        with pytest.raises(ValueError, match="no rows"):
            read_rows(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(TypeError, match="row 1 is a list"):
        read_rows([{"a": 1}, [1, 2]])
    with pytest.raises(TypeError, match="cannot read rows from a int"):
        read_rows(3)


# ----------------------------------------------------------------------------- split_rows


def test_split_rows_is_deterministic_disjoint_and_complete() -> None:
    rows = [{"i": i} for i in range(50)]
    train, val = split_rows(rows, val_fraction=0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(r["i"] for r in train + val) == list(range(50))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # original order kept
    assert split_rows(rows, val_fraction=0.2, seed=3) == (train, val)
    assert split_rows(rows, val_fraction=0.2, seed=4)[1] != val
    assert split_rows(rows, val_fraction=0.0, seed=0) == (rows, [])
    assert len(split_rows(rows[:3], val_fraction=0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="no training rows"):
        split_rows(rows[:1], val_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        split_rows(rows, val_fraction=1.0, seed=0)


# ----------------------------------------------------------------------------- templates + tokenize


def test_prompt_template_missing_column_names_it_and_the_columns() -> None:
    template = PromptTemplate(prompt="Q: {question}", response="{a}")
    with pytest.raises(KeyError, match=r"column 'question'.*\['a', 'q'\]"):
        template.render(ROWS[0])
    with pytest.raises(ValueError, match="positional field"):
        PromptTemplate(prompt="Q: {}", response="{a}").render(ROWS[0])
    braces = PromptTemplate(prompt="{{q}} {q}", response=lambda r: r["a"].upper())
    assert braces.render(ROWS[0]) == ("{q} 007", "SEVEN")


@pytest.mark.parametrize("field", ["q.__class__.__mro__", "q[0]", "q!r", "q:>9", "q:{a.__class__}"])
def test_prompt_templates_allow_plain_column_fields_only(field: str) -> None:
    template = PromptTemplate(prompt="Q: {" + field + "}", response="{a}")
    with pytest.raises(ValueError, match=r"the prompt template 'Q: \{.*' has the field \{.*only plain"):
        template.render(ROWS[0])


def test_tokenize_prompt_template_labels_eos_and_train_on_prompt(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    template = PromptTemplate(prompt="Q: {q}\nA:", response=" {a}")
    data = tokenize_rows(ROWS, tok, template=template, max_length=64)
    assert (data.truncated, data.dropped) == (0, 0)
    prompt = tok("Q: 007\nA:")["input_ids"]
    answer = tok(" seven", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first = data.examples[0]
    assert first.input_ids == prompt + answer
    assert first.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.decode([t for t in first.labels if t != IGNORE_INDEX]) == " seven<|im_end|>"
    full = tokenize_rows(ROWS, tok, template=template, max_length=64, train_on_prompt=True)
    assert full.examples[0].labels == first.input_ids


def test_tokenize_truncates_answers_and_drops_long_prompts(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    template = PromptTemplate(prompt="{q}", response="{a}")
    rows = [{"q": "ab", "a": "cxyzvw"}, {"q": "abcxyzuvwk", "a": "k"}, {"q": "a", "a": "b"}]
    # 1 byte = 1 token here (no merges apply): lengths prompt+answer+eos = 2+7, 10+2, 1+2
    data = tokenize_rows(rows, tok, template=template, max_length=5)
    assert (data.truncated, data.dropped) == (1, 1)
    assert [len(e.input_ids) for e in data.examples] == [5, 3]
    assert tok.decode(data.examples[0].input_ids) == "abcxy"  # the answer lost "zvw" + eos
    assert data.examples[0].labels[:2] == [IGNORE_INDEX] * 2
    with pytest.raises(ValueError, match=r"all 1 rows were dropped.*longest prompt: 10.*raise max_length"):
        tokenize_rows(rows[1:2], tok, template=template, max_length=10)


def test_chat_template_boundary_and_eos(tiny_tokenizer) -> None:
    tok = tiny_tokenizer

    def conversation(row: dict[str, str]) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": "Name it."},
            {"role": "user", "content": row["q"]},
            {"role": "assistant", "content": row["a"]},
        ]

    data = tokenize_rows(ROWS, tok, template=ChatTemplate(conversation), max_length=128)
    example = data.examples[0]
    n_prompt = sum(1 for t in example.labels if t == IGNORE_INDEX)
    prompt_text = tok.apply_chat_template(conversation(ROWS[0])[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(example.input_ids[:n_prompt]) == prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")
    # The answer is the assistant text and its <|im_end|>, without ChatML's trailing newline.
    assert tok.decode(example.input_ids[n_prompt:]) == "seven<|im_end|>"
    assert example.input_ids[-1] == tok.eos_token_id
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    full_ids = tok.apply_chat_template(conversation(ROWS[0]), tokenize=True)["input_ids"]
    assert full_ids[:-1] == example.input_ids  # same tokens as the whole conversation, minus "\n"

    with pytest.raises(ValueError, match="must be the 'assistant'"):
        tokenize_rows(ROWS, tok, template=ChatTemplate(lambda r: conversation(r)[:2]), max_length=64)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has none; use a PromptTemplate"):
        tokenize_rows(ROWS, tok, template=ChatTemplate(conversation), max_length=64)


def test_chat_template_that_rewrites_the_prompt_is_rejected(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    # A template whose generation prompt differs from how it renders the assistant turn.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    template = ChatTemplate(lambda r: [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}])
    with pytest.raises(ValueError, match="not a prefix of the full conversation"):
        tokenize_rows(ROWS, tok, template=template, max_length=64)


# ----------------------------------------------------------------------------- batches


def _examples(lengths: list[int], *, prompt: int = 2, vocab: int = 270, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * min(prompt, n) + ids[prompt:]))
    return out


def test_batches_pad_right_and_mask_labels() -> None:
    examples = _examples([3, 5, 4])
    examples[0] = Example(input_ids=[7, 8, 2], labels=[IGNORE_INDEX, 8, 2])  # ends with eos = pad id 2
    got = batches(examples, batch_size=2, pad_id=2, shuffle=False)
    assert len(got) == 2 and set(got[0]) == {"input_ids", "attention_mask", "labels", "num_tokens"}
    assert [int(b["num_tokens"]) for b in got] == [int(b["attention_mask"].sum()) for b in got]
    first = got[0]
    assert first["input_ids"].shape == (2, 5) and first["input_ids"].dtype == torch.long
    assert first["input_ids"][0].tolist() == [7, 8, 2, 2, 2]
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert first["labels"][0].tolist() == [IGNORE_INDEX, 8, 2, IGNORE_INDEX, IGNORE_INDEX]  # eos kept, pads not
    assert first["labels"][1].tolist() == examples[1].labels
    assert got[1]["input_ids"].shape == (1, 4)  # the last, partial batch is kept


def test_batches_order_depends_only_on_seed_and_epoch() -> None:
    examples = _examples(list(range(3, 23)))

    def order(**kw: int) -> list[int]:
        return [len(row[row != 0]) for b in batches(examples, batch_size=3, pad_id=0, **kw) for row in b["input_ids"]]

    first = order(seed=1, epoch=0)
    assert sorted(first) == list(range(3, 23))  # every example exactly once
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first
    assert [len(e.input_ids) for e in examples] == list(range(3, 23))  # input not reordered


def test_batches_errors() -> None:
    with pytest.raises(ValueError, match="pack=True needs max_length"):
        batches(_examples([3]), batch_size=1, pad_id=0, pack=True)
    with pytest.raises(ValueError, match="6 tokens > max_length=5"):
        batches(_examples([6]), batch_size=1, pad_id=0, max_length=5)


def test_packing_layout() -> None:
    examples = _examples([4, 3, 5, 1, 6])
    got = batches(examples, batch_size=2, pad_id=0, shuffle=False, pack=True, max_length=8)
    # Greedy in order: [4+3], [5+1], [6]; every packed batch is max_length wide (fixed shapes)
    assert [b["input_ids"].shape for b in got] == [(2, 8), (1, 8)]
    assert [int(b["num_tokens"]) for b in got] == [13, 6]  # real tokens, padding excluded
    first = got[0]
    assert "attention_mask" not in first
    assert first["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert first["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 0, 1]
    assert first["input_ids"][0].tolist()[:7] == examples[0].input_ids + examples[1].input_ids
    assert first["labels"][0, 4].item() == IGNORE_INDEX  # no prediction across the boundary
    # Row 2 (6 tokens) is padded by two: input pad, label -100, positions from 0 (a segment of their own)
    assert first["input_ids"][1].tolist()[-2:] == [0, 0]
    assert first["labels"][1].tolist()[-2:] == [IGNORE_INDEX, IGNORE_INDEX]
    assert first["labels"][1, 5].item() == IGNORE_INDEX  # the 1-token segment has nothing to learn
    assert got[1]["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def _per_example_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], segments: list[list[int]]
) -> list[float]:
    """Sum of next-token losses of each segment (``segments[b]`` = segment lengths of row b),
    then the batch's total loss (which also counts any prediction across segment boundaries)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # (B, T-1): loss of predicting token t+1 from position t; 0 where the label is ignored
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    losses = []
    for row, lengths in enumerate(segments):
        start = 0
        for n in lengths:
            losses.append(token_loss[row, start : start + n - 1].sum().item())
            start += n
    return losses + [token_loss.sum().item()]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_losses_equal_unpacked(make_tiny_llama, attn: str) -> None:
    model = make_tiny_llama(attn_implementation=attn)
    # prompt=0 (as with train_on_prompt): every label is set, so boundaries must be masked.
    examples = _examples([5, 9, 3, 7, 6, 4], prompt=0, vocab=270, seed=1)
    # Reference: each example alone, then a padded (unpacked) batch of all of them.
    alone = [_per_example_losses(model, batches([e], batch_size=1, pad_id=0)[0], [[len(e.input_ids)]])[0]
             for e in examples]
    alone.append(sum(alone))
    unpacked = batches(examples, batch_size=6, pad_id=0, shuffle=False)[0]
    padded = _per_example_losses(model, unpacked, [[len(e.input_ids)] for e in examples])
    assert torch.allclose(torch.tensor(padded), torch.tensor(alone), atol=1e-5, rtol=1e-5)

    packed = batches(examples, batch_size=3, pad_id=0, shuffle=False, pack=True, max_length=16)
    assert len(packed) == 1 and packed[0]["input_ids"].shape == (3, 16)  # rows [5+9], [3+7+6], [4]
    segments = [[5, 9], [3, 7, 6], [4]]
    got = _per_example_losses(model, packed[0], segments)
    assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-5, rtol=1e-5)

    # Control: the same rows with a plain 2-D mask let segments attend across, and losses change.
    leaky = {k: v for k, v in packed[0].items() if k != "position_ids"}
    leaky["attention_mask"] = torch.tensor([[1] * sum(s) + [0] * (16 - sum(s)) for s in segments])
    crossed = _per_example_losses(model, leaky, segments)
    assert crossed[0] == pytest.approx(alone[0], abs=1e-5)  # a row's first segment sees nothing before it
    assert not torch.allclose(torch.tensor(crossed[1:5]), torch.tensor(alone[1:5]), atol=1e-3)


def test_a_save_to_disk_folder_passes_preflight_and_a_plain_folder_does_not(tmp_path) -> None:
    """--data takes a save_to_disk folder; any other folder is refused before the model loads."""
    import pytest

    from splice.core.errors import UsageError
    from splice.training.config import TrainConfig
    from splice.training.preflight import _data_file

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    _data_file("data", str(saved))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UsageError, match="is a directory, not a data file"):
        _data_file("data", str(plain))
    _data_file("data", [{"prompt": "a", "completion": "b"}])  # rows from Python: nothing to check
    assert TrainConfig(data=[{"prompt": "a", "completion": "b"}]).data is not None


def test_a_csv_that_is_not_utf8_names_its_line(tmp_path) -> None:
    import pytest

    from splice.core.errors import UsageError

    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,completion\nok,fine\ncaf\xe9,x\n")
    with pytest.raises(UsageError, match=r"rows.csv, line 3: not UTF-8 text \(byte 0xe9"):
        read_rows(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_over_long_line_is_refused_with_its_file_and_line(tmp_path: Path, suffix: str) -> None:
    from splice.core.errors import UsageError

    path = tmp_path / f"rows{suffix}"
    long = "x" * (3 << 20)  # 3 MB in one line: over the 1 MB limit given, within the default
    if suffix == ".jsonl":
        path.write_text('{"q": "a", "a": "b"}\n' + json.dumps({"q": long, "a": "b"}) + "\n")
    else:
        path.write_text(f"q,a\na,b\n{long},b\n")
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(UsageError, match=rf"rows{suffix}, line {line}: longer than 1048576 bytes"):
        read_rows(path, max_line_bytes=1 << 20)
    assert [len(r["q"]) for r in read_rows(path)] == [1, 3 << 20]
    array = tmp_path / "rows.json"  # a .json list is one document: its one line is not a "row line"
    array.write_text(json.dumps([{"q": long, "a": "b"}]))
    assert len(read_rows(array, max_line_bytes=1 << 20)) == 1
