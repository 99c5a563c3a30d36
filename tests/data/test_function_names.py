"""splice.data.function_names: function-name extraction rules, the split, the cache, the real build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import splice.data.function_names as function_names
from splice.data.function_names import SPLITS, build_function_names

MODULE_A = '''
def read_config(path):
    """Read it."""
    with open(path) as f:
        return f.read()

def factorial(n):
    if n < 2:
        return 1
    return n * factorial(n - 1)

def check_limit(value):
    if value > 3:
        raise ValueError("check_limit: too big")
    return value

class Store:
    @property
    def size(self):
        return len(self._items)

    @size.setter
    def size(self, size):
        del self._items[size:]

    def reload_items(self):
        self.reload_items_later = True
        return self.reload_items()

    def __len__(self):
        return len(self._items)

    def _hidden(self):
        return self._items

    def getValue(self):
        return self._items[0]

    def nothing(self):
        """Only a docstring."""

    def abstract_step(self):
        raise NotImplementedError

    def constant(self):
        return 42

def very_long(x):
''' + "".join(f"    x = x + {i}\n" for i in range(45)) + '''    return x
'''
MODULE_B = '''
def read_config(path):
    with open(path) as f:
        return f.read()

def write_config(path, text):
    with open(path, "w") as f:
        f.write(text)
'''
MODULE_ALPHA = "async def fetch_all(urls):\n    return [await fetch(u) for u in urls]\n"
SKIPPED = "def skipped_function(x):\n    return x + 1\n"


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text(MODULE_A)
    (root / "pkg" / "__init__.py").write_text(MODULE_B)
    (root / "alpha.py").write_text(MODULE_ALPHA)
    (root / "pkg" / "broken.py").write_text("def oops(:\n")
    for skipped in ["test", "idlelib", "site-packages", "lib2to3"]:
        (root / skipped).mkdir()
        (root / skipped / "mod.py").write_text(SKIPPED)
    monkeypatch.setattr(function_names, "_stdlib_root", lambda: root)
    return root


def test_extraction_rules(fake_stdlib: Path, tmp_path: Path) -> None:
    splits = build_function_names(cache_dir=tmp_path / "cache")
    # Module hashes: "a" -> test, "pkg" -> train, "alpha" -> validation (a module stays in one split).
    assert {s: [(r["module"], r["name"]) for r in rows] for s, rows in splits.items()} == {
        "train": [("pkg", "write_config")],
        "validation": [("alpha", "fetch_all")],
        "test": [("a", "read_config"), ("a", "factorial"), ("a", "check_limit"), ("a", "size"), ("a", "size"),
                 ("a", "reload_items")],
    }
    # Skipped: dunder, private, camelCase, docstring-only, NotImplementedError, constant, >40 lines,
    # the test/idlelib/site-packages/lib2to3 folders, a file that does not parse, and pkg's
    # read_config (the same code as a.read_config once the docstring is dropped).
    code = [r["code"] for r in splits["test"]]
    assert code[0] == "def fcn_0(path):\n    with open(path) as f:\n        return f.read()"
    assert code[1] == "def fcn_0(n):\n    if n < 2:\n        return 1\n    return n * fcn_0(n - 1)"
    assert code[2] == (
        "def fcn_0(value):\n    if value > 3:\n        raise ValueError('fcn_0: too big')\n    return value"
    )
    assert code[3] == "@property\ndef fcn_0(self):\n    return len(self._items)"
    # The decorator names the property (hidden); the parameter is a local variable (kept).
    assert code[4] == "@fcn_0.setter\ndef fcn_0(self, size):\n    del self._items[size:]"
    assert code[5] == "def fcn_0(self):\n    self.reload_items_later = True\n    return self.fcn_0()"
    assert splits["validation"][0]["code"] == "async def fcn_0(urls):\n    return [await fetch(u) for u in urls]"


def test_build_is_cached_and_atomic(fake_stdlib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = build_function_names(cache_dir=cache)
    (folder,) = list(cache.iterdir())  # one keyed folder, no temp folder left behind
    assert re.fullmatch(r"[0-9a-f]{12}-py\d+\.\d+\.\d+", folder.name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["info.json", "test.parquet", "train.parquet", "validation.parquet"]

    def no_rebuild(root: Path) -> None:
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(function_names, "_extract", no_rebuild)
    assert build_function_names(cache_dir=cache) == first


@pytest.mark.slow
def test_real_stdlib_data_set(tmp_path: Path) -> None:
    """The real build (~20 s): sizes, no skipped folders, no name leaks in the def line."""
    splits = build_function_names(cache_dir=tmp_path)
    sizes = {s: len(rows) for s, rows in splits.items()}
    assert sizes["train"] > 3000 and sizes["validation"] > 200 and sizes["test"] > 200, sizes
    rows = [r for s in SPLITS for r in splits[s]]
    assert len({r["code"] for r in rows}) == len(rows)
    for row in rows:
        assert not row["module"].startswith(("test.", "idlelib", "lib2to3")), row["module"]
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z][a-z0-9]*)*", row["name"])
        assert re.search(r"^(async )?def fcn_0\(", row["code"], re.M), row
        assert len(row["code"]) <= function_names.MAX_CHARS and row["code"].count("\n") < function_names.MAX_LINES


def test_missing_stdlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(function_names, "_stdlib_root", lambda: tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="standard library folder .*nowhere.* does not exist"):
        build_function_names(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing half-written
