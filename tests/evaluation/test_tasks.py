"""splice.evaluation.tasks: the function-naming task's prompt, JSON parsing and metrics."""

from __future__ import annotations

import pytest

from splice.data.function_names import function_name_template
from splice.data.rows import IGNORE_INDEX, tokenize_rows
from splice.evaluation.tasks import (
    function_name_prompt,
    function_names_task,
    name_metrics,
    name_words,
    parse_name,
)


def test_template_trains_on_the_json_answer_only(tiny_tokenizer) -> None:
    row = {"module": "m", "code": "def fcn_0(path):\n    return open(path).read()", "name": "read_file"}
    data = tokenize_rows([row], tiny_tokenizer, template=function_name_template(), max_length=512)
    (example,) = data.examples
    answer = [t for t in example.labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer) == '{"name": "read_file"}<|im_end|>'
    prompt = function_name_prompt(row, tiny_tokenizer)
    assert tiny_tokenizer.decode(example.input_ids[: len(example.input_ids) - len(answer)]) == prompt
    assert "Code:\ndef fcn_0(path):" in prompt and "snake_case" in prompt and '{"name": "function_name"}' in prompt
    assert prompt.startswith("<|im_start|>system\nGiven the following code")
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('{"name": "read_file"}', "read_file"),
        ('Sure! Here it is: {"name": "x"} and {"name": "y"}', "x"),
        ('{"other": 1} then {"name": "second"}', "second"),
        ('{"name": 3}', None),
        ('{"name": "unterminated"', None),
        ("read_file", None),
        ("", None),
        ('{"outer": {"name": "inner"}}', "inner"),
    ],
)
def test_parse_name(text: str, name: str | None) -> None:
    assert parse_name(text) == name


def test_name_words() -> None:
    assert name_words("read_file") == ["read", "file"]
    assert name_words("getHTTP_url2") == ["get", "http", "url2"]
    assert name_words("__init__") == ["init"]


def test_name_metrics_hand_computed() -> None:
    predictions = ['{"name": "read_file"}', '{"name": "read_text_file"}', "oops", '{"name": "write"}',
                   '{"name": "get_get_value"}']
    targets = ["read_file", "read_file", "read_file", "read_file_bytes", "get_value"]
    metrics = name_metrics(predictions, targets)
    # F1 per example: 1; P=2/3 R=1 -> 0.8; invalid -> 0; 0; multiset {get,get,value} vs {get,value} -> 0.8
    assert metrics == pytest.approx({"json_valid": 4 / 5, "exact_match": 1 / 5, "word_f1": 2.6 / 5})
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        name_metrics(["a", "b"], ["a"])


def test_function_names_task_scores_the_json_name(tiny_tokenizer) -> None:
    task = function_names_task()
    row = {"module": "m", "code": "def fcn_0():\n    return 1", "name": "one"}
    assert task.reference(row) == "one" and task.prompt(row, tiny_tokenizer) == function_name_prompt(row, tiny_tokenizer)
    assert task.score(['{"name": "one"}', "one"], ["one", "one"]) == {"json_valid": 0.5, "exact_match": 0.5,
                                                                    "word_f1": 0.5}
