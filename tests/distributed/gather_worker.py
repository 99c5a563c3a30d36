"""One rank of a :meth:`Wrapped.whole_weights` test job (started by :func:`tests.distributed.ranks.run_ranks`).

The job (JSON on the command line): ``{"out": dir, "prompt": [ids], "max_tokens": [per rank], "ids": [[ids]]}``,
and optionally ``"quantize": "fp8"`` (FP8 base weights, the CPU's emulation), ``"mixed_precision": true``
(FSDP2's bf16 policy), ``"shard": false`` (DDP instead of FSDP2) and ``"fuse": true`` (splice's fused modules).
Every rank builds the same tiny Llama with a LoRA adapter whose ``lora_B`` is not zero (:func:`lora_llama`),
shards it with FSDP2 over the group, builds an engine on it (and packs its projections as the engine does
on a GPU), and inside ``whole_weights()`` greedily generates ``max_tokens[rank]``
tokens of ``prompt`` on splice's engine: a different number of forwards on each rank. Then it takes one
training step's forward and backward on ``ids`` (the sum of the logits, so nothing depends on the
data). Each rank writes ``out/rank<r>.json``: whether every weight was whole (a plain tensor of
the full shape) inside the block and sharded again after it, the projection groups packed, the tokens,
the loss and the adapter's gradient norm; with FP8, whether every FP8 code and scale was whole inside the
block, in its own dtype and equal to the codes the model was built with (no cast on the way).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from splice.distributed.process import DistEnv, barrier, start, stop
from splice.distributed.wrap import wrap_model
from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.fused.apply import fuse
from splice.fused.projections import pack_projections
from splice.lora.apply import add_lora, lora_modules
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.quant.fp8 import FP8Linear, quantize_fp8
from tests.tiny import build_tiny_llama, build_tiny_tokenizer


def lora_llama(*, quantize: str | None = None, fuse_kernels: bool = False) -> tuple[nn.Module, Any]:
    """(the tiny Llama with a rank-4 adapter on q_proj and v_proj, lora_B drawn from seed 1; its tokenizer).
    The other projections are plain linears, which the engine packs on a GPU. ``quantize="fp8"``: every
    decoder linear's base weight in FP8 first (the CPU's emulation of the FP8 GEMMs). ``fuse_kernels``:
    splice's fused modules installed (training's default on a GPU; their reference paths here)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    if quantize == "fp8":
        quantize_fp8(model, allow_cpu=True)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, _, layer in lora_modules(model):
            layer.lora_B.weight.normal_(std=0.2)
    freeze(model)
    if fuse_kernels:
        fuse(model)
    return model, tokenizer


def logits_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"]).logits.sum()


def whole(model: nn.Module, shapes: dict[str, torch.Size]) -> bool:
    return all(not isinstance(p, DTensor) and p.shape == shapes[n] for n, p in model.named_parameters())


def fp8_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every FP8 code and scale tensor of ``model`` by name (whole, as the module sees it now)."""
    return {f"{name}.{attr}": getattr(m, attr) for name, m in model.named_modules() if isinstance(m, FP8Linear)
            for attr in ("qweight", "scale")}


def run(job: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """This rank's part of the job (module doc); its model and engine are gone when it returns."""
    model, tokenizer = lora_llama(quantize=job.get("quantize"), fuse_kernels=bool(job.get("fuse")))
    built = {n: t.detach().clone() for n, t in fp8_codes(model).items()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    wrapped = wrap_model(model, loss=logits_sum, env=env, device=torch.device("cpu"),
                         shard_why="--shard" if job.get("shard", True) else None,
                         mixed_precision=bool(job.get("mixed_precision")))
    engine = Engine(model, tokenizer, max_seqs=2, max_len=64)  # on the sharded model, as GRPO's
    packs = pack_projections(model)  # what the engine does on a GPU: sharded weights stay as they are
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    with wrapped.whole_weights():
        inside = whole(model, shapes)
        codes = fp8_codes(model)
        kept = len(codes) == len(built) and all(
            not isinstance(t, DTensor) and t.dtype == built[n].dtype and torch.equal(t.view(torch.uint8),
                                                                                 built[n].view(torch.uint8))
            for n, t in codes.items())
        done = engine.generate([job["prompt"]], SamplingParams(max_tokens=job["max_tokens"][env.rank],
                                                               temperature=0.0))
        still = whole(model, shapes)  # the forwards resharded nothing
    after = all(isinstance(p, DTensor) for p in model.parameters())
    loss = wrapped({"input_ids": torch.tensor(job["ids"])})
    loss.backward()
    grads = [g.full_tensor() if isinstance(g, DTensor) else g for p in model.parameters() if (g := p.grad) is not None]
    return {"parallel": wrapped.kind, "sharded": sharded, "packs": packs, "whole": inside and still,
            "resharded": after, "tokens": list(done[0].generated), "loss": float(loss.detach()),
            "grad_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))),
            "fp8_modules": len(built) // 2, "fp8_kept": kept}


def main() -> int:
    job = json.loads(sys.argv[1])
    env = start(device_type="cpu", timeout_s=60)
    assert env is not None
    try:
        result = run(job, env)
        gc.collect()  # FSDP2's modules sit in reference cycles: freed now, not at exit after the group closed
        (Path(job["out"]) / f"rank{env.rank}.json").write_text(json.dumps(result))
        barrier(env)  # no rank closes the group while another still reads the last gather from it
    finally:
        stop(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
