"""Property tests of the data loaders: no file content crashes them with an unexpected error.

Any bytes in a .jsonl / .json / .csv / .parquet file, read and rendered through a template, give
rows or an error of a kind the ``splice`` command turns into one line with exit code 2
(splice's UsageError, or the ValueError / TypeError / KeyError the data layer raises for bad
input), never an AttributeError, IndexError, a pyarrow crash or a traceback of another kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.core.errors import SpliceError
from splice.data.rows import PromptTemplate, read_rows, tokenize_rows
from tests.tiny import build_tiny_tokenizer

CLEAR = (SpliceError, ValueError, TypeError, KeyError)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["q", "a", "x"]), inner, max_size=3),
    max_leaves=8,
)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_and_render(path: Path) -> None:
    rows = read_rows(path)
    template = PromptTemplate("Q: {q}\nA: ", "{a}")
    tokenize_rows(rows, build_tiny_tokenizer(), template=template, max_length=64)


def _check(path: Path) -> None:
    try:
        _read_and_render(path)
    except CLEAR as error:
        assert str(error).strip(), f"{type(error).__name__} with no message"


@SETTINGS
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_any_bytes(tmp_path: Path, raw: bytes, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(raw)
    _check(path)


@SETTINGS
@given(values=st.lists(JSON_VALUES, min_size=1, max_size=5), as_array=st.booleans())
def test_any_json_values(tmp_path: Path, values: list, as_array: bool) -> None:
    path = tmp_path / ("data.json" if as_array else "data.jsonl")
    text = json.dumps(values) if as_array else "\n".join(json.dumps(v) for v in values)
    path.write_text(text)
    _check(path)


@SETTINGS
@given(cells=st.lists(st.lists(st.text(max_size=6), min_size=1, max_size=3), min_size=1, max_size=4))
def test_any_csv_cells(tmp_path: Path, cells: list) -> None:
    path = tmp_path / "data.csv"
    path.write_text("q,a\n" + "\n".join(",".join(json.dumps(c) for c in row) for row in cells))
    _check(path)
