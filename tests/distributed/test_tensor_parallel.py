"""The tensor-parallel split: on a world of one it changes nothing; on two real ranks (gloo on the CPU;
NCCL when two GPUs are present) the sharded model's logits are the full model's, whether split after
loading or loaded as shares; loaded quantized, each rank's slices are quantized alone and the logits
and tokens (adapters too) are one process's over those slices; adapters slice so that the ranks'
deltas add up to the full one; models that do not split are refused with one line."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from splice.core.errors import UsageError
from splice.distributed.lockstep import LockstepEngine
from splice.distributed.process import start, stop
from splice.distributed.tensor_parallel import (
    RowParallelLinear,
    Sharding,
    Split,
    check_shardable,
    shard,
    sharding_of,
)
from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.lora.apply import add_lora
from splice.lora.bank import HostAdapter
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.models.loading import load_model
from splice.quant.linear import is_quantized, quantize_int8
from splice.serve.service import Service
from tests import tiny
from tests.distributed.ranks import check, run_ranks
from tests.distributed.tp_worker import _logprobs, sliced_quantized
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

BACKENDS = [pytest.param("cpu", id="gloo"), pytest.param("cuda", id="nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs"))]
IDS = [[5, 17, 42, 99, 3, 250, 8, 61, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real one-rank gloo group for the test (no torchrun)."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = start(device_type="cpu", timeout_s=30, single=True)
    try:
        yield
    finally:
        stop(env)


def test_a_world_of_one_changes_no_logit_and_no_token(world_of_one: None) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    full = copy.deepcopy(model)
    sharding = shard(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(attn.q_proj) is nn.Linear and isinstance(attn.o_proj, RowParallelLinear)
    assert type(mlp.down_proj.local) is nn.Linear and sharding_of(model) is sharding
    assert sharding.splits["model.layers.1.self_attn.k_proj"] == Split("column", 32, 16)
    assert sharding.splits["model.layers.1.mlp.down_proj"] == Split("row", 64, 32)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(IDS)).logits, full(torch.tensor(IDS)).logits)
    prompts = [list(tokenizer(p)["input_ids"]) for p in ("the cat sat on", "hello there")]
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=1.0, seed=5)]
    expected = [r.generated for r in Engine(full, tokenizer, max_seqs=2, max_len=64).generate(prompts, params)]
    engine = LockstepEngine(model, tokenizer, max_seqs=2, max_len=64)
    assert [r.generated for r in engine.generate(prompts, params)] == expected
    assert engine.runner.key_caches[0].shape[2] == 2  # all the KV heads on the one rank


def _logits(out: Path, rank: int) -> torch.Tensor:
    return load_file(out / f"logits-rank{rank}.safetensors")["logits"]


def _run(job: dict, device: str, out: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1"} if device == "cuda" else None
    check(run_ranks({**job, "device": device, "out": str(out)}, worker="tests.distributed.tp_worker", env=env))


@pytest.mark.parametrize("device", BACKENDS)
def test_two_ranks_give_the_full_models_logits(tmp_path: Path, tiny_model_dir: Path, device: str) -> None:
    model = build_tiny_llama(len(build_tiny_tokenizer())).to(device)
    with torch.no_grad():
        expected = model(torch.tensor(IDS, device=device)).logits.float().cpu()
    tolerance = 1e-5 if device == "cpu" else 1e-3  # (the GPU's fp32 GEMMs may use TF32)
    for kind in ("logits", "load"):  # split after loading; loaded as shares from the folder
        out = tmp_path / kind
        out.mkdir()
        _run({"kind": kind, "ids": IDS, "model_dir": str(tiny_model_dir)}, device, out)
        assert json.loads((out / "rank1.json").read_text())["world"] == 2
        assert torch.equal(_logits(out, 0), _logits(out, 1))  # the all-reduce hands both ranks one sum
        torch.testing.assert_close(_logits(out, 0), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize(("quantize", "dora"), [("nf4", False), ("int8", False), ("nf4", True)])
def test_two_quantized_ranks_compute_with_their_slices_quantized_alone(tmp_path: Path, tiny_model_dir: Path,
                                                                       quantize: str, dora: bool) -> None:
    """Two gloo ranks of ``load_sharded(quantize=...)``: the linears one process quantizes (the output
    head not), each weight exactly its slice quantized alone (so the logits, greedy and seeded tokens,
    adapter included, are one process's over those weights); int8's column-parallel rows are also
    one process's ``--quantize int8`` rows, bit for bit. A DoRA adapter's factors over those weights are one
    process's too (row-parallel norms summed over the ranks)."""
    tokenizer = build_tiny_tokenizer()
    alpha = _adapter(tmp_path, dora=dora)
    prompts = [list(tokenizer(p)["input_ids"]) for p in ("the cat sat on", "hello world, how are")]
    params = [dict(max_tokens=10, logprobs=0), dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)]
    out = tmp_path / "out"
    out.mkdir()
    _run({"kind": "quantized", "quantize": quantize, "ids": IDS, "model_dir": str(tiny_model_dir), "alpha": alpha,
          "prompts": prompts, "params": params}, "cpu", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    one, _ = load_model(tiny_model_dir, quantize=quantize)
    single = {name: m for name, m in one.named_modules() if is_quantized(m)}
    local = {name.removesuffix(".local") for name in ranks[0]["quantized"]}
    assert local == set(single) and len(local) == 14 and "lm_head" not in local  # 7 linears a layer
    assert ranks[0]["types"] == [type(next(iter(single.values()))).__name__]
    reference = sliced_quantized(load_model(tiny_model_dir)[0], quantize=quantize)
    weights = [load_file(out / f"weights-rank{r}.safetensors") for r in range(2)]
    for name in ranks[0]["quantized"]:
        path = name.removesuffix(".local")
        dim = 1 if name.endswith(".local") else 0
        full = torch.cat([w[name] for w in weights], dim=dim)
        assert torch.equal(full, reference.get_submodule(path).weight), name
        rows = single[path].dequantize(torch.float32)
        assert torch.equal(full, rows) == (quantize == "int8" and dim == 0), name  # which codes are one card's
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits
    assert torch.equal(_logits(out, 0), _logits(out, 1))
    torch.testing.assert_close(_logits(out, 0), expected, rtol=0, atol=1e-5)
    service = Service(reference, tokenizer, model_name="tiny", adapters={"alpha": Path(alpha)}, max_batch=4,
                      max_len=96)
    done = service.engine.generate([*prompts, prompts[0]], [SamplingParams(**p) for p in [*params, params[0]]],
                                   adapters=[None, None, "alpha"])
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == [[c.generated for c in r.choices] for r in done]
    assert ranks[0]["tokens"][2] != ranks[0]["tokens"][0]  # the adapter changes the greedy tokens
    # the greedy tokens' logprobs (base and adapter) pin the weights the engine ran: the float model's differ (int8:
    # by 2e-4 on this tiny model, nf4 more)
    found, want = ranks[0]["logprobs"], _logprobs(done)
    assert [len(f) for f in found] == [10, 0, 10] and ranks[1]["logprobs"] == found
    torch.testing.assert_close(torch.tensor(found[0] + found[2]), torch.tensor(want[0] + want[2]), rtol=0, atol=1e-5)
    float_service = Service(load_model(tiny_model_dir)[0], tokenizer, model_name="tiny", max_batch=4, max_len=96)
    plain = _logprobs(float_service.engine.generate(prompts[:1], [SamplingParams(**params[0])]))
    assert max(abs(a - b) for a, b in zip(found[0], plain[0], strict=True)) > 1e-4  # 10x the tolerance
    assert ranks[0]["bank_bases"] == ranks[0]["types"]  # every bank site wraps a quantized linear (no head)
    assert "model.layers.1.mlp.down_proj.local" in ranks[0]["sites"]


def _adapter(folder: Path, *, dora: bool = False) -> str:
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    add_lora(model, LoraConfig(name="alpha", targets=("q_proj", "v_proj", "o_proj", "down_proj"), rank=4,
                               use_dora=dora))
    tiny.randomize_lora(model, seed=11)
    save_adapter(model, folder / "alpha", name="alpha")
    return str(folder / "alpha")


def test_adapter_slices_add_up_to_the_full_delta() -> None:
    generator = torch.Generator().manual_seed(0)
    a_col, b_col = torch.randn(4, 32, generator=generator), torch.randn(16, 4, generator=generator)
    a_row, b_row = torch.randn(4, 64, generator=generator), torch.randn(32, 4, generator=generator)
    adapter = HostAdapter(name="x", rank=4, weights={"k": (a_col, b_col), "down": (a_row, b_row),
                                                     "other": (a_col, b_row)})
    splits = {"k": Split("column", 32, 16), "down": Split("row", 64, 32)}
    shares = [Sharding(rank, 2, splits).adapter(adapter, source="folder") for rank in range(2)]
    x_col, x_row = torch.randn(3, 32, generator=generator), torch.randn(3, 64, generator=generator)
    columns = torch.cat([x_col @ s.weights["k"][0].T @ s.weights["k"][1].T for s in shares], dim=-1)
    torch.testing.assert_close(columns, x_col @ a_col.T @ b_col.T)  # rank r: rows [8r, 8r + 8)
    halves = [x_row[:, 32 * r: 32 * (r + 1)] for r in range(2)]
    rows = sum(h @ s.weights["down.local"][0].T @ s.weights["down.local"][1].T for h, s in zip(halves, shares,
                                                                                               strict=True))
    torch.testing.assert_close(rows, x_row @ a_row.T @ b_row.T)  # each rank's share, summed by the all-reduce
    assert all(s.weights["other"][0] is a_col and s.source == "folder" and "down" not in s.weights for s in shares)


def test_models_that_do_not_split_are_refused_with_one_line(world_of_one: None) -> None:
    config = build_tiny_llama(97).config  # 4 query heads, 2 KV heads, intermediate 64
    check_shardable(config, 2)
    with pytest.raises(UsageError, match=r"has 4 query and 2 key/value heads, so --nproc-per-node must divide "
                                         r"both: use one of 1, 2$"):
        check_shardable(config, 4)
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = 6, 6, 64
    with pytest.raises(UsageError, match="splits the MLP's 64 intermediate features evenly"):
        check_shardable(config, 3)
    extra = build_tiny_llama(97)
    extra.model.layers[0].mlp.extra = nn.Linear(32, 32)
    with pytest.raises(UsageError, match=r"model\.layers\.0\.mlp\.extra is a linear it does not know"):
        shard(extra)
    quantized = build_tiny_llama(97)
    quantize_int8(quantized)
    with pytest.raises(UsageError, match=r"plain linears, not model\.layers\.0\.self_attn\.q_proj \(Int8Linear\)"):
        shard(quantized)
    assert sharding_of(quantized) is None and not isinstance(quantized.model.layers[0].self_attn.o_proj,
                                                             RowParallelLinear)  # refused before any change
    lora = tiny.lora_llama()
    with pytest.raises(UsageError, match="splits plain linears"):
        shard(lora)
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(UsageError, match=r"this one is pre-quantized \(bitsandbytes\): pass its float \(bf16\) "
                                         "checkpoint, with --quantize nf4 or int8"):
        check_shardable(config, 2)
