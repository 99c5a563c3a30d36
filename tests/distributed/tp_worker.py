"""One rank of a tensor-parallel test job (started by :func:`tests.distributed.ranks.run_ranks`).

The job (JSON on the command line): ``{"kind": ..., "out": dir, "device": "cpu" | "cuda", ...}``.
Every rank builds the same tiny Llama (tests/tiny.py) and splits it over the group; each writes
``out/rank<r>.json`` (and ``out/logits-rank<r>.safetensors`` for logits):

* ``logits``: the sharded model's plain forward on ``ids`` (Hugging Face's attention);
* ``load``: the same after :func:`load_sharded` of ``model_dir``;
* ``quantized``: the same after ``load_sharded(model_dir, quantize=...)``, plus each quantized linear's
  dequantized weight (``out/weights-rank<r>.safetensors``) and a :class:`ShardedService` 's tokens
  for ``prompts`` (and ``prompts[0]`` under adapter ``alpha``);
* ``generate``: :meth:`LockstepEngine.generate` of ``prompts`` with ``params`` on every rank;
* ``serve``: a :class:`ShardedService` (adapter ``alpha`` from the start): rank 0 submits requests
  from its own thread while the engine runs (:meth:`LockstepEngine.run`), loads adapter ``beta`` at
  run time, cancels a long request, then stops; the other ranks follow.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from splice.core.rewrite import innermost
from splice.distributed.lockstep import LockstepEngine
from splice.distributed.process import start, stop
from splice.distributed.tensor_parallel import COLUMN, ROW, load_sharded, shard
from splice.engine.engine import Request
from splice.engine.sampling import SamplingParams
from splice.quant.linear import Int8Linear, is_quantized
from splice.quant.nf4 import NF4Tensor
from splice.serve.tensor_parallel import ShardedService
from tests.tiny import build_tiny_llama, build_tiny_tokenizer


def _model(device: torch.device) -> tuple[Any, Any]:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer)).to(device)
    shard(model)
    return model, tokenizer


def sliced_quantized(model: nn.Module, *, quantize: str, world: int = 2) -> nn.Module:
    """``model`` (float, changed in place) with each split projection's weight replaced by its
    ``world`` slices (as :meth:`Sharding.part` cuts them) each quantized alone and dequantized, side by
    side: the weights ``world`` ranks of ``load_sharded(quantize=...)`` compute with, in one process."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in COLUMN + ROW:
            continue
        assert isinstance(module, nn.Linear), name
        weight = module.weight.detach()
        dim = 0 if leaf in COLUMN else 1  # column-parallel: rows (output features); row-parallel: columns
        slices = [s.contiguous() for s in weight.chunk(world, dim=dim)]
        module.weight.data = torch.cat([
            NF4Tensor.from_float(s, block_size=64).dequantize(s.dtype) if quantize == "nf4"
            else Int8Linear(s, None).dequantize(s.dtype) for s in slices], dim=dim)
    return model


def _logits(model: Any, ids: list[list[int]], device: torch.device, out: Path, rank: int) -> None:
    with torch.no_grad():
        logits = model(torch.tensor(ids, device=device)).logits.float().cpu()
    save_file({"logits": logits.contiguous()}, str(out / f"logits-rank{rank}.safetensors"))


def _generate(job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    model, tokenizer = _model(device)
    engine = LockstepEngine(model, tokenizer, max_seqs=4, max_len=96)
    params = [SamplingParams(**p) for p in job["params"]]
    done = engine.generate(job["prompts"], params)
    return {"tokens": [[c.generated for c in r.choices] for r in done], "kv_heads": engine.runner.key_caches[0].shape[2]}


def _quantized(job: dict[str, Any], device: torch.device, out: Path, rank: int) -> dict[str, Any]:
    model, tokenizer = load_sharded(job["model_dir"], dtype=torch.float32, device=device, quantize=job["quantize"])
    _logits(model, job["ids"], device, out, rank)
    quantized = {name: m for name, m in model.named_modules() if is_quantized(m)}
    save_file({name: m.dequantize(torch.float32).cpu().contiguous() for name, m in quantized.items()},  # type: ignore[operator]
              str(out / f"weights-rank{rank}.safetensors"))
    service = ShardedService(model, tokenizer, model_name="tiny", adapters={"alpha": job["alpha"]}, max_batch=4,
                             max_len=96)
    prompts, params = job["prompts"], [SamplingParams(**p) for p in job["params"]]
    done = service.engine.generate([*prompts, prompts[0]], [*params, params[0]],
                                   adapters=[*[None] * len(prompts), "alpha"])
    bases = {type(innermost(model.get_submodule(path))).__name__ for path in service.sites}
    return {"tokens": [[c.generated for c in r.choices] for r in done], "logprobs": _logprobs(done),
            "quantized": sorted(quantized),
            "types": sorted({type(m).__name__ for m in quantized.values()}), "bank_bases": sorted(bases),
            "sites": sorted(service.sites)}


def _logprobs(done: list[Request]) -> list[list[float]]:
    """Each choice's generated tokens' log-probabilities (empty where its params did not ask)."""
    return [[t.logprob for t in c.logprobs or ()] for r in done for c in r.choices]


def _serve(job: dict[str, Any], device: torch.device, rank: int) -> dict[str, Any]:
    model, tokenizer = _model(device)
    service = ShardedService(model, tokenizer, model_name="tiny", adapters={"alpha": job["alpha"]}, max_batch=4,
                             max_len=256, gpu_adapters=1)
    engine = service.engine
    assert isinstance(engine, LockstepEngine)
    stop_engine = threading.Event()
    if rank != 0:
        engine.run(stop_engine)  # until rank 0 closes
        return {"digest": engine._digest, "computed": engine.computed_tokens}
    thread = threading.Thread(target=engine.run, args=(stop_engine,))
    thread.start()
    try:
        tokens = _requests(service, job)
    finally:
        stop_engine.set()
        thread.join()
    return {"tokens": tokens, "digest": engine._digest, "computed": engine.computed_tokens}


def _requests(service: ShardedService, job: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's side of ``serve``: every request waits for its last choice's final event."""
    def run(prompt: list[int], params: SamplingParams, adapter: str | None = None) -> Request:
        done = threading.Event()
        request = Request(prompt_ids=prompt, params=params, adapter=adapter)
        for choice in request.choices:
            choice.on_event = lambda _text, reason: done.set() if reason and all(
                c.finished for c in request.choices) else None
        service.engine.submit(request)
        assert done.wait(120), "a request never finished"
        return request

    params = [SamplingParams(**p) for p in job["params"]]
    prompts = job["prompts"]
    found: dict[str, Any] = {}
    # a long request, cancelled once it has streamed a token; the others run beside it
    # (seed 0 samples 200 tokens without EOS from this tiny model: it ends only by the cancellation)
    long = Request(prompt_ids=prompts[0], params=SamplingParams(max_tokens=200, temperature=0.7, seed=0))
    first, ended = threading.Event(), threading.Event()
    long.on_event = lambda _text, reason: (ended if reason else first).set()
    service.engine.submit(long)
    found["plain"] = [[c.generated for c in run(p, q).choices] for p, q in zip(prompts, params, strict=True)]
    found["alpha"] = run(prompts[0], params[0], "alpha").generated
    service.load_adapter("beta", job["beta"])
    found["beta"] = run(prompts[0], params[0], service.adapter_for("beta")).generated
    assert first.wait(60) and not ended.is_set(), long.finish_reason
    service.engine.cancel(long)
    assert ended.wait(60)
    unseeded = run(prompts[1], SamplingParams(max_tokens=6, temperature=1.0, n=2))
    found["unseeded"] = [c.generated for c in unseeded.choices]
    found["cancelled"] = long.finish_reason
    return found


def main() -> int:
    job = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    out = Path(job["out"])
    env = start(device_type=job["device"], timeout_s=120)
    assert env is not None
    device = torch.device("cuda", env.local_rank) if job["device"] == "cuda" else torch.device("cpu")
    try:
        result: dict[str, Any] = {"world": env.world_size}
        if job["kind"] == "logits":
            _logits(_model(device)[0], job["ids"], device, out, rank)
        elif job["kind"] == "load":
            model, _ = load_sharded(job["model_dir"], dtype=torch.float32, device=device)
            _logits(model, job["ids"], device, out, rank)
        elif job["kind"] == "quantized":
            result.update(_quantized(job, device, out, rank))
        elif job["kind"] == "generate":
            result.update(_generate(job, device))
        else:
            result.update(_serve(job, device, rank))
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        stop(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
