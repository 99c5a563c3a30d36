"""Every class of bad input from issue 16, one row each: the exit code and the one-line message.

Each row runs ``splice.cli.main`` in-process on the tiny model saved to a folder. An error must
be exactly one line ``splice <cmd>: error: ...`` on stderr (no traceback), with exit code 2 for
bad usage or input and 1 for a failure at run time. Runtime failures (divergence, a full disk)
and ``--debug`` have their own tests below; SIGTERM (exit 143) is in tests/training/test_rundir.py.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from splice.cli import main
from splice.core.errors import UsageError
from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["--prompt-template", "Q: {question}\nA: ", "--response-template", "{answer}"]


@dataclass
class Files:
    """The tiny model and data, and one bad file of each kind, made once for the module."""

    root: Path
    model: Path
    data: Path
    adapter: Path

    def out(self) -> str:  # a fresh output dir per use
        n = len(list(self.root.glob("out-*")))
        return str(self.root / f"out-{n}")

    def bad_adapter(self, name: str, edit: Callable[[Path], None]) -> str:
        target = self.root / "adapters" / name
        if not target.exists():
            shutil.copytree(self.adapter, target)
            edit(target)
        return str(target)


@pytest.fixture(scope="module")
def files(tiny_run_inputs, tmp_path_factory) -> Files:
    from splice.lora.apply import add_lora
    from splice.lora.layers import LoraConfig
    from splice.lora.peft_io import save_adapter
    from splice.models.loading import load_model

    root = tmp_path_factory.mktemp("cli-errors")
    model_dir, data = tiny_run_inputs
    model, _ = load_model(model_dir)
    add_lora(model, LoraConfig(rank=4))
    adapter = save_adapter(model, root / "adapter")
    (root / "afile").write_text("not a folder")
    (root / "datadir").mkdir()
    (root / "bad.toml").write_text('[train]\nrank = "eight"\n')
    (root / "broken.toml").write_text("rank = = 8\n")
    (root / "latin1.jsonl").write_bytes('{"question": "caf\xe9?", "answer": "oui"}\n'.encode("latin-1"))
    (root / "array.json").write_text("[1, 2, 3]")
    (root / "nulls.jsonl").write_text("".join(
        json.dumps({"question": None if i == 3 else f"q{i}?", "answer": "a"}) + "\n" for i in range(20)))
    return Files(root=root, model=model_dir, data=data, adapter=adapter)


def _train(f: Files, *extra: str, data: str | None = None) -> list[str]:
    return ["train", "--model", str(f.model), "--data", data or str(f.data), "--output-dir", f.out(),
            *TEMPLATES, "--max-length", "64", "--steps", "1", "--eval-samples", "0", *extra]


def _gen(f: Files, *extra: str, adapter: str | None = None) -> list[str]:
    return ["generate", "--model", str(f.model), "--prompt", "Q: alpha?\nA: ",
            *(["--adapter", adapter] if adapter else []), *extra]


def _truncate(d: Path) -> None:
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
# (id, argv from the files, exit code, phrase the message must contain)
ROWS: list = [
    # silent wrong results, now refused before the model loads
    ("max-grad-norm-negative", lambda f: _train(f, "--max-grad-norm", "-1"), 2, "max_grad_norm must be >= 0"),
    ("alpha-zero", lambda f: _train(f, "--alpha", "0"), 2, "alpha must be > 0"),
    ("alpha-negative", lambda f: _train(f, "--alpha", "-16"), 2, "alpha must be > 0"),
    ("epochs-zero", lambda f: _train(f, "--steps", "0", "--epochs", "0"), 2, "epochs must be > 0"),
    ("epochs-negative", lambda f: _train(f, "--steps", "0", "--epochs", "-1"), 2, "epochs must be > 0"),
    ("eval-batches-zero", lambda f: _train(f, "--eval-batches", "0"), 2, "eval_batches must be >= 1"),
    ("max-rows-negative", lambda f: _train(f, "--max-rows", "-5"), 2, "max_rows must be >= 1"),
    ("eval-samples-negative", lambda f: _train(f, "--eval-samples", "-3"), 2, "eval_samples must be >= 0"),
    ("max-length-past-context", lambda f: _train(f, "--max-length", "100000"), 2,
     "past the context of model"),
    ("template-column-null", lambda f: _train(f, data=str(f.root / "nulls.jsonl")), 2,
     "nulls.jsonl, row 4: column 'question'"),
    # options that used to fail only after the whole training
    ("eval-batch-size-zero", lambda f: _train(f, "--eval-batch-size", "0"), 2, "eval_batch_size must be >= 1"),
    ("max-new-tokens-negative", lambda f: _train(f, "--max-new-tokens", "-1"), 2, "max_new_tokens must be >= 1"),
    # raw tracebacks before
    ("device-unknown", lambda f: _train(f, "--device", "gpu0"), 2, "device must be auto, cpu"),
    ("device-cuda-without-gpu", lambda f: _train(f, "--device", "cuda"), 2, "no CUDA GPU", NO_GPU),
    ("targets-non-linear", lambda f: _train(f, "--targets", "model.norm"), 2, "cannot adapt 'model.norm'"),
    ("targets-bad-regex", lambda f: _train(f, "--targets", "q_proj("), 2, "a valid regex"),
    ("targets-match-nothing", lambda f: _train(f, "--targets", "zzz_proj"), 2, "matched no module"),
    ("toml-string-for-number", lambda f: _train(f, "--config", str(f.root / "bad.toml")), 2,
     "bad.toml: rank must be int, got 'eight'"),
    ("toml-syntax", lambda f: _train(f, "--config", str(f.root / "broken.toml")), 2, "not valid TOML"),
    ("config-missing", lambda f: _train(f, "--config", str(f.root / "nope.toml")), 2, "does not exist"),
    ("adapter-truncated", lambda f: _gen(f, adapter=f.bad_adapter("trunc", _truncate)), 2,
     "may be truncated or empty"),
    ("adapter-empty", lambda f: _gen(f, adapter=f.bad_adapter(
        "empty", lambda d: (d / "adapter_model.safetensors").write_bytes(b""))), 2, "(0 bytes"),
    ("adapter-config-not-object", lambda f: _gen(f, adapter=f.bad_adapter(
        "list", lambda d: (d / "adapter_config.json").write_text("[1, 2]"))), 2, "must be a JSON object"),
    ("adapter-config-not-json", lambda f: _gen(f, adapter=f.bad_adapter(
        "text", lambda d: (d / "adapter_config.json").write_text("r = 8"))), 2, "is not valid JSON"),
    ("adapter-config-wrong-type", lambda f: _gen(f, adapter=f.bad_adapter(
        "rtype", lambda d: (d / "adapter_config.json").write_text('{"r": "eight"}'))), 2,
     "r is 'eight'; it must be a int"),
    ("adapter-missing-files", lambda f: _gen(f, adapter=str(f.root / "datadir")), 2, "not an adapter directory"),
    ("adapter-is-a-file", lambda f: _gen(f, adapter=str(f.root / "afile")), 2, "pass the adapter directory"),
    ("merge-output-is-a-file", lambda f: ["merge", "--model", str(f.model), "--adapter", str(f.adapter),
                                          "--output", str(f.root / "afile")], 2, "is a file; pass a new directory"),
    ("merge-output-under-a-file", lambda f: ["merge", "--model", str(f.model), "--adapter", str(f.adapter),
                                             "--output", str(f.root / "afile" / "m")], 2, "is a file, not a folder"),
    ("merge-output-not-empty", lambda f: ["merge", "--model", str(f.model), "--adapter", str(f.adapter),
                                          "--output", str(f.adapter)], 2, "is not empty"),
    ("output-dir-read-only", lambda f: _train(f, "--output-dir", "/sys/splice-test/run"), 2,
     "cannot create output dir /sys/splice-test/run"),
    ("output-dir-under-a-file", lambda f: _train(f, "--output-dir", str(f.root / "afile" / "run")), 2,
     "afile is a file, not a folder"),
    ("output-dir-is-a-file", lambda f: _train(f, "--output-dir", str(f.root / "afile")), 2, "is a file"),
    ("data-not-utf8", lambda f: _train(f, data=str(f.root / "latin1.jsonl")), 2,
     "latin1.jsonl, line 1: not UTF-8 text (byte 0xe9"),
    ("data-top-level-array", lambda f: _train(f, data=str(f.root / "array.json")), 2, "row 0"),
    ("temperature-nan", lambda f: _gen(f, "--temperature", "nan"), 2, "temperature must be a finite number"),
    ("temperature-negative", lambda f: _gen(f, "--temperature", "-1"), 2, "temperature must be"),
    ("top-p-zero", lambda f: _gen(f, "--top-p", "0"), 2, "must be in (0, 1]"),
    ("generate-max-new-tokens-zero", lambda f: _gen(f, "--max-new-tokens", "0"), 2, "must be an integer >= 1"),
    ("prompt-past-context", lambda f: _gen(f, "--prompt", "alpha " * 300), 2, "passes the model's context"),
    ("generate-seed-overflow", lambda f: _gen(f, "--seed", str(2**70)), 2, "must be in [0, 2**63)"),
    ("train-seed-overflow", lambda f: _train(f, "--seed", str(2**70)), 2, "seed must be in [0, 2**63)"),
    ("generate-device-unknown", lambda f: _gen(f, "--device", "tpu"), 2, "device"),
    ("eval-samples-negative-eval", lambda f: ["eval", "--model", str(f.model), "--samples", "-1"], 2,
     "argument --samples: '-1': must be an integer >="),
    ("eval-json-is-a-directory", lambda f: ["eval", "--model", str(f.model), "--json", str(f.root)], 2,
     "is a directory"),
    # messages that misled
    ("data-is-a-directory", lambda f: _train(f, data=str(f.root / "datadir")), 2, "is a directory, not a data file"),
    ("data-missing", lambda f: _train(f, data=str(f.root / "nope.jsonl")), 2, "nope.jsonl does not exist"),
    ("resume-nothing", lambda f: _train(f, "--resume"), 2, "holds no run to resume"),
    # usage
    ("flag-not-a-number", lambda f: _train(f, "--rank", "eight"), 2, "argument --rank: invalid int value"),
    ("flag-unknown", lambda f: _train(f, "--bogus"), 2, "unrecognized arguments: --bogus (see"),
    # other trainers' names for splice's options (PEFT, TRL/transformers, axolotl)
    ("flag-from-peft", lambda f: _train(f, "--lora-r", "8"), 2,
     "unrecognized arguments: --lora-r 8; did you mean --rank?"),
    ("flag-from-trl", lambda f: _train(f, "--num-train-epochs", "1"), 2, "did you mean --epochs?"),
    ("flag-learning-rate", lambda f: _train(f, "--learning-rate", "1e-4"), 2, "did you mean --lr?"),
    ("flag-with-underscores", lambda f: _train(f, "--output_dir=runs/x"), 2, "did you mean --output-dir?"),
    ("flag-misspelt", lambda f: _train(f, "--ouput-dir", "x"), 2, "did you mean --output-dir?"),
    ("flags-from-two-trainers", lambda f: _train(f, "--lora-alpha", "16", "--per-device-train-batch-size", "2"),
     2, "did you mean --alpha (for --lora-alpha), --batch-size (for --per-device-train-batch-size)?"),
    ("flag-of-another-command", lambda f: _gen(f, "--lora-r", "8"), 2, "unrecognized arguments: --lora-r 8 (see"),
]


def _params() -> list:
    out = []
    for row in ROWS:
        name, argv, code, phrase, *marks = row
        out.append(pytest.param(argv, code, phrase, id=name, marks=marks))
    return out


def _error_lines(err: str) -> list[str]:
    """The lines that are not progress bars (transformers' "Loading weights", the trainer's bar)."""
    return [line for line in err.splitlines() if ": error: " in line]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "code", "phrase"), _params())
def test_bad_input_is_one_clear_line(files: Files, capsys, argv, code, phrase) -> None:
    args = argv(files)
    got, err = _run(args, capsys)
    lines = _error_lines(err)
    assert (got, phrase in err) == (code, True), err
    assert len(lines) == 1 and re.match(rf"splice {args[0]}: error: ", lines[0]), err
    assert err.rstrip().endswith(lines[0]) and "Traceback" not in err


def test_every_row_is_distinct() -> None:
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names)) and len(names) >= 40


def test_debug_shows_the_traceback(files: Files) -> None:
    with pytest.raises(UsageError, match="alpha must be > 0"):
        main(["--debug", *_train(files, "--alpha", "0")])
    with pytest.raises(UsageError, match="alpha must be > 0"):
        main([*_train(files, "--alpha", "0"), "--debug"])


def test_divergence_names_a_checkpoint_that_exists(files: Files, capsys) -> None:
    argv = [*_train(files, "--steps", "20", "--lr", "1e30", "--save-every", "1", "--max-bad-steps", "2",
                    "--warmup-steps", "0", "--optimizer", "sgd", "--max-grad-norm", "0",
                    "--no-compare-base")]
    code, err = _run(argv, capsys)
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("splice train: error: 2 non-finite losses in a row"), err
    named = re.search(r"the last good checkpoint is (\S+) ", line)
    assert named and (Path(named[1]) / "trainer_state.json").is_file(), line


def _limit_file_size() -> None:  # in the child: writes past 48 KiB fail with EFBIG, as a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 << 10, 48 << 10))


def test_full_disk_is_a_runtime_error_and_leaves_no_temporary_checkpoint(files: Files) -> None:
    out = Path(files.out())
    argv = _train(files, "--steps", "2", "--save-every", "1", "--rank", "64", "--no-compare-base")
    argv[argv.index("--output-dir") + 1] = str(out)
    proc = subprocess.run(
        [sys.executable, "-m", "splice", *argv],
        env=subprocess_env(),
        capture_output=True, text=True,
        preexec_fn=_limit_file_size, timeout=300)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("splice train: error: "), proc.stderr
    assert re.search(r"could not write checkpoint|File too large", lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("checkpoints/.tmp-step-*"))
    # stderr is a pipe: every progress bar (splice's, and Hugging Face's "Loading weights") printed
    # plain lines, no carriage returns
    assert "\r" not in proc.stderr and "Loading weights" not in proc.stderr
