"""CUDA graphs for training steps: capture forward + loss + backward once per batch shape, replay.

A short step (a small model, or a big one on 1k tokens) is launch-bound: the GPU idles while
Python issues thousands of kernels (Hugging Face module calls, autograd, Triton's launcher).
:class:`GraphedStep` runs a step function eagerly to warm up (Triton compiles, cuBLAS picks its
kernels, pinned buffers for offloaded checkpoints exist), then captures one call into a CUDA graph and afterwards replays it: every kernel of
the forward, the loss and the backward goes to the GPU in one launch.

The step function ``fn(batch) -> Tensor`` computes the loss *and calls backward itself*; it gets
the graph's static copy of ``batch`` (a dict of tensors) and returns what the caller wants back
(e.g. the detached loss). What capture requires of it:

* the same shapes every call: one graph is captured per distinct set of input shapes and dtypes
  (they share one memory pool), up to ``max_graphs``, then calls run eagerly;
* no host syncs (``.item()``, Python ``if`` on a GPU value, data-dependent shapes): e.g.
  :func:`splice.training.loss.causal_lm_loss` with ``static_shapes=True``. Hugging Face models notice the
  capture and skip their host-side mask checks, building an explicit attention mask instead;
  for calls without mask or positions :func:`splice.training.loss.model_hidden_states` tells
  :mod:`splice.fused.modules`'s attention that it is plain causal, so sdpa keeps its causal kernels;
* randomness from torch's CUDA generator (``torch.rand``, ``nn.Dropout``, splice's dropout keys)
  is fresh on every replay; a recompute under :mod:`splice.memory.checkpointing` replays splice's LoRA
  dropout keys, but not torch's generator (those layers refuse capture).

Gradients: parameters' ``.grad`` tensors are created (zeros) before capture and the graph adds
into them, so accumulation over micro-batches works as in eager mode. Zero them in place
(``optimizer.zero_grad(set_to_none=False)``); if they are set to None anyway, the next call puts
the graph's tensors back, zeroed. When ``fn`` raises during capture, the error is reported once
through ``warn`` and every later call runs eagerly: same results, only slower. When CUDA itself
aborts the capture (a host sync inside ``fn``), torch's CUDA generator is left unusable, so the
call raises with the fix (run without graphs) instead. On CPU, or with ``enabled=False``, a call
is simply ``fn(batch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GraphedStep"]

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def _check_generator_after_failed_capture(inputs: Mapping[str, Tensor], failure: str) -> None:
    """A capture that CUDA itself aborted (a host sync inside it) leaves torch's CUDA generator
    in capture mode, so no random op would work again in this process: then stop with the fix."""
    device = next(iter(inputs.values())).device
    try:
        torch.randint(0, 2, (1,), device=device)
    except RuntimeError as exc:
        raise RuntimeError(
            f"CUDA graph capture failed ({failure}) and left torch's CUDA generator unusable: the "
            "step synchronizes with the host (.item(), a data-dependent shape, a value tested in "
            "Python), which a graph cannot hold. Rerun without CUDA graphs (splice train "
            "--no-cuda-graphs, or GraphedStep(enabled=False)); --resume continues a run"
        ) from exc


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, Tensor], output: Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedStep:
    """``step(batch)``: ``fn(batch)`` replayed from a CUDA graph per input shape (module doc)."""

    def __init__(
        self,
        fn: Callable[[dict[str, Tensor]], Tensor],
        params: Sequence[nn.Parameter],
        *,
        enabled: bool = True,
        warmup: int = 2,
        max_graphs: int = 4,
        warn: Callable[[str], None] = print,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (Triton and cuBLAS must run once before capture), got {warmup}")
        self.fn, self.params = fn, [p for p in params if p.requires_grad]
        self.enabled, self.warmup, self.max_graphs, self.warn = enabled, warmup, max_graphs, warn
        self.graphs: dict[Signature, _Captured] = {}
        self.grads: list[Tensor] | None = None  # the .grad tensors every graph accumulates into
        self.pool: Any = None  # torch's graph memory-pool handle, shared by this step's graphs
        self.failure: str | None = None

    @property
    def captured(self) -> int:
        """How many graphs have been captured (0 on CPU, when disabled, or after a failure)."""
        return len(self.graphs)

    def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
        device = next(iter(batch.values())).device if batch else torch.device("cpu")
        if not (self.enabled and self.failure is None and device.type == "cuda"):
            return self.fn(dict(batch))
        sig = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        captured = self.graphs.get(sig)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(dict(batch))
            captured = self._capture(sig, batch)
            if captured is None:
                return self.fn(dict(batch))
        self._install_grads()
        for key, value in batch.items():
            captured.inputs[key].copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.output

    def _install_grads(self) -> None:
        """Point every ``.grad`` at the graph's tensor (zeroed where it had been set to None)."""
        assert self.grads is not None
        stale = []
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is g:
                continue
            if p.grad is None:
                stale.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if stale:
            torch._foreach_zero_(stale)

    def _capture(self, sig: Signature, batch: Mapping[str, Tensor]) -> _Captured | None:
        inputs = {k: v.detach().clone() for k, v in batch.items()}
        if self.grads is None:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grads = [p.grad for p in self.params]  # type: ignore[misc]
        else:
            self._install_grads()
        saved = [g.clone() for g in self.grads]  # the caller's partial accumulation, kept
        side = torch.cuda.Stream()
        output: Tensor | None = None
        try:
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.fn(inputs)
            finally:  # even after an error: nothing may run on while the grads are restored
                torch.cuda.current_stream().wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.fn(inputs)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            for g, s in zip(self.grads, saved, strict=True):  # undo the warm-up's gradients
                g.copy_(s)
        if self.failure is not None:
            _check_generator_after_failed_capture(inputs, self.failure)
            self.warn(f"CUDA graph capture failed, training continues without graphs ({self.failure})")
        if output is None:
            return None
        captured = _Captured(graph, inputs, output)
        self.graphs[sig] = captured
        return captured
