"""Quantize-on-load: build a model on the meta device, then stream its weights in one at a time.

:func:`load_quantized` never holds the float model: the skeleton costs no memory, each
safetensors tensor is read (memory-mapped: host memory about one tensor), moved to ``device``
and, for a targeted linear's weight, quantized there at once (NF4 or int8) before the next one
is read. Peak device memory is about the quantized model plus one float weight. With
``quantize_device`` the arithmetic runs there (a GPU: seconds for a 70B) and each quantized
weight then moves to ``device`` (the CPU, for FSDP2 to shard from): the GPU holds one float
weight at a time, never the model. The quantized
linears are installed by one rewrite at the end (:mod:`splice.core.rewrite`), the same
``NF4Linear``/``Int8Linear`` that :func:`splice.quant.linear.quantize_nf4` makes, so both paths
give identical codes.

``quantize="fp8"`` stores e4m3 weights with per-output-channel scales
(:class:`~splice.quant.fp8.FP8Linear`; a GPU of compute capability 8.9+). FP8 checkpoints (an e4m3
``weight`` beside its ``weight_scale`` or ``weight_scale_inv``: fbgemm_fp8, compressed-tensors,
DeepSeek-V3 / Qwen3 FP8) keep their codes where the scale is per tensor or per channel; block
scales are applied and the weight re-quantized per row (:func:`splice.quant.fp8.from_checkpoint`).
With another ``quantize`` such a weight is dequantized first; static ``input_scale`` tensors are
skipped (activations are scaled per row as they come).

Pre-quantized bitsandbytes 4-bit checkpoints (``quantization_config.load_in_4bit``, a weight
stored as packed uint8 beside ``.absmax``/``.quant_map``/``.nested_*`` and a JSON
``.quant_state.bitsandbytes__nf4``) are read into the same NF4Tensor without dequantizing, and
:func:`bnb_state_dict` writes that format back.

:func:`random_quantized` runs the same path with seeded random weights instead of a checkpoint:
a 70B shape is measured without 140 GB of files.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.rewrite import Replace, nodes, rewrite
from splice.core.targets import Targets, target_matcher
from splice.quant.fp8 import FP8Linear, dequantize_fp8, fp8_problem, from_checkpoint
from splice.quant.linear import Int8Linear, NF4Linear
from splice.quant.nf4 import NF4Tensor

__all__ = ["QUANTIZE_KINDS", "bnb_state_dict", "load_quantized", "random_quantized", "skeleton"]

QUANTIZE_KINDS = ("nf4", "int8", "fp8")
_FP8_SCALES = ("weight_scale", "weight_scale_inv")  # an FP8 checkpoint's dequantization scales
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def skeleton(config: Any, *, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The causal LM of a transformers ``config`` on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _check_quantize(quantize: str, device: torch.device, *, allow_cpu: bool = False) -> None:
    if quantize not in QUANTIZE_KINDS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_KINDS)}, got {quantize!r}")
    problem = fp8_problem(device, allow_cpu=allow_cpu) if quantize == "fp8" else None
    if problem is not None:
        raise ValueError(problem)


def _targets(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """{module path: linear} of the skeleton's targeted linears."""
    matches = target_matcher(model, targets)
    return {node.name: node.module for node in nodes(model)
            if matches(node) and isinstance(node.module, nn.Linear)}


def _quantized(weight: Tensor, bias: Tensor | None, quantize: str, block_size: int,
               device: torch.device) -> nn.Module:
    """The quantized linear of ``weight`` (quantized where it is), its tensors on ``device``."""
    bias_p = None if bias is None else nn.Parameter(bias, requires_grad=False)
    if quantize == "nf4":
        return NF4Linear(NF4Tensor.from_float(weight, block_size=block_size).to(device), bias_p)  # type: ignore[arg-type]
    if quantize == "fp8":
        return FP8Linear.from_float(weight, bias_p).to(device)
    return Int8Linear(weight, bias_p).to(device)


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` at ``name`` (a parameter or buffer path) in place of the meta tensor."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"checkpoint tensor {name!r} has no place in the model ({type(model).__name__})")


def _materialize(model: nn.Module, tensors: Iterator[tuple[str, Tensor]], *, quantize: str, device: torch.device,
                 dtype: torch.dtype, targets: Targets, block_size: int,
                 quantize_device: torch.device | None = None, fp8_block: tuple[int, int] | None = None) -> list[str]:
    """Stream ``tensors`` into the skeleton, quantizing targeted linear weights on arrival (on
    ``quantize_device``, default ``device``). ``fp8_block``: an FP8 checkpoint's weight_block_size."""
    linears = _targets(model, targets)
    built: dict[str, nn.Module] = {}
    pending_bias: dict[str, Tensor] = {}
    bnb_parts: dict[str, dict[str, Tensor]] = {}
    fp8_parts: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors:
        path, _, attr = name.rpartition(".")
        if attr == "input_scale":  # a static activation scale: FP8Linear scales each row as it comes
            continue
        if attr in _FP8_SCALES or (attr == "weight" and tensor.dtype in _FLOAT8):
            fp8_parts.setdefault(path, {})["scale" if attr in _FP8_SCALES else "weight"] = tensor
            if len(fp8_parts[path]) == 2:
                _fp8_weight(model, path, fp8_parts.pop(path), quantize=quantize, dtype=dtype, device=device,
                            at=quantize_device or device, block=fp8_block, block_size=block_size, linears=linears,
                            built=built, pending_bias=pending_bias)
            continue
        bnb_key = next((f"weight.{s}" for s in _BNB_SUFFIXES if name.endswith(f".weight.{s}")), None)
        if bnb_key is not None:  # a pre-quantized bitsandbytes part: collect until complete
            owner = name[: -len(bnb_key) - 1]
            bnb_parts.setdefault(owner, {})[bnb_key] = tensor.to(device)
            _maybe_bnb(owner, bnb_parts, built, pending_bias, dtype)
            continue
        if path in linears and attr == "weight":
            if tensor.dtype == torch.uint8:  # bitsandbytes' packed codes
                bnb_parts.setdefault(path, {})["weight"] = tensor.to(device)
                _maybe_bnb(path, bnb_parts, built, pending_bias, dtype)
                continue
            weight = tensor.to(device=quantize_device or device, dtype=dtype)
            built[path] = _quantized(weight, pending_bias.pop(path, None), quantize, block_size, device)
            del weight
            continue
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if path in linears and attr == "bias":
            if path in built:
                built[path].bias = nn.Parameter(value, requires_grad=False)
            else:
                pending_bias[path] = value
            continue
        _set_tensor(model, name, value)
    if fp8_parts:
        raise ValueError(f"the checkpoint's FP8 weights {sorted(fp8_parts)[:3]} lack a weight or its scale "
                         f"({' or '.join(_FP8_SCALES)})")
    missing = sorted(set(linears) - set(built))
    if missing:
        raise ValueError(f"the checkpoint has no weight for {len(missing)} linear(s), e.g. {missing[:3]}")
    rewrite(model, lambda node: Replace(built[node.name], keep_original=False) if node.name in built else None)
    _finish(model, device)
    return sorted(built)


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_weight(model: nn.Module, path: str, parts: dict[str, Tensor], *, quantize: str, dtype: torch.dtype,
                device: torch.device, at: torch.device, block: tuple[int, int] | None, block_size: int,
                linears: dict[str, nn.Module], built: dict[str, nn.Module], pending_bias: dict[str, Tensor]) -> None:
    """Install an FP8 checkpoint's weight at ``path`` (``parts``: its codes and scale, read at ``at``):
    a targeted linear as an FP8Linear (``quantize="fp8"``) or dequantized and quantized by
    ``quantize``; any other weight dequantized to ``dtype``."""
    codes, rows = from_checkpoint(parts["weight"].to(at), parts["scale"].to(at), block=block)
    if path not in linears:
        _set_tensor(model, f"{path}.weight", dequantize_fp8(codes, rows, dtype).to(device))
        return
    bias = pending_bias.pop(path, None)
    if quantize == "fp8":
        bias_p = None if bias is None else nn.Parameter(bias, requires_grad=False)
        built[path] = FP8Linear(codes, rows, bias_p, compute_dtype=dtype).to(device)
    else:
        built[path] = _quantized(dequantize_fp8(codes, rows, dtype), bias, quantize, block_size, device)


def _maybe_bnb(owner: str, parts: dict[str, dict[str, Tensor]], built: dict[str, nn.Module], pending_bias: dict[str, Tensor], dtype: torch.dtype) -> None:
    got = parts[owner]
    if "weight" not in got or any(f"weight.{s}" not in got for s in _BNB_SUFFIXES):
        return
    state = json.loads(bytes(got["weight.quant_state.bitsandbytes__nf4"].cpu().tolist()))
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{owner}: bitsandbytes {state.get('quant_type')!r} weights are not supported (nf4 only)")
    device = got["weight"].device
    inner: dict[str, Tensor | None] = {
        "packed": got["weight"].reshape(-1), "code": got["weight.quant_map"].float(),
        "qabsmax": got["weight.absmax"], "scale2": got["weight.nested_absmax"].float(),
        "offset": torch.tensor(state["nested_offset"], dtype=torch.float32, device=device),
        "code2": got["weight.nested_quant_map"].float()}
    shape = tuple(state["shape"])
    nf4 = NF4Tensor(inner, shape=(shape[0], shape[1]), block_size=int(state["blocksize"]), dtype=dtype)
    bias = pending_bias.pop(owner, None)
    built[owner] = NF4Linear(nf4, None if bias is None else nn.Parameter(bias, requires_grad=False))
    del parts[owner]


def _finish(model: nn.Module, device: torch.device) -> None:
    """Tie weights the checkpoint stores once, rebuild non-persistent buffers (rotary tables)."""
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # type: ignore[operator]
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                with torch.device(device):
                    rebuilt = type(module)(model.config)
            except TypeError as error:
                raise ValueError(f"{name}: cannot rebuild its buffers ({type(module).__name__})") from error
            for key, buffer in rebuilt._buffers.items():
                module._buffers[key] = buffer
            for key in ("original_inv_freq", "attention_scaling"):
                if hasattr(rebuilt, key):
                    setattr(module, key, getattr(rebuilt, key))
    still = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still:
        raise ValueError(f"the checkpoint left {len(still)} tensor(s) unloaded, e.g. {still[:3]}")


def _safetensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the folder's safetensors shards, one at a time (memory-mapped reads)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files: quantize-on-load reads safetensors only")
    for file in files:
        with safe_open(str(folder / file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def load_quantized(folder: str | Path, *, quantize: str = "nf4", device: str | torch.device = "cuda",
                   dtype: torch.dtype = torch.bfloat16, targets: Targets = "all-linear",
                   block_size: int = 64, quantize_device: str | torch.device | None = None,
                   allow_cpu: bool = False) -> nn.Module:
    """The causal LM in ``folder`` with its targeted linears quantized while they stream in
    (module doc). ``dtype``: the compute dtype and that of every unquantized tensor.
    ``quantize_device``: where the quantization runs, if not on ``device``. ``allow_cpu``: fp8
    on the CPU (torch's emulated FP8 GEMM; tests), which is refused otherwise."""
    from transformers import AutoConfig

    _check_quantize(quantize, torch.device(quantize_device or device), allow_cpu=allow_cpu)
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    scheme = getattr(config, "quantization_config", None)
    block = scheme.get("weight_block_size") if isinstance(scheme, dict) else None
    if scheme is not None:
        del config.quantization_config  # bitsandbytes / FP8 checkpoints: their parts are read directly
    model = skeleton(config, dtype=dtype)
    _materialize(model, _safetensors(folder), quantize=quantize, device=torch.device(device), dtype=dtype,
                 targets=targets, block_size=block_size,
                 quantize_device=None if quantize_device is None else torch.device(quantize_device),
                 fp8_block=None if block is None else (int(block[0]), int(block[1])))
    return model.eval()


def _random_tensors(model: nn.Module, device: torch.device, std: float,
                    seed: Callable[[str], int]) -> Iterator[tuple[str, Tensor]]:
    for name, p in model.named_parameters():
        if p.dim() == 1:
            yield name, torch.ones(p.shape, device=device, dtype=torch.float32)  # norm weights
        else:
            gen = torch.Generator(device=device).manual_seed(seed(name))
            yield name, torch.empty(p.shape, device=device, dtype=p.dtype).normal_(0.0, std, generator=gen)


def random_quantized(config: Any, *, quantize: str | None = "nf4", device: str | torch.device = "cuda",
                     dtype: torch.dtype = torch.bfloat16, targets: Targets = "all-linear", std: float = 0.02,
                     block_size: int = 64) -> nn.Module:
    """A model of ``config`` with seeded N(0, std) weights (1 for norms; seed = crc32 of the
    parameter name, as the benchmarks' bf16 builder), quantized as each weight is made.
    ``quantize=None`` makes the bf16 model the same way (same values)."""
    device = torch.device(device)
    model = skeleton(config, dtype=dtype)
    seed: Callable[[str], int] = lambda name: zlib.crc32(name.encode())  # noqa: E731
    if quantize is None:
        for name, value in _random_tensors(model, device, std, seed):
            _set_tensor(model, name, value.to(dtype))
        _finish(model, device)
        return model
    _check_quantize(quantize, device)
    _materialize(model, _random_tensors(model, device, std, seed), quantize=quantize, device=device,
                 dtype=dtype, targets=targets, block_size=block_size)
    return model


def bnb_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors in bitsandbytes' serialized 4-bit format (what ``save_pretrained`` of
    a ``load_in_4bit`` model writes): NF4 weights as packed uint8 plus their quant-state parts."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or "." in key:
                continue
            full = f"{name}.{key}" if name else key
            if isinstance(tensor, NF4Tensor):
                if not tensor.double_quant:
                    raise ValueError(f"{full}: bitsandbytes' format here needs double quantization")
                out[full] = tensor.packed.reshape(-1, 1)
                out[f"{full}.absmax"] = tensor.qabsmax  # type: ignore[assignment]
                out[f"{full}.quant_map"] = tensor.code
                out[f"{full}.nested_absmax"] = tensor.scale2  # type: ignore[assignment]
                out[f"{full}.nested_quant_map"] = tensor.code2  # type: ignore[assignment]
                state = {"quant_type": "nf4", "blocksize": tensor.block_size,
                         "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.weight_shape),
                         "nested_blocksize": 256, "nested_dtype": "float32",
                         "nested_offset": float(tensor.offset)}  # type: ignore[arg-type]
                out[f"{full}.quant_state.bitsandbytes__nf4"] = torch.tensor(
                    list(json.dumps(state).encode()), dtype=torch.uint8)
            else:
                out.setdefault(full, tensor.detach())
    return out
