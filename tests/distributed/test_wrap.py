"""DDP and FSDP2 on 2 real gloo ranks (CPU) match one process reading the same global batches.

Each rank reads ``batch_size`` rows of every global micro-batch; one process with
``batch_size * 2`` reads them all. Token-weighted losses and averaged gradients make the two the
same run up to float summation order: per-step losses agree to 1e-5 (fp32), the trained adapters
to 1e-4. The fast path (fused modules' reference paths and activation checkpointing on the CPU)
runs under both wrappers on the same trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.training.loop import train
from tests.distributed.ranks import check, run_ranks
from tests.numerics import GPU
from tests.tiny import run_config

# val_fraction: the 5% split these tolerances were set on (the default split holds out 9 rows, whose
# batches put one NF4-FSDP2 adapter value 2.5e-5 from the single process's, over atol 1e-5)
COMMON = dict(steps=4, val_fraction=0.05, dropout=0.0, lr=1e-2, device="cpu", save_every=0, grad_accum=2)
NF4 = dict(quantize="nf4")
RUNS = {  # name: options of each rank's run (batch_size is per rank)
    "ddp": dict(batch_size=2, fuse=False),
    "fsdp2": dict(batch_size=2, fuse=False, shard=True),
    "ddp_fast": dict(batch_size=2, fuse=True, gradient_checkpointing=True),
    "fsdp2_fast": dict(batch_size=2, fuse=True, gradient_checkpointing=True, shard=True),
    # QLoRA sharded in 4 bits. The tiny model's shards cut its 256-block absmax groups, so they
    # hold fp32 absmax; the wide one's shards keep the double-quantized statistics.
    "fsdp2_nf4": dict(batch_size=2, fuse=False, shard=True, **NF4),
    "fsdp2_nf4_wide": dict(batch_size=2, fuse=False, shard=True, **NF4),
}
REFERENCE = {"fsdp2_nf4": "nf4", "fsdp2_nf4_wide": "nf4_wide"}  # the one-process run each matches


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """The tiny tokenizer with a Llama of hidden 256, MLP 512: each projection split over 2 ranks
    is a whole number of 256-block absmax groups."""
    from tests.tiny import build_tiny_tokenizer, llama

    root = tmp_path_factory.mktemp("wide") / "model"
    tokenizer = build_tiny_tokenizer()
    llama(vocab=len(tokenizer), hidden=256, intermediate=512, eos_token_id=2, pad_token_id=0,
          bos_token_id=None).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _options(name: str, wide_model: Path) -> dict:
    return {**COMMON, **RUNS[name], **({"model": str(wide_model)} if name.endswith("_wide") else {})}


@pytest.fixture(scope="module")
def two_ranks(tiny_run_inputs, wide_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    job = {"inputs": [str(p) for p in tiny_run_inputs],
           "runs": [{"out": str(root / name), "options": _options(name, wide_model)} for name in RUNS]}
    results = run_ranks(job, world=2, timeout=400)
    check(results)
    (root / "rank0.log").write_text(results[0].stdout + results[0].stderr)
    (root / "rank1.log").write_text(results[1].stdout + results[1].stderr)
    return root


@pytest.fixture(scope="module")
def one_process(tiny_run_inputs, wide_model, tmp_path_factory):
    """One plain process per reference (batch 4: both ranks' rows): {name: (result, out dir)}."""
    root = tmp_path_factory.mktemp("single")
    runs = {"plain": {}, "nf4": NF4, "nf4_wide": {**NF4, "model": str(wide_model)}}
    return {name: (train(run_config(tiny_run_inputs, root / name,
                                    **{**COMMON, "batch_size": 4, "fuse": False, **extra})), root / name)
            for name, extra in runs.items()}


def _result(root: Path, name: str, rank: int) -> dict:
    return json.loads((root / name / f"result-rank{rank}.json").read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_one_process(two_ranks: Path, one_process, name: str) -> None:
    single, single_out = one_process[REFERENCE.get(name, "plain")]
    ranks = [_result(two_ranks, name, r) for r in (0, 1)]
    assert ranks[0]["parallel"] == name.split("_")[0] and ranks[0]["world_size"] == 2
    assert ranks[0]["losses"] == ranks[1]["losses"]  # all-reduced: every rank reports the same
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-5)
    assert single.losses[-1] < single.losses[0] - (1.0 if name in ("ddp", "fsdp2") else 0.0)  # it trained
    # One adapter, written by rank 0 from the gathered parameters, in PEFT format.
    ours = load_file(two_ranks / name / "adapter" / "adapter_model.safetensors")
    ref = load_file(single_out / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == ref.keys() and all(k.startswith("base_model.model.") for k in ours)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5)
    config = json.loads((two_ranks / name / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8


def test_rank_zero_alone_prints_and_writes(two_ranks: Path) -> None:
    rank0, rank1 = (two_ranks / "rank0.log").read_text(), (two_ranks / "rank1.log").read_text()
    assert "FSDP2 (--shard): 2 decoder layers + root sharded over 2 rank(s), fp32" in rank0
    assert "DDP over 2 rank(s)" in rank0
    assert "falling back" not in rank0  # the NF4 runs were sharded, in 4 bits
    assert "trainable" in rank0.lower() and "adapter saved to" in rank0
    assert "adapter saved to" not in rank1 and "DDP over" not in rank1
    records = [json.loads(line) for line in (two_ranks / "fsdp2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 5))  # once each
    assert any(r["kind"] == "eval" and "val_loss" in r for r in records)


# --- on a GPU: FSDP2 at world size 1 (no torchrun) against the same run without it ---------------

@GPU
@pytest.mark.parametrize("quantize", [None, "nf4", "fp8"])
@pytest.mark.parametrize("fast", [False, True])
def test_fsdp2_world_of_one_matches_the_plain_step_on_gpu(tiny_run_inputs, tmp_path, capsys, fast: bool,
                                                          quantize: str | None) -> None:
    # nf4: the 4-bit weights are FSDP2 parameters, all-gathered through NF4Tensor's hooks; fp8: each FP8
    # linear its own FSDP2 unit, gathered without the bf16 cast (the GPU needs FP8 tensor cores: 8.9+)
    options = dict(steps=6, dropout=0.0, lr=1e-2, device="cuda", save_every=0, batch_size=4,
                   fuse=fast, cuda_graphs=False, pack=True, max_length=64, quantize=quantize)
    plain = train(run_config(tiny_run_inputs, tmp_path / "plain", **options))
    sharded = train(run_config(tiny_run_inputs, tmp_path / "sharded", shard=True, **options))
    assert plain.parallel == "none" and sharded.parallel == "fsdp2" and sharded.world_size == 1
    assert "falling back" not in capsys.readouterr().out
    # bf16 compute both ways (autocast vs FSDP2's bf16 parameter policy): bf16-rounding agreement
    diffs = [abs(a - b) for a, b in zip(plain.losses, sharded.losses, strict=True)]
    assert max(diffs) < 0.03, diffs
    ours = load_file(tmp_path / "sharded" / "adapter" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    for key in ref:
        assert (ours[key] - ref[key]).norm() <= 0.05 * ref[key].norm() + 1e-6, key


@GPU
def test_fsdp2_moves_cpu_held_nf4_shards_to_the_gpu(make_tiny_llama, monkeypatch) -> None:
    # The multi-GPU QLoRA load: the 4-bit model is held on the CPU and FSDP2 moves each rank's
    # packed shards to its GPU (its _move_states_to_device swaps the NF4 parameters).
    from torch.distributed.tensor import DTensor

    from splice.distributed.process import start, stop
    from splice.distributed.wrap import wrap_model
    from splice.quant.linear import quantize_nf4
    from splice.quant.nf4 import NF4Tensor
    from tests.tiny import tokens

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model, reference = make_tiny_llama(), make_tiny_llama()
    quantize_nf4(model)
    quantize_nf4(reference)
    reference.to("cuda")
    env = start(device_type="cuda", single=True)
    assert env is not None
    try:
        wrapped = wrap_model(model, loss=lambda m, b: m(**b).logits.float().sum(), env=env,
                             device=torch.device("cuda"), shard_why="--shard", mixed_precision=False)
        assert wrapped.kind == "fsdp2", wrapped.notes
        ids = tokens().cuda()
        with torch.no_grad():
            torch.testing.assert_close(wrapped({"input_ids": ids}),
                                       reference(input_ids=ids).logits.float().sum())
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert isinstance(weight, DTensor) and isinstance(weight.to_local(), NF4Tensor)
        assert weight.to_local().packed.is_cuda
    finally:
        stop(env)


@GPU
def test_fsdp2_world_of_one_turns_cuda_graphs_off_and_says_why(tiny_run_inputs, tmp_path, capsys) -> None:
    result = train(run_config(tiny_run_inputs, tmp_path / "run", steps=2, device="cuda", shard=True,
                           fuse=True, cuda_graphs=True, pack=True, max_length=64, save_every=0))
    assert result.cuda_graphs == 0
    assert "CUDA graphs off under fsdp2" in capsys.readouterr().out


# --- what the wrap decides, without a process group ---------------------------------------------

class _Packed(torch.Tensor):
    """A weight stored in a tensor subclass without FSDP2's all-gather hooks."""


class _PackedWithHooks(torch.Tensor):
    def fsdp_pre_all_gather(self, *args, **kwargs):  # pragma: no cover - FSDP2 calls it, not us
        raise NotImplementedError

    def fsdp_post_all_gather(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


def test_decoder_layers_and_shardable_weights(make_tiny_llama) -> None:
    from splice.distributed.wrap import decoder_layers, shard_reason, unshardable_params

    model = make_tiny_llama()
    assert decoder_layers(model) == list(model.model.layers)
    assert unshardable_params(model, world_size=2) == []
    proj = model.model.layers[0].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().as_subclass(_Packed), requires_grad=False)
    assert unshardable_params(model, world_size=2) == [
        "model.layers.0.mlp.down_proj.weight (_Packed: no fsdp_pre_all_gather hooks)"]
    proj.weight = torch.nn.Parameter(proj.weight.detach().as_subclass(_PackedWithHooks), requires_grad=False)
    assert unshardable_params(model, world_size=2) == []  # a subclass with the hooks can be sharded
    assert shard_reason(model, shard=True, device=torch.device("cpu")) == "--shard"
    assert shard_reason(model, shard=False, device=torch.device("cpu")) is None


def test_fsdp2_world_of_one_on_cpu_matches_the_plain_run(tiny_run_inputs, tmp_path, capsys) -> None:
    options = dict(steps=3, dropout=0.0, device="cpu", save_every=0, batch_size=4)
    plain = train(run_config(tiny_run_inputs, tmp_path / "plain", **options))
    sharded = train(run_config(tiny_run_inputs, tmp_path / "sharded", shard=True, **options))
    assert (sharded.parallel, sharded.world_size) == ("fsdp2", 1)
    assert "FSDP2 (--shard): 2 decoder layers + root sharded over 1 rank(s), fp32" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(sharded.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-5)
    assert not torch.distributed.is_initialized()  # the world of one is closed again


def test_a_weight_fsdp2_cannot_shard_falls_back_to_ddp_and_says_why(make_tiny_llama, monkeypatch) -> None:
    from splice.distributed.process import start, stop
    from splice.distributed.wrap import wrap_model

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = make_tiny_llama()
    proj = model.model.layers[1].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().as_subclass(_Packed), requires_grad=False)
    env = start(device_type="cpu", single=True)
    assert env is not None
    try:
        wrapped = wrap_model(model, loss=lambda m, b: m(**b).logits.sum(), env=env,
                             device=torch.device("cpu"), shard_why="--shard", mixed_precision=False)
    finally:
        stop(env)
    assert wrapped.kind == "ddp"
    assert "cannot shard model.layers.1.self_attn.q_proj.weight (_Packed: no fsdp_pre_all_gather hooks)" in wrapped.notes[0]
    assert "falling back to DDP" in wrapped.notes[0]


def test_nf4_weights_shard_unless_their_rows_do_not_split(make_tiny_llama) -> None:
    from splice.distributed.wrap import unshardable_params
    from splice.quant.linear import quantize_nf4

    model = make_tiny_llama()
    quantize_nf4(model)
    assert unshardable_params(model, world_size=2) == []  # 4-bit shards (tests/quant/test_nf4_shard.py)
    assert unshardable_params(model, world_size=3)[0] == (
        "model.layers.0.self_attn.q_proj.weight (NF4Tensor: its 32 rows do not split evenly over 3 ranks)")
    # "does it fit on one GPU" counts a 4-bit weight's stored bytes, not its bf16 size
    from splice.distributed.wrap import _stored_bytes

    weight = model.model.layers[0].mlp.up_proj.weight
    assert _stored_bytes(weight) == weight.nbytes_stored() < weight.numel() * weight.element_size()
    assert _stored_bytes(model.lm_head.weight) == model.lm_head.weight.numel() * 4


@pytest.mark.parametrize(("quantize", "shard", "fused"), [(None, True, False), ("fp8", True, False),
                                                         ("fp8", False, False), ("fp8", True, True)])
def test_whole_weights_lets_each_rank_run_its_own_forwards(tmp_path, quantize: str | None, shard: bool,
                                                           fused: bool) -> None:
    """FSDP2 on 2 gloo ranks: inside ``whole_weights()`` every weight is whole and stays so through the
    engine's forwards, 3 on one rank and 9 on the other (with a collective in any of them, the ranks
    would wait on each other: a hang, then a timeout); the greedy tokens are one process's, and the
    training step after the block (sharded again) gives that process's loss and gradient. The engine's
    projection packing (on a GPU) leaves the sharded weights alone. FP8 base weights: sharded too (their
    codes and scales are parameters), and under DDP left out of its start-up broadcast (gloo has no float8).
    ``fused``: the fused LoRA linears, which run an FP8 base's GEMMs in their own node, leave a base that
    FSDP2 shards alone to its own forward (whose hooks gather it), as the reference's unsharded run does not."""
    from splice.engine.engine import Engine
    from splice.engine.sampling import SamplingParams
    from tests.distributed.gather_worker import logits_sum, lora_llama

    prompt, ids, counts = [5, 17, 42, 99, 3], [[5, 17, 42, 99, 3, 250, 8, 61]], [3, 9]
    check(run_ranks({"out": str(tmp_path), "prompt": prompt, "max_tokens": counts, "ids": ids, "quantize": quantize,
                     "shard": shard, "fuse": fused}, world=2, timeout=200, worker="tests.distributed.gather_worker"))
    model, tokenizer = lora_llama(quantize=quantize, fuse_kernels=fused)
    tokens = Engine(model, tokenizer, max_seqs=2, max_len=64).generate(
        [prompt], SamplingParams(max_tokens=max(counts), temperature=0.0))[0].generated
    loss = logits_sum(model, {"input_ids": torch.tensor(ids)})
    loss.backward()
    loss = loss.detach()
    grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()
                                                    if p.grad is not None]))
    for rank, count in enumerate(counts):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["parallel"] == ("fsdp2" if shard else "ddp")
        assert (got["sharded"], got["whole"], got["resharded"]) == (shard, True, shard)
        assert got["packs"] == 0
        assert got["tokens"] == list(tokens[:count])
        assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert got["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5)
        # FP8: every code and scale whole inside the block, in its own dtype, equal to what was built
        assert (got["fp8_modules"], got["fp8_kept"]) == ((14, True) if quantize else (0, True))


def test_fp8_weights_under_fsdp2_bf16_policy_are_gathered_uncast(tmp_path) -> None:
    """With the GPU's bf16 mixed-precision policy, each FP8 linear is its own FSDP2 unit without a cast: the
    codes and scales arrive whole and bit-equal, not rounded through bf16; the step still computes."""
    from tests.distributed.gather_worker import lora_llama

    prompt, ids = [5, 17, 42, 99, 3], [[5, 17, 42, 99, 3, 250, 8, 61]]
    check(run_ranks({"out": str(tmp_path), "prompt": prompt, "max_tokens": [2, 2], "ids": ids, "quantize": "fp8",
                     "mixed_precision": True}, world=2, timeout=200, worker="tests.distributed.gather_worker"))
    model, _ = lora_llama(quantize="fp8")
    loss = float(model(input_ids=torch.tensor(ids)).logits.sum())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["parallel"] == "fsdp2" and got["sharded"] and got["whole"] and got["resharded"]
        assert (got["fp8_modules"], got["fp8_kept"]) == (14, True)
        assert got["loss"] == pytest.approx(loss, rel=2e-2, abs=2.0)  # bf16 compute vs this fp32 forward
