"""``torchrun --nproc-per-node N -m splice serve ...``: one base split over N ranks, rank 0 serving HTTP.

For a base too large for one card. Every rank loads its share of the base
(:func:`~splice.distributed.tensor_parallel.load_sharded`: q/k/v/gate/up split by output rows,
o/down by input columns, embeddings and the output head replicated), builds the same
:class:`ShardedService` (adapter bank over its slices, a
:class:`~splice.distributed.lockstep.LockstepEngine`) and captures the same CUDA graphs. Rank 0 then
runs the OpenAI-compatible server; the other ranks run the engine loop, stepping with rank 0 on what
it broadcasts before each step. Adapters (``--adapter``, and ``/v1/load_lora_adapter`` with
``--allow-adapter-dir``) are read by every rank from the same folder, each keeping its slice, so the
ranks must share a file system (one node).

Shutdown: SIGTERM or Ctrl+C on rank 0 drains as ``splice serve`` does; the other ranks ignore both
(torchrun forwards SIGTERM to every rank) and stop when rank 0's engine closes, so a drain can finish
its requests; every rank then exits 0 (within torchrun's 30 s before it kills its workers: keep
``--drain-timeout`` below that). A rank that dies ends the others' next collective, so all exit 1.

``--quantize nf4|int8``: each rank quantizes its own slices as they stream in (every linear but the
output head, as ``splice serve --quantize`` does on one card): each rank holds a quantized 1/N of the
projections, the replicated float embeddings and head, and one float slice at a time while loading,
so a base that fits N cards only in 4 or 8 bits serves from them. A slice's codes are not the full weight's sliced (NF4's double-quantized
absmax, int8's per-row scales of o/down), so the tokens can differ from one card's ``--quantize``
by what quantization differs by; adapters apply over the quantized slices as on one card. DoRA adapters
serve too: their factors are norms over whole rows, so the ranks sum their o/down columns' squared norms
(:meth:`~splice.distributed.tensor_parallel.Sharding.finish`).

Limits (each refused with one line before the model loads): ``--device cuda:N`` (each rank takes
``cuda:LOCAL_RANK``), fewer GPUs than ranks on the node, a model whose query or KV heads or MLP width
do not divide by N, and a pre-quantized checkpoint (bitsandbytes, FP8: pass the float one, with
``--quantize``). CUDA graphs with NCCL all-reduces
inside are captured as on one card (every rank captures the same buckets; a rank whose capture fails
makes all stop with one line).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Collection
from pathlib import Path

import torch
import torch.distributed as dist

from splice.core.errors import RunError, UsageError
from splice.distributed.lockstep import LockstepEngine
from splice.distributed.process import DistEnv, collective_errors, start, stop
from splice.distributed.tensor_parallel import ShardAdapter, check_shardable, load_sharded, sharding_of
from splice.serve.app import MAX_REQUEST_BYTES
from splice.serve.server import DRAIN_TIMEOUT_S, _check_access, _check_limits, frozen_heap, serve_service
from splice.serve.service import Service

__all__ = ["ShardedService", "serve_sharded"]


class ShardedService(Service):
    """A :class:`Service` on a sharded base (every rank builds one): steps in lockstep, and reads
    each adapter folder as this rank's slice of it."""

    engine_class = LockstepEngine

    def read(self, path: str | Path, *, name: str) -> ShardAdapter:
        """This rank's share of the adapter in ``path``. Before the engine exists (the ``--adapter`` folders,
        read by every rank in the same order) a DoRA adapter's factors are finished here; later (rank 0's
        HTTP thread, alone) they are finished at the engine's next boundary, on every rank at once."""
        sharding = sharding_of(self.model)
        if sharding is None:
            raise RuntimeError("ShardedService serves a model split by splice.distributed.tensor_parallel.shard")
        adapter = sharding.read_adapter(path, name=name, model=self.model)
        return sharding.finish(adapter) if getattr(self, "engine", None) is None else adapter


def _device_type(device: str, ranks: int) -> str:
    """"cuda" or "cpu" for the ``ranks`` ranks on this node, or one line why not."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); "
                         "pass --device cuda, cpu or auto")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind = "cuda" if device == "cuda" or (device == "auto" and have > 0) else "cpu"
    if kind == "cuda" and have < ranks:
        raise UsageError(f"--device {device}: torchrun started {ranks} ranks on this node and it has {have} GPU(s), "
                         "one per rank is needed: lower --nproc-per-node or pass --device cpu")
    return kind


def _agree(value: int, env: DistEnv, what: str) -> None:
    """One line if ranks got different ``value`` s (e.g. CUDA graphs captured)."""
    if env.world_size == 1:
        return
    both = torch.tensor([value, -value], dtype=torch.int64,
                        device=torch.device("cuda") if env.backend == "nccl" else torch.device("cpu"))
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RunError(f"rank {env.rank}: the ranks disagree on {what} (from {-int(both[1])} to {int(both[0])}); "
                       "tensor-parallel ranks must run the same steps")


def serve_sharded(model: str | None, *, adapters: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
                  device: str = "auto", dtype: str = "auto", model_name: str | None = None, max_batch: int = 32,
                  max_len: int = 1024, gpu_adapters: int = 8, max_lora_rank: int = 64,
                  max_request_bytes: int = MAX_REQUEST_BYTES, drain_timeout: float = DRAIN_TIMEOUT_S,
                  api_keys: Collection[str] = (), allow_adapter_dir: str | Path | None = None,
                  quantize: str | None = None, kv_cache: str = "auto", kv_memory: float = 0.8) -> None:
    """``splice serve`` on one of torchrun's ranks (the options are :func:`~splice.serve.server.serve`'s;
    see module docstring)."""
    _check_limits(max_request_bytes=max_request_bytes, drain_timeout=drain_timeout)
    _check_access(allow_adapter_dir=allow_adapter_dir, quantize=quantize)
    kind = _device_type(device, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))
    if model is not None and (Path(model) / "config.json").is_file():  # before the ranks meet: one line each
        from transformers import AutoConfig

        check_shardable(AutoConfig.from_pretrained(model), int(os.environ.get("WORLD_SIZE") or 1))
    torch_dtype = (torch.bfloat16 if kind == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    env = start(device_type=kind)
    assert env is not None  # torchrun's environment is set (commands.cmd_serve checked it)
    try:
        with collective_errors(env):
            where = torch.device("cuda", env.local_rank) if kind == "cuda" else torch.device("cpu")
            base, tokenizer = load_sharded(model, dtype=torch_dtype, device=where, quantize=quantize)
            name = model_name or (Path(model).name if model else "smollm2-135m-instruct")
            service = ShardedService(base, tokenizer, model_name=name, adapters=dict(adapters),
                                     max_batch=max_batch, gpu_adapters=gpu_adapters, max_lora_rank=max_lora_rank,
                                     kv_dtype=kv_cache, kv_memory=kv_memory,
                                     max_len=min(max_len, int(getattr(tokenizer, "model_max_length", max_len)
                                                              or max_len)))
            started = time.monotonic()
            graphs = service.engine.runner.warmup()
            _agree(graphs, env, "the CUDA graphs captured")
            if env.rank != 0:
                return _follow(service)
            if graphs:
                print(f"splice serve: {graphs} CUDA graphs captured on each rank in {time.monotonic() - started:.1f} s",
                      flush=True)
            keys = "with API keys" if api_keys else "open (no --api-key)"
            print(f"splice serve: {name}{f' ({quantize})' if quantize else ''} split over {env.world_size} ranks ({env.backend}) with adapters "
                  f"{sorted(adapters) or 'none'} on http://{host}:{port}/v1, {keys}", flush=True)
            serve_service(service, host=host, port=port, max_request_bytes=max_request_bytes,
                          drain_timeout=drain_timeout, api_keys=api_keys, allow_adapter_dir=allow_adapter_dir)
    finally:
        stop(env)


def _follow(service: ShardedService) -> None:
    """A rank other than 0: step with rank 0 until it closes, deaf to SIGTERM and SIGINT (rank 0
    drains; see module docstring)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    with frozen_heap():  # rank 0's pauses are its followers' too: every step waits for all ranks
        service.engine.run(threading.Event())
