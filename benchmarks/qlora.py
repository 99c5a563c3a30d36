"""QLoRA benchmark: splice NF4 vs PEFT + bitsandbytes vs splice bf16 LoRA, in one invocation.

    PYTHONPATH=. python benchmarks/qlora.py --out DIR [--budget-s 280] [--tiny --device cpu]

Random Llama-3-8B / Llama-3-70B-shaped models (seeded per parameter name, as
``benchmarks/_workload.py`` builds them): splice's NF4 models come from
``splice.models.streaming.random_quantized`` (quantized weight by weight: a 70B shape never
exists in bf16), the peer's from the same bf16 values quantized by bitsandbytes. The peer recipe
(the issue's): transformers + PEFT + bitsandbytes, NF4, double quantization, bf16 compute,
``prepare_model_for_kbit_training``, gradient checkpointing, r16 all-linear. Parts, in order
(each part's results are written to ``qlora.json`` as soon as it ends; the later, longer parts
stop at ``--budget-s``):

* ``Q``: 8B, r16 all-linear, 2 x 2048 tokens: tokens/s, peak memory, loss, per framework.
* ``low``: 8B NF4 2048 x 1 with every layer checkpointed and the kept inputs offloaded: peak.
* ``parity``: QLoRA vs bf16 LoRA losses over 50 steps, same data and seed (``--parity-layers``).
* ``70b``: 70B NF4, 4096 x 1: tokens/s and peak.
* ``longest``: the longest batch-1 sequence under an 80 GiB cap (per-process memory fraction),
  for 8B and 70B NF4, doubling then bisecting within the remaining budget, or trying the
  lengths ``--probes-8b`` / ``--probes-70b`` give (``longest8`` / ``longest70``: one shape). Host
  memory bounds these lengths (every layer's input is pinned there): ``--offload-compression fp8``
  stores the inputs in 8 bits, half of it; a length whose pinned inputs would not fit the host's
  available memory is reported host-bound, untried.
  ``--mlp-chunk-tokens N`` runs each MLP N tokens at a time (splice.memory.tiled_mlp): the MLP's
  intermediates, which dominate a layer's backward there, then scale with N, not the sequence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _workload  # noqa: E402
import torch  # noqa: E402
from _workload import CONFIGS, GIB, batches, free_cuda, init_lora, setup_peft, setup_splice, train  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = {"8b": dict(hidden=4096, inter=14336, heads=32, kv=8, layers=32, vocab=128256),
          "70b": dict(hidden=8192, inter=28672, heads=64, kv=8, layers=80, vocab=128256)}
CAP_GIB = 80.0


def llama_config(shape: str, *, layers: int | None = None, tiny: bool = False) -> Any:
    from transformers import LlamaConfig

    s = dict(SHAPES[shape])
    if tiny:
        s.update(hidden=128, inter=256, heads=4, kv=2, vocab=1000)
    return LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
        num_hidden_layers=layers or s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1 << 20, tie_word_embeddings=False,
        attn_implementation="sdpa", use_cache=False)


def splice_model(config: Any, quantize: str | None) -> nn.Module:
    from splice.models.streaming import random_quantized

    model = random_quantized(config, quantize=quantize, device=_workload.DEVICE, dtype=torch.bfloat16)
    model.config.use_cache = False
    return model.train()


def peft_bnb_setup(config: Any, cfg: Any) -> Any:
    """The peer: bf16 weights -> bitsandbytes Linear4bit (NF4, double quant, bf16 compute) ->
    prepare_model_for_kbit_training (gradient checkpointing) -> PEFT r16 all-linear."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = splice_model(config, None)
    with torch.no_grad():
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                        q.weight = bnb.nn.Params4bit(child.weight.data.cpu() if _workload.DEVICE == "cpu"
                                                     else child.weight.data, requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4")
                        q = q.to(_workload.DEVICE)
                        setattr(parent, name, q)
                        del child
    free_cuda()
    model.is_loaded_in_4bit = True
    model.quantization_method = "bitsandbytes"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    setup = setup_peft(model, cfg)
    setup.set_ckpt("on")
    return setup


def run_q(result: dict[str, Any], save: Any, args: argparse.Namespace) -> None:
    cfg = CONFIGS["C"]  # r16 all-linear, 2 x 2048
    config = llama_config("8b", layers=args.layers, tiny=args.tiny)
    variants = {"bf16": ("splice bf16 LoRA", None, False), "nf4": ("splice NF4", "nf4", False),
                "nf4-graphs": ("splice NF4 + CUDA graphs", "nf4", True),
                "peer": ("PEFT + bitsandbytes", "peer", False)}
    for label, quantize, graphs in (variants[key] for key in args.q_rows.split(",")):
        if graphs and _workload.DEVICE != "cuda":
            continue
        try:
            free_cuda()
            if quantize == "peer":
                setup = peft_bnb_setup(config, cfg)
            else:
                setup = setup_splice(splice_model(config, quantize), cfg)
                setup.set_ckpt("on")
            init_lora(setup.lora)
            weights = torch.cuda.memory_allocated() / GIB if _workload.DEVICE == "cuda" else 0.0
            r = train(setup, batches(cfg), warmup=2, steps=args.steps, graphs=graphs)
            r.update(label=label, weights_gib=weights, seq=cfg.seq, batch=cfg.batch)
        except Exception as error:
            r = {"label": label, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
        result["Q"].append(r)
        save()
        setup = None  # type: ignore[assignment]
        free_cuda()


def run_low(result: dict[str, Any], save: Any, args: argparse.Namespace) -> None:
    from splice.memory.host_embedding import embeddings_to_host

    cfg = CONFIGS["C"]
    setup = setup_splice(splice_model(llama_config("8b", layers=args.layers, tiny=args.tiny), "nf4"), cfg)
    init_lora(setup.lora)

    def rows(modes: tuple[str, ...], suffix: str = "") -> None:
        for mode in modes:
            setup.set_ckpt(mode)
            try:
                r = train(setup, batches(cfg, batch=1), warmup=1, steps=2)
                r.update(mode=mode + suffix, seq=cfg.seq, batch=1)
            except Exception as error:
                r = {"mode": mode + suffix, "error": f"{type(error).__name__}: {error}"}
            print(json.dumps(r), flush=True)
            result["low"].append(r)
            save()
            free_cuda()

    rows(("all", "offload-recompute", "offload"))
    embeddings_to_host(setup.model)  # the 0.98 GiB input table to pinned host memory (last: it stays)
    rows(("all", "offload-recompute"), " + embeddings on host")


def run_parity(result: dict[str, Any], save: Any, args: argparse.Namespace) -> None:
    cfg = CONFIGS["P"]  # no dropout; fresh batches every step, the same for both
    losses = {}
    for quantize in (None, "nf4"):
        setup = setup_splice(splice_model(llama_config("8b", layers=args.parity_layers, tiny=args.tiny),
                                          quantize), cfg)
        setup.set_ckpt("on")
        init_lora(setup.lora)
        r = train(setup, batches(cfg), warmup=0, steps=50, lr=2e-4)
        losses["nf4" if quantize else "bf16"] = r["losses"]
        setup = None  # type: ignore[assignment]
        free_cuda()
    diff = [abs(a - b) for a, b in zip(losses["nf4"], losses["bf16"])]
    result["parity"] = {"layers": args.parity_layers, "steps": 50, "losses": losses,
                        "max_abs_diff": max(diff), "mean_abs_diff": sum(diff) / len(diff),
                        "last10_mean": {k: sum(v[-10:]) / 10 for k, v in losses.items()}}
    print(json.dumps({k: v for k, v in result["parity"].items() if k != "losses"}), flush=True)
    save()


def run_70b(result: dict[str, Any], save: Any, args: argparse.Namespace, t0: float, parts: list[str]) -> None:
    cfg = CONFIGS["C"]
    t = time.perf_counter()
    setup = setup_splice(splice_model(llama_config("70b", layers=args.layers_70b, tiny=args.tiny), "nf4"), cfg)
    build_s = time.perf_counter() - t
    init_lora(setup.lora)
    if "70b" in parts:
        setup.set_ckpt("all")
        weights = torch.cuda.memory_allocated() / GIB if _workload.DEVICE == "cuda" else 0.0
        r = train(setup, batches(cfg, seq=4096, batch=1), warmup=1, steps=2)
        r.update(seq=4096, batch=1, build_s=build_s, weights_gib=weights, layers=args.layers_70b or 80)
        result["70b"] = r
        print(json.dumps(r), flush=True)
        save()
    if "longest70" in parts or "longest" in parts:
        run_longest(result, save, args, t0, setup, "70b", start=16384, probes=args.probes_70b)


def run_longest(result: dict[str, Any], save: Any, args: argparse.Namespace, t0: float, setup: Any,
                shape: str, *, start: int, probes: list[int] | None = None) -> None:
    """The doubling-then-bisecting search from ``start``, or (``probes``) one step at each given
    length in order, up to the first OOM: at these lengths one probe is minutes, so a run aims
    at the target instead of walking up to it."""
    from train_throughput import _maxseq, offload_host_bytes, probe_step

    budget = args.budget_s - (time.perf_counter() - t0)
    if budget < 20:
        result["longest"][shape] = {"skipped": "no time left in the budget"}
        save()
        return
    if _workload.DEVICE == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB / total))
    # inputs offloaded, attention recomputed: host memory is one layer input per layer (keeping
    # the attention internals too would need ~4.5x that in pinned host memory)
    host_layers = args.host_layers_70b if shape == "70b" else None
    compression = args.offload_compression
    setup.set_ckpt("offload-recompute" + (f":{host_layers}" if host_layers else "")
                   + ("" if compression == "none" else f"+{compression}"))
    if args.mlp_chunk_tokens:  # each MLP a chunk of tokens at a time (splice.memory.tiled_mlp)
        from splice.memory.tiled_mlp import tile_mlps

        tile_mlps(setup.model, chunk_tokens=args.mlp_chunk_tokens)
    dims = llama_config(shape, layers=args.layers_70b if shape == "70b" else args.layers, tiny=args.tiny)
    host = lambda seq: offload_host_bytes(seq, layers=host_layers or dims.num_hidden_layers,  # noqa: E731
                                          hidden=dims.hidden_size, cfg=CONFIGS["C"], compression=compression)
    if probes:
        tried: list[dict[str, Any]] = []
        for seq in probes:
            tried.append(probe_step(setup, CONFIGS["C"], seq, host_bytes=host))
            print(f"  probe {shape} {seq}: {tried[-1]}", flush=True)
            result["longest"][shape] = {"probes": tried}
            save()
            if not tried[-1]["ok"]:
                break
        ok = [p["seq"] for p in tried if p["ok"]]
        bad = [p["seq"] for p in tried if not p["ok"]]
        r = {"longest_ok": max(ok) if ok else None, "shortest_oom": min(bad) if bad else None,
             "probes": tried, "searched": False, "host_layers": host_layers}
    else:
        r = _maxseq(setup, CONFIGS["C"], start=start, cap=1 << 21, gran=8192, budget_s=budget / 2, host_bytes=host)
    r["cap_gib"], r["offload_compression"] = CAP_GIB, compression
    r["mlp_chunk_tokens"] = args.mlp_chunk_tokens
    result["longest"][shape] = r
    print(json.dumps({k: v for k, v in r.items() if k != "probes"}), flush=True)
    save()
    if _workload.DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--budget-s", type=float, default=280.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="8B decoder layers (default: all 32)")
    parser.add_argument("--layers-70b", type=int, default=None, help="70B decoder layers (default: all 80)")
    parser.add_argument("--parity-layers", type=int, default=4)
    parser.add_argument("--parts", default="Q,low,parity,70b,longest",
                        help="longest8 / longest70: the longest-sequence part for one shape only")
    seqs = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--probes-8b", type=seqs, default=None, help="lengths to try instead of searching")
    parser.add_argument("--probes-70b", type=seqs, default=None, help="lengths to try instead of searching")
    parser.add_argument("--q-rows", default="bf16,nf4,nf4-graphs,peer",
                        help="Q rows to run: bf16, nf4, nf4-graphs, peer")
    parser.add_argument("--host-layers-70b", type=int, default=None,
                        help="longest 70b: offload only the last N layer inputs (host memory bound)")
    parser.add_argument("--offload-compression", choices=("none", "fp8", "int8"), default="none",
                        help="longest: the offloaded layer inputs in 8 bits (half the host memory)")
    parser.add_argument("--mlp-chunk-tokens", type=int, default=None,
                        help="longest: run each MLP this many tokens at a time (its intermediates scale with it)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke test of this script)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    _workload.configure(tiny=args.tiny, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
        "Q": [], "low": [], "parity": None, "70b": None, "longest": {}}
    try:
        import bitsandbytes
        import peft
        import transformers

        result["versions"] = {"bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
                              "transformers": transformers.__version__}
    except Exception as error:
        result["versions"] = {"error": str(error)}

    def save() -> None:
        (out / "qlora.json").write_text(json.dumps(result, indent=1))

    parts = args.parts.split(",")
    for part, fn in (("Q", run_q), ("low", run_low), ("parity", run_parity)):
        if part in parts:
            try:
                fn(result, save, args)
            except Exception as error:
                result.setdefault("errors", []).append(f"{part}: {type(error).__name__}: {error}")
                traceback.print_exc()
                save()
            free_cuda()
    if "70b" in parts or "longest70" in parts:
        try:
            run_70b(result, save, args, t0, parts)
        except Exception as error:
            result.setdefault("errors", []).append(f"70b: {type(error).__name__}: {error}")
            traceback.print_exc()
            save()
    if "longest" in parts or "longest8" in parts:
        try:
            setup = setup_splice(splice_model(llama_config("8b", layers=args.layers, tiny=args.tiny), "nf4"),
                                 CONFIGS["C"])
            init_lora(setup.lora)
            run_longest(result, save, args, t0, setup, "8b", start=65536, probes=args.probes_8b)
            setup = None
        except Exception as error:
            result.setdefault("errors", []).append(f"longest 8b: {type(error).__name__}: {error}")
            traceback.print_exc()
            save()
        free_cuda()
    save()
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, {result['date']}")
    print(f"{'Q: 8B r16 all-linear 2x2048':<30} {'tok/s':>8} {'peak GiB':>9} {'loss (last)':>12}")
    for r in result["Q"]:
        if "error" in r:
            print(f"{r['label']:<30} error: {r['error'][:80]}")
        else:
            print(f"{r['label']:<30} {r['tok_s']:>8.0f} {r['peak_gib']:>9.2f} {r['losses'][-1]:>12.4f}")
    for r in result["low"]:
        print(f"8B NF4 2048x1 {r['mode']:<16} " + (f"peak {r['peak_gib']:.2f} GiB, {r['tok_s']:.0f} tok/s"
                                                   if "error" not in r else r["error"][:80]))
    if result["parity"]:
        p = result["parity"]
        print(f"parity ({p['layers']} layers, 50 steps): max |loss diff| {p['max_abs_diff']:.4f}, "
              f"mean {p['mean_abs_diff']:.4f}")
    if result["70b"]:
        r = result["70b"]
        print(f"70B NF4 4096x1: {r['tok_s']:.0f} tok/s, peak {r['peak_gib']:.2f} GiB (build {r['build_s']:.0f} s)")
    for shape, r in result["longest"].items():
        print(f"longest bs1 {shape} NF4 under {CAP_GIB:.0f} GiB: {r.get('longest_ok')} "
              f"(first OOM {r.get('shortest_oom')}, budget hit {r.get('budget_hit')})")


if __name__ == "__main__":
    main()
