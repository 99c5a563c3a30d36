"""``splice serve``: load a base model and adapters, then run the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from splice.core.device import resolve_device
from splice.models.loading import load_model
from splice.serve.app import build_app
from splice.serve.service import Service

__all__ = ["parse_adapters", "running", "serve"]


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``["name=path", ...]`` -> ``{name: path}``; a bad spec names the fix before anything loads."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter sql=runs/sql/adapter")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice: give each adapter its own name")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {name}={path}: no adapter_config.json there (pass the "
                                    "adapter folder, e.g. <run dir>/adapter)")
        adapters[name] = folder
    return adapters


def serve(model: str | None, *, adapters: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", dtype: str = "auto", model_name: str | None = None, max_batch: int = 32,
          max_len: int = 1024, gpu_adapters: int = 8, max_lora_rank: int = 64) -> None:
    import uvicorn

    resolved = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    base, tokenizer = load_model(model, dtype=torch_dtype, device=resolved)
    name = model_name or (Path(model).name if model else "smollm2-135m-instruct")
    service = Service(base, tokenizer, model_name=name, adapters=dict(adapters), max_batch=max_batch,
                      max_len=min(max_len, int(getattr(tokenizer, "model_max_length", max_len) or max_len)),
                      gpu_adapters=gpu_adapters, max_lora_rank=max_lora_rank)
    print(f"splice serve: {name} with adapters {sorted(adapters) or 'none'} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(build_app(service), host=host, port=port, log_level="warning")


@contextlib.contextmanager
def running(service: Service, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """``service``'s OpenAI-compatible app on uvicorn in a background thread for the length of the
    block (tests, benchmarks, notebooks); yields the base URL ``http://host:port/v1``. ``port=0``
    takes a free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_app(service), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start within {timeout_s:.0f} s")
        time.sleep(0.025)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
