"""The options of a training run, from flags or a TOML/YAML file, and the run directory's rules."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from splice.lora.init import init_name

__all__ = ["TrainConfig", "check_output_dir", "load_config_file", "save_run_config"]

RUN_CONFIG = "run_config.json"
# Options that may differ when resuming (they don't change the trajectory's meaning).
_RESUME_FREE = {"resume", "steps", "epochs", "save_every", "keep_checkpoints", "eval_every",
                "eval_samples", "compare_base", "eval_batch_size", "max_new_tokens",
                "fast", "gradient_checkpointing", "offload_checkpoints", "keep_attention", "cuda_graphs",
                "device"}


@dataclass(kw_only=True)
class TrainConfig:
    """Every option has a default: ``TrainConfig()`` fine-tunes the embedded SmolLM2-135M-Instruct
    on the embedded function-naming dataset in a few minutes on 2 CPU cores."""

    model: str | None = None  # HF folder, .gguf file or hub id; None: embedded SmolLM2-135M
    data: str | None = None  # parquet/JSONL/CSV; None: embedded function-naming task
    val_data: str | None = None  # None: split val_fraction off the training rows
    prompt_template: str | None = None  # "{column}" format string (custom data)
    response_template: str | None = None
    system_prompt: str | None = None  # with chat=True
    chat: bool = False  # render prompt/response through the tokenizer's chat template
    output_dir: str = "runs/splice"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # PEFT's default; on CPU each dropout mask costs ~a third of a step
    targets: str = "all-linear"  # "all-linear", a regex, or comma-separated module names
    rslora: bool = False
    steps: int | None = 40  # optimizer steps; None: use epochs
    epochs: float = 1.0
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 3
    batch_size: int = 4  # rows per micro-batch (packed rows hold several examples)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_length: int = 352
    max_rows: int | None = None  # cap training rows (quick experiments)
    val_fraction: float = 0.05
    pack: bool = True  # several examples per max_length row: no compute wasted on padding
    train_on_prompt: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    gradient_checkpointing: bool = False  # recompute every decoder layer in backward
    offload_checkpoints: bool = False  # keep checkpointed layer inputs in CPU memory (longest sequences)
    keep_attention: bool = False  # checkpointing also keeps q/k/v/attention (offloaded too): less recompute
    fast: bool | None = None  # fused kernels + memory-aware checkpointing; None: on with a CUDA GPU
    cuda_graphs: bool | None = None  # replay each step from a CUDA graph; None: on with --fast on a GPU
    seed: int = 0
    eval_every: int = 0  # validation loss every N steps (0: at the end only)
    eval_batches: int = 8
    eval_samples: int = 96  # held-out examples scored by generation (0: none)
    eval_batch_size: int = 16
    max_new_tokens: int = 20
    compare_base: bool = True  # score the base model first, for a before/after table
    save_every: int = 20
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    resume: bool = False
    # LoRA variants (issue 18): DoRA, the initialisation, LoRA+'s learning-rate ratio for B.
    dora: bool = False
    init: str = "default"  # default | gaussian | pissa | pissa_niter_N | olora
    loraplus_ratio: float | None = None  # lr of lora_B = lr * ratio (LoRA+, e.g. 16); None: off

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, "rank must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.steps is None or self.steps >= 1, "steps must be >= 1 (or None to use epochs)"),
            (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
            (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))
        if (self.prompt_template is None) != (self.response_template is None):
            raise ValueError("give both prompt_template and response_template (or neither)")
        init_name(self.init)  # one line naming the valid initialisations
        if self.loraplus_ratio is not None and self.loraplus_ratio <= 0:
            raise ValueError(f"invalid training options: loraplus_ratio must be > 0 (e.g. 16), got {self.loraplus_ratio}")

    def target_spec(self) -> str | tuple[str, ...]:
        """``targets`` as LoraConfig takes it: 'all-linear', a regex, or a tuple of names."""
        if self.targets == "all-linear" or any(c in self.targets for c in "\\^$*+?[]()|"):
            return self.targets
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def model_name(self) -> str:
        return self.model or "HuggingFaceTB/SmolLM2-135M-Instruct"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or YAML file (keys as in :class:`TrainConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        values = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ValueError("YAML config needs PyYAML (pip install pyyaml), or use TOML") from exc
        values = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path}: use a .toml or .yaml file")
    values = values.get("train", values)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown options {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return values


def check_output_dir(out: Path, config: TrainConfig) -> None:
    """Refuse to write over another run: a used directory needs ``resume`` with the same options."""
    saved = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise ValueError(f"output dir {out} is a file: choose another --output-dir")
    used = out.is_dir() and any(out.iterdir())
    if not used:
        if config.resume:
            raise ValueError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return
    if not config.resume:
        raise ValueError(
            f"output dir {out} already holds a run (or other files): pass --resume to continue "
            "it, or choose another --output-dir. Nothing was overwritten"
        )
    if not saved.is_file():
        raise ValueError(f"--resume: {out} has no {RUN_CONFIG}; it is not a splice run directory")
    before = json.loads(saved.read_text())
    now = config.to_dict()
    changed = sorted(k for k in now if k not in _RESUME_FREE and before.get(k) != now[k])
    if changed:
        raise ValueError(
            f"--resume: options differ from the run in {out}: {', '.join(changed)}. Resume with "
            "the run's options (see its run_config.json) or start a new --output-dir"
        )


def save_run_config(out: Path, config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
