"""Serving with adapters and CUDA graphs: the graphs ``warmup()`` captures must be the ones requests replay.

A captured graph holds the adapter-bank launches of the paths some resident adapter adapts; the bank's
``version`` changes with that set and every graph is captured again (mid-load, on first use). So the
adapters ``splice serve`` starts with are resident before the capture: the first request for one of them
changes nothing (the version on the CPU, the graphs themselves on a GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from splice.engine.sampling import SamplingParams
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.serve.service import Service
from tests import tiny
from tests.numerics import GPU


def _service(tmp_path: Path, *, device: str) -> Service:
    tokenizer = tiny.build_tiny_tokenizer()
    donor = tiny.build_tiny_llama(len(tokenizer), seed=1)
    add_lora(donor, LoraConfig(name="alpha", targets=("q_proj", "v_proj", "down_proj"), rank=4))
    tiny.randomize_lora(donor, seed=2)
    save_adapter(donor, tmp_path / "alpha", name="alpha")
    model = tiny.build_tiny_llama(len(tokenizer)).to(device)
    return Service(model, tokenizer, model_name="tiny", adapters={"alpha": tmp_path / "alpha"}, max_batch=4,
                   max_len=64, gpu_adapters=2, kv_memory=0.05)  # (not 80% of a GPU other test workers share)


def _first_adapter_request(service: Service) -> None:
    prompt = list(service.tokenizer("the cat sat on")["input_ids"])
    (done,) = service.engine.generate([prompt], SamplingParams(max_tokens=3), adapters=["alpha"])
    assert done.finish_reason in ("stop", "length")


def test_startup_adapters_are_resident_before_any_request(tmp_path: Path) -> None:
    service = _service(tmp_path, device="cpu")
    assert list(service.bank.resident) == ["alpha"]
    version = service.bank.version
    _first_adapter_request(service)
    assert service.bank.version == version  # what keys the CUDA graphs: unchanged, nothing recaptured


@GPU
def test_warmed_up_graphs_serve_the_first_adapter_request(tmp_path: Path) -> None:
    service = _service(tmp_path, device="cuda")
    runner = service.engine.runner
    assert runner.warmup() > 0
    graphs = dict(runner._graphs)
    with torch.inference_mode():
        _first_adapter_request(service)
    assert service.engine.graph_failure is None
    assert all(runner._graphs.get(key) is entry for key, entry in graphs.items())  # none captured again
