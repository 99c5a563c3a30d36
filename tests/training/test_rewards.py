"""splice.training.rewards: loading reward functions (files, built-ins), their one-line errors, and
scoring completions with them (TRL's signature, weights, bad values named by row)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from splice.core.errors import RunError, UsageError
from splice.training.rewards import BUILTINS, check_columns, load_rewards, parse_rewards, score

REWARDS_PY = '''
calls = []

def length_reward(prompts, completions, **kwargs):
    calls.append(sorted(kwargs))
    return [float(len(c)) for c in completions]

def echo_column(prompts, completions, target, **kwargs):
    return [float(c == t) for c, t in zip(completions, target)]

def boom(prompts, completions, **kwargs):
    return [1.0 / (c != "bad") for c in completions]   # ZeroDivisionError on "bad"

def short(prompts, completions, **kwargs):
    return [1.0]

def nan_on_second(prompts, completions, **kwargs):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]

def none_reward(prompts, completions, **kwargs):
    return [None for _ in completions]

def flags(prompts, completions, **kwargs):
    return [c.startswith("a") for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def _score(spec: str | Any, completions: list[Any], **columns: list[Any]) -> list[float]:
    rewards = load_rewards([spec])
    rows = [f"training row {i + 1}" for i in range(len(completions))]
    result = score(rewards, prompts=["p"] * len(completions), completions=completions,
                   completion_ids=[[1, 2]] * len(completions), columns=columns, rows=rows)
    return result.each[rewards[0].name]


def test_a_file_function_gets_trls_arguments(reward_file: Path) -> None:
    rewards = load_rewards([f"{reward_file}:length_reward", f"{reward_file}:echo_column"], [0.5, 2.0])
    assert [r.name for r in rewards] == ["length_reward", "echo_column"]
    result = score(rewards, prompts=["p", "p"], completions=["ab", "xyz"], completion_ids=[[1], [2, 3]],
                   columns={"target": ["ab", "no"]}, rows=["row 1", "row 2"])
    assert result.each == {"length_reward": [2.0, 3.0], "echo_column": [1.0, 0.0]}
    assert result.total == [0.5 * 2 + 2.0 * 1, 0.5 * 3 + 0.0]
    module_calls = rewards[0].fn.__globals__["calls"]
    assert module_calls == [["completion_ids", "target"]]  # the columns and completion_ids, as TRL passes


def test_builtin_rewards_score_the_embedded_tasks_json(tmp_path: Path) -> None:
    completions = ['{"name": "read_file"}', '{"name": "read_the_file"}', "read_file", '{"name": "write"}']
    names = ["read_file"] * 4
    assert _score("builtin:json_valid", completions) == [1.0, 1.0, 0.0, 1.0]
    assert _score("builtin:exact_match", completions, name=names) == [1.0, 0.0, 0.0, 0.0]
    f1 = _score("builtin:word_f1", completions, name=names)
    assert f1 == pytest.approx([1.0, 0.8, 0.0, 0.0])  # read_the_file: p 2/3, r 1 -> 0.8
    # chat completions (TRL's shape for chat prompts) and the "reference" column work too
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert _score("builtin:word_f1", chat, reference=names) == pytest.approx(f1)
    assert set(BUILTINS) == {"json_valid", "exact_match", "word_f1"}


def test_check_columns_wants_a_reference_for_word_f1() -> None:
    check_columns(load_rewards(["builtin:json_valid"]), {"prompt"}, where="data.jsonl")  # needs none
    check_columns(load_rewards(["builtin:word_f1"]), {"prompt", "name"}, where="data.jsonl")
    with pytest.raises(UsageError, match=r"--reward builtin:word_f1: data.jsonl has no name or reference column"):
        check_columns(load_rewards(["builtin:word_f1"]), {"prompt", "answer"}, where="data.jsonl")


@pytest.mark.parametrize(("spec", "message"), [
    ("missing.py:f", r"--reward missing.py:f: missing.py does not exist"),
    ("{file}:nope", r"my_rewards.py defines no 'nope'; it defines .*boom.*length_reward"),
    ("{file}:NOT_A_FUNCTION", r"NOT_A_FUNCTION in .*my_rewards.py is a int, not a function"),
    ("{file}", r"give FILE.py:FUNCTION"),
    ("builtin:bleu", r"no built-in reward 'bleu'; the built-ins are builtin:exact_match, builtin:json_valid"),
])
def test_bad_reward_specs_are_one_line(reward_file: Path, spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as error:
        load_rewards([spec.format(file=reward_file)])
    assert "\n" not in str(error.value)


def test_a_file_that_fails_to_import_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UsageError, match=r"--reward .*broken.py:f: importing .*broken.py raised "
                                         r"ModuleNotFoundError: No module named 'not_a_module_anywhere'"):
        load_rewards([f"{broken}:f"])


def test_two_files_of_one_name_do_not_clash(tmp_path: Path) -> None:
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "r.py").write_text(f"def f(prompts, completions, **kw):\n    return [{value}] * len(completions)\n")
    rewards = load_rewards([f"{tmp_path / 'a' / 'r.py'}:f", f"{tmp_path / 'b' / 'r.py'}:f"])
    result = score(rewards, prompts=["p"], completions=["c"], completion_ids=[[1]], columns={}, rows=["row 1"])
    assert [r.name for r in rewards] == ["f", "f_1"]  # the metrics keep them apart
    assert result.each == {"f": [1.0], "f_1": [2.0]}


def test_weights_and_specs_from_option_text(reward_file: Path) -> None:
    rewards = parse_rewards(f"builtin:json_valid,{reward_file}:length_reward", "1,0.25")
    assert [(r.name, r.weight) for r in rewards] == [("json_valid", 1.0), ("length_reward", 0.25)]
    with pytest.raises(UsageError, match=r"--reward-weights: 1 weights for 2 rewards"):
        parse_rewards("builtin:json_valid,builtin:word_f1", "1")
    with pytest.raises(UsageError, match=r"--reward-weights one: give comma-separated numbers"):
        parse_rewards("builtin:json_valid", "one")
    with pytest.raises(UsageError, match=r"--reward-weights: nan is not a finite number"):
        load_rewards(["builtin:json_valid"], [math.nan])
    with pytest.raises(UsageError, match=r"GRPO needs a reward: --reward FILE.py:FUNCTION"):
        parse_rewards(None, None)


def test_a_reward_that_raises_names_the_row(reward_file: Path) -> None:
    with pytest.raises(RunError, match=r"reward .*my_rewards.py:boom raised ZeroDivisionError: .* \(on training "
                                       r"row 2\)$"):
        _score(f"{reward_file}:boom", ["good", "bad", "good"])


def test_wrong_counts_and_non_finite_values_are_named(reward_file: Path) -> None:
    with pytest.raises(RunError, match=r"my_rewards.py:short returned 1 values for 3 completions \(training row 1 "
                                       r"and 2 other rows\); return one float per completion"):
        _score(f"{reward_file}:short", ["a", "b", "c"])
    with pytest.raises(RunError, match=r"nan_on_second returned nan for completion 1 of the step, from training "
                                       r"row 2; every reward must be a finite number"):
        _score(f"{reward_file}:nan_on_second", ["a", "b", "c"])
    with pytest.raises(RunError, match=r"none_reward returned None for completion 0"):
        _score(f"{reward_file}:none_reward", ["a"])
    assert _score(f"{reward_file}:flags", ["ab", "b"]) == [1.0, 0.0]  # bools count as 0/1


def test_python_functions_are_rewards_too() -> None:
    def shout(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
        return [float(c.isupper()) for c in completions]

    assert _score(shout, ["HI", "hi"]) == [1.0, 0.0]
