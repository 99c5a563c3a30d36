"""Sibling LoRA linears as one node (splice.kernels.lora_group) against float64 member-by-member references."""

from __future__ import annotations

import pytest
import torch

import splice.kernels.lora_linear as lora_module
from splice.kernels.dropout import new_keys
from splice.kernels.lora_group import lora_group, lora_group_u
from splice.kernels.lora_linear import lora_linear, lora_linear_reference, lora_u, uses_lora_kernels
from tests.numerics import DEVICES, GPU, rel_err

# (x shape, out features per member, rank per member): q/k/v-like (GQA: k and v narrower), mixed ranks
SHAPES = [((3, 5, 33), (17, 9, 9), (3, 8, 2)), ((64, 128), (96, 96), (8, 8)), ((2, 7, 96), (257, 31, 31), (16, 16, 16))]


def _tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)


def _members(k: int, outs: tuple[int, ...], ranks: tuple[int, ...], *, dtype: torch.dtype, device: str,
             bias: bool) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
    ws = [(torch.randn(n, k, device=device) / k**0.5).to(dtype) for n in outs]
    bs = [torch.randn(n, device=device).to(dtype) if bias else None for n in outs]
    # fp32 master adapter weights; B non-zero so every gradient path is exercised
    la = [(torch.randn(r, k, device=device) / k**0.5).requires_grad_() for r in ranks]
    lb = [torch.randn(n, r, device=device).requires_grad_() for n, r in zip(outs, ranks)]
    return ws, bs, la, lb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,outs,ranks", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_forward_and_grads_match_each_member_alone(device: str, dtype: torch.dtype, shape: tuple[int, ...],
                                                   outs: tuple[int, ...], ranks: tuple[int, ...], bias: bool,
                                                   kernels: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(lora_module, "LORA_KERNEL_MIN_TOKENS", 0 if kernels else 1 << 62)
    k = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    ws, bs, la, lb = _members(k, outs, ranks, dtype=dtype, device=device, bias=bias)
    scales = [1.7, 0.5, 2.0][:len(outs)]
    ys = lora_group(x, ws, bs, la, lb, scales=scales)
    assert [y.shape for y in ys] == [(*shape[:-1], n) for n in outs] and all(y.dtype == dtype for y in ys)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)

    x64 = x.detach().double().requires_grad_()
    a64 = [a.detach().double().requires_grad_() for a in la]
    b64 = [b.detach().double().requires_grad_() for b in lb]
    refs = [lora_linear_reference(x64, w.double(), None if b is None else b.double(), a, bb, scale=s)
            for w, b, a, bb, s in zip(ws, bs, a64, b64, scales)]
    torch.autograd.backward(refs, [dy.double() for dy in dys])
    tol = _tol(dtype)
    for y, ref in zip(ys, refs):
        assert rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    # the Triton path keeps the adapter math fp32-accurate, as lora_linear's does
    tol_ab = 2e-4 if uses_lora_kernels(x.reshape(-1, k)) else tol
    for a, ref_a, b, ref_b in zip(la, a64, lb, b64):
        assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        assert rel_err(a.grad, ref_a.grad) < tol_ab
        assert rel_err(b.grad, ref_b.grad) < tol_ab


@pytest.mark.parametrize("device", DEVICES)
def test_equals_lora_linear_member_by_member_in_fp32(device: str) -> None:
    """The same math as the per-member node: values and gradients equal to fp32 rounding."""
    x = torch.randn(2, 6, 40, device=device, requires_grad=True)
    ws, bs, la, lb = _members(40, (24, 8, 8), (4, 4, 4), dtype=torch.float32, device=device, bias=True)
    ys = lora_group(x, ws, bs, la, lb, scales=[0.5, 0.5, 0.5])
    sum(y.square().sum() for y in ys).backward()
    grads = [t.grad.clone() for t in (x, *la, *lb)]
    for t in (x, *la, *lb):
        t.grad = None
    singles = [lora_linear(x, w, b, a, bb, scale=0.5) for w, b, a, bb in zip(ws, bs, la, lb)]
    sum(y.square().sum() for y in singles).backward()
    for y, single in zip(ys, singles):
        torch.testing.assert_close(y, single, rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, (x, *la, *lb)):
        assert rel_err(got, t.grad) < 2e-6  # sums over the tokens in another order: fp32 rounding, not elementwise


@pytest.mark.parametrize("device", DEVICES)
def test_trainable_base_weights_and_biases_get_their_gradients(device: str) -> None:
    x = torch.randn(9, 40, device=device, requires_grad=True)
    ws = [torch.randn(n, 40, device=device, requires_grad=True) for n in (24, 12)]
    bs = [torch.randn(n, device=device, requires_grad=True) for n in (24, 12)]
    la = [torch.randn(r, 40, device=device, requires_grad=True) for r in (4, 2)]
    lb = [torch.randn(n, r, device=device, requires_grad=True) for n, r in ((24, 4), (12, 2))]
    leaves = (x, *ws, *bs, *la, *lb)
    ys = lora_group(x, ws, bs, la, lb, scales=[0.5, 3.0])
    (ys[0].sum() + 2 * ys[1].sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    refs = [lora_linear_reference(x, w, b, a, bb, scale=s) for w, b, a, bb, s in zip(ws, bs, la, lb, (0.5, 3.0))]
    (refs[0].sum() + 2 * refs[1].sum()).backward()
    for got, t in zip(grads, leaves):
        assert rel_err(got, t.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_a_recompute_with_the_kept_u_and_no_output_builds_the_same_backward(device: str) -> None:
    """A checkpoint recompute passes the forward's stacked U back and asks for no values: same gradients."""
    x = torch.randn(5, 3, 32, device=device, requires_grad=True)
    ws, bs, la, lb = _members(32, (16, 8), (4, 2), dtype=torch.float32, device=device, bias=False)
    u = lora_group_u(x, la)
    assert u.shape == (15, 6)
    torch.testing.assert_close(u, x.reshape(-1, 32) @ torch.cat(la).T)
    dys = [torch.randn(5, 3, n, device=device) for n in (16, 8)]
    torch.autograd.backward(lora_group(x, ws, bs, la, lb, scales=[1.0, 2.0]), dys)
    expected = [t.grad.clone() for t in (x, *la, *lb)]
    for t in (x, *la, *lb):
        t.grad = None
    torch.autograd.backward(lora_group(x, ws, bs, la, lb, scales=[1.0, 2.0], output=False, u=u.detach()), dys)
    for want, t in zip(expected, (x, *la, *lb)):
        torch.testing.assert_close(t.grad, want)


def _keys(members: int, device: str) -> torch.Tensor:
    return torch.stack([new_keys(device) for _ in range(members)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("outs", [(40, 24, 24), (96, 33)])
def test_dropout_each_member_keeps_its_own_mask(device: str, dtype: torch.dtype, kernels: bool,
                                                outs: tuple[int, ...], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With dropout, member j's values and every gradient equal lora_linear's for that member alone with
    its row of the keys (the same mask), on the PyTorch path and through the kernels."""
    monkeypatch.setattr(lora_module, "LORA_KERNEL_MIN_TOKENS", 0 if kernels else 1 << 62)
    torch.manual_seed(3)
    x = torch.randn(3, 11, 72, device=device).to(dtype).requires_grad_()
    ws, bs, la, lb = _members(72, outs, (8,) * len(outs), dtype=dtype, device=device, bias=True)
    keys = _keys(len(outs), device)
    scales = [1.5, 0.5, 2.0][:len(outs)]
    leaves = (x, *la, *lb)
    ys = lora_group(x, ws, bs, la, lb, scales=scales, dropout_p=0.3, keys=keys)
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, leaves, dys)
    singles = [lora_linear(x, w, b, a, bb, scale=s, dropout_p=0.3, keys=keys[j])
               for j, (w, b, a, bb, s) in enumerate(zip(ws, bs, la, lb, scales))]
    # member 1 reads its own row of the keys: its U block changes when it is given member 0's keys
    u = lora_group_u(x, la, dropout_p=0.3, keys=keys)
    u_first = lora_group_u(x, la, dropout_p=0.3, keys=keys[[0] * len(outs)])
    assert torch.equal(u[:, :8], u_first[:, :8]) and not torch.allclose(u[:, 8:16], u_first[:, 8:16])
    want = torch.autograd.grad(singles, leaves, dys)
    tol = _tol(dtype)
    for y, single in zip(ys, singles):
        assert rel_err(y, single) < tol
    assert rel_err(grads[0], want[0]) < tol  # dx: the members' parts summed in another order
    for got, ref in zip(grads[1:], want[1:]):
        assert rel_err(got, ref) < (1e-5 if uses_lora_kernels(x.reshape(-1, 72)) else tol)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_u_for_a_recompute_is_the_nodes_own(device: str) -> None:
    x = torch.randn(4, 6, 32, device=device, requires_grad=True)
    ws, bs, la, lb = _members(32, (16, 8), (4, 4), dtype=torch.float32, device=device, bias=False)
    keys = _keys(2, device)
    u = lora_group_u(x, la, dropout_p=0.25, keys=keys)
    torch.testing.assert_close(u, torch.cat([lora_u(x, a, dropout_p=0.25, keys=keys[j]) for j, a in enumerate(la)], 1))
    dys = [torch.randn(4, 6, n, device=device) for n in (16, 8)]
    want = torch.autograd.grad(lora_group(x, ws, bs, la, lb, scales=[1.0, 2.0], dropout_p=0.25, keys=keys),
                               (x, *la, *lb), dys)
    got = torch.autograd.grad(lora_group(x, ws, bs, la, lb, scales=[1.0, 2.0], output=False, u=u.detach(),
                                         dropout_p=0.25, keys=keys), (x, *la, *lb), dys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_arguments_raise_one_clear_error() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="one of each per member"):
        lora_group(x, [torch.randn(3, 4)], [None, None], [torch.randn(1, 4)], [torch.randn(3, 1)], scales=[1.0])
    with pytest.raises(ValueError, match="one rank and \\(2, 2\\) keys"):  # a mask a member: equal ranks
        lora_group(x, [torch.randn(3, 4)] * 2, [None] * 2, [torch.randn(1, 4), torch.randn(2, 4)],
                   [torch.randn(3, 1), torch.randn(3, 2)], scales=[1.0] * 2, dropout_p=0.1, keys=_keys(2, "cpu"))
    with pytest.raises(ValueError, match="one rank and \\(2, 2\\) keys"):
        lora_group(x, [torch.randn(3, 4)] * 2, [None] * 2, [torch.randn(1, 4)] * 2, [torch.randn(3, 1)] * 2,
                   scales=[1.0] * 2, dropout_p=0.1, keys=None)
    with pytest.raises(TypeError, match="must share a dtype"):
        lora_group(x, [torch.randn(3, 4, dtype=torch.float64)], [None], [torch.randn(1, 4)], [torch.randn(3, 1)],
                   scales=[1.0])


@GPU
def test_gpu_llama_8b_widths_through_the_kernels_match_member_by_member() -> None:
    """Config C's shape on the Triton path (4,096 tokens, r16 fp32 adapters over bf16, without dropout and
    with C's 0.05, each member its own mask): the grouped node against each member's own fused node,
    outputs and every gradient."""
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert uses_lora_kernels(x)
    for outs, p in (((4096, 1024, 1024), 0.0), ((14336, 14336), 0.0), ((4096, 1024, 1024), 0.05),
                    ((14336, 14336), 0.05)):
        ws, bs, la, lb = _members(4096, outs, (16,) * len(outs), dtype=torch.bfloat16, device="cuda", bias=False)
        dys = [torch.randn(4096, n, device="cuda", dtype=torch.bfloat16) for n in outs]
        keys = _keys(len(outs), "cuda") if p else None
        ys = lora_group(x, ws, bs, la, lb, scales=[2.0] * len(outs), dropout_p=p, keys=keys)
        torch.autograd.backward(ys, dys)
        grads = [t.grad.clone() for t in (x, *la, *lb)]
        for t in (x, *la, *lb):
            t.grad = None
        singles = [lora_linear(x, w, None, a, b, scale=2.0, dropout_p=p, keys=0 if keys is None else keys[j])
                   for j, (w, a, b) in enumerate(zip(ws, la, lb))]
        torch.autograd.backward(singles, dys)
        for y, single in zip(ys, singles):
            assert rel_err(y, single) < 1e-3
        assert rel_err(grads[0], x.grad) < 1e-2  # bf16 dx summed in a different order
        for got, t in zip(grads[1:], (*la, *lb)):
            assert rel_err(got, t.grad) < 1e-4  # fp32-accurate adapter gradients either way
        x.grad = None
