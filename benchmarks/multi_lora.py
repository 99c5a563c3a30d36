"""Multi-LoRA kernels (splice.kernels.multi_lora) against the base GEMMs they ride on, Llama-3-8B shapes.

    PYTHONPATH=. python benchmarks/multi_lora.py [--json FILE] [--sweep] [--deadline-s 110] [--tiny]

bf16, rank 16, a bank of ``adapters`` slots per projection (q 4096->4096, k/v 4096->1024, o 4096->4096,
gate/up 4096->14336, down 14336->4096). Scenarios: decode batches of T = 32, 128, 256 tokens, each
token's slot drawn uniformly from 8 or 64 adapters (so up to min(T, adapters) distinct), and a mixed
batch of 2,048 tokens in 8 runs of 256 (prefill chunks of 8 adapters).

Timing as a decode step sees it: every call is captured in one CUDA graph over 4 copies of the
weights and adapters (more than L2 holds, as consecutive layers are) and replayed between two events.

* ``projections``: per projection, the base GEMM (``F.linear``) and the delta alone (shrink + expand
  added into the GEMM's output); ratio = delta / base.
* ``layers``: the 7 GEMMs of a layer with and without the deltas: ``grouped`` (what the bank runs under
  bank sites: one shrink for q/k/v and one for gate/up, an expand per projection), ``packed`` (on the
  engine's packed GEMMs, q/k/v and gate/up one each, with ``add_packed_delta``: a shrink and an expand
  per group; compared with the packed GEMMs alone), ``ungrouped`` (a shrink per projection) and
  ``legacy`` (``benchmarks/_legacy_multi_lora.py``: the previous per-token BGMV kernels).
  ``step_ms_added`` = 32 layers x the added time; ``of_step`` divides it by the engine's measured
  decode step without adapters (batch 32: 6.45 ms, batch 128: 8.17 ms; H200, 2026-12-04).
  ``idle`` runs the grouped launches over base rows only (every slot -1): the launch floor. ``planned``: as
  ``packed``, each shrink given the step's tile plan (``plan_tiles``, made once outside the timed calls: a step
  makes it once for all its layers) instead of counting it in every program; ``plan_us`` times that one launch.
* ``eager``: µs per call without a graph (decode-32x8's q), i.e. the host's cost of a launch, which
  mixed prefill steps (run eagerly by the engine) pay per projection.
* ``sweep`` (``--sweep``): other launch shapes (:class:`Tiles`) for a few projections.

``--tiny``: a CPU smoke run of the same tables at toy sizes (the PyTorch path; wall-clock timing).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.kernels.multi_lora import (
    Tiles,
    multi_lora,
    multi_lora_expand,
    multi_lora_shrink,
    plan_tiles,
    tiles_for,
)

PROJECTIONS = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
               "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}  # name -> (K, N)
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # projections that read one input
SCENARIOS = [(f"decode-{t}x{n}", t, n, "decode") for t in (32, 128, 256) for n in (8, 64)]
SCENARIOS.append(("mixed-2048x8", 2048, 8, "runs"))
STEP_MS = {32: 6.45, 128: 8.17}  # engine decode step without adapters (docs/benchmarks.md)
RANK, COPIES, LAYERS = 16, 4, 32
SWEEP = {
    "decode": [Tiles(block_m=16, k_split=256, block_k=64), Tiles(block_m=16, k_split=1024, block_k=128),
               Tiles(block_m=16, k_split=512, block_k=64, block_n=256), Tiles(block_m=16, k_split=512, block_k=64,
               block_n=64), Tiles(block_m=16, k_split=512, block_k=128, warps=8),
               Tiles(block_m=16, k_split=512, block_k=64, per_token=True)],
    "runs": [Tiles(block_m=64, k_split=512, block_k=64), Tiles(block_m=64, k_split=4096, block_k=64),
             Tiles(block_m=128, k_split=1024, block_k=64, warps=8), Tiles(block_m=64, k_split=1024, block_k=64,
             block_n=256, warps=8), Tiles(block_m=32, k_split=1024, block_k=64)],
}


class Clock:
    """Times lists of calls: captured in one CUDA graph and replayed (GPU), or wall-clock (CPU)."""

    def __init__(self, *, device: str, deadline: float) -> None:
        self.device, self.deadline = device, deadline

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def us(self, calls: list[Callable[[], Any]], *, replays: int = 7) -> float:
        """Median microseconds per call of ``calls`` over ``replays`` runs of the list (each call runs
        once first: Triton compiles, cuBLAS picks its kernels)."""
        for call in calls:
            call()
        run: Callable[[], Any] = lambda: [call() for call in calls]  # noqa: E731
        if self.device == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            run = graph.replay
        samples = sorted(self._elapsed_us(run) for _ in range(replays))
        return samples[replays // 2] / len(calls)

    def _elapsed_us(self, run: Callable[[], Any]) -> float:
        if self.device != "cuda":
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e6
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
        run()
        events[1].record()
        events[1].synchronize()
        return events[0].elapsed_time(events[1]) * 1e3


def legacy_module() -> Any:
    """The previous kernels (one program per token), if a copy sits beside this file."""
    path = Path(__file__).with_name("_legacy_multi_lora.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_legacy_multi_lora", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Layer:
    """One layer: weights packed per group (q/k/v, o, gate/up, down) as the engine packs them, ``w[p]``
    each projection's rows; a bank of ``adapters`` slots stored as :class:`splice.lora.bank.LoraBank`
    stores it: A (S, G, R, K) and B (S, N_1 + .. + N_G, R) per group, ``a[p]`` / ``b[p]`` views."""

    def __init__(self, shapes: dict[str, tuple[int, int]], *, adapters: int, device: str, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape: int, scale: float = 0.02) -> Tensor:
            return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

        self.packed: list[tuple[tuple[str, ...], Tensor, Tensor, Tensor, tuple[int, ...]]] = []
        self.w, self.a, self.b, self.member = {}, {}, {}, {}
        for group in GROUPS:
            k, widths = shapes[group[0]][0], tuple(shapes[p][1] for p in group)
            w, a, b = rand(sum(widths), k, scale=k**-0.5), rand(adapters, len(group), RANK, k), rand(
                adapters, sum(widths), RANK)
            self.packed.append((group, w, a, b, widths))
            for i, p in enumerate(group):
                start = sum(widths[:i])
                self.w[p], self.a[p], self.b[p] = w[start: start + widths[i]], a[:, i], b[:, start: start + widths[i]]
                self.member[p] = (a, i)
        self.legacy_ab = {p: (self.a[p].contiguous(), self.b[p].contiguous()) for p in self.a}


def slots_for(tokens: int, adapters: int, kind: str, device: str) -> Tensor:
    g = torch.Generator().manual_seed(tokens * 1000 + adapters)
    if kind == "runs":  # 8 runs of one adapter each
        slots = torch.arange(8).repeat_interleave(tokens // 8) % adapters
    else:
        slots = torch.randint(0, adapters, (tokens,), generator=g)
    return slots.to(device, torch.int32)


def deltas(layers: list[Layer], inputs: dict[str, Tensor], outs: dict[str, Tensor], slots: Tensor, *,
           way: str, legacy: Any, tiles: Tiles | None = None, only: str | None = None) -> list[Callable[[], Any]]:
    """Calls adding every projection's delta (or ``only``'s) into ``outs``, one list entry per layer copy;
    ``packed``: each group's deltas into its packed output ``outs[group[0] + "+"]``; ``planned``: the same with
    the step's tile plan given (made here, once)."""
    step_tiles = tiles or tiles_for(slots.numel(), 0)  # the shape depends on the token count alone
    plan = plan_tiles(slots, capacity=layers[0].packed[0][2].shape[0], tiles=step_tiles) if way == "planned" else None

    def run(layer: Layer) -> None:
        for group, _, stack, b_stack, widths in layer.packed:
            names = [p for p in group if only in (None, p)]
            if not names:
                continue
            x = inputs[names[0]]
            if way in ("packed", "planned"):
                shrunk = multi_lora_shrink(x, stack, slots, tiles=step_tiles if plan is not None else tiles, plan=plan)
                multi_lora_expand(shrunk, b_stack, outs[group[0] + "+"], widths=widths)
            elif way == "grouped" and len(names) > 1:
                shrunk = multi_lora_shrink(x, stack, slots, tiles=tiles)
                for p in names:
                    multi_lora_expand(shrunk, layer.b[p], outs[p], member=layer.member[p][1])
            for p in names if way in ("legacy", "torch", "ungrouped") or (way == "grouped" and len(names) == 1) else ():
                if way == "legacy":
                    legacy.multi_lora(x, outs[p], *layer.legacy_ab[p], slots, inplace=True)
                elif way == "torch":
                    multi_lora(x, outs[p], layer.a[p], layer.b[p], slots, inplace=True, kernels=False)
                else:
                    multi_lora_expand(multi_lora_shrink(x, layer.a[p], slots, tiles=tiles), layer.b[p], outs[p])
    return [lambda layer=layer: run(layer) for layer in layers]


def bases(layers: list[Layer], inputs: dict[str, Tensor], outs: dict[str, Tensor], *, packed: bool = False,
          only: str | None = None) -> list[Callable[[], Any]]:
    """The GEMMs (F.linear's, into fixed outputs): one per projection, or with ``packed`` one per group."""
    def run(layer: Layer) -> None:
        for group, w, *_ in layer.packed:
            if packed:
                torch.mm(inputs[group[0]], w.t(), out=outs[group[0] + "+"])
                continue
            for p in group:
                if only in (None, p):
                    torch.mm(inputs[p], layer.w[p].t(), out=outs[p])
    return [lambda layer=layer: run(layer) for layer in layers]


def scenario_io(tokens: int, shapes: dict[str, tuple[int, int]], device: str) -> tuple[dict, dict]:
    hidden, inter = shapes["q"][0], shapes["down"][0]
    x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
    h = torch.randn(tokens, inter, device=device).to(torch.bfloat16)
    inputs = {p: (h if p == "down" else x) for p in shapes}
    outs = {p: torch.zeros(tokens, n, device=device, dtype=torch.bfloat16) for p, (_, n) in shapes.items()}
    for group in GROUPS:  # the packed outputs
        outs[group[0] + "+"] = torch.zeros(tokens, sum(shapes[p][1] for p in group), device=device,
                                           dtype=torch.bfloat16)
    return inputs, outs


def projection_rows(clock: Clock, layers: list[Layer], scenario: tuple, shapes: dict, *, ways: list[str],
                    legacy: Any, device: str) -> list[dict[str, Any]]:
    name, tokens, adapters, kind = scenario
    inputs, outs = scenario_io(tokens, shapes, device)
    slots = slots_for(tokens, adapters, kind, device)
    rows = []
    for p, (k, n) in shapes.items():
        if clock.expired():
            break
        row: dict[str, Any] = {"scenario": name, "projection": p, "K": k, "N": n,
                               "base_us": clock.us(bases(layers, inputs, outs, only=p))}
        for way in ways:
            row[f"{way}_us"] = clock.us(deltas(layers, inputs, outs, slots, way=way, legacy=legacy, only=p))
            row[f"{way}_ratio"] = row[f"{way}_us"] / row["base_us"]
        rows.append(row)
    return rows


def layer_row(clock: Clock, layers: list[Layer], scenario: tuple, shapes: dict, *, ways: list[str],
              legacy: Any, device: str) -> dict[str, Any]:
    """One layer's GEMMs with each way's deltas; ``packed`` rides on the packed GEMMs (q/k/v and gate/up
    one GEMM each, as the engine runs them without adapters) and is compared with those."""
    name, tokens, adapters, kind = scenario
    inputs, outs = scenario_io(tokens, shapes, device)
    slots = slots_for(tokens, adapters, kind, device)
    base, base_packed = bases(layers, inputs, outs), bases(layers, inputs, outs, packed=True)
    row: dict[str, Any] = {"scenario": name, "tokens": tokens, "adapters": adapters, "base_us": clock.us(base),
                           "base_packed_us": clock.us(base_packed)}
    if "planned" in ways:  # the one plan a step makes
        row["plan_us"] = clock.us([lambda: plan_tiles(slots, capacity=adapters, tiles=tiles_for(tokens, 0))])
    for way in ways:
        # "idle": the bank's launches over a batch of base rows only (slot -1): the launch floor
        rows_slots = torch.full_like(slots, -1) if way == "idle" else slots
        added = deltas(layers, inputs, outs, rows_slots, way="grouped" if way == "idle" else way, legacy=legacy)
        under, ref_us = (base_packed, row["base_packed_us"]) if way in ("packed", "planned") else (base, row["base_us"])
        both = [call for pair in zip(under, added, strict=True) for call in pair]
        total = clock.us(both) * 2  # per layer: a base call and a delta call
        added_ms = (total - ref_us) * LAYERS / 1e3
        row[way] = {"layer_us": total, "vs_base": ref_us / total, "step_ms_added": added_ms}
        if tokens in STEP_MS:
            row[way]["of_step"] = added_ms / STEP_MS[tokens]
    return row


def eager_rows(layers: list[Layer], shapes: dict, *, ways: list[str], legacy: Any,
               device: str) -> list[dict[str, Any]]:
    """Eager (no graph) µs per call for decode-32x8's q: mostly the host's launch cost, which a mixed
    prefill step (run eagerly) pays per projection."""
    name, tokens, adapters, kind = SCENARIOS[0]
    inputs, outs = scenario_io(tokens, shapes, device)
    slots = slots_for(tokens, adapters, kind, device)
    clock = Clock(device="cpu", deadline=float("inf"))  # wall clock: the host's time when it is the bottleneck
    row: dict[str, Any] = {"scenario": name, "projection": "q",
                           "base_us": clock.us(bases(layers, inputs, outs, only="q") * 25)}
    for way in ways:
        row[f"{way}_us"] = clock.us(deltas(layers, inputs, outs, slots, way=way, legacy=legacy, only="q") * 25)
    torch.cuda.synchronize()
    return [row]


def sweep_rows(clock: Clock, layers_for: Callable[[int], list[Layer]], shapes: dict, *,
               device: str) -> list[dict[str, Any]]:
    rows = []
    for scenario in (SCENARIOS[0], SCENARIOS[5], SCENARIOS[6]):
        name, tokens, adapters, kind = scenario
        inputs, outs = scenario_io(tokens, shapes, device)
        slots = slots_for(tokens, adapters, kind, device)
        for p in ("q", "gate", "down"):
            k = shapes[p][0]
            for tiles in [tiles_for(tokens, k), *SWEEP[kind]]:
                if clock.expired():
                    return rows
                calls = deltas(layers_for(adapters), inputs, outs, slots, way="ungrouped", legacy=None, tiles=tiles,
                               only=p)
                rows.append({"scenario": name, "projection": p, "tiles": vars(tiles), "us": clock.us(calls)})
    return rows


def print_tables(result: dict[str, Any]) -> None:
    print(f"{result['device']}  {result['date']}  (µs per call; ratio = delta / base GEMM)")
    for row in result["projections"]:
        ways = "  ".join(f"{k[:-3]} {v:8.1f}" for k, v in row.items() if k.endswith("_us") and k != "base_us")
        print(f"{row['scenario']:>14} {row['projection']:>5} base {row['base_us']:8.1f}  {ways}  "
              + " ".join(f"{k}={v:.2f}" for k, v in row.items() if k.endswith("_ratio")))
    print("layer (7 GEMMs) with the deltas: µs, base/with, ms added to a 32-layer step, share of the step")
    for row in result["layers"]:
        cells = "  ".join(f"{w}: {v['layer_us']:.0f} ({v['vs_base']:.2f}x, +{v['step_ms_added']:.2f} ms"
                          + (f", {v['of_step']:.0%})" if "of_step" in v else ")")
                          for w, v in row.items() if isinstance(v, dict))
        plan = f"  plan {row['plan_us']:.1f}" if "plan_us" in row else ""
        print(f"{row['scenario']:>14} base {row['base_us']:7.0f} (packed {row['base_packed_us']:.0f}){plan}  {cells}")
    for row in result.get("eager", []):
        print("eager µs per call (host launch cost):", {k: round(v, 1) for k, v in row.items() if k.endswith("_us")})
    for row in result.get("sweep", []):
        print(f"sweep {row['scenario']:>14} {row['projection']:>5} {row['us']:8.1f}  {row['tiles']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    parser.add_argument("--deadline-s", type=float, default=150.0, help="stop measuring after this long")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shapes = {p: (k // 64, n // 64) for p, (k, n) in PROJECTIONS.items()} if device == "cpu" else PROJECTIONS
    scenarios = [(n, t // 8, a, kind) for n, t, a, kind in SCENARIOS[::3]] if device == "cpu" else SCENARIOS
    clock = Clock(device=device, deadline=time.monotonic() + args.deadline_s)
    legacy = legacy_module() if device == "cuda" else None
    ways = ["torch"] if device == "cpu" else ["ungrouped", *(["legacy"] if legacy else [])]
    layer_ways = ["torch"] if device == "cpu" else ["packed", "planned", "grouped", "ungrouped", "idle",
                                                    *(["legacy"] if legacy else [])]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "rank": RANK, "dtype": "bfloat16", "copies": COPIES,
        "projections": [], "layers": [], "complete": False,
    }
    banks: dict[int, list[Layer]] = {}

    def layers_for(adapters: int) -> list[Layer]:
        if adapters not in banks:
            banks.clear()  # one bank size at a time (4 copies: 1.7 GB of weights, 0.7 GB of 64-slot banks)
            banks[adapters] = [Layer(shapes, adapters=adapters, device=device, seed=c) for c in range(COPIES)]
        return banks[adapters]

    for part in ("layers", "eager", "projections", "sweep"):
        for scenario in scenarios if part not in ("sweep", "eager") else [None]:
            if clock.expired() or (part in ("sweep", "eager") and device != "cuda") or (part == "sweep"
                                                                                      and not args.sweep):
                break
            if part == "sweep":
                result["sweep"] = sweep_rows(clock, layers_for, shapes, device=device)
            elif part == "eager":
                result["eager"] = eager_rows(layers_for(8), shapes, ways=ways, legacy=legacy, device=device)
            elif part == "layers":
                result["layers"].append(layer_row(clock, layers_for(scenario[2]), scenario, shapes,
                                                  ways=layer_ways, legacy=legacy, device=device))
            else:
                result["projections"] += projection_rows(clock, layers_for(scenario[2]), scenario, shapes,
                                                         ways=ways, legacy=legacy, device=device)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
    result["complete"] = not clock.expired()
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
