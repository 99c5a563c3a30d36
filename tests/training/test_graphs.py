"""splice.training.graphs.GraphedStep: a replayed CUDA graph computes what the eager step computes (loss,
every LoRA gradient, fresh dropout masks, checkpoint recompute), accumulates like eager, survives
``.grad = None``, and falls back to eager when capture is impossible. On CPU it is transparent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from splice.fused.apply import fuse
from splice.memory.checkpointing import checkpoint_layers
from splice.training.graphs import GraphedStep
from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states
from tests.numerics import GPU, rel_err
from tests.tiny import lora_llama

Step = Callable[[dict[str, Tensor]], Tensor]


def make_step(model: nn.Module) -> Step:
    weight, _ = lm_head_params(model)

    def step(batch: dict[str, Tensor]) -> Tensor:
        hidden = model_hidden_states(model, input_ids=batch["ids"])
        loss = causal_lm_loss(hidden, weight, batch["ids"], static_shapes=True)
        loss.backward()
        return loss.detach()

    return step


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def zero(model: nn.Module) -> None:
    for p in trainable(model):
        if p.grad is not None:
            p.grad.zero_()


def test_cpu_calls_are_plain_calls() -> None:
    model = lora_llama(dropout=0.0, layers=3)
    ids = torch.randint(0, 101, (2, 12))
    graphed = GraphedStep(make_step(model), trainable(model))
    loss = graphed({"ids": ids})
    got = grads(model)
    zero(model)
    ref = make_step(model)({"ids": ids})
    assert graphed.captured == 0 and torch.equal(loss, ref)
    assert got.keys() == grads(model).keys() and all(torch.equal(got[k], v) for k, v in grads(model).items())
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(make_step(model), trainable(model), warmup=0)


def _graph_vs_eager(model: nn.Module, ids: Tensor, seed: int) -> tuple[tuple[Tensor, dict], tuple[Tensor, dict]]:
    step = make_step(model)
    graphed = GraphedStep(step, trainable(model))
    graphed({"ids": ids})  # warm-up + capture + first replay
    assert graphed.captured == 1
    zero(model)
    torch.manual_seed(seed)  # a replay draws from the generator exactly as the eager step does
    replayed = (graphed({"ids": ids}).clone(), grads(model))
    zero(model)
    torch.manual_seed(seed)
    eager = (step({"ids": ids}), grads(model))
    return replayed, eager


@GPU
@pytest.mark.parametrize("ckpt", ["none", "all", "offload", "kept attention", "kept attention offload"])
@pytest.mark.parametrize(("dtype", "length", "tol"), [(torch.float32, 12, 1e-5), (torch.bfloat16, 12, 1e-2),
                                                      (torch.bfloat16, 1100, 1e-2)])  # 2,200 tokens: Triton LoRA
def test_replay_equals_eager_with_dropout(ckpt: str, dtype: torch.dtype, length: int, tol: float,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from splice.memory import stash

    monkeypatch.setattr(stash, "_MIN_OFFLOAD_BYTES", 0)  # these small tensors offload too
    model = lora_llama(dropout=0.1, device="cuda", dtype=dtype, layers=3)
    fuse(model)
    if ckpt != "none":  # offload: what is kept goes through pinned host memory inside the graph
        checkpoint_layers(model, layers="all", offload=ckpt.endswith("offload"),
                          keep_attention=ckpt.startswith("kept"))
    ids = torch.randint(0, 101, (2, length), device="cuda")
    (loss_g, grads_g), (loss_e, grads_e) = _graph_vs_eager(model, ids, seed=5)
    assert rel_err(loss_g, loss_e) < tol
    assert grads_g.keys() == grads_e.keys() and len(grads_g) == 3 * 7 * 2
    worst = max(rel_err(grads_g[k], grads_e[k]) for k in grads_g)
    assert worst < tol
    # fresh masks on every replay: another seed moves the gradients far more than the tolerance
    zero(model)
    torch.manual_seed(6)
    make_step(model)({"ids": ids})
    assert max(rel_err(grads(model)[k], grads_e[k]) for k in grads_e) > 10 * tol


@GPU
def test_accumulates_and_reinstalls_grads_set_to_none() -> None:
    model = lora_llama(dropout=0.0, device="cuda", layers=3)
    fuse(model)
    a, b = (torch.randint(0, 101, (2, 16), device="cuda") for _ in range(2))
    step = make_step(model)
    graphed = GraphedStep(step, trainable(model))
    graphed({"ids": a})
    graphed({"ids": b})
    accumulated = grads(model)
    for p in trainable(model):
        p.grad = None
    step({"ids": a})
    step({"ids": b})
    expected = grads(model)
    assert all(rel_err(accumulated[k], expected[k]) < 1e-5 for k in expected)
    for p in trainable(model):
        p.grad = None  # as optimizer.zero_grad() does by default: the graph's tensors come back zeroed
    graphed({"ids": a})
    assert graphed.captured == 1
    graphed_single = grads(model)
    for p in trainable(model):
        p.grad = None
    step({"ids": a})
    assert all(rel_err(graphed_single[k], v) < 1e-5 for k, v in grads(model).items())


@GPU
def test_new_shape_gets_its_own_graph() -> None:
    model = lora_llama(dropout=0.0, device="cuda", layers=3)
    fuse(model)
    graphed = GraphedStep(make_step(model), trainable(model))
    for length in (16, 24, 16):
        ids = torch.randint(0, 101, (2, length), device="cuda")
        zero(model)
        loss = graphed({"ids": ids}).clone()
        zero(model)
        assert rel_err(loss, make_step(model)({"ids": ids})) < 1e-5
    assert graphed.captured == 2


@GPU
def test_error_during_capture_falls_back_to_eager() -> None:
    model = lora_llama(dropout=0.0, device="cuda", layers=3)  # warm-ups draw random numbers: no dropout here
    fuse(model)
    step = make_step(model)

    def refuses(batch: dict[str, Tensor]) -> Tensor:
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("not in a graph")
        return step(batch)

    messages: list[str] = []
    graphed = GraphedStep(refuses, trainable(model), warn=messages.append)
    ids = torch.randint(0, 101, (2, 16), device="cuda")
    zero(model)
    loss = graphed({"ids": ids})
    got = grads(model)
    assert graphed.captured == 0 and len(messages) == 1 and "not in a graph" in messages[0]
    zero(model)
    ref = step({"ids": ids})
    assert rel_err(loss, ref) < 1e-6
    assert all(rel_err(got[k], v) < 1e-6 for k, v in grads(model).items())  # warm-ups undone
    graphed({"ids": ids})  # later calls run eagerly, no second warning
    assert len(messages) == 1
    assert torch.randint(0, 5, (3,), device="cuda").shape == (3,)  # the CUDA generator still works


_SYNCING_STEP = """
import torch
from splice.training.graphs import GraphedStep
w = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
def step(batch):
    loss = (batch["x"] @ w).square().mean()
    if loss.item() < 0:  # a host sync inside the step
        raise AssertionError
    loss.backward()
    return loss.detach()
try:
    GraphedStep(step, [w])({"x": torch.randn(4, 8, device="cuda")})
except RuntimeError as exc:
    print("RAISED:", exc)
"""


@GPU
def test_host_sync_in_the_step_stops_with_the_fix() -> None:
    import subprocess
    import sys

    # its own process: the aborted capture leaves that process's CUDA generator unusable
    out = subprocess.run([sys.executable, "-c", _SYNCING_STEP], capture_output=True, text=True, timeout=300)
    assert "RAISED:" in out.stdout, out.stderr[-2000:]
    assert "synchronizes with the host" in out.stdout and "--no-cuda-graphs" in out.stdout


@GPU
def test_checkpoint_refuses_capture_with_torch_dropout_inside() -> None:
    model = lora_llama(dropout=0.1, device="cuda", layers=3)  # not accelerated: nn.Dropout draws from torch
    checkpoint_layers(model, layers="all")
    messages: list[str] = []
    graphed = GraphedStep(make_step(model), trainable(model), warn=messages.append)
    graphed({"ids": torch.randint(0, 101, (2, 16), device="cuda")})
    assert graphed.captured == 0 and "could not" in messages[0] and "replay" in messages[0]
