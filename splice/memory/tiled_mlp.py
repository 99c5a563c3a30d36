"""A per-token MLP run over the tokens a chunk at a time, forward and backward ("TiledMLP").

Why: at the longest batch-1 sequences the GPU peak sits inside one decoder layer's backward, and
there the MLP's intermediates dominate. A Llama SwiGLU MLP ``down(silu(gate(x)) * up(x))`` over
``T`` tokens with intermediate width ``I`` holds ``gate(x)``, ``up(x)`` and ``silu(g) * u``
(``T x I`` each) plus their gradients: Llama-3-8B (``I = 14336``, bf16) at 600k tokens is 17 GB
per tensor, 50-70 GB for the MLP's backward alone. The MLP is per token, so running it on ``C``
rows at a time is exact: :func:`tiled_mlp` keeps only the input ``x`` (``T x H``) and its output
(``T x H``); in backward it runs each chunk's forward again with gradients on and backpropagates
that chunk alone, writing the chunk's rows of ``dx`` and summing the parameters' gradients. The
MLP's own peak is then ``~3 C I`` values for the intermediates (and as many for their gradients)
instead of ``3 T I``: at ``C = 65536`` 1.8 GB instead of 17 GB per tensor (8B at 600k).

Cost: one more MLP forward per chunk in the backward (the un-tiled backward reuses the forward's
intermediates); that recompute builds ``down``'s backward without computing its value
(:func:`~splice.memory.stash.mlp_output_unread`), so the extra work is the gate/up GEMMs. Inside a
checkpointed Llama-family layer the MLP costs nothing extra: the layer's recompute, whose MLP
output nobody reads, runs no tiled forward at all (only ``x`` is kept), and the gate/up GEMMs it
would have run move into the chunked backward.

Dropout: the chunks draw their masks in the forward as the un-tiled MLP would (splice's seeded
keys through whatever tape is current, a checkpoint's included; torch's generator otherwise), and
the backward replays exactly those: the keys are recorded (:class:`_RelayTape`) and torch's
generator state is restored. A chunk's mask is a function of its keys and the element's index in
the chunk, so with dropout the tiled MLP draws other (equally distributed) masks than the
un-tiled one; without dropout the two agree to rounding.

Parameter gradients come back through the autograd node (the trainable ``params`` are inputs of
it): DDP's and FSDP2's gradient hooks fire once per step, as without tiling. Every trainable
tensor the MLP reads must be in ``params``.

:func:`tile_mlps` installs :class:`TiledMLP` (a rewrite sharing the MLP's parameters and children)
over a model's SwiGLU MLPs, fused (:class:`splice.fused.modules.FusedSwiGLUMLP`) or not;
:func:`untile_mlps` undoes it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.family import MLP_CLASSES
from splice.core.rewrite import Node, Replace, rewrite, share_state, unrewrite
from splice.kernels.dropout import KeyTape, new_keys, recording_keys, replaying_keys
from splice.lora.layers import LoraLinear
from splice.lora.routing import current_route
from splice.memory.stash import is_mlp_output_unread, mlp_output_unread, recording

__all__ = ["TiledMLP", "tile_mlps", "tiled_mlp", "untile_mlps"]

MlpForward = Callable[[Tensor], Tensor]
# Besides the Llama-family MLPs, the fused one (splice.fused sits above this package: matched by name).
_TILEABLE = MLP_CLASSES | {"FusedSwiGLUMLP"}


class _RelayTape(KeyTape):
    """Records the dropout keys drawn inside the tiled MLP while drawing them where they would be
    drawn without it: through the tape current when it was made (a checkpoint's forward records
    them, its recompute replays them) or torch's generator. Replayed in the tiled backward."""

    def __init__(self) -> None:
        super().__init__()
        self._outer = contextvars.copy_context()

    def draw(self, device: torch.device) -> Tensor:
        if self.position is not None:
            return super().draw(device)
        keys = self._outer.run(new_keys, device)
        self.keys.append(keys)
        return keys


def _rows(x: Tensor) -> Tensor:
    """``x`` as (tokens, features): the chunks are row ranges of this."""
    return x.reshape(-1, x.shape[-1])


def _spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _chunked(fn: MlpForward, x: Tensor, chunk: int) -> Tensor:
    """``fn(x)`` computed ``chunk`` rows at a time into one output (no graph is kept by this)."""
    rows, out = _rows(x), None
    for start, end in _spans(rows.shape[0], chunk):
        y = _rows(fn(rows[start:end]))
        if out is None:
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out[start:end] = y
    assert out is not None  # at least one row: the caller tiles only past `chunk` rows
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def _chunk_context(ctx: Any) -> Iterator[None]:
    """Around the backward's recompute: the forward's autocast and random state, no stash (the
    chunks compute their own LoRA down-projections), and down's value skipped (only its graph is used)."""
    devices = [ctx.device] if ctx.cuda_rng is not None else []
    keys = replaying_keys(ctx.tape) if ctx.ran else recording_keys(ctx.tape)
    with torch.random.fork_rng(devices=devices), keys, recording(None), mlp_output_unread(True), \
            torch.autocast(ctx.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]), torch.enable_grad():
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
        yield


class _TiledMLP(torch.autograd.Function):
    """``fn(x)`` keeping only ``x``; backward recomputes and backpropagates chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: MlpForward, chunk: int, *params: Tensor) -> Tensor:
        ctx.fn, ctx.chunk, ctx.device = fn, chunk, x.device
        ctx.cpu_rng = torch.get_rng_state()
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda and not capturing else None
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.tape = _RelayTape()
        ctx.save_for_backward(x, *params)
        # A checkpoint's recompute of a layer whose MLP output only enters the residual sum: that
        # value is never read, so nothing is computed; the backward draws the forward's keys itself.
        ctx.ran = not is_mlp_output_unread()
        if not ctx.ran:
            return torch.empty_like(x)
        with recording_keys(ctx.tape), recording(None):
            return _chunked(fn, x, chunk)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        trainable = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        rows, grad_rows = _rows(x), _rows(grad)
        dx = torch.empty_like(rows) if needs_x else None
        dparams: list[Tensor | None] = [None] * len(params)
        with _chunk_context(ctx):
            for start, end in _spans(rows.shape[0], ctx.chunk):
                piece = rows[start:end].detach().requires_grad_(needs_x)
                inputs = ([piece] if needs_x else []) + [params[i] for i in trainable]
                out = _rows(ctx.fn(piece))
                grads = list(torch.autograd.grad(out, inputs, grad_rows[start:end], allow_unused=True))
                if needs_x:
                    piece_grad = grads.pop(0)
                    dx[start:end] = 0 if piece_grad is None else piece_grad  # type: ignore[index]
                for i, g in zip(trainable, grads, strict=True):
                    if g is not None:  # summed in fp32 (16-bit parameters under FSDP2's bf16 policy)
                        g = g.float()
                        dparams[i] = g if dparams[i] is None else dparams[i] + g  # type: ignore[operator]
        del ctx.fn, ctx.tape
        dparams = [g if g is None else g.to(p.dtype) for g, p in zip(dparams, params, strict=True)]
        return (None if dx is None else dx.view_as(x), None, None, *dparams)


def tiled_mlp(fn: MlpForward, x: Tensor, *, chunk_tokens: int, params: Sequence[Tensor] = ()) -> Tensor:
    """``fn(x)`` for a per-token ``fn`` (each output row depends on its input row alone), over
    ``chunk_tokens`` rows of ``x`` (``(..., H)``, flattened to tokens) at a time (see the module doc).

    ``params``: every trainable tensor ``fn`` reads (their gradients come back through this call).
    Without gradients it only computes chunk by chunk. The plain reference is ``fn(x)``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"tiled_mlp: chunk_tokens must be >= 1, got {chunk_tokens}")
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        if is_mlp_output_unread():
            return torch.empty_like(x)
        with recording(None):
            return _chunked(fn, x, chunk_tokens)
    out: Tensor = _TiledMLP.apply(x, fn, chunk_tokens, *params)
    return out


class TiledMLP(nn.Module):
    """An MLP run through :func:`tiled_mlp` when its input has more than ``chunk_tokens`` tokens
    (shares the MLP's parameters and children: same paths, same ``state_dict``); un-tiled while its
    LoRA layers route batch rows to different adapters (:mod:`splice.lora.routing`)."""

    def __init__(self, mlp: nn.Module, *, chunk_tokens: int) -> None:
        super().__init__()
        share_state(self, mlp)
        self.__dict__["_mlp"] = mlp  # the original, unregistered (its children are ours)
        self.chunk_tokens = chunk_tokens

    def forward(self, x: Tensor) -> Tensor:
        mlp = self.__dict__["_mlp"]
        mlp.training = self.training
        if x.numel() <= self.chunk_tokens * x.shape[-1] or _routed_per_row(self):
            out: Tensor = mlp(x)
            return out
        return tiled_mlp(mlp, x, chunk_tokens=self.chunk_tokens,
                         params=[p for p in self.parameters() if p.requires_grad])

    def extra_repr(self) -> str:
        return f"chunk_tokens={self.chunk_tokens}"


def _routed_per_row(mlp: nn.Module) -> bool:
    """Whether a LoRA layer of ``mlp`` runs its batch rows with different adapters in this call: the
    route indexes the batch rows, which token chunks do not keep (the call then runs un-tiled)."""
    routes = (current_route(m) for m in mlp.modules() if isinstance(m, LoraLinear))
    return any(r is not None and (r.rows is not None or r.slots is not None) for r in routes)


def _tileable(module: nn.Module) -> bool:
    return type(module).__name__ in _TILEABLE and all(
        hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))


def tile_mlps(model: nn.Module, *, chunk_tokens: int) -> list[str]:
    """Run ``model``'s SwiGLU MLPs (Llama family, fused or not) ``chunk_tokens`` tokens at a time
    when an input is longer (call after :func:`~splice.fused.apply.fuse`, before
    :func:`~splice.memory.checkpointing.checkpoint_layers`); returns the rewritten names. Raises
    if ``chunk_tokens < 1`` or the model has no such MLP."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"tile_mlps: chunk_tokens must be an int >= 1, got {chunk_tokens!r}")

    def rule(node: Node) -> Replace | None:
        if isinstance(node.module, TiledMLP) or not _tileable(node.module):
            return None
        return Replace(TiledMLP(node.module, chunk_tokens=chunk_tokens))

    names = rewrite(model, rule, allow_empty=True)
    if not names:
        raise ValueError("tile_mlps (mlp_chunk_tokens): the model has no untiled SwiGLU MLP (Llama family: "
                         "gate_proj, up_proj, down_proj) to run in token chunks; drop the option")
    return names


def untile_mlps(model: nn.Module) -> list[str]:
    """Undo :func:`tile_mlps`."""
    return unrewrite(model, layer=lambda m: isinstance(m, TiledMLP))
