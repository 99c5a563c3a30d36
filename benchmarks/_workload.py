"""One framework's LoRA training on a random Llama-3-8B-shaped model (runs inside a worker).

Frameworks: ``peft`` (PEFT as installed), ``liger`` (PEFT + Liger-Kernel's Llama patches:
fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) and ``splice`` (add_lora + freeze +
splice.fused.apply.fuse + splice.memory.checkpointing.checkpoint_layers, loss by splice.training.loss). All three see
the same bf16 base weights (seeded per parameter name, built on the GPU), the same LoRA init
(lora_A seeded per module path, lora_B zero), the same token batches and the same AdamW.

``packed=True`` batches are rows packed with ShareGPT-like segments (:func:`sharegpt_lengths`,
``position_ids`` restarting per segment, each segment's first token not a target); splice attends
them as ``pack`` says (``"mask"``: Hugging Face's block-diagonal mask, ``"varlen"``: the varlen
kernel, no mask), PEFT and Liger through Hugging Face's mask.
"""

from __future__ import annotations

import gc
import math
import random
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

GIB = float(1 << 30)
VOCAB = 128256
HIDDEN, INTER, HEADS, KV_HEADS = 4096, 14336, 32, 8
LR = 1e-4
DEVICE = "cuda"


def configure(*, tiny: bool, device: str) -> None:
    """``tiny``: a small model of the same shape family (CPU smoke tests of this harness)."""
    global VOCAB, HIDDEN, INTER, HEADS, KV_HEADS, DEVICE
    if tiny:
        VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 1000, 128, 256, 4, 2
    DEVICE = device


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Config:
    name: str
    rank: int
    targets: tuple[str, ...] | str
    seq: int
    batch: int
    ckpt: bool  # PEFT's and Liger's gradient checkpointing (the settings)
    dropout: float = 0.05


CONFIGS = {
    "A": Config("A", 8, ("q_proj", "v_proj"), 1024, 1, False),
    "C": Config("C", 16, "all-linear", 2048, 2, True),
    "E": Config("E", 16, "all-linear", 8192, 1, True),
    # loss parity: no dropout, the same batch every step, a larger lr so the loss moves
    "P": Config("P", 16, "all-linear", 1024, 1, False, dropout=0.0),
}


def build_model(n_layers: int) -> nn.Module:
    """Llama-3-8B architecture, random bf16 weights made on the GPU (meta init + to_empty)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=n_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=262144, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False,
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device=DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=gen)
    rotary = model.model.rotary_emb  # its inv_freq buffer is not a parameter: rebuild it
    with torch.device(DEVICE):
        model.model.rotary_emb = type(rotary)(config)
    model.config.use_cache = False
    return model.train()


def init_lora(pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    """Same adapter init everywhere: A ~ U(-1/sqrt(in), 1/sqrt(in)) seeded by path, B = 0."""
    with torch.no_grad():
        for path, a, b in pairs:
            gen = torch.Generator(device=a.device).manual_seed(zlib.crc32(path.encode()))
            bound = 1.0 / a.shape[1] ** 0.5
            a.copy_(torch.rand(a.shape, generator=gen, device=a.device, dtype=torch.float32) * 2 * bound - bound)
            b.zero_()


@dataclass
class Setup:
    model: nn.Module
    loss: Callable[..., Tensor]  # loss(ids), or loss(ids, positions) for packed rows
    lora: list[tuple[str, Tensor, Tensor]]
    set_ckpt: Callable[[str], None]  # "off" | "on" (framework's default) | "all" | "offload"


def _peft_pairs(model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    pairs = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            pairs.append((name.removeprefix("base_model.model."), lora_a["default"].weight,
                          module.lora_B["default"].weight))
    return pairs


def setup_peft(base: nn.Module, cfg: Config) -> Setup:
    from peft import LoraConfig, get_peft_model

    targets = cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=16, lora_dropout=cfg.dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))

    def set_ckpt(mode: str) -> None:
        if mode == "off":
            base.gradient_checkpointing_disable()
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss(ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return model(input_ids=ids, position_ids=positions, labels=packed_labels(ids, positions),
                     use_cache=False).loss

    return Setup(model, loss, _peft_pairs(model), set_ckpt)


def packed_labels(ids: Tensor, positions: Tensor | None) -> Tensor:
    """Labels of (packed) rows: the ids, with each segment's first token no target."""
    return ids if positions is None else ids.masked_fill(positions == 0, -100)


def setup_splice(base: nn.Module, cfg: Config, *, pack: str = "mask") -> Setup:
    from splice.fused.apply import fuse
    from splice.lora.apply import add_lora, lora_modules
    from splice.lora.freeze import freeze
    from splice.lora.layers import LoraConfig
    from splice.memory.checkpointing import checkpoint_layers, uncheckpoint_layers
    from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states

    add_lora(base, LoraConfig(rank=cfg.rank, alpha=16, dropout=cfg.dropout, targets=cfg.targets))
    freeze(base)
    fuse(base)
    weight, bias = lm_head_params(base)
    chunk = {"rows": 1024}  # the loss's (rows, vocab) fp32 block: smaller in low-memory modes

    def set_ckpt(mode: str) -> None:
        uncheckpoint_layers(base)
        mode, _, compression = mode.partition("+")  # "offload-recompute+fp8": 8-bit layer inputs on the host
        mode, _, host_layers = mode.partition(":")  # "offload-recompute:76": only 76 layers to the host
        chunk["rows"] = 1024 if mode in ("off", "on") else 256
        if mode != "off":
            # "offload" keeps the attention internals too (offloaded); "offload-recompute" does not
            offload: bool | int = int(host_layers) if host_layers else mode.startswith("offload")
            checkpoint_layers(base, layers="auto" if mode == "on" else "all", offload=offload,
                              keep_attention=mode == "offload", offload_compression=compression or "none")

    def loss(ids: Tensor, positions: Tensor | None = None) -> Tensor:
        hidden = model_hidden_states(base, input_ids=ids, position_ids=positions, packed_attention=pack)
        # static_shapes: no host sync (CUDA graphs need it); (nearly) every label is a target here anyway
        return causal_lm_loss(hidden, weight, packed_labels(ids, positions), lm_head_bias=bias,
                              chunk_size=chunk["rows"], static_shapes=True)

    pairs = [(p, layer.lora_A.weight, layer.lora_B.weight) for p, _, layer in lora_modules(base)]
    return Setup(base, loss, pairs, set_ckpt)


def make_setup(framework: str, cfg: Config, n_layers: int, *, pack: str = "mask") -> Setup:
    base = build_model(n_layers)
    setup = setup_splice(base, cfg, pack=pack) if framework == "splice" else setup_peft(base, cfg)
    init_lora(setup.lora)
    return setup


def sharegpt_lengths(total: int, *, seed: int, median: int = 350) -> list[int]:
    """Segment lengths filling ``total`` tokens, ShareGPT-like: log-normal with median 350 tokens and
    sigma 1 (conversations of a few hundred tokens, a long tail), each in [8, 4096]; the last one cut
    to fit. Fixed by ``seed`` (Python's generator: the same on every platform)."""
    rng, lengths = random.Random(seed), list[int]()
    while sum(lengths) < total:
        n = min(max(8, round(rng.lognormvariate(math.log(median), 1.0))), 4096)
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def packed_positions(rows: int, seq: int, *, seed: int) -> Tensor:
    """(rows, seq) position ids of rows packed with :func:`sharegpt_lengths` (restarting per segment)."""
    return torch.stack([torch.cat([torch.arange(n) for n in sharegpt_lengths(seq, seed=seed * 1000 + r)])
                        for r in range(rows)]).to(DEVICE)


def batches(cfg: Config, *, seq: int | None = None, batch: int | None = None, same: bool = False,
            packed: bool = False) -> Iterator[dict[str, Tensor]]:
    """``{"ids": (batch, seq)}`` of random tokens, and ``"positions"`` of packed rows (``packed``)."""
    step = 0
    while True:
        seed = 1000 + (0 if same else step)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        rows, width = batch or cfg.batch, seq or cfg.seq
        out = {"ids": torch.randint(0, VOCAB, (rows, width), generator=gen, device=DEVICE)}
        if packed:
            out["positions"] = packed_positions(rows, width, seed=seed)
        yield out
        step += 1


def step_fn(setup: Setup, params: list[nn.Parameter], *, graphs: bool) -> Callable[[dict[str, Tensor]], Tensor]:
    """Forward + loss + backward of a batch ``{"ids": ...}``, returning the detached loss; with
    ``graphs`` replayed from a CUDA graph (splice.training.graphs.GraphedStep)."""

    def eager(batch: dict[str, Tensor]) -> Tensor:
        loss = setup.loss(batch["ids"]) if "positions" not in batch else setup.loss(batch["ids"], batch["positions"])
        loss.backward()
        return loss.detach()

    if not graphs:
        return eager
    from splice.training.graphs import GraphedStep

    return GraphedStep(eager, params, warn=lambda m: print("[graphs] " + m, flush=True))


def train(setup: Setup, data: Iterator[dict[str, Tensor]], *, warmup: int, steps: int, lr: float = LR,
          graphs: bool = False) -> dict[str, Any]:
    """warmup + steps optimizer steps; returns timing, memory and per-step losses.
    ``graphs``: forward + loss + backward replayed from a CUDA graph (splice.training.graphs.GraphedStep;
    its capture happens in the first warm-up step, so ``warmup`` must be >= 1)."""
    params = [p for p in setup.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    step = step_fn(setup, params, graphs=graphs)
    cuda = DEVICE == "cuda"
    _sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    losses: list[Tensor] = []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        batch = next(data)
        loss = step(batch)
        opt.step()
        opt.zero_grad(set_to_none=not graphs)  # a graph adds into the same .grad tensors
        losses.append(loss.float().clone())
    _sync()
    elapsed = time.perf_counter() - t0
    tokens = batch["ids"].numel() * steps
    out = {
        "step_ms": 1000 * elapsed / max(steps, 1),
        "tok_s": tokens / elapsed if steps else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else 0.0,
        "start_gib": start_alloc / GIB,
        "losses": [float(x) for x in torch.stack(losses).cpu()],
        "graphs": getattr(step, "captured", 0),
    }
    del opt, step
    return out


def free_cuda() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def try_one_step(setup: Setup, cfg: Config, seq: int, *, packed: bool = False) -> dict[str, Any]:
    """One training step at batch 1 x ``seq``; OOM is caught and reported, memory freed."""
    result: dict[str, Any] = {"seq": seq}
    free_cuda()
    try:
        r = train(setup, batches(cfg, seq=seq, batch=1, packed=packed), warmup=0, steps=1)
        result.update(ok=True, seconds=r["step_ms"] / 1000, peak_gib=r["peak_gib"], tok_s=r["tok_s"],
                      loss=r["losses"][0])
        import resource  # the process's peak resident host memory so far (pinned buffers included)

        result["host_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    except torch.OutOfMemoryError:
        result.update(ok=False)
    for p in setup.model.parameters():
        p.grad = None
    free_cuda()
    return result


def linear_params(n_layers: int) -> int:
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN * KV_HEADS // HEADS) + 3 * HIDDEN * INTER
    return n_layers * per_layer + VOCAB * HIDDEN  # + lm_head (a matmul too; embeddings are not)


def flops_per_token(cfg: Config, seq: int, n_layers: int, lora_params: int) -> float:
    """Model FLOPs per trained token (recompute not counted):

    4 * N_linear (forward 2N + input-gradient 2N; frozen base weights get no weight gradient)
    + 6 * N_lora (forward, input- and weight-gradient of the adapters)
    + 6 * L * d * s (causal attention: QK^T and PV forward 2 * 2 * d * s/2 per token and layer,
      backward twice the forward).
    """
    return 4.0 * linear_params(n_layers) + 6.0 * lora_params + 6.0 * n_layers * HIDDEN * seq


_CATEGORIES = (
    ("triton LoRA", ("_lora_down", "_lora_dx", "_tn_reduce")),
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "splitk")),
    ("dropout", ("dropout", "bernoulli")),
    ("copy / cast", ("copy", "cast")),
    ("optimizer", ("adam",)),
    ("triton (fused)", ("triton", "_rms", "_swiglu", "_rope", "liger", "_kernel_", "_lora", "_tn_reduce")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(setup: Setup, cfg: Config, steps: int = 2, *, graphs: bool = False, packed: bool = False) -> str:
    """Profile ``steps`` training steps: GPU time by kernel category, busy fraction, top kernels.
    ``graphs``: the steps replay a captured CUDA graph (captured before profiling starts); ``packed``:
    the batches of packed rows the timed steps trained on (a varlen setup takes no other)."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in setup.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    data = batches(cfg, packed=packed)
    run = step_fn(setup, params, graphs=graphs)

    def step() -> None:
        run(next(data))
        opt.step()
        opt.zero_grad(set_to_none=not graphs)

    step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    kernels: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if not str(e.device_type).endswith("CUDA"):
            continue
        us = float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0))
        if us > 0:
            kernels[e.key] = (kernels.get(e.key, (0.0, 0))[0] + us, kernels.get(e.key, (0.0, 0))[1] + e.count)
    total = sum(us for us, _ in kernels.values())
    by_cat: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        by_cat[_category(name)] = by_cat.get(_category(name), 0.0) + us
    lines = [f"{steps} steps, wall {wall_us / 1e3:.1f} ms, GPU kernel time {total / 1e3:.1f} ms "
             f"(busy {100 * total / wall_us:.0f}%), {sum(c for _, c in kernels.values())} kernel launches"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cat:16s} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%")
    lines.append("  top kernels:")
    for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:18]:
        lines.append(f"  {us / 1e3:9.1f} ms {count:6d}x  {name[:110]}")
    return "\n".join(lines)
