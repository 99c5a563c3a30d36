"""FP8 base weights for LoRA training: :class:`FP8Linear` and :func:`quantize_fp8` (a replace rewrite).

Storage: each linear's weight ``W`` (out N, in K) becomes an e4m3 tensor ``q`` (N, K) with one fp32
scale per output channel ``s`` (N,): ``W ~ q * s[:, None]``, ``s = amax(|W[n, :]|) / 448`` (448 is
e4m3's largest value), 1 byte a weight plus 4 bytes a row (half of bf16).

Forward, ``y = x @ W^T + b`` with ``x`` (M, K) (leading dimensions flattened into M):
``x`` is quantized per row on the fly, ``x ~ x_q * a[:, None]`` with ``a = amax(|x[m, :]|) / 448``,
and one FP8 tensor-core GEMM with row-wise scales gives ``y = (x_q @ q^T) * a[:, None] * s[None, :]``:
``torch._scaled_mm(x_q, q.t(), scale_a=a (M, 1), scale_b=s (1, N), out_dtype=bf16)``. cuBLASLt
takes the first operand row-major and the second column-major: ``q.t()`` of the row-major ``q`` is
exactly that.

Input gradient (the weight is frozen: no weight gradient), ``dx = dy @ W = (dy * s[None, :]) @ q``:
``dy * s`` (M, N) is quantized per row to e4m3 (row scales ``g``) and multiplied by ``q`` (N, K) as
the column-major second operand, which is ``q^T`` stored row-major: ``torch._scaled_mm(dy_q,
q_t.t(), scale_a=g (M, 1), scale_b=1 (1, K))``. ``q^T`` is either made in the backward, one weight
at a time (the default: a transient 1 byte a weight, one memory-bound transpose per layer per
step), or kept (``keep_transpose=True``: a second FP8 copy, 2 bytes a weight in all, as much as
bf16, for no transpose in the step). No layout avoids it: the contraction dimension of the
backward is N, which ``q`` (N, K) stores as rows, and the FP8 GEMM reads its second operand
contracted along its storage's contiguous dimension.

The gradient is quantized to e4m3, not e5m2: with one scale per row the range e5m2 buys is not
needed, and e4m3's extra mantissa bit halves the rounding error (tests/quant/test_fp8.py measures
both, on normal and heavy-tailed gradients). Both GEMMs accumulate without ``use_fast_accum``.

The autograd function saves no activation: only ``q`` and ``s`` (the module's own buffers). LoRA
factors are not quantized: they keep LoraConfig's dtype, as over a bf16 base (the LoRA wrapper adds
``scale * B(A(x))`` to this output).

Where ``torch._scaled_mm`` cannot run (``N`` or ``K`` not a multiple of 16, which the CUDA kernel
requires), the layer takes :func:`fp8_linear_reference`'s path instead: the same FP8 storage,
dequantized for one ordinary matmul (weight-only FP8); the rule depends on the shapes alone, so
a model's path is the same on every device.

Devices: FP8 tensor cores need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper,
Blackwell); :func:`fp8_problem` says why another device cannot (the training preflight prints
it before the model loads). On the CPU the same math runs in fp32 for
the tests (``allow_cpu=True``). Everything on the device stays there: no host syncs in forward or
backward, so steps replay from CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.targets import Targets
from splice.kernels import fp8_rows
from splice.quant.linear import _bias, _float_weight, _quantize, _restore_linear

__all__ = ["FP8Linear", "FP8_DTYPE", "FP8_MAX", "dequantize_fp8", "fp8_linear_reference", "fp8_problem", "from_checkpoint",
           "quantize_fp8", "quantize_rows", "scaled_mm_applies"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
_ALIGN = 16  # torch._scaled_mm on CUDA: both dimensions of the weight multiples of 16
_PACKED = ("qweight", "scale", "qweight_t")  # frozen parameters that keep their dtype through module.to(dtype)


def fp8_problem(device: torch.device | str, *, allow_cpu: bool = False) -> str | None:
    """Why ``device`` cannot train on FP8 base weights (None: it can). ``allow_cpu``: the CPU's
    fp32 emulation of the same GEMMs is accepted (tests)."""
    device = torch.device(device)
    if device.type == "cpu" and allow_cpu:
        return None
    need = (f"FP8 base weights (quantize fp8) need a CUDA GPU with FP8 tensor cores (compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell)")
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return f"{need}; this run's device is {device}: use quantize nf4 or int8 here"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{need}; {device} ({name}) is {major}.{minor}: use quantize nf4 or int8 on it"
    return None


def scaled_mm_applies(out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight takes the FP8 GEMM (module doc); else the dequantizing path."""
    return out_features % _ALIGN == 0 and in_features % _ALIGN == 0


quantize_rows = fp8_rows.quantize_rows  # the one row quantizer (splice.kernels.fp8_rows), named here for callers


def dequantize_fp8(qweight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The float (N, K) weight ``q * s[:, None]`` in ``dtype`` (a new tensor)."""
    return (qweight.float() * scale[:, None]).to(dtype)


def fp8_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                         quantize_input: bool = False) -> Tensor:
    """The plain-PyTorch meaning of :class:`FP8Linear`: ``y = x @ (q * s[:, None])^T + b``.

    ``x`` (..., K), ``qweight`` ``q`` (N, K) e4m3, ``scale`` ``s`` (N,) fp32, ``bias`` (N,); returns
    (..., N) in ``x``'s dtype. ``quantize_input``: ``x`` first goes through the same per-row e4m3
    rounding as the FP8 GEMM's input (``x_q * a``, quantized in ``x``'s dtype as the GEMM's is), so
    the only difference left to the GEMM is its accumulation order and output rounding. Computed
    in fp32.
    """
    x32 = x.float()
    if quantize_input:
        codes, rows = fp8_rows.quantize_rows(x.reshape(-1, x.shape[-1]))
        x32 = (codes.float() * rows).reshape(x.shape)
    y = F.linear(x32, dequantize_fp8(qweight, scale, torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM's output dtype: row-wise scaled FP8 GEMMs write bf16 or fp16 only."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _scaled_mm(a: Tensor, b: Tensor, *, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a * scale_a) @ (b * scale_b)`` for FP8 ``a`` (M, K) row-major and ``b`` (K, N) column-major,
    ``scale_a`` (M, 1), ``scale_b`` (1, N): the tensor cores' GEMM on CUDA. On the CPU the same math
    in fp32 (torch 2.11's own CPU ``_scaled_mm`` takes per-tensor scales only)."""
    if a.device.type == "cuda":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)


def _fp8_forward(x2: Tensor, qweight: Tensor, scale: Tensor,
                 quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``x2`` (M, K) @ (q * s)^T -> (M, N) in the GEMM's output dtype (module doc); ``quantized``: x2's
    codes and row scales, if already made (siblings over one input share them)."""
    # contiguous codes: the GEMM wants its first operand row-major
    codes, rows = quantized if quantized is not None else fp8_rows.quantize_rows(x2)
    return _scaled_mm(codes.contiguous(), qweight.t(), scale_a=rows, scale_b=scale[None, :],
                      out_dtype=_out_dtype(x2.dtype))


def _fp8_input_grad(g2: Tensor, qweight: Tensor, scale: Tensor, qweight_t: Tensor | None) -> Tensor:
    """``g2`` (M, N) @ (q * s) -> (M, K): ``(g2 * s) @ q`` with ``g2 * s`` quantized per row."""
    codes, rows = fp8_rows.quantize_rows(g2, column_scale=scale)  # of g2 * s, in one kernel on a GPU
    q_t = qweight_t if qweight_t is not None else fp8_rows.transpose(qweight)  # (K, N) row-major
    ones = torch.ones((1, q_t.shape[0]), dtype=torch.float32, device=g2.device)
    return _scaled_mm(codes.contiguous(), q_t.t(), scale_a=rows, scale_b=ones, out_dtype=_out_dtype(g2.dtype))


def fp8_matmul(x2: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None, *, fast: bool,
               quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``x2`` (M, K) @ (q * s)^T (+ ``bias`` (N,), in ``x2``'s dtype) -> (M, N) in ``x2``'s dtype: the
    FP8 GEMM (``fast``), else dequantize + matmul (odd shapes; module doc)."""
    if not fast:
        return F.linear(x2, dequantize_fp8(qweight, scale, x2.dtype), bias)
    y = _fp8_forward(x2, qweight, scale, quantized).to(x2.dtype)
    return y if bias is None else y + bias


def fp8_matmul_t(g2: Tensor, qweight: Tensor, scale: Tensor, qweight_t: Tensor | None, *, fast: bool) -> Tensor:
    """``g2`` (M, N) @ (q * s) -> (M, K) in ``g2``'s dtype: the input gradient's GEMM (module doc)."""
    if not fast:
        return g2 @ dequantize_fp8(qweight, scale, g2.dtype)
    return _fp8_input_grad(g2, qweight, scale, qweight_t).to(g2.dtype)


class _FP8LinearFn(torch.autograd.Function):
    """``y = x @ (q * s)^T + b``; saves only ``q``, ``s`` (and ``q^T`` if kept): no activation,
    no dequantized weight. ``fast``: the FP8 GEMMs, else dequantize + matmul (odd shapes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, qweight: Tensor, scale: Tensor, qweight_t: Tensor | None,
                bias: Tensor | None, fast: bool) -> Tensor:
        ctx.save_for_backward(qweight, scale, qweight_t)
        ctx.fast, ctx.x_dtype = fast, x.dtype
        b = None if bias is None else bias.to(x.dtype)
        y = fp8_matmul(x.reshape(-1, x.shape[-1]), qweight, scale, b, fast=fast)
        return y.reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, Tensor | None, None]:
        qweight, scale, qweight_t = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:
            dx2 = fp8_matmul_t(g2, qweight, scale, qweight_t, fast=ctx.fast)
            dx = dx2.to(ctx.x_dtype).reshape(*grad.shape[:-1], qweight.shape[1])
        dbias = g2.sum(0) if ctx.needs_input_grad[4] else None
        return dx, None, None, None, dbias, None


class FP8Linear(nn.Module):
    """A frozen linear over an e4m3 weight with per-output-channel scales (module doc).

    Frozen parameters: ``qweight`` (out, in) e4m3, ``scale`` (out,) fp32, and ``qweight_t`` (in, out)
    e4m3 with ``keep_transpose``. ``compute_dtype``: the float dtype :meth:`dequantize` gives and LoRA
    reads where its config names none; ``module.to(dtype)`` changes it and leaves the codes and scales as
    they are. The output has the activations' dtype.

    Parameters, not buffers, so FSDP2 shards them (rows of ``qweight`` with their scales, dim 0) like
    any weight; ``splice_shard_alone`` asks it to make this module its own unit with no mixed-precision
    cast (:func:`splice.distributed.wrap.wrap_model`): a bf16 policy would round the e4m3 codes' all-gather
    to bf16 values and the scales to 8 bits of mantissa.
    """

    splice_kind = "linear"
    splice_quantized = True
    splice_shard_alone = True

    qweight: Tensor
    scale: Tensor
    qweight_t: Tensor | None
    compute_dtype: torch.dtype  # dequantize()'s dtype (LoRA reads it); module.to(dtype) sets it

    def __init__(self, qweight: Tensor, scale: Tensor, bias: nn.Parameter | None, *,
                 compute_dtype: torch.dtype = torch.bfloat16, keep_transpose: bool = False) -> None:
        super().__init__()
        if qweight.dtype != FP8_DTYPE or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"FP8Linear takes an (out, in) {FP8_DTYPE} weight and (out,) scales, got "
                             f"{qweight.dtype} {tuple(qweight.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.qweight = nn.Parameter(qweight.contiguous(), requires_grad=False)
        self.scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        self.register_parameter("qweight_t", nn.Parameter(qweight.t().contiguous(), requires_grad=False)
                                if keep_transpose else None)
        self.bias = bias

    @classmethod
    def from_float(cls, weight: Tensor, bias: nn.Parameter | None = None, *, dtype: torch.dtype | None = None,
                   keep_transpose: bool = False) -> FP8Linear:
        """Quantize a float (out, in) ``weight`` where it is (fp32 arithmetic)."""
        codes, rows = fp8_rows.quantize_rows(weight.detach().float())
        compute = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.bfloat16)
        return cls(codes, rows[:, 0], bias, compute_dtype=compute, keep_transpose=keep_transpose)

    @classmethod
    def from_linear(cls, module: nn.Module, *, dtype: torch.dtype | None = None,
                    keep_transpose: bool = False) -> FP8Linear:
        return cls.from_float(_float_weight(module), _bias(module), dtype=dtype, keep_transpose=keep_transpose)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def fast(self) -> bool:
        """Whether this layer runs the FP8 GEMMs (else dequantize + matmul; module doc)."""
        return scaled_mm_applies(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float (out, in) weight (a new tensor)."""
        return dequantize_fp8(self.qweight, self.scale, dtype or self.compute_dtype)

    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.qweight_t) if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        result: Tensor = _FP8LinearFn.apply(x, self.qweight, self.scale, self.qweight_t, self.bias, self.fast)
        return result

    def prepare(self, x2: Tensor) -> tuple[Tensor, Tensor] | None:
        """``x2``'s e4m3 codes and row scales, which :meth:`matmul` takes (None where it runs no FP8 GEMM):
        computed once for the siblings that read one input (:func:`splice.kernels.lora_group.lora_group`)."""
        return fp8_rows.quantize_rows(x2) if self.fast else None

    def matmul(self, x2: Tensor, prepared: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x2 W^T`` (M, out) for ``x2`` (M, in), no bias and no autograd node: the base GEMM of a fused
        LoRA linear over this layer (:func:`splice.kernels.lora_linear.lora_linear`'s ``base``); ``prepared``:
        a sibling's :meth:`prepare` of the same ``x2``."""
        return fp8_matmul(x2, self.qweight, self.scale, fast=self.fast, quantized=prepared if self.fast else None)

    def matmul_t(self, g2: Tensor) -> Tensor:
        """``g2 W`` (M, in) for ``g2`` (M, out): the base's input gradient in that fused node."""
        return fp8_matmul_t(g2, self.qweight, self.scale, self.qweight_t, fast=self.fast)

    def restore(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (used by ``unrewrite``)."""
        return _restore_linear(self, self.dequantize())

    def _apply(self, fn: Any, recurse: bool = True) -> FP8Linear:
        """``module.to(device)`` moves the codes and scales; a float dtype change (``.to(bf16)``,
        ``.half()``) changes only the compute dtype: cast, the codes and scales would be lost."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.qweight.device))
        kept = {name: self._parameters.pop(name) for name in _PACKED}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, param in kept.items():
                if param is not None and param.device != probe.device:
                    param.data = param.data.to(probe.device)
                self._parameters[name] = param
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_gemm={self.fast}, "
                f"keep_transpose={self.qweight_t is not None}, compute_dtype={self.compute_dtype}")


def quantize_fp8(model: nn.Module, *, targets: Targets = "all-linear", compute_dtype: torch.dtype | None = None,
                 keep_transpose: bool = False, keep_original: bool = False, allow_cpu: bool = False) -> list[str]:
    """Replace targeted linears with :class:`FP8Linear` (FP8 base weights); returns their names.

    Quantization runs where each weight is. ``compute_dtype``: the activations' dtype (default:
    the float weight's own; bf16 on a GPU). ``keep_transpose``: keep a second FP8 copy for the
    backward (module doc: 2 bytes a weight in all, no transpose per step). ``keep_original``: as
    :func:`~splice.quant.linear.quantize_int8`. Raises ValueError (:func:`fp8_problem`) for a model on
    a device without FP8 tensor cores; ``allow_cpu`` runs the CPU's emulation (tests).
    """
    for device in {p.device for p in model.parameters() if not p.is_meta}:
        problem = fp8_problem(device, allow_cpu=allow_cpu)
        if problem is not None:
            raise ValueError(f"quantize_fp8: {problem}")
    return _quantize(model, targets, lambda m: FP8Linear.from_linear(
        m, dtype=compute_dtype, keep_transpose=keep_transpose), keep_original, min_numel=1)


def from_checkpoint(qweight: Tensor, scale: Tensor, *, block: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """An FP8 checkpoint's (N, K) weight and its dequantization scale (``W = q * scale``, as
    ``weight_scale`` of fbgemm_fp8 / compressed-tensors checkpoints and ``weight_scale_inv`` of
    DeepSeek-V3 / Qwen3 FP8 ones) as :class:`FP8Linear`'s (codes, (N,) row scales).

    A per-tensor (one value) or per-channel ((N,) or (N, 1)) scale over e4m3 codes keeps the codes
    as they are. Block scales ((ceil(N / bn), ceil(K / bk)); ``block`` = (bn, bk), the config's
    ``weight_block_size``, else inferred) and e5m2 codes are applied and the weight re-quantized
    per row: one scale a row cannot hold a block's, so those codes change (one more e4m3 rounding).
    """
    n, k = qweight.shape
    if scale.numel() == 1 or tuple(scale.shape) in ((n,), (n, 1)):
        rows = scale.float().reshape(-1).expand(n).contiguous()
        if qweight.dtype == FP8_DTYPE:
            return qweight, rows
        full = rows[:, None]
    elif scale.dim() == 2:
        bn, bk = block or (-(-n // scale.shape[0]), -(-k // scale.shape[1]))
        if (-(-n // bn), -(-k // bk)) != tuple(scale.shape):
            raise ValueError(f"FP8 checkpoint: a ({n}, {k}) weight with block scales {tuple(scale.shape)} "
                             f"does not fit blocks of {bn} x {bk} (quantization_config.weight_block_size)")
        full = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    else:
        raise ValueError(f"FP8 checkpoint: a ({n}, {k}) weight with a scale of shape {tuple(scale.shape)} "
                         "(expected one value, (out,), (out, 1) or 2-D block scales)")
    codes, rows = fp8_rows.quantize_rows(qweight.float() * full)
    return codes, rows[:, 0]
