"""The options of a training run, from flags or a TOML/YAML file, and the run directory's rules."""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from splice.core.errors import UsageError, one_line
from splice.core.io import MAX_LINE_BYTES, read_utf8

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_STEPS", "LOSS_TYPES", "MANY_EPOCHS", "MIN_HELD_OUT", "RULES", "Rule", "TrainConfig",
           "check_options", "check_output_dir", "flag", "load_config_file", "save_run_config"]

RUN_CONFIG = "run_config.json"
DEFAULT_STEPS = 40  # the embedded task given neither steps nor epochs (a few-minute run)
DEFAULT_EPOCHS = 3.0  # a user's data given neither steps nor epochs (TRL's num_train_epochs)
MANY_EPOCHS = 3.0  # a run over more passes than this says so before it trains (small data overfits)
MIN_HELD_OUT = 20  # held-out rows below which a generation score is noise
_DEFAULT_VAL_FRACTION = 0.05
# Each method's loss types (the first is its default).
LOSS_TYPES = {"sft": (), "dpo": ("sigmoid", "ipo"), "grpo": ("dapo", "grpo", "dr_grpo")}
# Options that may differ when resuming (they don't change the trajectory's meaning).
# output_dir: a run directory that was moved or copied resumes from its new place.
_RESUME_FREE = {"resume", "steps", "epochs", "save_every", "keep_checkpoints", "eval_every",
                "eval_samples", "compare_base", "eval_batch_size", "max_new_tokens",
                "fuse", "gradient_checkpointing", "offload_checkpoints", "offload_compression", "keep_attention",
                "mlp_chunk_tokens",
                "cuda_graphs",
                "embeddings_on_host",
                "device", "output_dir", "report_to", "shard", "dist_timeout", "precompute_ref"}
# Files in a run directory that do not make it "used" (the run-directory lock, see rundir.py).
_NOT_A_RUN = {".splice.lock"}


@dataclass(kw_only=True)
class TrainConfig:
    """Every option has a default: ``TrainConfig()`` fine-tunes the embedded SmolLM2-135M-Instruct
    on the embedded function-naming dataset in a few minutes on 2 CPU cores."""

    model: str | None = None  # HF folder, .gguf file or hub id; None: embedded SmolLM2-135M
    data: str | Any | None = None  # a file, a save_to_disk folder, or (Python) rows / a Dataset; None: embedded task
    val_data: str | Any | None = None  # as data; None: split val_fraction off the training rows
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
    steps: int | None = None  # optimizer steps (neither: DEFAULT_EPOCHS over data, DEFAULT_STEPS embedded)
    epochs: float | None = None  # passes over the training rows, instead of steps
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
    max_line_bytes: int = MAX_LINE_BYTES  # a JSONL/CSV line longer than this is refused (file and line named)
    val_fraction: float | None = None  # None: 5%, at least MIN_HELD_OUT rows while 80% is left to train
    pack: bool = True  # several examples per max_length row: no compute wasted on padding
    train_on_prompt: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    gradient_checkpointing: bool = False  # recompute every decoder layer in backward
    offload_checkpoints: bool = False  # keep checkpointed layer inputs in CPU memory (longest sequences)
    offload_compression: str = "none"  # none | fp8 | int8: offloaded layer inputs in 8 bits (half the host memory)
    keep_attention: bool = False  # checkpointing also keeps q/k/v/attention (offloaded too): less recompute
    mlp_chunk_tokens: int | None = None  # run each MLP this many tokens at a time (longest sequences); None: off
    fuse: bool | None = None  # fused kernels + memory-aware checkpointing; None: on with a CUDA GPU
    cuda_graphs: bool | None = None  # replay each step from a CUDA graph; None: on with --fuse on a GPU
    embeddings_on_host: bool = False  # frozen input embedding in CPU memory (lowest GPU peak; no graphs)
    seed: int = 0
    quantize: str | None = None  # None | "nf4" (QLoRA: 4-bit NormalFloat base) | "int8" | "fp8" (GPU 8.9+)
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
    # A user's own data and tracking (issue 17).
    last_turn_only: bool = False  # conversations: loss on the last assistant turn only (default: every one)
    report_to: str = ""  # trackers besides metrics.jsonl, comma-separated: tensorboard, wandb, csv

    # torch.distributed (under torchrun): DDP by default; FSDP2 with shard (or when the model
    # does not fit one GPU). shard without torchrun: FSDP2 in a world of one process.
    shard: bool = False
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before failing
    # LoRA variants (issue 18): DoRA, the initialisation, LoRA+'s learning-rate ratio for B.
    dora: bool = False
    init: str = "default"  # default | gaussian | pissa | pissa_niter_N | olora
    loraplus_ratio: float | None = None  # lr of lora_B = lr * ratio (LoRA+, e.g. 16); None: off
    adapter: str | None = None  # train this adapter folder further (its rank, alpha, targets), e.g. GRPO after SFT
    # Preference and reward training (issue 27): the method (splice.training.method), DPO's and
    # GRPO's options.
    method: str = "sft"  # sft | dpo | grpo
    beta: float | None = None  # DPO: the KL strength (None: 0.1); GRPO: the KL term's weight (None: 0)
    label_smoothing: float = 0.0  # DPO sigmoid: the chance a pair's preference is flipped (cDPO)
    loss_type: str | None = None  # dpo: sigmoid (default) | ipo; grpo: grpo | dr_grpo | dapo
    precompute_ref: bool = False  # DPO: the reference log-probs once, before training
    rpo_alpha: float | None = None  # DPO: + alpha * the chosen answers' NLL per token (RPO; None: off)
    reward: str | None = None  # GRPO: FILE.py:FUNCTION, comma-separated (the flag is repeatable)
    reward_weights: str | None = None  # GRPO: one weight per reward, comma-separated (default: all 1)
    num_generations: int = 8  # GRPO: completions per prompt (one group)
    max_completion_length: int = 256  # GRPO: tokens per completion
    epsilon: float = 0.2  # GRPO: the clip range of the surrogate
    temperature: float = 1.0  # GRPO: the rollouts' sampling temperature
    top_p: float = 1.0  # GRPO: the rollouts' nucleus (1: off)

    def __post_init__(self) -> None:
        for f in fields(self):  # TOML/YAML write 32 for 32.0: a whole number is a valid float
            value = getattr(self, f.name)
            if _kinds(f.type) and "float" in _kinds(f.type) and type(value) is int:
                setattr(self, f.name, float(value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` naming every invalid option (types, ranges, combinations).

        Runs on construction and again when training starts (a config may be changed in between).
        """
        problems = check_options({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise UsageError("invalid training options: " + "; ".join(problems))

    def target_spec(self) -> str | tuple[str, ...]:
        """``targets`` as LoraConfig takes it: 'all-linear', a regex, or a tuple of names."""
        return _target_spec(self.targets)

    def fuses(self, device_type: str) -> bool:
        """Whether the run uses the fused kernels (``fuse``; by default: on a CUDA GPU)."""
        return device_type == "cuda" if self.fuse is None else self.fuse

    def model_name(self) -> str:
        return self.model or "HuggingFaceTB/SmolLM2-135M-Instruct"

    def epochs_planned(self) -> float | None:
        """Passes over the data the run trains for, or None when it counts steps: ``epochs``; else
        ``steps``; else DEFAULT_EPOCHS for the user's data (as TRL) and DEFAULT_STEPS for the
        embedded task (whose one epoch is ~620 steps)."""
        if self.epochs is not None or self.steps is not None:
            return self.epochs
        return DEFAULT_EPOCHS if self.data is not None else None

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run, given the micro-batches in one epoch."""
        epochs = self.epochs_planned()
        if epochs is None:
            return self.steps or DEFAULT_STEPS
        return max(1, math.ceil(epochs * batches_per_epoch / self.grad_accum))

    @staticmethod
    def held_out_rows(n_rows: int) -> int:
        """Rows the default split (no ``val_data``, no ``val_fraction``) holds out of ``n_rows`` for
        validation and generation scoring: 5%, but at least MIN_HELD_OUT rows while that leaves 80%
        to train. A 46-row file holds out 9 rows, not 2 (a score on 2 rows is noise); 1,000 rows, 50."""
        return max(round(n_rows * _DEFAULT_VAL_FRACTION), min(MIN_HELD_OUT, n_rows // 5))

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], *, config_file: str | Path | None = None) -> TrainConfig:
        """A config from command-line ``flags`` (option -> value, None: not given) over the options
        of a TOML/YAML ``config_file``: a flag beats the file. ``epochs`` works without ``steps 0``:
        epochs alone trains by epochs, ``steps 0`` alone is one epoch; steps and epochs together
        at one level (the flags, or the file) is an error naming it."""
        file = load_config_file(config_file) if config_file is not None else {}
        values = dict(file)
        values.update({name: value for name, value in flags.items() if value is not None})
        for level, where in ((flags, "flags"), (file, "config file")):
            steps, epochs = level.get("steps"), level.get("epochs")
            if epochs is not None and steps not in (None, 0):
                raise UsageError(f"both steps ({steps}) and epochs ({epochs}) given in the {where}: "
                                 "give --steps N or --epochs N, not both")
            if epochs is not None or steps == 0:  # (--steps 0 alone: one epoch)
                values.update(steps=None, epochs=1.0 if epochs is None else epochs)
                break
            if steps is not None:
                values.update(steps=steps, epochs=None)
                break
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        from splice.data.rows import describe_source  # data given as objects: a summary, not the rows

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("data", "val_data"):
            values[key] = None if values[key] is None else describe_source(values[key])
        return values


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or YAML file (keys as in :class:`TrainConfig`, optionally under a
    ``[train]`` table), each checked on its own (type and range) with the file named."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"config file {path} is a directory; pass a .toml or .yaml file")
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; pass an existing .toml or .yaml file")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UsageError(f"config file {path}: use a .toml or .yaml file")
    _, text = read_utf8(path)
    values: Any
    if path.suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {one_line(str(exc))}") from exc
    else:
        try:
            import yaml
        except ImportError as exc:
            raise UsageError("YAML config needs PyYAML (pip install pyyaml), or use TOML") from exc
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {path} is not valid YAML: {one_line(str(exc))}") from exc
    if isinstance(values, Mapping) and isinstance(values.get("train"), Mapping):
        values = values["train"]
    if not isinstance(values, Mapping):
        raise UsageError(f"config file {path} holds a {type(values).__name__}; it must map option "
                         "names to values (e.g. rank = 8)")
    if isinstance(values, Mapping) and "fast" in values and "fuse" not in values:
        values = {("fuse" if k == "fast" else k): v for k, v in values.items()}  # the name before 0.2
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise UsageError(f"config file {path}: unknown options {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    problems = check_options(values, partial=True)
    if problems:
        raise UsageError(f"config file {path}: " + "; ".join(problems))
    return dict(values)


def check_output_dir(out: Path, config: TrainConfig) -> None:
    """Refuse to write over another run: a used directory needs ``resume`` with the same options."""
    saved = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise UsageError(f"output dir {out} is a file: choose another --output-dir")
    used = out.is_dir() and any(p.name not in _NOT_A_RUN for p in out.iterdir())
    if not used:
        if config.resume:
            raise UsageError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return
    if not config.resume:
        raise UsageError(
            f"output dir {out} already holds a run (or other files): pass --resume to continue "
            "it, or choose another --output-dir. Nothing was overwritten"
        )
    if not saved.is_file():
        raise UsageError(f"--resume: {out} has no {RUN_CONFIG}; it is not a splice run directory")
    try:
        before = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: {saved} is unreadable ({one_line(str(exc))}); it is not a "
                         "splice run directory any more") from exc
    if not isinstance(before, dict):
        raise UsageError(f"--resume: {saved} is not a JSON object; it is not a splice run directory")
    now = config.to_dict()
    changed = sorted(k for k in now if k not in _RESUME_FREE and before.get(k) != now[k])
    if changed:
        raise UsageError(
            f"--resume: options differ from the run in {out}: {', '.join(changed)}. Resume with "
            "the run's options (see its run_config.json) or start a new --output-dir"
        )


def save_run_config(out: Path, config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(config.to_dict(), indent=1) + "\n")


# ----------------------------------------------------------------------------- validation
# One table for the Python API, config files and flags. A new option joins with one line:
# its type is checked from its annotation; add a Rule for its range or its combinations.


@dataclass(frozen=True)
class Rule:
    """``ok(*values)`` must hold for the options ``names``; ``says`` is what would be valid.

    A rule on one option sees only a non-None value of the right type; a rule on several runs
    once all of them have the right type (and not on a config file's partial options)."""

    names: tuple[str, ...]
    ok: Callable[..., bool]
    says: str


_DEVICE = re.compile(r"auto|cpu|mps|meta|(cuda|xpu)(:\d+)?")


def _compiles(targets: str) -> bool:
    spec = _target_spec(targets)
    if isinstance(spec, tuple):
        return bool(spec)
    if spec == "all-linear":
        return True
    try:
        re.compile(spec)
    except Exception:  # re.error, and RecursionError / OverflowError on pathological patterns
        return False
    return True


def _init_ok(name: str) -> bool:
    from splice.lora.init import init_name  # here, not at the top: it needs torch (keeps --help fast)

    try:
        init_name(name)
    except ValueError:
        return False
    return True


RULES: tuple[Rule, ...] = (
    Rule(("rank",), lambda v: v >= 1, "must be >= 1"),
    Rule(("alpha",), lambda v: v > 0, "must be > 0 (the LoRA scale is alpha / rank)"),
    Rule(("dropout",), lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    Rule(("targets",), _compiles, "must be 'all-linear', a valid regex, or comma-separated module "
         "names such as q_proj,v_proj"),
    Rule(("steps",), lambda v: v >= 1, "must be >= 1 (or none/0 on the command line: use epochs)"),
    Rule(("epochs",), lambda v: v > 0, "must be > 0"),
    Rule(("steps", "epochs"), lambda steps, epochs: steps is None or epochs is None,
         "give steps or epochs, not both"),
    Rule(("lr",), lambda v: v > 0, "must be > 0"),
    Rule(("optimizer",), lambda v: v in ("adamw", "sgd"), "must be adamw or sgd"),
    Rule(("weight_decay",), lambda v: v >= 0, "must be >= 0"),
    Rule(("schedule",), lambda v: v in ("cosine", "linear", "constant"),
         "must be cosine, linear or constant"),
    Rule(("warmup_steps",), lambda v: v >= 0, "must be >= 0"),
    Rule(("batch_size",), lambda v: v >= 1, "must be >= 1"),
    Rule(("grad_accum",), lambda v: v >= 1, "must be >= 1"),
    Rule(("max_grad_norm",), lambda v: v >= 0, "must be >= 0 (0 turns clipping off; a negative "
         "norm would turn training into gradient ascent)"),
    Rule(("max_length",), lambda v: v >= 8, "must be >= 8"),
    Rule(("max_rows",), lambda v: v >= 1, "must be >= 1 (or unset for all rows)"),
    Rule(("max_line_bytes",), lambda v: v >= 1, "must be >= 1"),
    Rule(("val_fraction",), lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    Rule(("precision",), lambda v: v in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32"),
    Rule(("init",), _init_ok, "must be default, gaussian, pissa, pissa_niter_N (N >= 1) or olora"),
    Rule(("loraplus_ratio",), lambda v: v > 0, "must be > 0 (e.g. 16; unset: LoRA+ off)"),
    Rule(("adapter",), lambda v: (Path(v) / "adapter_config.json").is_file(),
         "must be an adapter folder (adapter_config.json + adapter_model.safetensors, e.g. runs/sft/adapter)"),
    Rule(("dist_timeout",), lambda v: v > 0, "must be > 0 (seconds)"),
    Rule(("quantize",), lambda v: v in ("nf4", "int8", "fp8"), "must be nf4, int8 or fp8 (or unset: no quantization)"),
    Rule(("device",), lambda v: _DEVICE.fullmatch(v) is not None,
         "must be auto, cpu, mps, cuda or cuda:N"),
    Rule(("seed",), lambda v: 0 <= v < 2**63, "must be in [0, 2**63)"),
    Rule(("eval_every",), lambda v: v >= 0, "must be >= 0 (0: at the end only)"),
    Rule(("eval_batches",), lambda v: v >= 1, "must be >= 1"),
    Rule(("eval_samples",), lambda v: v >= 0, "must be >= 0 (0: no generation scoring)"),
    Rule(("eval_batch_size",), lambda v: v >= 1, "must be >= 1"),
    Rule(("max_new_tokens",), lambda v: v >= 1, "must be >= 1"),
    Rule(("save_every",), lambda v: v >= 0, "must be >= 0 (0: only at the end)"),
    Rule(("keep_checkpoints",), lambda v: v >= 1, "must be >= 1"),
    Rule(("max_bad_steps",), lambda v: v >= 1, "must be >= 1"),
    Rule(("method",), lambda v: v in LOSS_TYPES, "must be sft, dpo or grpo"),
    Rule(("beta",), lambda v: v >= 0, "must be >= 0"),
    Rule(("label_smoothing",), lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)"),
    Rule(("num_generations",), lambda v: v >= 2, "must be >= 2 (advantages compare completions of one prompt)"),
    Rule(("max_completion_length",), lambda v: v >= 1, "must be >= 1"),
    Rule(("epsilon",), lambda v: v > 0, "must be > 0"),
    Rule(("temperature",), lambda v: v >= 0, "must be >= 0 (0: greedy)"),
    Rule(("top_p",), lambda v: 0 < v <= 1, "must be in (0, 1] (1: off)"),
    Rule(("method", "loss_type"), lambda m, t: t is None or t in LOSS_TYPES.get(m, ()),
         "loss_type must be sigmoid or ipo with method dpo, grpo, dr_grpo or dapo with method grpo, "
         "and unset with sft"),
    Rule(("method", "beta"), lambda m, b: b is None or m != "sft" and (b > 0 or m != "dpo"),
         "beta is an option of method dpo (> 0; default 0.1) or grpo (>= 0; default 0): add --method"),
    Rule(("method", "label_smoothing", "loss_type"), lambda m, ls, t: ls == 0 or (m == "dpo" and t in (None, "sigmoid")),
         "label_smoothing is an option of method dpo with the sigmoid loss"),
    Rule(("method", "precompute_ref"), lambda m, p: not p or m == "dpo",
         "precompute_ref is an option of method dpo"),
    Rule(("method", "rpo_alpha"), lambda m, a: a is None or (m == "dpo" and a >= 0),
         "rpo_alpha is an option of method dpo (>= 0, the weight of the chosen answers' NLL; default: off)"),
    Rule(("method", "reward"), lambda m, r: r is None or m == "grpo", "reward is an option of method grpo"),
    Rule(("prompt_template", "response_template"), lambda p, r: (p is None) == (r is None),
         "give both prompt_template and response_template (or neither)"),
    Rule(("system_prompt", "chat"), lambda s, chat: s is None or chat,
         "system_prompt is only used with chat: add --chat or drop --system-prompt"),
    Rule(("keep_attention", "gradient_checkpointing", "offload_checkpoints"),
         lambda keep, ckpt, offload: not keep or ckpt or offload,
         "keep_attention needs gradient_checkpointing or offload_checkpoints"),
    Rule(("mlp_chunk_tokens",), lambda v: v is None or v >= 1,
         "must be a number of tokens >= 1 (e.g. 65536 for the longest sequences), or unset (off)"),
    Rule(("offload_compression",), lambda v: v in ("none", "fp8", "int8"),
         "must be none, fp8 (recommended) or int8"),
    Rule(("offload_compression", "offload_checkpoints"), lambda c, offload: c == "none" or offload,
         "offload_compression compresses the layer inputs offload_checkpoints keeps in host memory: add "
         "--offload-checkpoints or drop --offload-compression"),
    Rule(("embeddings_on_host", "cuda_graphs"), lambda host, graphs: not host or graphs is not True,
         "embeddings_on_host gathers rows on the CPU, which a CUDA graph cannot capture: drop "
         "cuda_graphs (it is off by default with embeddings_on_host)"),
)


def flag(name: str) -> str:
    """The command-line flag of option ``name``: ``max_grad_norm`` -> ``--max-grad-norm``."""
    return "--" + name.replace("_", "-")


def _kinds(annotation: Any) -> set[str]:
    """{"int", "None"} for ``"int | None"``; empty for annotations this check does not know."""
    parts = {p.strip() for p in str(annotation).split("|")}
    return parts if parts <= {"int", "float", "str", "bool", "None"} else set()


def _type_ok(value: Any, kinds: set[str]) -> bool:
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"}) and ("int" in kinds or math.isfinite(float(value)))
    if isinstance(value, float):
        return "float" in kinds and math.isfinite(value)
    return isinstance(value, str) and "str" in kinds


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_options(values: Mapping[str, Any], *, partial: bool = False) -> list[str]:
    """Every problem with ``values`` (option -> value), one clause each, naming the option and
    its flag and what would be valid. ``partial``: only the options present (a config file)."""
    kinds = {f.name: _kinds(f.type) for f in fields(TrainConfig)}
    problems: list[str] = []
    typed: dict[str, Any] = {}
    for name, value in values.items():
        want = kinds.get(name)
        if want is None or not want:  # unknown options are the caller's to report
            typed[name] = value
            continue
        if _type_ok(value, want):
            typed[name] = value
            continue
        names = " or ".join(sorted(k if k != "None" else "unset" for k in want))
        finite = " (finite)" if "float" in want and isinstance(value, float) else ""
        problems.append(f"{name} must be {names}{finite}, got {_show(value)} of type "
                        f"{type(value).__name__} ({flag(name)})")
    for rule in RULES:
        if not all(n in typed for n in rule.names):
            continue
        args = [typed[n] for n in rule.names]
        if len(args) == 1:
            if args[0] is not None and not rule.ok(args[0]):
                name = rule.names[0]
                problems.append(f"{name} {rule.says}, got {_show(args[0])} ({flag(name)})")
        elif not partial and not rule.ok(*args):
            problems.append(f"{rule.says} ({', '.join(flag(n) for n in rule.names)})")
    return problems


def _target_spec(targets: str) -> str | tuple[str, ...]:
    if targets == "all-linear" or any(c in targets for c in "\\^$*+?[]()|"):
        return targets
    return tuple(t.strip() for t in targets.split(",") if t.strip())
