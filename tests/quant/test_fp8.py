"""FP8 base weights (splice.quant.fp8): the GEMM path against its references, the gradient, odd shapes,
what autograd saves, LoRA on top, checkpointing and a few training steps of the tiny Llama.

The CPU runs torch._scaled_mm's emulation (``allow_cpu=True``); the GPU tests need compute capability 8.9+.

Tolerances: e4m3 keeps 3 mantissa bits, so one rounding is off by at most 2^-4 of the value and by
about 2.5% RMS on normal data (measured here). Against the emulated reference (the same codes and
scales, fp32 sums) the CPU path is exact and a GPU may differ only by its accumulation order and the
bf16 output: 1e-2. Against the weight-only reference (only ``x`` is rounded again): 4% relative error.
Against the bf16 linear (both operands rounded): 5%. A transposed scale, a missing scale or a wrong
layout gives errors of order 100%.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from splice.quant.fp8 import (
    FP8Linear,
    dequantize_fp8,
    fp8_linear_reference,
    fp8_problem,
    quantize_fp8,
    quantize_rows,
    scaled_mm_applies,
)
from tests import tiny
from tests.numerics import rel_err

FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes as bytes: torch.equal has no FP8 kernel for larger CPU tensors."""
    return t.view(torch.uint8)


def _layer(n: int = 48, k: int = 64, *, bias: bool = False, seed: int = 0) -> tuple[nn.Linear, FP8Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return linear, FP8Linear.from_linear(linear)


def _grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad  # type: ignore[return-value]


def _emulated_input_grad(g: torch.Tensor, q: FP8Linear) -> torch.Tensor:
    """dx = (g * s) @ q with ``g * s`` rounded per row as the FP8 backward does, summed in fp32."""
    g2 = g.reshape(-1, g.shape[-1])
    codes, rows = quantize_rows(g2 * q.scale.to(g2.dtype))
    return ((codes.float() * rows) @ q.qweight.float()).reshape(*g.shape[:-1], q.in_features)


@pytest.mark.interpreter_limit("fp8")
def test_weight_codes_and_error_bound() -> None:
    linear, q = _layer()
    w = linear.weight.float()
    assert q.qweight.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    assert q.qweight.shape == (48, 64) and q.scale.shape == (48,)
    # each row's largest weight maps to 448 exactly
    assert torch.all(q.qweight.float().abs().amax(1) == 448.0)
    torch.testing.assert_close(q.scale, w.abs().amax(1) / 448.0, rtol=1e-6, atol=0)
    err = (q.dequantize(torch.float32) - w).abs()
    # half a step: 2^-4 of the value for normal codes, half a subnormal step (2^-10 * s) below
    assert torch.all(err <= torch.maximum(w.abs() * 2.0**-4, q.scale[:, None] * 2.0**-10) * (1 + 1e-6))


@pytest.mark.interpreter_limit("fp8")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_quantize_in_any_float_dtype_small_and_zero_rows_included(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 64) * torch.tensor([[1.0], [1e-5], [0.0], [300.0]])
    codes, scales = quantize_rows(t.to(dtype))
    back = codes.float() * scales
    assert torch.isfinite(back).all() and torch.all(back[2] == 0)
    assert torch.all(codes.float().abs().amax(1)[[0, 1, 3]] == 448.0)
    for row in (0, 1, 3):  # e4m3 rounding (2^-4) on top of the input's own (fp16 / bf16)
        assert rel_err(back[row], t[row].to(dtype).float()) < 0.04


@pytest.mark.interpreter_limit("fp8", "bf16")
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_against_the_references(bias: bool) -> None:
    linear, q = _layer(bias=bias)
    assert q.fast
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)  # (batch, seq, in): leading dims flattened
    g = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    y, dx = _grad(q, x, g)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    b = None if linear.bias is None else linear.bias.detach()

    emulated = fp8_linear_reference(x, q.qweight, q.scale, b, quantize_input=True)
    assert rel_err(y, emulated) < 1e-2
    assert rel_err(dx, _emulated_input_grad(g, q)) < 1e-2

    ref_y, ref_dx = _grad(lambda t: fp8_linear_reference(t, q.qweight, q.scale, b), x, g)
    assert rel_err(y, ref_y) < 0.04 and rel_err(dx, ref_dx) < 0.04
    bf16_y, bf16_dx = _grad(lambda t: F.linear(t, linear.weight.detach(), b), x, g)
    assert rel_err(y, bf16_y) < 0.05 and rel_err(dx, bf16_dx) < 0.05
    assert rel_err(y, bf16_y) > 1e-3  # it did round (not a silent bf16 path)


def test_the_reference_is_the_dequantized_weight() -> None:
    _, q = _layer()
    x = torch.randn(4, 64)
    expected = x @ (q.qweight.float() * q.scale[:, None]).T
    torch.testing.assert_close(fp8_linear_reference(x, q.qweight, q.scale), expected)
    torch.testing.assert_close(q.dequantize(torch.float32), dequantize_fp8(q.qweight, q.scale, torch.float32))


@pytest.mark.interpreter_limit("fp8")
def test_gradient_in_e4m3_is_twice_as_close_as_e5m2() -> None:
    """Why the backward rounds dy * s to e4m3: per-row scales leave e5m2's range unused, and e4m3's
    extra mantissa bit halves the error, on normal and on heavy-tailed gradients."""
    _, q = _layer(n=64, k=128)
    torch.manual_seed(1)
    normal = torch.randn(64, 64)
    heavy = torch.distributions.StudentT(2.0).sample((64, 64))
    for g in (normal, heavy):
        gs = g * q.scale
        exact = gs @ q.qweight.float()
        errors = {}
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            codes, rows = quantize_rows(gs, dtype=dtype)
            errors[dtype] = rel_err((codes.float() * rows) @ q.qweight.float(), exact)
        assert errors[torch.float8_e4m3fn] < 0.6 * errors[torch.float8_e5m2]
        assert errors[torch.float8_e4m3fn] < 0.03


@pytest.mark.parametrize(("n", "k"), [(7, 20), (48, 20), (9, 64)])
def test_odd_shapes_take_the_dequantizing_path(n: int, k: int) -> None:
    """N or K not a multiple of 16: torch._scaled_mm on CUDA refuses them, so the layer computes with
    the dequantized weight (the weight-only reference, exactly) on every device."""
    linear, q = _layer(n, k, bias=True)
    assert not q.fast and not scaled_mm_applies(n, k) and scaled_mm_applies(16, 32)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    g = torch.randn(2, 3, n, dtype=torch.bfloat16)
    y, dx = _grad(q, x, g)
    w = q.dequantize(torch.bfloat16)
    ref_y, ref_dx = _grad(lambda t: F.linear(t, w, linear.bias.detach()), x, g)  # type: ignore[union-attr]
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(dx, ref_dx)


@pytest.mark.parametrize(("n", "k"), [(48, 64), (7, 20)])
def test_autograd_saves_only_the_fp8_weight_and_scales(n: int, k: int) -> None:
    _, q = _layer(n, k)
    x = torch.randn(4, k, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert {t.dtype for t in saved} <= {torch.float8_e4m3fn, torch.float32}
    assert sum(t.numel() * t.element_size() for t in saved) == n * k + 4 * n  # q and s, nothing else
    y.sum().backward()
    assert x.grad is not None and not any(p.requires_grad for p in q.parameters())


def test_keep_transpose_same_numbers_twice_the_bytes() -> None:
    linear, q = _layer()
    kept = FP8Linear.from_linear(linear, keep_transpose=True)
    assert kept.qweight_t is not None and torch.equal(_bits(kept.qweight_t), _bits(q.qweight.t().contiguous()))
    assert kept.nbytes_stored() == q.nbytes_stored() + 48 * 64
    x, g = torch.randn(6, 64, dtype=torch.bfloat16), torch.randn(6, 48, dtype=torch.bfloat16)
    for a, b in zip(_grad(q, x, g), _grad(kept, x, g), strict=True):
        assert torch.equal(a, b)


def test_bias_gradient_when_the_bias_trains() -> None:
    linear, q = _layer(bias=True)
    assert q.bias is not None
    q.bias.requires_grad_(True)
    x, g = torch.randn(2, 4, 64, dtype=torch.bfloat16), torch.randn(2, 4, 48, dtype=torch.bfloat16)
    q(x).backward(g)
    torch.testing.assert_close(q.bias.grad, g.sum((0, 1)))


def test_module_to_keeps_the_codes_and_sets_the_compute_dtype() -> None:
    _, q = _layer(bias=True)
    codes, scale = q.qweight.clone(), q.scale.clone()
    q.to(torch.float32)
    assert q.compute_dtype == torch.float32 and q.bias.dtype == torch.float32  # type: ignore[union-attr]
    assert q.qweight.dtype == torch.float8_e4m3fn and torch.equal(_bits(q.qweight), _bits(codes))
    assert torch.equal(q.scale, scale) and q.qweight_t is None
    q.half()
    assert q.compute_dtype == torch.float16 and torch.equal(q.scale, scale)
    q.to("cpu")
    assert q.compute_dtype == torch.float16 and q.device == torch.device("cpu")
    restored = q.restore()
    assert isinstance(restored, nn.Linear) and restored.weight.dtype == torch.float16
    torch.testing.assert_close(restored.weight.float(), q.dequantize(torch.float32), rtol=1e-3, atol=0)


def test_devices_without_fp8_tensor_cores_are_refused_in_one_line() -> None:
    problem = fp8_problem("cpu")
    assert problem is not None and "compute capability 8.9+" in problem and "cpu" in problem
    assert "\n" not in problem and fp8_problem("cpu", allow_cpu=True) is None
    model = tiny.llama()
    with pytest.raises(ValueError, match="quantize_fp8: FP8 base weights .* need a CUDA GPU"):
        quantize_fp8(model)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())  # refused before any change


def test_quantized_llama_keeps_the_signal() -> None:
    model = tiny.llama().to(torch.bfloat16)
    ids = tiny.tokens()
    reference = model(ids).logits.float()
    names = splice.quantize_fp8(model, allow_cpu=True)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), FP8Linear) for n in names)
    assert all(model.get_submodule(n).fast for n in names)  # 32 / 64 / 16 wide: all on the FP8 GEMM
    assert 1e-3 < rel_err(model(ids).logits.float(), reference) < 0.05


def test_lora_before_or_after_quantize_and_the_adapter_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = tiny.tokens()
    first = tiny.llama().to(torch.bfloat16)
    quantize_fp8(first, allow_cpu=True)
    splice.add_lora(first, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(first)
    second = tiny.llama().to(torch.bfloat16)
    splice.add_lora(second, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(second)
    quantize_fp8(second, allow_cpu=True)
    torch.testing.assert_close(first(ids).logits, second(ids).logits, rtol=0, atol=0)

    plain = tiny.llama().to(torch.bfloat16)
    splice.add_lora(plain, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(plain)
    # the factors are as on the bf16 base (LoraConfig's dtype, fp32 by default as PEFT's), never FP8
    factors = {n: p.dtype for n, p in first.named_parameters() if "lora_" in n}
    assert factors == {n: p.dtype for n, p in plain.named_parameters() if "lora_" in n}
    splice.save_adapter(first, tmp_path / "fp8")
    splice.save_adapter(plain, tmp_path / "bf16")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fp8", "bf16"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the base changes nothing
    third = tiny.llama().to(torch.bfloat16)
    quantize_fp8(third, allow_cpu=True)
    splice.load_adapter(third, tmp_path / "fp8")
    torch.testing.assert_close(third(ids).logits, first(ids).logits, rtol=0, atol=0)


def _train(quantize: bool, *, checkpoint: bool = False, steps: int = 8) -> tuple[list[float], nn.Module]:
    model = tiny.llama().to(torch.bfloat16)
    if quantize:
        quantize_fp8(model, allow_cpu=True)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=8, alpha=16))
    splice.freeze(model)
    if checkpoint:
        from splice.memory.checkpointing import checkpoint_layers

        assert checkpoint_layers(model, layers="all")
    torch.manual_seed(0)
    return tiny.train_losses(model, tiny.tokens(batch=4, length=16), steps=steps, lr=1e-2), model


def test_lora_training_on_fp8_tracks_the_bf16_run() -> None:
    """Eight AdamW steps of the tiny Llama (bf16 activations, r8 LoRA on every linear): the loss falls
    as on the bf16 base (4.58 -> 4.25) and stays within 0.02 of that run at every step (measured:
    0.005; the bf16 run of another init seed is up to 0.04 away)."""
    fp8, _ = _train(True)
    bf16, _ = _train(False)
    assert fp8[-1] < fp8[0] - 0.25
    assert max(abs(a - b) for a, b in zip(fp8, bf16, strict=True)) < 0.02
    assert fp8 != bf16  # the FP8 path ran


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    plain, model = _train(True, steps=2)
    ckpt, checkpointed = _train(True, checkpoint=True, steps=2)
    assert plain == ckpt
    grads = dict(model.named_parameters())
    for name, p in checkpointed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, grads[name]), name


@pytest.mark.parametrize(("dropout", "bias", "dtype"), [
    pytest.param(0.0, False, torch.bfloat16, marks=pytest.mark.interpreter_limit("bf16")),
    pytest.param(0.25, True, torch.bfloat16, marks=pytest.mark.interpreter_limit("bf16")),
    (0.0, True, torch.float32)])
def test_lora_linear_over_an_fp8_base_runs_its_scaled_gemms_in_one_node(dropout: float, bias: bool,
                                                                         dtype: torch.dtype) -> None:
    _check_lora_linear_over_fp8("cpu", 3 * 7, dropout=dropout, bias=bias, dtype=dtype)  # odd token count


@FP8_GPU
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gpu_lora_linear_over_an_fp8_base_with_the_triton_lora_kernels(dropout: float) -> None:
    from splice.kernels.lora_linear import LORA_KERNEL_MIN_TOKENS

    _check_lora_linear_over_fp8("cuda", LORA_KERNEL_MIN_TOKENS + 37, dropout=dropout, bias=True, dtype=torch.bfloat16)


def _check_lora_linear_over_fp8(device: str, tokens: int, *, dropout: float, bias: bool, dtype: torch.dtype) -> None:
    """``lora_linear(..., base=fp8)``: y = (the FP8 GEMM's x W^T) + b + s * B(A(D(x))), dx = (the FP8
    input-gradient GEMM's g W) + D(s * (g B) A), dA and dB as over a bf16 base. Against the emulated FP8
    products plus the adapter's plain-PyTorch terms (same dropout keys): 1e-2 (bf16 rounding of the
    sums); a missing LoRA term or a wrong scale gives ~30-100%."""
    from splice.kernels.dropout import dropout as hashed_dropout
    from splice.kernels.lora_linear import lora_linear

    linear, q = _layer(n=48, k=64, bias=bias, seed=1)
    q = q.to(device=device, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(1, tokens, 64, dtype=dtype).to(device)
    g = torch.randn(1, tokens, 48, dtype=dtype).to(device)
    lora_a = (torch.randn(8, 64) * 0.2).to(device).requires_grad_()
    lora_b = (torch.randn(48, 8) * 0.2).to(device).requires_grad_()
    scale, keys = 0.5, 1234
    b = None if q.bias is None else q.bias.detach().to(dtype)

    xg = x.clone().requires_grad_()
    y = lora_linear(xg, q.qweight, b, lora_a, lora_b, scale=scale, dropout_p=dropout, keys=keys, base=q)
    y.backward(g)
    assert y.dtype == dtype and y.grad_fn is not None and "LoraLinearFn" in type(y.grad_fn).__name__

    x2, g2 = x.reshape(-1, 64).float(), g.reshape(-1, 48).float()
    xd = hashed_dropout(x.reshape(-1, 64), dropout, keys).float() if dropout else x2
    base_y = fp8_linear_reference(x, q.qweight, q.scale, b, quantize_input=True).reshape(-1, 48).float()
    u = xd @ lora_a.detach().T
    want_y = base_y + scale * u @ lora_b.detach().T
    t = scale * g2 @ lora_b.detach()
    lora_dx = t @ lora_a.detach()
    if dropout:
        lora_dx = hashed_dropout(lora_dx, dropout, keys)
    want_dx = _emulated_input_grad(g, q).reshape(-1, 64).float() + lora_dx
    assert rel_err(y.reshape(-1, 48), want_y) < 1e-2
    assert rel_err(xg.grad.reshape(-1, 64), want_dx) < 1e-2  # type: ignore[union-attr]
    assert rel_err(lora_a.grad, t.T @ xd) < 1e-2  # type: ignore[arg-type]
    assert rel_err(lora_b.grad, scale * g2.T @ u) < 1e-2  # type: ignore[arg-type]
    assert rel_err(y.reshape(-1, 48), base_y) > 0.1  # the adapter's term is there


def _node_names(t: torch.Tensor) -> set[str]:
    """The autograd node class names behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [nxt for nxt, _ in node.next_functions]
    return names


def test_fused_kernels_take_an_fp8_base_into_the_lora_node() -> None:
    """fuse() after LoRA (training's default on a GPU; the CPU runs its references): each LoRA linear over
    an FP8 base becomes one node running the base's scaled GEMMs (no dropped-out copy of ``x`` kept, as
    over bf16), and the model computes what the plain path did. In fp32 activations, logits and every
    adapter gradient agree to 1e-5 (the same FP8 products; bf16 activations differ by ~1-2% either way,
    fused or not, over a bf16 base too, so they would hide a real difference)."""
    from splice.fused.apply import fuse
    from splice.fused.modules import FusedLoraLinear

    model = tiny.llama()
    quantize_fp8(model, allow_cpu=True)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(model)
    ids = tiny.tokens()

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        nodes = _node_names(logits)
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, nodes

    before, grads, plain_nodes = run()
    assert fuse(model)
    assert sum(isinstance(m, FusedLoraLinear) and isinstance(m.base, FP8Linear) for m in model.modules()) == 14
    after, fused_grads, fused_nodes = run()
    assert "_LoraLinearFnBackward" in fused_nodes and "_LoraLinearFnBackward" not in plain_nodes
    assert "_LoraGroupFnBackward" in fused_nodes  # q/k/v and gate/up over FP8: one node each, x quantized once
    assert "_FP8LinearFnBackward" in plain_nodes and "_FP8LinearFnBackward" not in fused_nodes
    assert rel_err(after, before) < 1e-5
    assert fused_grads.keys() == grads.keys() and sum("lora_" in name for name in grads) == 28
    for name, grad in grads.items():  # adapters, and the unfrozen norms, embedding and head
        assert rel_err(fused_grads[name], grad) < 1e-5, name


@FP8_GPU
def test_gpu_gemm_matches_the_emulation_and_replays_in_a_cuda_graph() -> None:
    linear, q = _layer(n=256, k=512, bias=True)
    q = q.cuda()
    x = torch.randn(37, 512, device="cuda", dtype=torch.bfloat16)  # M need not be a multiple of 16
    g = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    y, dx = _grad(q, x, g)
    b = q.bias.detach() if q.bias is not None else None
    assert rel_err(y, fp8_linear_reference(x, q.qweight, q.scale, b, quantize_input=True)) < 1e-2
    assert rel_err(dx, _emulated_input_grad(g, q)) < 1e-2

    static_x = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture wants
        q(static_x).backward(g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):  # fails on any host sync in forward or backward
        static_y = q(static_x)
        static_y.backward(g)
    static_x.data.copy_(x * 2)
    graph.replay()
    assert rel_err(static_y, q(x * 2)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siblings_over_fp8_bases_run_as_one_group_that_quantizes_the_input_once(dtype: torch.dtype,
                                                                               monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _check_fp8_group("cpu", 22, dtype, monkeypatch)


@FP8_GPU
def test_gpu_fp8_group_with_the_triton_lora_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from splice.kernels.lora_linear import LORA_KERNEL_MIN_TOKENS

    _check_fp8_group("cuda", LORA_KERNEL_MIN_TOKENS + 37, torch.bfloat16, monkeypatch)


def _check_fp8_group(device: str, tokens: int, dtype: torch.dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """q/k/v over FP8 weights (a 16-wide member: k/v of GQA; a 40-wide one runs the dequantizing path): one
    lora_group node gives each member's fused LoRA-linear output and the same x, A and B gradients (fp32:
    5e-5; bf16: the member-by-member node rounds each member's dx before autograd sums them, 1e-2), and it
    quantizes x once for the forward, against once per FP8 member alone."""
    import splice.kernels.fp8_rows as fp8_rows
    from splice.kernels.lora_group import lora_group
    from splice.kernels.lora_linear import lora_linear

    torch.manual_seed(3)
    layers = [FP8Linear.from_linear(nn.Linear(64, n, bias=False).to(torch.bfloat16)).to(device=device, dtype=dtype)
              for n in (48, 16, 40)]
    assert [q.fast for q in layers] == [True, True, False]
    x = torch.randn(1, tokens, 64).to(device=device, dtype=dtype)
    las = [(torch.randn(r, 64) * 0.2).to(device).requires_grad_() for r in (4, 8, 2)]
    lbs = [(torch.randn(q.out_features, r) * 0.2).to(device).requires_grad_() for q, r in zip(layers, (4, 8, 2))]
    scales = [0.5, 2.0, 1.0]
    calls: list[int] = []
    original = fp8_rows.quantize_rows

    def counting(t: torch.Tensor, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(t.shape[-1])
        return original(t, **kwargs)

    monkeypatch.setattr(fp8_rows, "quantize_rows", counting)

    def run(group: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        xg = x.clone().requires_grad_()
        for t in (*las, *lbs):
            t.grad = None
        calls.clear()
        if group:
            ys = list(lora_group(xg, [q.qweight for q in layers], [None] * 3, las, lbs, scales=scales, bases=layers))
        else:
            ys = [lora_linear(xg, q.qweight, None, a, b, scale=s, base=q)
                  for q, a, b, s in zip(layers, las, lbs, scales)]
        forward_quantizations = sum(width == 64 for width in calls)
        sum((y.float() * (i + 1)).square().sum() for i, y in enumerate(ys)).backward()
        return [y.detach() for y in ys], [t.grad.clone() for t in (xg, *las, *lbs)], forward_quantizations

    grouped, grouped_grads, grouped_calls = run(True)
    single, single_grads, single_calls = run(False)
    assert (grouped_calls, single_calls) == (1, 2)
    # fp32: dx sums three members' terms of ~1e2 in another order (measured 1.4e-5); a member missing: ~30%
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    names = ["y_q", "y_k", "y_v", "dx", "dA_q", "dA_k", "dA_v", "dB_q", "dB_k", "dB_v"]
    for name, got, want in zip(names, grouped + grouped_grads, single + single_grads, strict=True):
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    with pytest.raises(ValueError, match="one base per member"):
        lora_group(x, [q.qweight for q in layers], [None] * 3, las, lbs, scales=scales, bases=layers[:2])
