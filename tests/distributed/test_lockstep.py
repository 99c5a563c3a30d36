"""The lockstep engine: two real ranks (gloo on the CPU; NCCL when two GPUs are present) generate the
tokens one process does, greedy and seeded; rank 0 takes requests, cancellations and adapters while
the engine runs and the other rank follows it token for token."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.distributed.lockstep import AtBoundary
from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.serve.service import Service
from tests import tiny
from tests.distributed.ranks import check, run_ranks
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

BACKENDS = [pytest.param("cpu", id="gloo"), pytest.param("cuda", id="nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs"))]
PROMPTS = ["the cat sat on", "hello world, how are", "once upon a time"]
PARAMS: list[dict[str, Any]] = [
    dict(max_tokens=12),  # greedy
    dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=7),
    dict(max_tokens=10, temperature=1.2, top_k=20, seed=11, n=2, presence_penalty=0.5),
]
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")  # column- and row-parallel ones


def _ids() -> list[list[int]]:
    tokenizer = build_tiny_tokenizer()
    return [list(tokenizer(p)["input_ids"]) for p in PROMPTS]


def _ranks(job: dict[str, Any], device: str, out: Path) -> list[dict[str, Any]]:
    env = {"CUDA_VISIBLE_DEVICES": "0,1"} if device == "cuda" else None
    out.mkdir(exist_ok=True)
    check(run_ranks({**job, "device": device, "out": str(out)}, worker="tests.distributed.tp_worker", env=env))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _one_process(device: str, prompts: list[list[int]], params: list[SamplingParams],
                 adapters: list[str | None] | None = None, service: Service | None = None) -> list[list[list[int]]]:
    if service is None:
        tokenizer = build_tiny_tokenizer()
        engine = Engine(build_tiny_llama(len(tokenizer)).to(device), tokenizer, max_seqs=4, max_len=96)
    else:
        engine = service.engine
    return [[c.generated for c in r.choices] for r in engine.generate(prompts, params, adapters=adapters)]


@pytest.mark.parametrize("device", BACKENDS)
def test_two_ranks_generate_what_one_process_generates(tmp_path: Path, device: str) -> None:
    ranks = _ranks({"kind": "generate", "prompts": _ids(), "params": PARAMS}, device, tmp_path)
    expected = _one_process(device, _ids(), [SamplingParams(**p) for p in PARAMS])
    assert [len(c) for c in expected] == [1, 1, 2] and all(len(t) > 3 for c in expected for t in c)
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == expected
    assert ranks[0]["kv_heads"] == ranks[1]["kv_heads"] == 1  # each rank caches its one of the 2 KV heads


def _save_adapter(folder: Path, name: str, seed: int, *, dora: bool = False) -> str:
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    add_lora(model, LoraConfig(name=name, targets=TARGETS, rank=4, use_dora=dora))
    tiny.randomize_lora(model, seed=seed)
    save_adapter(model, folder / name, name=name)
    return str(folder / name)


@pytest.mark.parametrize("device", BACKENDS)
@pytest.mark.parametrize("dora", [False, True])
def test_rank_0_takes_requests_cancellations_and_adapters_and_the_other_rank_follows(tmp_path: Path, device: str,
                                                                                     dora: bool) -> None:
    """DoRA: alpha read at start (every rank finishes its factors in the constructor), beta loaded at run time
    (read by rank 0's thread, its row-parallel factors summed over the ranks at the next boundary): both give
    one device's tokens, whose DoRA factors come from the whole weights."""
    alpha, beta = _save_adapter(tmp_path, "alpha", 11, dora=dora), _save_adapter(tmp_path, "beta", 12, dora=dora)
    ranks = _ranks({"kind": "serve", "prompts": _ids(), "params": PARAMS, "alpha": alpha, "beta": beta}, device,
                   tmp_path / "out")
    found = ranks[0]["tokens"]
    # every token accepted on rank 0 was accepted on rank 1 (checked at every step, and at the end)
    assert (ranks[0]["digest"], ranks[0]["computed"]) == (ranks[1]["digest"], ranks[1]["computed"])
    assert found["cancelled"] == "cancelled"
    assert len(found["unseeded"]) == 2  # (drawn from rank 0's base seed: the checksums above agree)
    tokenizer = build_tiny_tokenizer()
    service = Service(build_tiny_llama(len(tokenizer)).to(device), tokenizer, model_name="tiny",
                      adapters={"alpha": alpha, "beta": beta}, max_batch=4, max_len=256)
    params = [SamplingParams(**p) for p in PARAMS]
    assert found["plain"] == _one_process(device, _ids(), params, service=service)
    adapted = _one_process(device, _ids()[:1] * 2, params[:1] * 2, ["alpha", "beta"], service=service)
    assert [found["alpha"], found["beta"]] == [a[0] for a in adapted]
    assert len({tuple(t) for t in (found["alpha"], found["beta"], found["plain"][0][0])}) == 3  # adapters matter


def test_a_cancellation_waits_for_the_boundary() -> None:
    cancelled = AtBoundary()
    asker = threading.Thread(target=cancelled.set)
    asker.start()
    asker.join()
    assert cancelled.asked and not cancelled.is_set() and not cancelled.wait(0.01)
    cancelled.apply()
    assert cancelled.is_set()
