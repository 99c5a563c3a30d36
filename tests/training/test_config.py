"""TrainConfig and config files: every bad value is a UsageError naming the option, nothing else.

Property tests (hypothesis) throw arbitrary values at every option and at config files; the only
exception allowed out is splice's own :class:`UsageError`, and a config that constructs passes
its own checks again.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.core.errors import SpliceError, UsageError
from splice.training.config import RULES, TrainConfig, check_options, flag, load_config_file

NAMES = [f.name for f in fields(TrainConfig)]

# Anything a user, a TOML/YAML file or a careless caller could hand over.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["all-linear", "q_proj,v_proj", "(", "[a-", "*", "cuda:7", "cpu", "auto", "adamw",
                     "cosine", "bf16", "a{1000000000}", "(?P<x", "\\"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(NAMES), ANY_VALUE, max_size=6))
def test_no_input_crashes_with_anything_but_usage_error(values) -> None:
    try:
        config = TrainConfig(**values)
    except UsageError as error:
        message = str(error)
        assert "\n" not in message and message.startswith("invalid training options: ")
        assert any(name in message for name in values)  # names an option it was given
        return
    config.validate()  # a constructed config stays valid
    assert check_options({f.name: getattr(config, f.name) for f in fields(config)}) == []


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), ANY_VALUE, max_size=4))
def test_one_bad_option_is_named_with_its_flag(values) -> None:
    problems = check_options(values, partial=True)
    for problem in problems:
        assert any(name in problem and flag(name) in problem for name in values)


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        (dict(max_grad_norm=-1.0), "max_grad_norm must be >= 0"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(alpha=-8.0), "alpha must be > 0"),
        (dict(epochs=0, steps=None), "epochs must be > 0"),
        (dict(epochs=-1.0), "epochs must be > 0"),
        (dict(epochs=3, steps=40), "give steps or epochs, not both"),
        (dict(eval_batches=0), "eval_batches must be >= 1"),
        (dict(max_rows=-5), "max_rows must be >= 1"),
        (dict(eval_samples=-1), "eval_samples must be >= 0"),
        (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 1"),
        (dict(device="gpu"), "device must be auto, cpu"),
        (dict(targets="q_proj("), "valid regex"),
        (dict(targets=" , "), "comma-separated module names"),
        (dict(rank="8"), "rank must be int, got '8' of type str (--rank)"),
        (dict(lr=float("nan")), "lr must be float (finite)"),
        (dict(rank=True), "rank must be int"),
        (dict(chat="yes"), "chat must be bool"),
        (dict(system_prompt="be brief"), "only used with chat"),
        (dict(keep_attention=True), "keep_attention needs gradient_checkpointing"),
        (dict(embeddings_on_host=True, cuda_graphs=True), "a CUDA graph cannot capture: drop cuda_graphs"),
        (dict(prompt_template="{x}"), "both prompt_template and response_template"),
        (dict(seed=2**70), "seed must be in [0, 2**63)"),
    ],
)
def test_bad_option_is_named(options, phrase) -> None:
    with pytest.raises(UsageError, match="^invalid training options: .*" + _escape(phrase)):
        TrainConfig(**options)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_whole_numbers_are_floats_and_good_options_pass() -> None:
    config = TrainConfig(alpha=32, epochs=2, steps=None, max_grad_norm=0, targets="q_proj,v_proj")
    assert isinstance(config.alpha, float) and config.alpha == 32.0 and config.max_grad_norm == 0.0
    assert config.target_spec() == ("q_proj", "v_proj")
    assert TrainConfig(targets=r"model\.layers\.\d+\.self_attn\.q_proj").target_spec().startswith("model")


def test_validate_sees_changes_after_construction() -> None:
    config = TrainConfig()
    config.max_grad_norm = -1.0
    with pytest.raises(UsageError, match="max_grad_norm"):
        config.validate()


def test_every_rule_names_known_options() -> None:
    for rule in RULES:
        assert set(rule.names) <= set(NAMES), rule


@pytest.mark.parametrize(
    ("name", "text", "phrase"),
    [
        ("run.toml", '[train]\nrank = "eight"\n', "run.toml: rank must be int, got 'eight'"),
        ("run.toml", "lr = -1e-3\n", "lr must be > 0"),
        ("run.toml", "alpha = 0\n", "alpha must be > 0"),
        ("run.toml", "rank = \n", "not valid TOML"),
        ("run.toml", "bogus = 1\n", "unknown options bogus"),
        ("run.yaml", "- 1\n- 2\n", "holds a list"),
        ("run.yaml", "rank: [1, 2\n", "not valid YAML"),
        ("run.yaml", "steps: 1.5\n", "steps must be int"),
        ("run.json", "{}", "use a .toml or .yaml file"),
    ],
)
def test_config_file_errors_name_the_file(tmp_path, name, text, phrase) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_config_file(path)
    assert phrase in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_file_not_utf8_missing_or_a_directory(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"rank = 8 # \xff\xfe\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config_file(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_config_file(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="is a directory"):
        load_config_file(tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80), raw=st.binary(max_size=40), suffix=st.sampled_from([".toml", ".yaml"]))
def test_no_config_file_crashes_with_anything_but_usage_error(tmp_path: Path, text, raw, suffix) -> None:
    path = tmp_path / f"c{suffix}"
    for content in (text.encode("utf-8", "surrogatepass") if _encodable(text) else b"", raw):
        path.write_bytes(content)
        try:
            values = load_config_file(path)
        except SpliceError as error:
            assert "\n" not in str(error)
            continue
        try:
            TrainConfig(**values)
        except UsageError:
            pass


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_floats_in_messages_are_finite_checks() -> None:
    assert check_options({"alpha": math.inf})[0].startswith("alpha must be float (finite)")


def test_steps_epochs_or_the_default() -> None:
    assert TrainConfig().total_steps(7) == 40  # neither, on the embedded task: DEFAULT_STEPS
    assert TrainConfig(steps=5).total_steps(7) == 5
    assert TrainConfig(epochs=3).total_steps(7) == 21  # epochs alone are not ignored
    assert TrainConfig(epochs=3, grad_accum=2).total_steps(7) == 11
    assert TrainConfig(epochs=0.1).total_steps(7) == 1


def test_from_sources_flags_over_the_file(tmp_path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text("[train]\nrank = 4\nalpha = 8\nepochs = 2\n")
    config = TrainConfig.from_sources({"rank": 8, "alpha": None, "steps": 5}, config_file=config_file)
    assert (config.rank, config.alpha, config.steps, config.epochs) == (8, 8.0, 5, None)
    assert TrainConfig.from_sources({"steps": 0}).epochs == 1.0
    with pytest.raises(UsageError, match="both steps \\(3\\) and epochs \\(1\\) given in the flags"):
        TrainConfig.from_sources({"steps": 3, "epochs": 1})


def test_user_data_defaults_to_epochs() -> None:
    assert TrainConfig(data="rows.jsonl").epochs_planned() == 3.0
    assert TrainConfig(data="rows.jsonl").total_steps(7) == 21
    assert TrainConfig(data="rows.jsonl", steps=4).total_steps(7) == 4
    assert TrainConfig().epochs_planned() is None  # the embedded task counts steps
