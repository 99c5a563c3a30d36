"""In-place cross-entropy gradient (splice.kernels.cross_entropy) against float64 autograd, the
PyTorch reference, and through splice.training.loss.causal_lm_loss.

The Triton tests need a GPU, or ``TRITON_INTERPRET=1`` in the environment when pytest starts
(``triton.jit`` reads it when the kernel module is imported); otherwise they skip on the CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import splice.kernels.linear_cross_entropy as loss_module
import splice.training.loss as training_loss
from splice.kernels import use_triton
from splice.kernels.cross_entropy import cross_entropy_grad_, cross_entropy_grad_reference
from splice.training.loss import causal_lm_loss
from tests.numerics import DEVICES, GPU, HostSyncs, rel_err

_MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, vocab): one column, odd sizes, a block-size multiple, one past it, several blocks.
SHAPES = [(1, 1), (3, 17), (37, 17), (37, 5000), (2, 4096), (3, 8193), (1, 12345), (5, 12345)]


def _skip_without_triton(device: str) -> None:
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the Triton path needs a GPU, or TRITON_INTERPRET=1 set before pytest starts")


def _problem(c: int, v: int, dtype: torch.dtype, device: str, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(c, v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (c,), generator=g)
    targets[0] = v - 1  # the last column (the tail of the last block)
    if c > 1:
        targets[1] = 0
    scale = torch.rand(c, generator=g) + 0.1
    scale[::3] = 0.0  # ignored rows: zero gradient, loss still reported
    if c > 2:
        scale[2] = 1.0
    return logits.to(device), targets.to(device), scale.to(device)


def _float64(logits: Tensor, targets: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss and d(sum_i scale_i * loss_i)/dlogits by autograd in float64."""
    z = logits.double().requires_grad_()
    loss = F.cross_entropy(z, targets, reduction="none")
    (loss * scale.double()).sum().backward()
    assert z.grad is not None
    return loss.detach(), z.grad


def _assert_grad_close(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    """fp32: 1e-5 relative. 16-bit: within one unit in the last place of ``dtype`` (Triton's
    interpreter truncates where the GPU and torch round to nearest), plus fp32-level slack."""
    got, want = got.double(), want.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        return
    m = _MANTISSA[dtype]
    _, exp = torch.frexp(torch.maximum(got.abs(), want.abs()))  # |x| = f * 2**exp, f in [0.5, 1)
    subnormal_step = torch.finfo(dtype).smallest_normal * 2.0**-m
    ulp = torch.pow(2.0, (exp - 1 - m).double()).clamp_min(subnormal_step)
    excess = (got - want).abs() - (ulp + 1e-5 * want.abs())
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} entries off by more than one ulp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64_autograd(device: str, dtype: torch.dtype) -> None:
    for c, v in SHAPES:
        logits, targets, scale = _problem(c, v, dtype, device, seed=c * v)
        loss64, grad64 = _float64(logits, targets, scale)
        out = logits.clone()
        loss = cross_entropy_grad_reference(out, targets, scale)
        assert loss.dtype == torch.float32 and out.dtype == dtype
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
        _assert_grad_close(out, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("c", "v"), SHAPES)
def test_triton_matches_float64_and_the_reference(device: str, dtype: torch.dtype, c: int, v: int) -> None:
    _skip_without_triton(device)
    logits, targets, scale = _problem(c, v, dtype, device, seed=c * v + 1)
    loss64, grad64 = _float64(logits, targets, scale)
    out, ref = logits.clone(), logits.clone()
    ptr = out.data_ptr()
    loss = cross_entropy_grad_(out, targets, scale)
    ref_loss = cross_entropy_grad_reference(ref, targets, scale)
    assert out.data_ptr() == ptr and out.dtype == dtype  # in place
    assert loss.dtype == torch.float32 and loss.shape == (c,)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=2e-6)
    _assert_grad_close(out, grad64, dtype)
    _assert_grad_close(out, ref, dtype)
    assert torch.all(out[scale == 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_large_and_masked_logits(device: str, dtype: torch.dtype, impl: str) -> None:
    """Logits far outside exp's range, and rows whose first blocks are all -inf (no NaNs)."""
    if impl == "triton":
        _skip_without_triton(device)
    fn = cross_entropy_grad_ if impl == "triton" else cross_entropy_grad_reference
    c, v = 4, 9000
    logits, targets, scale = _problem(c, v, dtype, device, seed=5)
    logits[0] *= 3000  # |z| up to ~4e4: exp overflows without the running max
    logits[1, :8192] = float("-inf")  # two whole blocks of -inf before any finite logit
    targets[1] = 8500
    logits[2, 100] = 1e4  # one dominant logit ...
    targets[2] = 100  # ... that is the target: loss ~ 0, gradient ~ 0
    loss64, grad64 = _float64(logits, targets, scale)
    out = logits.clone()
    loss = fn(out, targets, scale)
    assert torch.isfinite(loss).all() and torch.isfinite(out).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    _assert_grad_close(out, grad64, dtype)
    assert torch.all(out[1, :8192] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_scale_and_input_checks(device: str) -> None:
    logits, targets, _ = _problem(6, 300, torch.bfloat16, device, seed=7)
    scale = torch.tensor(0.25, device=device).expand(6)  # stride 0, as from a 0-dim mean weight
    out, ref = logits.clone(), logits.clone()
    torch.testing.assert_close(cross_entropy_grad_(out, targets, scale),
                               cross_entropy_grad_reference(ref, targets, scale.contiguous()),
                               rtol=1e-6, atol=2e-6)
    _assert_grad_close(out, ref, torch.bfloat16)
    assert cross_entropy_grad_(logits[:0].clone(), targets[:0], scale[:0]).shape == (0,)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy_grad_(logits.T, targets, scale)
    with pytest.raises(ValueError, match="targets must be int64"):
        cross_entropy_grad_(logits.clone(), targets.int(), scale)
    with pytest.raises(ValueError, match="row_scale must be float32"):
        cross_entropy_grad_(logits.clone(), targets, scale.bfloat16())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        cross_entropy_grad_(logits.int(), targets, scale)
    with pytest.raises(ValueError, match="row_scale must be float64"):  # fp64 logits: fp64 math
        cross_entropy_grad_(logits.double(), targets, scale)


@GPU
def test_offsets_past_2_to_the_31() -> None:
    v = 128256
    c = 2**31 // v + 3  # the last rows start past 2**31 elements (4.3 GB of bf16 logits)
    logits = torch.empty(c, v, device="cuda", dtype=torch.bfloat16).normal_(0, 3)
    targets = torch.randint(0, v, (c,), device="cuda")
    scale = torch.full((c,), 1.0 / c, device="cuda")
    picked = [0, c // 2, c - 2, c - 1]
    want = logits[picked].clone()
    want_loss = cross_entropy_grad_reference(want, targets[picked], scale[picked])
    loss = cross_entropy_grad_(logits, targets, scale)
    torch.testing.assert_close(loss[picked], want_loss, rtol=1e-6, atol=2e-6)
    _assert_grad_close(logits[picked], want, torch.bfloat16)


@GPU
def test_captures_in_a_cuda_graph() -> None:
    logits, targets, scale = _problem(37, 5000, torch.bfloat16, "cuda", seed=8)
    buf = logits.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        cross_entropy_grad_(buf.clone(), targets, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = cross_entropy_grad_(buf, targets, scale)
    buf.copy_(logits)
    graph.replay()
    torch.cuda.synchronize()
    want = logits.clone()
    torch.testing.assert_close(loss, cross_entropy_grad_reference(want, targets, scale), rtol=1e-6, atol=2e-6)
    _assert_grad_close(buf, want, torch.bfloat16)


# --- through the chunked linear + cross-entropy of splice.training.loss --------------------------------


def _loss_problem(device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(11)
    b, t, h, v = 2, 13, 32, 301
    hidden = torch.randn(b, t, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    labels[0, 1] = v - 1
    return hidden, weight, labels.to(device)


def _loss_and_grads(hidden: Tensor, weight: Tensor, labels: Tensor, **kw: Any) -> tuple[Tensor, Tensor, Tensor]:
    hidden.grad = weight.grad = None
    loss = causal_lm_loss(hidden, weight, labels, chunk_size=8, **kw)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


class _Spy:
    """Counts the loss's cross-entropy calls (``calls``) and those taking the Triton kernel."""

    def __init__(self) -> None:
        self.calls = self.kernel_calls = 0

    def __call__(self, *args: Tensor) -> Tensor:
        self.calls += 1
        self.kernel_calls += int(use_triton(*args) and args[0].dtype != torch.float64)
        return cross_entropy_grad_(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_causal_lm_loss_triton_path_matches_the_reference_path(
    device: str, static_shapes: bool, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _skip_without_triton(device)
    hidden, weight, labels = _loss_problem(device)
    spy = _Spy()
    monkeypatch.setattr(loss_module, "cross_entropy_grad_", spy)
    kw: dict[str, Any] = {"static_shapes": static_shapes, "reduction": reduction}
    loss, gh, gw = _loss_and_grads(hidden, weight, labels, **kw)
    rows = labels[:, 1:].numel() if static_shapes else int((labels[:, 1:] != -100).sum())
    chunks = -(-rows // 8)
    assert spy.kernel_calls == chunks  # one kernel call per chunk of 8 rows
    with torch.no_grad():
        forward_only = causal_lm_loss(hidden, weight, labels, chunk_size=8, **kw)
    monkeypatch.setenv("SPLICE_NO_TRITON", "1")
    ref, rh, rw = _loss_and_grads(hidden, weight, labels, **kw)
    assert spy.kernel_calls == 2 * chunks  # the no-grad call used it too; the reference path did not
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Same bf16 logits, fp32 softmax in both: the loss differs by fp32 rounding only; the bf16
    # gradients by at most one bf16 ulp per logit before the GEMMs.
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forward_only, ref, rtol=1e-5, atol=1e-6)
    assert rel_err(gh, rh) < 5e-3 and rel_err(gw, rw) < 5e-3
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100
    ignored[:, -1] = True  # the last position predicts nothing
    assert torch.all(gh[ignored] == 0) and torch.all(gh[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_lm_loss_takes_the_same_path_with_a_bias_and_in_fp32(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One cross-entropy call per chunk whatever the dtype or bias (the bias is added in fp32
    first): the loss has a single softmax-gradient path."""
    spy = _Spy()
    monkeypatch.setattr(loss_module, "cross_entropy_grad_", spy)
    hidden, weight, labels = _loss_problem(device)
    bias = torch.zeros(weight.shape[0], device=device, dtype=torch.bfloat16)
    causal_lm_loss(hidden, weight, labels, lm_head_bias=bias).backward()
    hidden32, weight32, _ = _loss_problem(device, torch.float32)
    causal_lm_loss(hidden32, weight32, labels).backward()
    assert spy.calls == 2  # one chunk each


@pytest.mark.parametrize("device", DEVICES)
def test_static_shapes_triton_path_runs_without_host_syncs(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the graph capture of a training step needs (see test_loss's fp32 version)."""
    _skip_without_triton(device)

    hidden, weight, labels = _loss_problem(device)
    spy = _Spy()
    monkeypatch.setattr(loss_module, "cross_entropy_grad_", spy)
    monkeypatch.setattr(training_loss, "check_labels", lambda *a, **k: None)  # as for GPU labels
    with HostSyncs() as mode:
        causal_lm_loss(hidden, weight, labels, static_shapes=True, chunk_size=8).backward()
    assert mode.synced == [] and spy.kernel_calls == 3
