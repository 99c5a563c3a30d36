"""The built-in training data set: name a function from its code, answering ``{"name": "..."}``.

It mirrors fine-tuning a model to give decompiled functions descriptive snake_case names, with
data every machine has: the functions of the running interpreter's standard library. Each
function's source is parsed with ``ast``, its docstring dropped, its name (and calls to itself)
replaced by ``fcn_0``, and the original name is the target. Rows are split 80/10/10 into
train/validation/test by a hash of the module name, so a module's functions stay together.
The task that scores a model on it (prompt, JSON parsing, metrics) is
:func:`splice.evaluation.tasks.function_names_task`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from splice.core.io import atomic_dir
from splice.core.progress import busy
from splice.data.rows import ChatTemplate
from splice.models.loading import cache_root

__all__ = [
    "PLACEHOLDER",
    "SPLITS",
    "SYSTEM_PROMPT",
    "build_function_names",
    "function_name_messages",
    "function_name_template",
]

PLACEHOLDER = "fcn_0"
SPLITS = ("train", "validation", "test")
SYSTEM_PROMPT = (
    f"Given the following code, provide a descriptive function name for {PLACEHOLDER}. Use snake_case. "
    'Only output the name as valid JSON, e.g. {"name": "function_name"}'
)
MAX_LINES = 40
MAX_CHARS = 1200
# A tokenizer-free token estimate: words, single digits and punctuation, whitespace runs. It
# over-counts SmolLM2's BPE (~0.65x on this code, correlation 0.995); 270 keeps prompts <= ~320.
MAX_PIECES = 270
_PIECES = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]|\n *| +")
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z][a-z0-9]*)*$")
_SKIP_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
    "ensurepip", "__pycache__", "lib-dynload", "__phello__", "pydoc_data",
}


# ----------------------------------------------------------------------------- extraction


def _is_trivial(body: list[ast.stmt]) -> bool:
    """Nothing to name: no statement, or one ``pass`` / ``...`` / ``return <constant>`` /
    ``raise NotImplementedError``."""
    if len(body) != 1:
        return not body
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Return) and (stmt.value is None or isinstance(stmt.value, ast.Constant)):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


class _Rename(ast.NodeVisitor):
    """Hide the function's own name, in place and undoably: ``name(...)``, ``self.name`` /
    ``cls.name`` and the name as a word inside string constants (error messages spell it out)."""

    def __init__(self, name: str, *, names: bool) -> None:
        self.name = name
        self.names = names  # False when the name is also a local variable (then it is not us)
        self.word = re.compile(rf"\b{re.escape(name)}\b")
        self.undo: list[tuple[ast.AST, str, Any]] = []  # (node, field, old value)

    def _set(self, node: ast.AST, field: str, value: Any) -> None:
        self.undo.append((node, field, getattr(node, field)))
        setattr(node, field, value)

    def visit_Name(self, node: ast.Name) -> None:
        if self.names and node.id == self.name:
            self._set(node, "id", PLACEHOLDER)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if node.attr == self.name and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            self._set(node, "attr", PLACEHOLDER)

    def visit_Constant(self, node: ast.Constant) -> None:
        if self.names and isinstance(node.value, str) and self.name in node.value:
            self._set(node, "value", self.word.sub(PLACEHOLDER, node.value))

    def restore(self) -> None:
        for node, field, value in reversed(self.undo):
            setattr(node, field, value)


def _local_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Parameters and names assigned anywhere inside the function (nested scopes included)."""
    args = node.args
    params = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    stored = {
        n.id for stmt in node.body for n in ast.walk(stmt)
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }
    return {a.arg for a in params} | stored


def _function_code(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function as code to name (docstring dropped, name hidden), or None to skip it."""
    name = node.name
    if name.startswith("_") or not _SNAKE.match(name):
        return None
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if _is_trivial(body):
        return None
    # Cheap pre-filter on the source span (unparsing rarely makes code more than 2x shorter).
    if (node.end_lineno or node.lineno) - body[0].lineno + 1 > 2 * MAX_LINES:
        return None
    # Rewrite the tree in place (far cheaper than copying it), unparse, then undo: the enclosing
    # and nested functions are extracted from the same, unchanged tree.
    rename = _Rename(name, names=name not in _local_names(node))
    original_body = node.body
    node.body = body
    try:
        for part in body + node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            rename.visit(part)
        rename.names = True  # decorators run in the enclosing scope: `@name.setter` is the property
        for decorator in node.decorator_list:
            rename.visit(decorator)
        rename._set(node, "name", PLACEHOLDER)
        code = ast.unparse(node)
    finally:
        rename.restore()
        node.body = original_body
    too_long = code.count("\n") + 1 > MAX_LINES or len(code) > MAX_CHARS
    return None if too_long or len(_PIECES.findall(code)) > MAX_PIECES else code


def _functions(body: Sequence[ast.AST]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function defined in ``body``, depth first in source order (methods and nested
    functions included); expressions are not searched (they hold no ``def``)."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):  # handlers/cases: not stmts
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _functions(inner)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        files.extend(Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata"))
    return sorted(files)


def _stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(module: str) -> str:
    bucket = int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100  # stable across runs
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def _extract(root: Path) -> dict[str, list[dict[str, str]]]:
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # e.g. files written for another Python version
        module = _module_name(path, root)
        for node in _functions(tree.body):
            code = _function_code(node)
            if code is not None and code not in seen:  # identical code: keep the first
                seen.add(code)
                splits[_split_of(module)].append({"module": module, "code": code, "name": node.name})
    return splits


# ----------------------------------------------------------------------------- build + cache


def build_function_names(*, cache_dir: Path | None = None) -> dict[str, list[dict[str, str]]]:
    """The function-naming data set: ``{"train"|"validation"|"test": [{"module", "code", "name"}]}``.

    Built from the running interpreter's standard library (``sysconfig`` "stdlib"; test suites,
    idlelib, lib2to3, site-packages and the like skipped) and cached as parquet files under
    ``<cache_dir or cache_root()/"datasets"/"function_names">/<rules hash>-py<X.Y.Z>/``. Skipped
    functions: dunder and private names, names that are not snake_case words, trivial bodies,
    more than 40 lines, 1200 characters or ~270 estimated tokens (prompts stay
    within ~320 SmolLM2 tokens), and exact duplicates of an earlier function's code.
    Building takes ~20 s once (2 CPU cores); later calls read the cache (<1 s).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = Path(cache_dir) if cache_dir is not None else cache_root() / "datasets" / "function_names"
    version = ".".join(str(v) for v in sys.version_info[:3])
    # Keyed by this file's own source (the extraction rules) and the Python version, so a changed
    # rule never reads a stale cache.
    rules = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    folder = base / f"{rules}-py{version}"
    if all((folder / f"{s}.parquet").is_file() for s in SPLITS):
        return {s: pq.read_table(folder / f"{s}.parquet").to_pylist() for s in SPLITS}
    root = _stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"the standard library folder {root} (sysconfig 'stdlib') does not exist, so the default "
            "data set cannot be built; run with a full CPython install or pass your own data"
        )
    start = time.perf_counter()
    with busy("building the function-naming data set once (~20 s)"):
        splits = _extract(root)
    seconds = time.perf_counter() - start
    if not all(splits.values()):
        raise RuntimeError(
            f"only {({s: len(r) for s, r in splits.items()})} functions found under {root}; the "
            "standard library looks incomplete; run with a full CPython install or pass your own data"
        )
    with atomic_dir(folder, replace=False) as tmp:  # another process may build the same folder
        for name, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{name}.parquet")
        info = {"stdlib": str(root), "python": version, "rows": {s: len(r) for s, r in splits.items()},
                "build_seconds": round(seconds, 1)}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return splits


# ----------------------------------------------------------------------------- chat rows


def function_name_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """System + user (``Code: ...``) + assistant (``{"name": ...}``) messages for one row."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Code:\n{row['code']}"},
        {"role": "assistant", "content": json.dumps({"name": row["name"]})},
    ]


def function_name_template() -> ChatTemplate:
    """The chat template for :func:`splice.data.rows.tokenize_rows` (the answer is the JSON)."""
    return ChatTemplate(messages=function_name_messages)
