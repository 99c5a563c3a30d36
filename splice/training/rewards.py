"""GRPO's reward functions: the user's own (``--reward FILE.py:FUNCTION``) and the built-in ones.

A reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float]``: it is
called with keyword arguments ``prompts`` (one per completion, a prompt repeated for each of its
completions), ``completions`` (the generated text; for chat-message prompts, TRL's
``[{"role": "assistant", "content": text}]``), ``completion_ids`` (the generated token ids) and every
other column of the rows, as lists aligned with the completions. It returns one float per
completion (None counts as NaN, as in TRL, and is refused). Several rewards add up, weighted by
``--reward-weights`` (default 1 each).

``FILE.py:FUNCTION`` imports the file as a module by its path (it is the user's code; they asked to
run it); nothing is ever unpickled. ``builtin:NAME`` names one of :data:`BUILTINS`, which score the
embedded function-naming task's JSON answer against the row's ``name`` column (or ``reference``):
``json_valid``, ``exact_match`` and ``word_f1``, the held-out metrics of
:func:`splice.evaluation.tasks.name_metrics`, per completion.

Problems are one line each: a spec, file or function that is not there or not callable
(:class:`~splice.core.errors.UsageError`, before any model loads), and at run time a reward that
raises, returns the wrong number of values or a non-finite one (:class:`~splice.core.errors.RunError`,
naming the function and the data row).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.core.errors import RunError, UsageError, one_line

__all__ = ["BUILTINS", "REFERENCE_COLUMNS", "Reward", "RewardScores", "check_columns", "completion_text",
           "load_rewards", "parse_rewards", "score"]

RewardFn = Callable[..., Sequence[Any]]
REFERENCE_COLUMNS = ("name", "reference")  # where the built-ins find the right answer, first present wins


# ----------------------------------------------------------------------------- built-in rewards


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of TRL's chat-message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is text or a list of chat messages, got {type(completion).__name__}")


def _references(columns: Mapping[str, Sequence[Any]]) -> list[str]:
    for name in REFERENCE_COLUMNS:
        if name in columns:
            return [str(value) for value in columns[name]]
    raise KeyError(f"no {' or '.join(repr(c) for c in REFERENCE_COLUMNS)} column with the reference answer "
                   f"(columns: {', '.join(sorted(columns)) or 'none'})")


def _name_metric(metric: str) -> RewardFn:
    """A reward: ``metric`` of :func:`~splice.evaluation.tasks.name_metrics` for each completion alone."""

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        from splice.evaluation.tasks import name_metrics  # (transformers: only when a reward runs)

        references = _references(columns) if metric != "json_valid" else [""] * len(completions)
        return [name_metrics([completion_text(c)], [ref])[metric]
                for c, ref in zip(completions, references, strict=True)]

    reward.__name__ = metric
    reward.__doc__ = f"1 per completion whose JSON answer scores {metric} (the embedded task's metric)."
    return reward


# name -> (function, whether it reads the reference column)
BUILTINS: dict[str, tuple[RewardFn, bool]] = {
    "json_valid": (_name_metric("json_valid"), False),
    "exact_match": (_name_metric("exact_match"), True),
    "word_f1": (_name_metric("word_f1"), True),
}


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Reward:
    """One reward function: ``name`` (metrics say ``reward/<name>``), where it came from, its weight."""

    name: str
    spec: str  # "builtin:word_f1", "rewards.py:length_penalty" or the Python object's repr
    fn: RewardFn
    weight: float = 1.0
    needs_reference: bool = False  # a built-in that reads the name / reference column


def _load_file(spec: str) -> RewardFn:
    """The function ``FUNCTION`` of ``FILE.py``, imported as a module by path."""
    file, _, function = spec.rpartition(":")
    if not file or not function:
        raise UsageError(f"--reward {spec}: give FILE.py:FUNCTION (e.g. rewards.py:format_reward) or "
                         f"builtin:NAME ({', '.join(sorted(BUILTINS))})")
    path = Path(file).expanduser()
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"--reward {spec}: {path} {why}; pass an existing Python file")
    # A module name unique to the file's path, so two reward files of the same name do not clash.
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    module_spec = importlib.util.spec_from_file_location(f"splice_reward_{path.stem}_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--reward {spec}: {path} cannot be imported as a Python module; pass a .py file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code: any error it raises while importing
        raise UsageError(f"--reward {spec}: importing {path} raised {type(error).__name__}: "
                         f"{one_line(str(error))}") from error
    if not hasattr(module, function):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"--reward {spec}: {path} defines no {function!r}; it defines "
                         f"{', '.join(defined) or 'no public functions'}")
    fn = getattr(module, function)
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {function} in {path} is a {type(fn).__name__}, not a function; "
                         "pass a function f(prompts, completions, **columns) -> list[float]")
    return fn


def _one(spec: str | RewardFn, weight: float) -> Reward:
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return Reward(name=name, spec=repr(spec), fn=spec, weight=weight)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise UsageError(f"--reward {spec}: no built-in reward {name!r}; the built-ins are "
                             f"{', '.join('builtin:' + n for n in sorted(BUILTINS))}")
        fn, needs = BUILTINS[name]
        return Reward(name=name, spec=spec, fn=fn, weight=weight, needs_reference=needs)
    return Reward(name=spec.rpartition(":")[2], spec=spec, fn=_load_file(spec), weight=weight)


def parse_rewards(reward: str | None, weights: str | None) -> list[Reward]:
    """:func:`load_rewards` from the options' text: ``reward`` comma-separated specs (``--reward`` is
    repeatable), ``weights`` comma-separated numbers."""
    specs = [s.strip() for s in (reward or "").split(",") if s.strip()]
    values: list[float] | None = None
    if weights is not None:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--reward-weights {weights}: give comma-separated numbers, one per --reward "
                             "(e.g. 1,0.5)") from None
    return load_rewards(specs, values)


def load_rewards(specs: Sequence[str | RewardFn], weights: Sequence[float] | None = None) -> list[Reward]:
    """The rewards ``specs`` name (``FILE.py:FUNCTION``, ``builtin:NAME`` or, from Python, functions),
    with ``weights`` (one per reward; default 1 each). Every problem is a one-line UsageError."""
    if not specs:
        raise UsageError("GRPO needs a reward: --reward FILE.py:FUNCTION or --reward builtin:NAME "
                         f"({', '.join(sorted(BUILTINS))}); repeat it for several")
    if weights is not None and len(weights) != len(specs):
        raise UsageError(f"--reward-weights: {len(weights)} weights for {len(specs)} rewards; give one per "
                         "--reward, in the same order")
    for weight in weights or ():
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not math.isfinite(weight):
            raise UsageError(f"--reward-weights: {weight!r} is not a finite number")
    rewards = [_one(spec, float(w)) for spec, w in zip(specs, weights or [1.0] * len(specs), strict=True)]
    seen: dict[str, int] = {}
    for i, reward in enumerate(rewards):  # two rewards of one name: the metrics keep them apart
        if reward.name in seen:
            rewards[i] = Reward(name=f"{reward.name}_{i}", spec=reward.spec, fn=reward.fn, weight=reward.weight,
                                needs_reference=reward.needs_reference)
        seen[reward.name] = i
    return rewards


def check_columns(rewards: Sequence[Reward], columns: set[str], *, where: str) -> None:
    """A built-in that scores against a reference needs the ``name`` or ``reference`` column."""
    for reward in rewards:
        if reward.needs_reference and not columns & set(REFERENCE_COLUMNS):
            raise UsageError(f"--reward {reward.spec}: {where} has no {' or '.join(REFERENCE_COLUMNS)} column to "
                             f"score against (columns: {', '.join(sorted(columns))}); add one, or drop the reward")


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class RewardScores:
    """A step's rewards: ``total[i]`` = sum of weight x reward for completion ``i``; ``each[name]`` per
    reward function (unweighted)."""

    total: list[float]
    each: dict[str, list[float]]


def _call(reward: Reward, prompts: Sequence[Any], completions: Sequence[Any], ids: Sequence[Sequence[int]],
          columns: Mapping[str, Sequence[Any]]) -> Sequence[Any]:
    return reward.fn(prompts=list(prompts), completions=list(completions), completion_ids=[list(i) for i in ids],
                     **{k: list(v) for k, v in columns.items()})


def _raising_row(reward: Reward, prompts: Sequence[Any], completions: Sequence[Any],
                 ids: Sequence[Sequence[int]], columns: Mapping[str, Sequence[Any]]) -> int | None:
    """The first completion that makes ``reward`` raise when scored alone (None: none does)."""
    for i in range(len(completions)):
        try:
            _call(reward, prompts[i : i + 1], completions[i : i + 1], ids[i : i + 1],
                  {k: v[i : i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None


def _span(rows: Sequence[str]) -> str:
    """The rows of a batch, for an error line: the first and how many others."""
    unique = list(dict.fromkeys(rows))
    return unique[0] + (f" and {len(unique) - 1} other rows" if len(unique) > 1 else "")


def _finite(value: Any, *, who: str, row: str, index: int) -> float:
    """``value`` as a float (a bool, NumPy or 0-dim tensor value works), or a RunError naming the row."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if value is None or not math.isfinite(number):
        raise RunError(f"{who} returned {value!r} for completion {index} of the step, from {row}; every reward "
                       "must be a finite number")
    return number


def score(rewards: Sequence[Reward], *, prompts: Sequence[Any], completions: Sequence[Any],
          completion_ids: Sequence[Sequence[int]], columns: Mapping[str, Sequence[Any]],
          rows: Sequence[str]) -> RewardScores:
    """Every reward on every completion (lists aligned with ``completions``); ``rows``: where each
    completion's prompt came from (e.g. ``"training row 7 (prompt 'Name it...')"``), named by the
    one-line RunError a reward that raises or returns bad values gets."""
    n = len(completions)
    each: dict[str, list[float]] = {}
    for reward in rewards:
        who = f"reward {reward.spec}"
        try:
            values = _call(reward, prompts, completions, completion_ids, columns)
        except Exception as error:
            bad = _raising_row(reward, prompts, completions, completion_ids, columns)
            where = rows[bad] if bad is not None else _span(rows)
            raise RunError(f"{who} raised {type(error).__name__}: {one_line(str(error))} (on {where})") from error
        try:
            values = list(values)
        except TypeError:
            raise RunError(f"{who} returned a {type(values).__name__}; return a list of {n} floats, one per "
                           "completion") from None
        if len(values) != n:
            raise RunError(f"{who} returned {len(values)} values for {n} completions ({_span(rows)}); return "
                           "one float per completion")
        each[reward.name] = [_finite(value, who=who, row=rows[i], index=i) for i, value in enumerate(values)]
    total = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(n)]
    return RewardScores(total=total, each=each)
