"""splice.data.formats: every accepted shape, multi-turn labels, value types, datasets sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splice.data.formats import FORMATS, choose_template, columns_of, detect_format
from splice.data.rows import (
    IGNORE_INDEX,
    ChatTemplate,
    PromptTemplate,
    check_template,
    read_rows,
    tokenize_rows,
)


def _trained_texts(tokenizer, example) -> list[str]:
    """The decoded runs of trained tokens of one example, in order."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(r) for r in runs]


def _one(tokenizer, row, **options):
    template = choose_template(set(row), **options)
    return template, tokenize_rows([row], tokenizer, template=template, max_length=256).examples[0]


def test_alpaca_renders_its_input_as_the_alpaca_template_does(tiny_tokenizer) -> None:
    row = {"instruction": "Translate to French", "input": "cat", "output": "chat"}
    template, example = _one(tiny_tokenizer, row)
    prompt, answer = template.render(row)
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                      "further context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\nTranslate to French\n\n### Input:\ncat\n\n### Response:\n")
    assert answer == "chat"
    assert _trained_texts(tiny_tokenizer, example) == ["chat<|im_end|>"]
    no_input = template.render({**row, "input": ""})[0]
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nTranslate to French\n\n### Response:\n")
    # with --chat the instruction and input are the user turn
    chat = choose_template(set(row), chat=True)
    assert isinstance(chat, ChatTemplate)
    assert chat.render(row)[0] == {"role": "user", "content": "Translate to French\n\ncat"}


@pytest.mark.parametrize(
    ("row", "name", "answer"),
    [
        ({"prompt": "2+2=", "completion": "4"}, "prompt/completion", "4"),
        ({"prompt": "2+2=", "response": "4"}, "prompt/response", "4"),
        ({"instruction": "Name a prime", "response": "7"}, "instruction/response", "7"),
        ({"instruction": "Name a prime", "output": "7"}, "alpaca", "7"),
        ({"input": "2+2=", "output": "4"}, "input/output", "4"),
    ],
)
def test_prompt_answer_shapes(tiny_tokenizer, row, name, answer) -> None:
    assert detect_format(set(row)).name == name
    template, example = _one(tiny_tokenizer, row)
    assert isinstance(template, PromptTemplate) and template.render(row)[1] == answer
    assert _trained_texts(tiny_tokenizer, example) == [answer + "<|im_end|>"]
    assert "Name a prime" in template.render(row)[0] or "2+2=" in template.render(row)[0]


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]
SHAREGPT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Bye."}]


@pytest.mark.parametrize("row", [{"messages": CHAT}, {"conversations": SHAREGPT}], ids=["chat", "sharegpt"])
def test_conversations_train_every_assistant_turn(tiny_tokenizer, row) -> None:
    _, every = _one(tiny_tokenizer, row)
    assert _trained_texts(tiny_tokenizer, every) == ["Hello!<|im_end|>", "Bye.<|im_end|>"]
    # the whole conversation is there, token for token, as the chat template renders it
    rendered = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tiny_tokenizer.decode(every.input_ids) == rendered.removesuffix("\n")
    _, last = _one(tiny_tokenizer, row, last_turn_only=True)
    assert last.input_ids == every.input_ids
    assert _trained_texts(tiny_tokenizer, last) == ["Bye.<|im_end|>"]


def test_system_prompt_leads_a_conversation_without_one(tiny_tokenizer) -> None:
    template = choose_template({"messages"}, system_prompt="Be brief.")
    assert template.render({"messages": CHAT})[0] == {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "Mine."}, *CHAT]
    assert template.render({"messages": own})[0]["content"] == "Mine."


def test_unknown_columns_list_every_accepted_shape() -> None:
    with pytest.raises(ValueError, match=r"columns \['a', 'q'\]") as caught:
        detect_format({"q", "a"})
    message = str(caught.value)
    assert "\n" not in message and "--prompt-template" in message
    for shape in FORMATS:
        assert shape.name in message and all(c in message for c in shape.columns)


@pytest.mark.parametrize("bad", [None, True, [1, 2], {"x": 1}], ids=["null", "bool", "list", "dict"])
def test_template_values_must_be_strings_or_numbers(bad) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": bad}]
    template = choose_template({"prompt", "completion"})
    with pytest.raises(ValueError, match=r"data.jsonl, row 2: column 'completion' holds .*strings or numbers"):
        check_template(rows, template, where="data.jsonl")
    numbers = [{"prompt": 2, "completion": 4.5}]
    check_template(numbers, template)  # numbers are written as text on purpose
    assert template.render(numbers[0]) == ("2", "4.5")


def test_bad_conversations_name_the_row(tiny_tokenizer) -> None:
    template = choose_template({"conversations"})
    rows = [{"conversations": SHAREGPT}, {"conversations": [{"from": "robot", "value": "x"}]}]
    with pytest.raises(ValueError, match=r"row 2: conversations\[0\] has 'from' 'robot'; use one of"):
        check_template(rows, template)
    with pytest.raises(ValueError, match=r"row 1: .*must be a non-empty list"):
        tokenize_rows([{"conversations": "hi"}], tiny_tokenizer, template=template, max_length=64)
    with pytest.raises(ValueError, match=r"row 1: .*no 'conversations' column"):
        check_template([{"messages": []}], template)


def test_datasets_objects_and_saved_folders(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    dataset = datasets.Dataset.from_list(rows)
    assert read_rows(dataset) == rows
    dataset.save_to_disk(str(tmp_path / "one"))
    assert read_rows(tmp_path / "one") == rows
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    assert read_rows(str(tmp_path / "dict")) == rows
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(ValueError, match=r"splits \['test'\] and no 'train'"):
        read_rows(tmp_path / "notrain")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a data file"):
        read_rows(tmp_path / "plain")


def test_bad_data_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                    + json.dumps({"prompt": "c", "completion": None}) + "\n")
    config = TrainConfig(model=str(tmp_path / "no-such-model"), data=str(data), output_dir=str(tmp_path / "o"),
                         val_fraction=0.0)
    with pytest.raises(ValueError, match=r"d.jsonl, row 2: column 'completion' holds None"):
        train(config)  # the model path does not exist: the data error came first


def test_the_readme_examples_are_accepted(tiny_tokenizer) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = readme.split("## Your own data")[1].split("```jsonl\n")[1:]
    names = []
    for block in blocks:
        rows = [json.loads(line) for line in block.split("```")[0].splitlines() if line.strip()]
        assert len(rows) == 3
        names.append(detect_format(set(rows[0])).name)
        template = choose_template(columns_of(rows))
        tokenize_rows(rows, tiny_tokenizer, template=template, max_length=256)
    assert names == ["prompt/completion", "alpaca", "instruction/response", "chat", "sharegpt"]
    dolly = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d", "context": "e"}]
    prompt = choose_template(columns_of(dolly)).render(dolly[1])[0]
    assert "### Input:\ne\n" in prompt  # an optional column that only later rows have is still used


def test_templates_that_reach_past_a_column_are_refused_before_any_row() -> None:
    with pytest.raises(ValueError) as refused:
        choose_template({"question", "answer"}, prompt_template="Q: {question.__class__.__mro__}",
                        response_template="{answer}")
    message = str(refused.value)
    assert "\n" not in message and "'Q: {question.__class__.__mro__}'" in message
    assert "{question.__class__.__mro__}" in message and "only plain {column} fields" in message
    with pytest.raises(ValueError, match=r"response template '\{answer!s\}' has the field \{answer!s\}"):
        choose_template({"question", "answer"}, prompt_template="Q: {question}", response_template="{answer!s}")
    plain = choose_template({"question", "answer"}, prompt_template="Q: {question}", response_template="{answer}")
    assert plain.render({"question": "2+2", "answer": 4}) == ("Q: 2+2", "4")
