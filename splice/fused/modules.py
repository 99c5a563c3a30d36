"""Fused kernels swapped into a model as rewrites: ``fuse(model)`` after ``add_lora``.

Nothing is patched globally and no model class is forked: each swap is a rewrite rule
(:func:`splice.core.rewrite.rewrite`) installing a module that *shares* the original's parameters,
buffers and submodules (same dicts, so ``state_dict`` keys, ``named_parameters`` paths and any
LoRA wrappers inside are unchanged), with a ``forward`` that calls a kernel from
:mod:`splice.kernels`:

* LoRA linears: :class:`FusedLoraLinear`, a subclass of :class:`~splice.core.rewrite.Around` over the
  same ``base`` and the same :class:`~splice.lora.layers.LoraLinear` (so ``lora_modules``, ``merge``
  and adapter save/load still find it), computing base + adapter in one autograd node in the
  activations' dtype (bf16), with a fused, seeded dropout (:mod:`splice.kernels.lora_linear`);
* Llama-family RMSNorm -> :class:`FusedRMSNorm` (Triton, one pass each way);
* Llama-family MLP -> :class:`FusedSwiGLUMLP`: the gate/up/down projections (LoRA-wrapped or
  not) are still called; only ``silu(g) * u`` is fused;
* Llama attention -> :class:`FusedRopeAttention`: q/k/v/o are still called, RoPE is one Triton
  launch for q and k, attention goes through the model's configured backend (sdpa, flash, ...).

Sibling projections of one input (q/k/v, gate/up) run as one autograd node (:func:`project`,
:mod:`splice.kernels.lora_group`; with dropout, each adapter keeps its own mask): the adapters' stacked
down-projection reads the input once, and the input gradients sum in the GEMMs.

On CPU the same modules run the PyTorch reference paths. ``unfuse(model)`` puts the original
modules back.

Containers (MLP, attention, and :mod:`splice.memory.checkpointing`'s layers) share their children with the
original, and the rewrite walker enters a replacement's children, so LoRA wrappers inside stay
visible to ``lora_modules``/``merge``/``save_adapter`` at their usual paths; ``unrewrite`` and
``unfuse`` put the originals back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.context import is_causal_only
from splice.core.rewrite import Around, share_state, weight_of
from splice.fused.projections import GROUPS, lora_tail, nf4_group_output, packed
from splice.fused.varlen import PACKING_KWARG, Packing, attend_packed, check_no_dropout
from splice.kernels.dropout import new_keys
from splice.kernels.gemv import decode_linear
from splice.kernels.lora_group import lora_group, lora_group_u
from splice.kernels.lora_linear import lora_linear, lora_u, uses_lora_kernels
from splice.kernels.rmsnorm import rms_norm
from splice.kernels.rope import rope
from splice.kernels.swiglu import swiglu, swiglu_packed
from splice.lora.bank import add_packed_delta
from splice.lora.casts import adapter_cast, group_cast
from splice.lora.layers import LoraLinear
from splice.lora.routing import current_route
from splice.memory import stash
from splice.quant.fp8 import FP8Linear

__all__ = [
    "FusedLoraLinear",
    "FusedRMSNorm",
    "FusedRopeAttention",
    "FusedSwiGLUMLP",
    "is_fast",
    "packed_lora",
    "packed_lora_groups",
    "project",
]

_FUSED_ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class _UnreadLinear(torch.autograd.Function):
    """``x W^T`` for a frozen ``W`` whose value nobody reads: no GEMM forward, ``dx = g W``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad.to(weight.dtype) @ weight, None


def _unread_projection(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``'s backward without its forward value, where that is possible."""
    if isinstance(module, FusedLoraLinear) and module._fusable(x):
        return module(x, output=False)
    weight = getattr(module, "weight", None)
    if (type(module) is nn.Linear and module.bias is None and isinstance(weight, Tensor)
            and not weight.requires_grad and weight.dtype == x.dtype):
        return _UnreadLinear.apply(x, weight)
    return module(x)


def project(modules: Sequence[nn.Module], x: Tensor, *, output: bool = True) -> list[Tensor]:
    """``[m(x) for m in modules]`` for sibling projections of one input (q/k/v, gate/up): one
    :func:`~splice.kernels.lora_group.lora_group` node when every one is a fused LoRA linear over a plain
    weight, or every one over an FP8 weight, with one dropout probability (and then, with dropout, one rank:
    each keeps its own mask) (``x`` read once by the adapters' down-projection, and quantized once for the
    FP8 GEMMs), else one call each. ``output=False``: only the backward is needed (:func:`_unread_projection`)."""
    fused = [m for m in modules if isinstance(m, FusedLoraLinear) and m._fusable(x)]
    frozen = [_frozen_base(m.base) for m in fused]
    loras: list[LoraLinear] = [m.fn for m in fused]  # type: ignore[misc]
    drops = {m._dropout_p() for m in fused}
    p = drops.pop() if len(drops) == 1 else -1.0
    if (len(fused) < 2 or len(fused) != len(modules) or len({f is None for f in frozen}) > 1 or p < 0
            or (p > 0 and len({lora.lora_A.weight.shape[0] for lora in loras}) > 1)):
        return [m(x) if output else _unread_projection(m, x) for m in modules]
    bases = None if frozen[0] is None else [cast(FP8Linear, f) for f in frozen]
    lora_as, lora_bs = (list(t) for t in zip(*(_factors(lora, x) for lora in loras), strict=True))
    # the members' keys in call order, as they would draw them one by one (a recompute replays them)
    keys = torch.stack([new_keys(x.device) for _ in fused]) if p > 0 else None
    with torch.autocast(x.device.type, enabled=False):  # as FusedLoraLinear.forward: fp32 adapters kept exact
        u = None  # inside a checkpointed layer: the forward keeps the stacked U, its recompute reuses it
        if (replay := stash.active(replay=True)) is not None:
            u = replay.take()
        elif (record := stash.active(replay=False)) is not None:
            u = lora_group_u(x, lora_as, dropout_p=p, keys=keys)
            record.put(u)
        biases = [m.base.bias for m in fused]
        weights = [weight_of(m.base) for m in fused] if bases is None else [f.qweight for f in bases]
        return list(lora_group(
            x, weights, [b if isinstance(b, Tensor) else None for b in biases],
            lora_as, lora_bs, scales=[lora.scale for lora in loras],
            output=output, u=u, bases=bases, dropout_p=p, keys=keys))


def packed_lora(modules: Sequence[nn.Module], x: Tensor) -> Tensor | None:
    """Sibling fused LoRA linears of one input (q/k/v, gate/up) over packed bases, in inference, as their
    outputs side by side (..., N_1 + .. + N_G): three GEMMs for the whole group, ``x W^T`` over the packed
    base weight (:func:`~splice.fused.projections.packed` with ``lora``) and ``(x A^T) B^T`` added in place
    over an engine call's stacked ``A`` and block-diagonal ``B`` (:func:`~splice.lora.casts.group_cast`).
    None (nothing computed) where that does not apply: autograd on, dropout, routed or disabled adapters,
    no group copy, bases not packed, or a step long enough for the Triton LoRA kernels."""
    if torch.is_grad_enabled() or not all(isinstance(m, FusedLoraLinear) and m._fusable(x) and m._dropout_p() == 0
                                          for m in modules):
        return None
    copies = group_cast([cast(nn.Module, m.rewriter) for m in modules if isinstance(m, FusedLoraLinear)])
    pair = packed(modules, lora=True) if copies is not None and copies[0].dtype == x.dtype else None
    x2 = x.reshape(-1, x.shape[-1])
    if copies is None or pair is None or uses_lora_kernels(x2):  # (_fusable: the bases share x's dtype)
        return None
    n = pair[0].shape[0]
    extended = lora_tail(modules, pair=pair)
    if extended is not None and extended[n:].data_ptr() == copies[0].data_ptr():  # A sits after the bases
        both = F.linear(x2, extended)  # (T, N + R) = [x W^T | x A^T]: one GEMM
        y, u = both[:, :n], both[:, n:]
    else:
        y, u = F.linear(x2, *pair), x2 @ copies[0].t()  # (T, N), (T, R)
    y.addmm_(u, copies[1].t())  # += [s_j (x A_j^T) B_j^T]_j  (in place: y may be a view of the wider output)
    return y.view(*x.shape[:-1], n)


def packed_lora_groups(model: nn.Module) -> list[tuple[list[LoraLinear], Tensor | None]]:
    """The LoRA layers of every q/k/v and gate/up group of ``model`` that :func:`packed_lora` can run (fused
    LoRA linears whose bases are packed), each with the rows after the bases where the group's stacked ``A``
    goes (:func:`~splice.fused.projections.lora_tail`; None: none), for
    :class:`~splice.lora.casts.AdapterCasts`'s ``groups``."""
    found: list[tuple[list[LoraLinear], Tensor | None]] = []
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            pair = packed(members, lora=True) if all(isinstance(m, FusedLoraLinear) for m in members) else None
            if pair is not None:
                layers = [cast(LoraLinear, m.rewriter) for m in members if isinstance(m, FusedLoraLinear)]
                extended = lora_tail(members, pair=pair)
                found.append((layers, None if extended is None else extended[pair[0].shape[0]:]))
    return found


def _factors(lora: LoraLinear, x: Tensor) -> tuple[Tensor, Tensor]:
    """``lora``'s (A, B) for a forward over ``x``: the masters, or in inference (no autograd, the
    PyTorch path that rounds them to x's dtype anyway) an engine call's copies already in that dtype
    (:mod:`splice.lora.casts`), so a decode step launches no cast kernels."""
    copies = None if torch.is_grad_enabled() else adapter_cast(lora)
    if copies is not None and copies[0].dtype == x.dtype and not uses_lora_kernels(x.reshape(-1, x.shape[-1])):
        return copies
    return lora.lora_A.weight, lora.lora_B.weight


def _frozen_base(module: nn.Module) -> FP8Linear | None:
    """``module`` if the fused LoRA node runs its GEMMs itself (an FP8 linear's scaled GEMMs), else None.
    Not when FSDP2 shards it as its own unit (an FP8 linear under splice.distributed.wrap): its parameters
    are whole only inside its own forward, whose hooks gather them."""
    if not isinstance(module, FP8Linear):
        return None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            return None
    return module


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` is one of the replacements :func:`~splice.fused.apply.fuse` installs."""
    return getattr(type(module), "splice_fast", False)


class FusedLoraLinear(Around):
    """A LoRA linear run as one fused autograd node (see :mod:`splice.kernels.lora_linear`).

    Same ``base`` and ``fn`` (the :class:`LoraLinear`) as the wrapper it replaces. Falls back to
    the plain ``base(x) + fn(x, y)`` when fusing does not apply: merged adapter, GPT-2 ``Conv1D``,
    a base that is neither a float ``nn.Linear`` nor an :class:`~splice.quant.fp8.FP8Linear` (whose
    scaled GEMMs run inside the node; int8 takes the plain path), dtype mismatch, or fp32 activations
    under autocast.
    """

    splice_fast = True

    def __init__(self, wrapper: Around) -> None:
        if not isinstance(wrapper.rewriter, LoraLinear):
            raise TypeError(f"FusedLoraLinear wraps a LoraLinear, got {type(wrapper.rewriter).__name__}")
        super().__init__(wrapper.base, wrapper.rewriter)

    def _fusable(self, x: Tensor) -> bool:
        lora, base = self.fn, self.base
        weight = getattr(base, "weight", None)
        plain = (isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
                 and isinstance(weight, Tensor) and weight.dtype == x.dtype)
        return (
            (plain or _frozen_base(base) is not None)
            and x.dtype.is_floating_point
            and not lora.merged
            and current_route(lora) is None  # routed rows / disabled adapters: the plain path
            and not lora.fan_in_fan_out
            # under autocast only 16-bit activations: fp32 ones would be cast by autocast
            and (x.dtype in (torch.bfloat16, torch.float16) or not torch.is_autocast_enabled(x.device.type))
        )

    def _dropout_p(self) -> float:
        """The adapter's dropout probability now (0 in eval mode)."""
        drop = self.fn.dropout
        return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def forward(self, *args: Any, output: bool = True, **kwargs: Any) -> Any:
        """``output=False``: the value is not computed (see :func:`lora_linear`)."""
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor) or not self._fusable(args[0]):
            return super().forward(*args, **kwargs)
        lora: LoraLinear = self.fn  # type: ignore[assignment]
        p = self._dropout_p()
        x = args[0]
        keys = new_keys(x.device) if p > 0 else 0
        # Autocast off inside: x and W already share the 16-bit dtype, and the fused function
        # keeps the fp32 adapter weights exact (autocast would round them to bf16).
        with torch.autocast(x.device.type, enabled=False):
            u = None  # inside a checkpointed layer: the forward keeps U, its recompute reuses it
            if (replay := stash.active(replay=True)) is not None:
                u = replay.take()
            elif (record := stash.active(replay=False)) is not None:
                u = lora_u(x, lora.lora_A.weight, dropout_p=p, keys=keys)
                record.put(u)
            bias = self.base.bias
            frozen = _frozen_base(self.base)
            a, b = _factors(lora, x) if u is None else (lora.lora_A.weight, lora.lora_B.weight)
            return lora_linear(
                x, frozen.qweight if frozen is not None else weight_of(self.base),
                bias if isinstance(bias, Tensor) else None, a, b,
                scale=lora.scale, dropout_p=p, keys=keys, output=output, u=u, base=frozen,
            )


    def add_into(self, x: Tensor, residual: Tensor) -> bool:
        """``residual += self(x)`` in place, for ``x`` (T, 1, K) and a contiguous ``residual`` (T, 1, N) of
        x's dtype, in inference (no autograd, no dropout, a plain bias-free base, the PyTorch path): the
        base GEMM and the adapter's up-projection both accumulate into ``residual`` (cuBLAS ``beta = 1``),
        so no output buffer and no add kernel. False, with nothing done, where that does not apply."""
        lora: LoraLinear = self.fn  # type: ignore[assignment]
        x2 = x.reshape(-1, x.shape[-1])
        if (torch.is_grad_enabled() or not self._fusable(x) or self._dropout_p() > 0 or self.base.bias is not None
                or _frozen_base(self.base) is not None or residual.dtype != x.dtype
                or not residual.is_contiguous() or uses_lora_kernels(x2)):
            return False
        a, b = (t.to(x.dtype) for t in _factors(lora, x))  # no-op casts for an engine call's copies
        y = residual.view(x2.shape[0], -1)
        y.addmm_(x2, weight_of(self.base).t())  # (T, N) += x W^T
        y.addmm_(x2 @ a.t(), b.t(), alpha=lora.scale)  # += s (x A^T) B^T
        return True


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm through :func:`splice.kernels.rmsnorm.rms_norm` (shares the weight)."""

    splice_fast = True
    weight: Tensor  # shared with the original norm

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        share_state(self, norm)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class FusedSwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the product fused; the projections are shared."""

    splice_fast = True
    gate_proj: nn.Module  # the original MLP's projections (shared children)
    up_proj: nn.Module
    down_proj: nn.Module

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        share_state(self, mlp)

    def activation(self, x: Tensor) -> Tensor:
        """``silu(gate(x)) * up(x)``, the down projection's input (one GEMM over packed gate/up weights
        in inference, :mod:`splice.fused.projections`)."""
        pair = None if torch.is_grad_enabled() else packed([self.gate_proj, self.up_proj])
        if pair is not None:
            return add_packed_delta([self.gate_proj, self.up_proj], x, lambda: decode_linear(x, *pair), swiglu=True)
        if (grouped := nf4_group_output([self.gate_proj, self.up_proj], x)) is not None:  # 4-bit, one token
            return add_packed_delta([self.gate_proj, self.up_proj], x, grouped, swiglu=True)
        if (both := packed_lora([self.gate_proj, self.up_proj], x)) is not None:  # a LoRA model's rollouts
            return swiglu_packed(both)
        gate, up = project([self.gate_proj, self.up_proj], x)
        return swiglu(gate, up, inplace_backward=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(x)
        if stash.is_mlp_output_unread():
            return _unread_projection(self.down_proj, h)
        return self.down_proj(h)


class FusedRopeAttention(nn.Module):
    """Llama attention with RoPE fused into one Triton launch; q/k/v/o are the shared modules.

    Runs the original forward when a KV cache is passed or the backend is not one of
    :data:`_FUSED_ATTENTION_BACKENDS` (eager attention returns weights we do not reproduce). Takes packed
    rows (:mod:`splice.fused.varlen`), whatever the backend.
    """

    splice_fast = True
    splice_varlen = True
    q_proj: nn.Module  # the original attention's projections (shared children)
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    scaling: float  # copied from the original with its other plain attributes

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        share_state(self, attn)
        for key, value in vars(attn).items():  # config, head_dim, scaling, is_causal, ...
            if not key.startswith("_") and key != "training":
                self.__dict__[key] = value
        self.__dict__["_attn"] = attn  # the original, unregistered (its children are ours)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """``splice_packing`` (a :class:`~splice.fused.varlen.Packing`): packed rows, attended per segment by
        the varlen kernel (``attention_mask`` and the backend are then unused)."""
        backend = getattr(self.config, "_attn_implementation", "eager")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        packing: Packing | None = kwargs.pop(PACKING_KWARG, None)
        if cache is not None or position_embeddings is None or (
                packing is None and backend not in _FUSED_ATTENTION_BACKENDS):
            if packing is not None:
                raise ValueError("packed rows need the decoder layer's position_embeddings and no KV cache")
            original = self.__dict__["_attn"]
            original.training = self.training
            return original(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        if packing is not None:  # each token rotated by its position in its segment
            position_embeddings = packing.rotary(*position_embeddings)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)  # (B, S, heads, D)
        replay = stash.active(replay=True)
        if replay is not None and replay.attention:  # a recompute reusing the forward's attention
            return self._replay(replay, hidden_states, position_embeddings), None
        record = stash.active(replay=False)
        q, k, v = (t.view(shape) for t in project([self.q_proj, self.k_proj, self.v_proj], hidden_states))
        q, k = rope(q, k, *position_embeddings)
        attend = self._attention(backend, attention_mask, kwargs) if packing is None else self._packed(packing)
        if record is not None and record.attention:
            attn_output, attn_weights = stash.record_attention(record, attend, q, k, v)
        else:
            attn_output, attn_weights = attend(q, k, v)
        out = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        if record is not None and record.attention:
            record.put(out)
        return out, attn_weights

    def _attention(self, backend: str, attention_mask: Tensor | None,
                   kwargs: dict[str, Any]) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]:
        """Attention of rotated q, k and v (B, S, heads, D) through the model's backend: (out, weights)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if is_causal_only() and getattr(self, "is_causal", True):
            attention_mask = None  # the caller vouches: plain causal, so sdpa's is_causal path

        def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
            return ALL_ATTENTION_FUNCTIONS[backend](
                self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                **kwargs,
            )

        return attend

    def _packed(self, packing: Packing) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, None]]:
        """The same for packed rows: the varlen kernel within each segment (Llama: no window, no softcap)."""
        check_no_dropout(self)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, None]:
            return attend_packed(q, k, v, packing, scale=self.scaling), None

        return attend

    def _replay(self, replay: stash.Stash, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The recompute's attention from what the forward kept: q/k/v/o build their backward
        without their GEMMs, the kept attention graph and output projection result are reused."""
        input_shape = hidden.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q, k, v = (t.view(shape) for t in project([self.q_proj, self.k_proj, self.v_proj], hidden, output=False))
        q, k = rope(q, k, *position_embeddings, output=False)  # only the backward matters
        attn_output = stash.replay_attention(replay, q, k, v)
        o = _unread_projection(self.o_proj, attn_output.reshape(*input_shape, -1).contiguous())
        return stash.substitute(o, replay.take())
