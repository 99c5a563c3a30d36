"""splice.memory.tiled_mlp: the MLP run a chunk of tokens at a time gives the un-tiled loss, input
gradient and LoRA gradients (fused or plain MLP, with or without checkpointed / offloaded layers),
replays its dropout masks, keeps LoRA visible, and refuses bad chunk sizes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from splice.cli import main
from splice.core.errors import UsageError
from splice.fused.apply import fuse
from splice.fused.modules import FusedSwiGLUMLP
from splice.lora.apply import adapters_disabled, lora_modules, use_adapters
from splice.memory.checkpointing import checkpoint_layers
from splice.memory.tiled_mlp import TiledMLP, tile_mlps, tiled_mlp, untile_mlps
from splice.training.config import TrainConfig
from splice.training.loop import train
from tests.distributed.ranks import check, run_ranks
from tests.numerics import GPU, rel_err
from tests.tiny import assert_same, lora_llama, loss_and_grads, run_config

TOKENS = 24  # ids of shape (2, 12)
TOL = 1e-5  # fp32 GEMMs over other row blocks round differently (measured up to 1.2e-6); a wrong row: > 0.5


def _mlp(*, fused: bool, dropout: float = 0.0) -> nn.Module:
    model = lora_llama(dropout=dropout, layers=1)
    if fused:
        fuse(model)
    return model.model.layers[0].mlp


def _input_and_grads(mlp: nn.Module, x: Tensor, *, chunk: int | None, seed: int = 0,
                     forward: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(output, dx, LoRA grads) of a random linear functional of ``mlp(x)`` (tiled when ``chunk``;
    ``forward`` instead of ``mlp`` when given)."""
    x = x.detach().requires_grad_()
    params = [p for p in mlp.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    if chunk is None:
        out = (forward or mlp)(x)
    else:
        out = tiled_mlp(mlp, x, chunk_tokens=chunk, params=params)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    mlp.zero_grad(set_to_none=True)
    assert x.grad is not None
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 23])
def test_function_matches_the_untiled_mlp(fused: bool, chunk: int) -> None:
    mlp = _mlp(fused=fused)
    x = torch.randn(2, 12, 64)
    out, dx, grads = _input_and_grads(mlp, x, chunk=None)
    tiled_out, tiled_dx, tiled_grads = _input_and_grads(mlp, x, chunk=chunk)
    assert rel_err(tiled_out, out) < 1e-6 and rel_err(tiled_dx, dx) < 1e-6
    assert grads.keys() == tiled_grads.keys() and len(grads) == 6  # A and B of gate, up, down
    for name in grads:
        assert rel_err(tiled_grads[name], grads[name]) < 1e-6, name


def test_a_wrong_stitching_would_fail_these_tolerances() -> None:
    """The comparisons above catch chunks written to the wrong rows: rolling the output by one
    chunk (or one token) moves it far past the tolerance."""
    mlp = _mlp(fused=True)
    x = torch.randn(2, 12, 64)
    out, _, _ = _input_and_grads(mlp, x, chunk=None)
    tiled, _, _ = _input_and_grads(mlp, x, chunk=5)
    rows, wrong_rows = out.reshape(TOKENS, -1), tiled.reshape(TOKENS, -1)
    assert rel_err(wrong_rows.roll(5, 0), rows) > 0.5 and rel_err(wrong_rows.roll(1, 0), rows) > 0.5
    assert rel_err(wrong_rows, rows) < 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_dropout_masks_are_replayed_in_the_backward(fused: bool) -> None:
    """With dropout the chunks draw their own masks (in the order the un-tiled modules would); the
    backward must use the same ones: equal to autograd through the chunks run one after another."""
    mlp = _mlp(fused=fused, dropout=0.3)
    mlp.train()
    x = torch.randn(2, 12, 64)
    tiled_out, tiled_dx, tiled_grads = _input_and_grads(mlp, x, chunk=5, seed=4)

    def chunked(t: Tensor) -> Tensor:
        rows = t.reshape(TOKENS, -1)
        return torch.cat([mlp(rows[s:s + 5]) for s in range(0, TOKENS, 5)]).view(t.shape)

    out, dx, grads = _input_and_grads(mlp, x, chunk=None, seed=4, forward=chunked)
    assert rel_err(tiled_out, out) < 1e-6 and rel_err(tiled_dx, dx) < 1e-6
    for name in grads:
        assert rel_err(tiled_grads[name], grads[name]) < 1e-6, name
    other, _, _ = _input_and_grads(mlp, x, chunk=5, seed=5)
    assert rel_err(other, out) > 0.01  # the masks do depend on the seed (the test can fail)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("checkpoint", [None, "all", "offload", "before"])
@pytest.mark.parametrize("chunk", [5, 8])
def test_model_loss_and_lora_grads_match(fused: bool, checkpoint: str | None, chunk: int) -> None:
    """``before``: the layers checkpointed first, the MLPs tiled inside them afterwards (the benchmarks' order)."""
    plain = lora_llama(layers=2)
    if fused:
        fuse(plain)
    tiled = copy.deepcopy(plain)
    if checkpoint == "before":
        checkpoint_layers(tiled, layers="all")
    assert tile_mlps(tiled, chunk_tokens=chunk) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    if checkpoint in ("all", "offload"):
        checkpoint_layers(tiled, layers="all", offload=checkpoint == "offload")
    assert all(isinstance(layer.mlp, TiledMLP) for layer in tiled.model.layers)
    ids = torch.randint(0, 101, (2, 12))
    assert_same(loss_and_grads(plain, ids), loss_and_grads(tiled, ids), tol=TOL)


@pytest.mark.parametrize("fused", [False, True])
def test_checkpointed_recompute_replays_the_forward_masks(fused: bool) -> None:
    """Inside a checkpointed layer the recompute skips the MLP (its output is unread) and the tiled
    backward draws the checkpoint's recorded keys: the same gradients as tiling without checkpoints."""
    model = lora_llama(layers=2, dropout=0.2)
    if fused:
        fuse(model)
    tile_mlps(model, chunk_tokens=5)
    ckpt = copy.deepcopy(model)
    checkpoint_layers(ckpt, layers="all")
    ids = torch.randint(0, 101, (2, 12))
    assert_same(loss_and_grads(model, ids, seed=3), loss_and_grads(ckpt, ids, seed=3), tol=TOL)


def test_short_inputs_and_no_grad_run_as_before() -> None:
    plain = lora_llama(layers=1)
    fuse(plain)
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, chunk_tokens=24)  # (2, 12): 24 tokens, not more than the chunk: untouched
    ids = torch.randint(0, 101, (2, 12))
    assert_same(loss_and_grads(plain, ids), loss_and_grads(tiled, ids))
    mlp = tiled.model.layers[0].mlp
    assert isinstance(mlp, TiledMLP) and isinstance(mlp.__dict__["_mlp"], FusedSwiGLUMLP)
    mlp.chunk_tokens = 7
    with torch.no_grad():  # chunked too, without a graph
        torch.testing.assert_close(tiled(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=1e-6, atol=1e-6)


def test_structure_lora_visibility_undo_and_refusals() -> None:
    model = lora_llama(layers=2)
    keys, paths = list(model.state_dict()), [p for p, _, _ in lora_modules(model)]
    tile_mlps(model, chunk_tokens=4)
    assert list(model.state_dict()) == keys and [p for p, _, _ in lora_modules(model)] == paths
    assert "chunk_tokens=4" in repr(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="no untiled SwiGLU MLP"):
        tile_mlps(model, chunk_tokens=4)  # already tiled
    assert untile_mlps(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not any(isinstance(m, TiledMLP) for m in model.modules())
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
            tile_mlps(model, chunk_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        tiled_mlp(nn.Identity(), torch.randn(3, 4), chunk_tokens=0)


def test_config_refuses_a_bad_chunk() -> None:
    for bad in (0, -1):
        with pytest.raises(UsageError, match="mlp_chunk_tokens.*must be a number of tokens >= 1"):
            TrainConfig(mlp_chunk_tokens=bad).validate()
    TrainConfig(mlp_chunk_tokens=65536).validate()


def test_the_cli_flag_refuses_a_bad_chunk_in_one_line(tiny_run_inputs: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, data = tiny_run_inputs
    argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--prompt-template", "Q: {question}\nA: ", "--response-template", "{answer}", "--mlp-chunk-tokens", "0"]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = int(stop.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "mlp_chunk_tokens" in err and "must be a number of tokens >= 1" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_ddp_and_fsdp2_on_two_ranks_match_one_untiled_process(tiny_run_inputs: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """The trainer's option under DDP and FSDP2 (2 gloo ranks, checkpointed fused layers): the
    parameter gradients come back through the tiled node once per step, so both match one un-tiled
    process reading the same global batches (tests/distributed/test_wrap.py's tolerances)."""
    common = dict(steps=3, val_fraction=0.05, dropout=0.0, lr=1e-2, device="cpu", save_every=0, grad_accum=2)
    tiled = dict(batch_size=2, fuse=True, gradient_checkpointing=True, mlp_chunk_tokens=7)
    runs = {"ddp": tiled, "fsdp2": {**tiled, "shard": True}}
    job = {"inputs": [str(p) for p in tiny_run_inputs],
           "runs": [{"out": str(tmp_path / name), "options": {**common, **options}} for name, options in runs.items()]}
    check(run_ranks(job, world=2, timeout=400))
    single = train(run_config(tiny_run_inputs, tmp_path / "single", **common, batch_size=4, fuse=False))
    ref = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    for name in runs:
        result = json.loads((tmp_path / name / "result-rank0.json").read_text())
        assert result["parallel"] == name
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-5)
        ours = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        assert ours.keys() == ref.keys() and any(".mlp." in k for k in ref)
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5)


def test_rows_routed_to_different_adapters_run_untiled() -> None:
    """A per-row route indexes the batch rows, which token chunks do not keep: those calls run un-tiled
    (the same logits as the un-tiled model), other calls still tile."""
    plain = lora_llama(layers=1)
    name = lora_modules(plain)[0][2].name
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, chunk_tokens=5)
    ids = torch.randint(0, 101, (2, 12))
    routed, base = {}, {}
    with torch.no_grad():
        for key, model in (("plain", plain), ("tiled", tiled)):
            with use_adapters(model, [name, None]):
                routed[key] = model(input_ids=ids).logits
            with adapters_disabled(model):
                base[key] = model(input_ids=ids).logits
    torch.testing.assert_close(routed["tiled"], routed["plain"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base["tiled"], base["plain"], rtol=1e-6, atol=1e-6)
    assert rel_err(routed["plain"][1], base["plain"][1]) < 1e-6 < rel_err(routed["plain"][0], base["plain"][0])


@GPU
def test_gpu_tiling_lowers_the_mlp_peak_and_matches() -> None:
    """bf16 on the GPU (the fused Triton kernels): the MLP's forward + backward peak above its input
    falls with the chunk, and the input and LoRA gradients agree to bf16 rounding."""
    mlp = lora_llama(device="cuda", dtype=torch.bfloat16, layers=1, hidden=256).model.layers[0]
    fuse(mlp)
    x = torch.randn(1, 16384, 256, device="cuda", dtype=torch.bfloat16)
    peaks, results = [], []
    for chunk in (None, 1024):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_input_and_grads(mlp.mlp, x, chunk=chunk))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < 0.7 * peaks[0], peaks
    (out, dx, grads), (tiled_out, tiled_dx, tiled_grads) = results
    assert rel_err(tiled_out, out) < 1e-2 and rel_err(tiled_dx, dx) < 2e-2
    for name in grads:
        assert rel_err(tiled_grads[name], grads[name]) < 2e-2, name


@GPU
def test_gpu_checkpointed_model_matches_with_tiling() -> None:
    plain = lora_llama(device="cuda", dtype=torch.bfloat16, layers=2, hidden=256)
    fuse(plain)
    checkpoint_layers(plain, layers="all", offload=True)
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, chunk_tokens=1000)  # does not divide the 4096 tokens
    ids = torch.randint(0, 101, (1, 4096), device="cuda")
    assert_same(loss_and_grads(plain, ids, seed=1), loss_and_grads(tiled, ids, seed=1), tol=2e-2)
