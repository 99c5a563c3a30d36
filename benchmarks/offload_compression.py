"""How much 8-bit offloaded layer inputs (``offload_compression`` fp8 / int8) change training.

    PYTHONPATH=. python benchmarks/offload_compression.py [--model PATH] [--device cpu|cuda] [--json FILE]

The default job's model (the embedded SmolLM2-135M-Instruct) with its default LoRA (r16, alpha 32,
all-linear; B drawn from N(0, 0.01) so that the adapters matter from the first step) on rows of the
embedded function-naming task, every decoder layer checkpointed with its input offloaded. For each
format (and ``none``, the reference) it reports:

* the layer inputs' relative error after the round trip (whole tensor, and the median token), and
  the error of their ordinary channels (all but the 4 of largest mean magnitude), with the inputs'
  amax / RMS per token (how far the outlier channels stand out);
* the relative error of the first step's LoRA gradients (all of them as one vector) against ``none``,
  and the loss of each of ``--steps`` AdamW steps (lr 1e-3, as ``splice train``) from the same start;
* ``--yardstick`` (fp32 only): the same first-step error and losses of the whole model in bf16
  against fp32, the rounding every bf16 run already has.

On the CPU the model runs in fp32 (2 cores: ~5 minutes); on a GPU in bf16 (``--dtype``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from splice.data.function_names import build_function_names, function_name_messages  # noqa: E402
from splice.lora.apply import add_lora, lora_modules  # noqa: E402
from splice.lora.freeze import freeze  # noqa: E402
from splice.lora.layers import LoraConfig  # noqa: E402
from splice.memory import offload  # noqa: E402
from splice.memory.checkpointing import checkpoint_layers  # noqa: E402
from splice.models.loading import load_model  # noqa: E402

FORMATS = ("fp8", "int8")


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def input_stats(x: Tensor, compression: str) -> dict[str, float]:
    """Round-trip errors of one layer input ``x`` (..., H) and how its outliers stand out."""
    back = offload.dequantize_rows(*offload.quantize_rows_8bit(x, compression), x.dtype)  # type: ignore[arg-type]
    flat, err = x.reshape(-1, x.shape[-1]).double(), (back.double() - x.double()).reshape(-1, x.shape[-1])
    ordinary = torch.ones(flat.shape[-1], dtype=torch.bool, device=x.device)
    ordinary[flat.abs().mean(0).topk(min(4, flat.shape[-1])).indices] = False
    ratio = flat.abs().amax(-1) / flat.pow(2).mean(-1).sqrt().clamp_min(1e-30)
    return {"tensor": rel(back, x), "token_median": (err.norm(dim=-1) / flat.norm(dim=-1).clamp_min(1e-30)).median().item(),
            "ordinary": (err[:, ordinary].norm() / flat[:, ordinary].norm()).item(),
            "amax_over_rms_max": ratio.max().item(), "amax_over_rms_median": ratio.median().item()}


def run(model: nn.Module, batches: list[tuple[Tensor, Tensor]], compression: str | None) -> dict[str, Any]:
    """Loss per step and the first step's gradients; ``compression`` None: no checkpointing."""
    model = copy.deepcopy(model)
    if compression is not None:
        checkpoint_layers(model, layers="all", offload=True, offload_compression=compression)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses, first = [], None
    for ids, mask in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        if first is None:
            first = torch.cat([p.grad.float().flatten() for p in params])  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "grad": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4, help="rows per step")
    ap.add_argument("--length", type=int, default=160, help="tokens per row")
    ap.add_argument("--yardstick", action="store_true", help="also bf16 vs fp32 (fp32 runs only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.device == "cpu" else torch.get_num_threads())
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    rows = build_function_names()["train"][: args.rows * args.steps]
    texts = [tokenizer.apply_chat_template(function_name_messages(r), tokenize=False) for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=args.length)
    batches = [(enc.input_ids[i:i + args.rows].to(args.device), enc.attention_mask[i:i + args.rows].to(args.device))
               for i in range(0, len(rows), args.rows)]
    torch.manual_seed(0)  # A's init, and B's below
    add_lora(model, LoraConfig(rank=16, alpha=32, targets="all-linear"))
    freeze(model)
    for _, _, layer in lora_modules(model):
        nn.init.normal_(layer.lora_B.weight, std=0.01)
    model.train()

    seen: list[Tensor] = []  # the first step's layer inputs, as the checkpoints keep them
    quantize = offload.quantize_rows_8bit

    def spy(x: Tensor, compression: Any, *, out: Any = None) -> tuple[Tensor, Tensor]:
        if len(seen) < model.config.num_hidden_layers:
            seen.append(x.detach().clone())
        return quantize(x, compression, out=out)

    offload.quantize_rows_8bit = spy  # type: ignore[assignment]
    t0 = time.perf_counter()
    reference = run(model, batches, "none")
    result: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "device": args.device,
                              "dtype": str(dtype), "rows": args.rows, "length": args.length,
                              "loss_none": reference["losses"], "formats": {}}
    for compression in FORMATS:
        seen.clear()
        r = run(model, batches, compression)
        stats = [input_stats(x, compression) for x in seen]
        result["formats"][compression] = {
            "input_error_tensor_median": statistics.median(s["tensor"] for s in stats),
            "input_error_tensor_max": max(s["tensor"] for s in stats),
            "input_error_token_median": statistics.median(s["token_median"] for s in stats),
            "input_error_ordinary_median": statistics.median(s["ordinary"] for s in stats),
            "first_step_grad_error": rel(r["grad"], reference["grad"]),
            "losses": r["losses"], "loss_equal_first_step": r["losses"][0] == reference["losses"][0]}
        result["amax_over_rms"] = {"max": max(s["amax_over_rms_max"] for s in stats),
                                   "median_token": statistics.median(s["amax_over_rms_median"] for s in stats)}
    offload.quantize_rows_8bit = quantize  # type: ignore[assignment]
    if args.yardstick and dtype == torch.float32:
        bf16 = run(model.to(torch.bfloat16), batches, None)
        result["bf16"] = {"first_step_grad_error": rel(bf16["grad"], reference["grad"]), "losses": bf16["losses"]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
