"""Paged attention on the GPU: time and achieved bandwidth against the measured copy bandwidth.

    PYTHONPATH=. python benchmarks/paged_attention.py --out DIR/paged_attention.json

Llama-3-8B attention (Hq 32, Hkv 8, head_dim 128, bf16), block size 16, blocks shuffled. Decode at
batch 1 / 32 / 128 x context 128 / 1,024 / 4,096 and batch 64 x 192 (a GRPO rollout's), each also with
``direct_decode`` off (the sequence found by the binary search, "variant ... search"), and a 2,048-token
prefill chunk (a full prefill and a chunk after 2,048 cached tokens). Each call is timed inside a CUDA graph of ``REPS`` calls
(how the engine runs it: no launch overhead), median of several replays. Bandwidth = bytes of K/V
read + q read + out written, over the time; the ceiling is the measured read bandwidth (a sum over
2 GiB; a device-to-device copy, read + write, is reported beside it).
The peer is torch SDPA over dense (un-paged) tensors, timed the same way; full prefills also against torch's
FlashAttention varlen (``torch.nn.attention.varlen``, where this torch has it) over flat fresh prompts, and the
engine's dense path for them (``fresh_attention="dense"``): the training varlen kernel's forward
(``splice.kernels.varlen_attention``, Triton) over the step's own K/V. "mixed step" is an offline run's step with
prompts (16 fresh prompts of 500 tokens and 240 decodes at 600): the paged kernel alone against the varlen kernel +
the paged kernel with ``skip_fresh``. ``--sweep`` also times tile-size variants of the paged kernel and of the
varlen forward. Each kernel result is checked against the plain reference. ``--int8``: the
caches as int8 codes with a scale per token and head (splice.kernels.kv_cache; its bytes are codes + scales),
decode cases only (``--cases`` picks some by label).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.kv_cache import kv_caches, write_kv
from splice.kernels.paged_attention import (
    KernelConfig,
    default_config,
    paged_attention_reference,
    paged_attention_triton,
)
from splice.kernels.varlen_attention import KernelConfig as VarlenConfig
from splice.kernels.varlen_attention import default_config as varlen_default
from splice.kernels.varlen_attention import varlen_attention

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16
REPS = 20


def graph_ms(fn: Callable[[], object], *, replays: int = 7) -> float:
    """Median milliseconds per call of ``fn``, ``REPS`` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / REPS)
    return sorted(times)[len(times) // 2]


def memory_bandwidth() -> tuple[float, float]:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted) and of a 2 GiB sum (read only)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy = 4 * src.numel() / (graph_ms(lambda: dst.copy_(src), replays=5) * 1e-3)
    read = 2 * src.numel() / (graph_ms(lambda: src.sum(dtype=torch.float32), replays=5) * 1e-3)
    return copy, read


def make_batch(batch: int, context: int, q_len: int, *, int8: bool = False) -> dict:
    """``batch`` sequences of ``context`` tokens, the last ``q_len`` of each queried; shuffled blocks; ``int8``:
    the caches as codes + scales (kv_cache), written from the same kind of random values."""
    per = -(-context // BS)
    num_blocks = batch * per + 1
    ids = (torch.randperm(num_blocks - 1, device="cuda") + 1).to(torch.int32).view(batch, per)
    caches = [torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE) for _ in range(2)]
    scales = {}
    if int8:
        codes = kv_caches((num_blocks, BS, HKV, D), torch.int8, "cuda")
        scales = {"key_scale": torch.zeros(num_blocks, BS, HKV, device="cuda"),
                  "value_scale": torch.zeros(num_blocks, BS, HKV, device="cuda")}
        slots = torch.arange(num_blocks * BS, device="cuda")
        write_kv(caches[0].flatten(0, 1), caches[1].flatten(0, 1), *codes, slots, **scales)
        caches = list(codes)
    return dict(q=torch.randn(batch * q_len, HQ, D, device="cuda", dtype=DTYPE), key_cache=caches[0],
                value_cache=caches[1], block_tables=ids, seq_lens=torch.full((batch,), context, device="cuda",
                                                                            dtype=torch.int32),
                query_start_loc=torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32),
                max_query_len=q_len, max_seq_len=context, **scales)


def dense_peer(args: dict, batch: int, context: int, q_len: int) -> Callable[[], Tensor]:
    """SDPA over the same K/V laid out densely (B, Hkv, ctx, D); GQA by enable_gqa."""
    flat = args["block_tables"].long()
    k = args["key_cache"][flat].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = args["value_cache"][flat].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    q = args["q"].view(batch, q_len, HQ, D).transpose(1, 2).contiguous()
    if q_len == context:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q_len == 1:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    mask = torch.ones(q_len, context, dtype=torch.bool, device="cuda").tril(context - q_len)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def varlen_peer(args: dict, batch: int, context: int) -> Callable[[], Tensor] | None:
    """torch's FlashAttention varlen (``torch.nn.attention.varlen``) over the flat q and the K/V of fresh prompts
    (no cached prefix, as a prompt's first chunk): the speed a step's prefills could get outside the paged kernel.
    None where this torch lacks it; its keyword for causal masking changed between releases."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        print("torch.nn.attention.varlen: not in this torch")
        return None
    flat = args["block_tables"].long()
    k, v = (args[c][flat].flatten(1, 2)[:, :context].flatten(0, 1).contiguous() for c in ("key_cache", "value_cache"))
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params:  # (T, Hkv, D) -> (T, Hq, D): the heads a grouped query reads
        k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    cu = torch.arange(0, batch * context + 1, context, device="cuda", dtype=torch.int32)
    extra: dict = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        extra["enable_gqa"] = True
    q = args["q"]
    try:
        varlen_attn(q, k, v, cu, cu, context, context, **extra)
    except Exception as error:  # an unsupported build or card: say so, keep the rest
        print(f"torch varlen_attn failed: {str(error).splitlines()[0][:200]}")
        return None
    return lambda: varlen_attn(q, k, v, cu, cu, context, context, **extra)


def measure(label: str, batch: int, context: int, q_len: int, ceiling: float,
            configs: list[KernelConfig | None], *, int8: bool = False, sweep: bool = False) -> list[dict]:
    args = make_batch(batch, context, q_len, int8=int8)
    kv_vector = D + 4 if int8 else D * args["q"].element_size()  # bytes of one token's key (or value) of a head
    moved = 2 * batch * context * HKV * kv_vector + 2 * args["q"].numel() * args["q"].element_size()
    attended = batch * sum(context - q_len + i + 1 for i in range(q_len))  # (query, key) pairs
    flops = 4 * attended * HQ * D
    want = paged_attention_reference(**args, scale=D**-0.5)
    rows = []
    for config in configs:
        out = torch.empty_like(args["q"])
        def run(config: KernelConfig | None = config, out: Tensor = out) -> Tensor:
            return paged_attention_triton(**args, scale=D**-0.5, out=out, config=config)
        try:
            ms = graph_ms(run)
        except Exception as error:  # a variant past the card's shared memory: note it, keep going
            print(f"{label}: {config} failed: {str(error).splitlines()[0][:200]}")
            continue
        err = float((out.float() - want.float()).abs().max())
        cfg = config or default_config(decode=q_len == 1, group=HQ // HKV, head_dim=D, int8=int8)
        rows.append(dict(case=label, impl="splice" if config is None else "variant", config=asdict(cfg), ms=ms,
                         bandwidth_tb_s=moved / ms * 1e-9, of_read=moved / ms * 1e3 / ceiling,
                         tflops=flops / ms * 1e-9, max_abs_err=err))
    if int8:
        return rows
    if q_len == context and (varlen := varlen_peer(args, batch, context)) is not None:
        try:
            ms = graph_ms(varlen)
        except Exception as error:  # not capturable in a CUDA graph on this build
            print(f"torch varlen_attn in a CUDA graph failed: {str(error).splitlines()[0][:200]}")
            ms = float("nan")
        got = varlen()
        rows.append(dict(case=label, impl="torch varlen_attn", ms=ms, bandwidth_tb_s=moved / ms * 1e-9,
                         of_read=moved / ms * 1e3 / ceiling, tflops=flops / ms * 1e-9,
                         max_abs_err=float((got.float() - want.float()).abs().max())))
    if q_len == context:
        rows += fresh_rows(label, args, context, want, moved, flops, ceiling, sweep=sweep)
    peer = dense_peer(args, batch, context, q_len)
    ms = graph_ms(peer)
    got = peer().transpose(1, 2).reshape(-1, HQ, D)
    rows.append(dict(case=label, impl="torch sdpa (dense)", ms=ms, bandwidth_tb_s=moved / ms * 1e-9,
                     of_read=moved / ms * 1e3 / ceiling, tflops=flops / ms * 1e-9,
                     max_abs_err=float((got.float() - want.float()).abs().max())))
    return rows


def fresh_rows(label: str, args: dict, context: int, want: Tensor, moved: float, flops: float, ceiling: float, *,
               sweep: bool) -> list[dict]:
    """The engine's fresh-prompt path (``fresh_attention="dense"``) over the prompts' dense K/V: splice's varlen
    kernel (splice.kernels.varlen_attention, the training kernel's forward), with its default tiles and, with
    ``sweep``, other forward tiles (``block_m`` queries x ``block_n`` keys, warps, stages)."""
    flat = args["block_tables"].long()
    k, v = (args[c][flat].flatten(1, 2)[:, :context].flatten(0, 1).contiguous() for c in ("key_cache", "value_cache"))
    base = varlen_default(head_dim=D, dtype=DTYPE)
    configs = [base] + ([replace(base, block_m=m, block_n=n, num_warps=w, num_stages=st) for m, n, w, st in
                         ((128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                          (64, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 4))] if sweep else [])
    rows = []
    for i, cfg in enumerate(configs):
        def run(cfg: VarlenConfig = cfg) -> Tensor:
            return varlen_attention(args["q"], k, v, cu_seqlens=args["query_start_loc"], max_seqlen=context,
                                    scale=D**-0.5, config=cfg)
        try:
            ms = graph_ms(run)
        except Exception as error:  # (a tile that does not fit: say so, go on)
            print(f"{label}: varlen {cfg} failed: {str(error).splitlines()[0][:200]}")
            continue
        rows.append(dict(case=label, impl="splice varlen (triton)" if i == 0 else "varlen variant", ms=ms,
                         bandwidth_tb_s=moved / ms * 1e-9, of_read=moved / ms * 1e3 / ceiling,
                         tflops=flops / ms * 1e-9, max_abs_err=float((run().float() - want.float()).abs().max()),
                         config=f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"))
    return rows


def mixed_step_rows(ceiling: float, *, prompts: int = 16, prompt_len: int = 500, decodes: int = 240,
                    context: int = 600) -> list[dict]:
    """An offline step with prompts: ``prompts`` fresh prompts and ``decodes`` one-token decodes at ``context``, in one
    call with the engine's graph bounds (max_query_len 1,024, max_seq_len 1,501): the paged kernel for all, against
    the varlen kernel for every sequence + the paged kernel for the decodes (``skip_fresh``), as the engine's
    ``fresh_attention="dense"`` runs it."""
    lens = [(prompt_len, prompt_len)] * prompts + [(context, 1)] * decodes
    per = [-(-n // BS) for n, _ in lens]
    num_blocks = sum(per) + 1
    order = (torch.randperm(num_blocks - 1, device="cuda") + 1).to(torch.int32)
    tables = torch.zeros(len(lens), max(per), dtype=torch.int32, device="cuda")
    at = 0
    for b, blocks in enumerate(per):
        tables[b, :blocks] = order[at: at + blocks]
        at += blocks
    caches = [torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE) for _ in range(2)]
    starts = torch.tensor([0] + [q for _, q in lens], device="cuda").cumsum(0).to(torch.int32)
    tokens = int(starts[-1])
    args = dict(q=torch.randn(tokens, HQ, D, device="cuda", dtype=DTYPE), key_cache=caches[0], value_cache=caches[1],
                block_tables=tables, seq_lens=torch.tensor([n for n, _ in lens], device="cuda", dtype=torch.int32),
                query_start_loc=starts, max_query_len=1024, max_seq_len=1501)
    # the step's own K/V, dense: each sequence's last L_b keys (what rope_write_kv's kv_out holds)
    step_kv = [torch.cat([c[tables[b, (n - q) // BS: -(-n // BS)].long()].flatten(0, 1)[(n - q) % BS: (n - q) % BS + q]
                          for b, (n, q) in enumerate(lens)]) for c in caches]
    want = paged_attention_reference(**args, scale=D**-0.5)
    attended = sum(q * (n - q) + q * (q + 1) // 2 for n, q in lens)
    moved = 2 * sum(n for n, _ in lens) * HKV * D * 2 + 2 * tokens * HQ * D * 2
    label = f"mixed step {prompts}x{prompt_len} + {decodes} decodes"
    out = torch.empty_like(args["q"])

    def paged() -> Tensor:
        return paged_attention_triton(**args, scale=D**-0.5, out=out)

    def split() -> Tensor:
        fresh = varlen_attention(args["q"], *step_kv, cu_seqlens=starts, max_seqlen=1024, scale=D**-0.5)
        return paged_attention_triton(**args, scale=D**-0.5, out=fresh, skip_fresh=True)

    rows = []
    for impl, fn in (("splice paged", paged), ("varlen + paged", split)):
        try:
            ms = graph_ms(fn)
        except Exception as error:
            print(f"{label}: {impl} failed: {str(error).splitlines()[0][:200]}")
            continue
        rows.append(dict(case=label, impl=impl, ms=ms, bandwidth_tb_s=moved / ms * 1e-9,
                         of_read=moved / ms * 1e3 / ceiling, tflops=4 * attended * HQ * D / ms * 1e-9,
                         max_abs_err=float((fn().float() - want.float()).abs().max())))
    return rows


def variants(decode: bool, *, int8: bool = False) -> list[KernelConfig | None]:
    default = default_config(decode=decode, group=HQ // HKV, head_dim=D, int8=int8)
    # the key loops software-pipelined (loop_stages; the launch's num_stages alone leaves them unpipelined)
    piped = [replace(default, loop_stages=ls) for ls in (2, 3, 4)]
    if decode and int8:
        return [None, *piped] + [KernelConfig(block_q=4, block_n=n, num_warps=w, num_stages=st, min_partition=mp,
                                              programs_per_sm=pps, loop_stages=ls)
                                 for n, w, st, mp, pps, ls in [(128, 4, 2, 128, 2, 3), (64, 4, 2, 128, 2, 3),
                                                               (128, 4, 2, 256, 4, 2)]]
    if decode:
        return [None, *piped] + [KernelConfig(block_q=4, block_n=n, num_warps=w, num_stages=st, min_partition=mp,
                                              loop_stages=ls)
                                 for n, w, st, mp, ls in [(128, 4, 3, 128, 0), (128, 4, 3, 128, 3), (32, 2, 4, 128, 4),
                                                          (64, 4, 3, 64, 3), (128, 8, 3, 128, 3), (256, 8, 2, 256, 2)]]
    # prefill: every variant keeps the default's unmasked steps below the causal edge (the sweep before
    # session 14 built them without, so none could beat the default fairly)
    return [None, *piped] + [KernelConfig(block_q=rows // 4, block_n=n, num_warps=w, num_stages=st,
                                          unmasked_steps=True, loop_stages=ls)
                             for rows, n, w, st, ls in [(128, 128, 8, 2, 2), (128, 128, 8, 3, 3), (128, 64, 4, 2, 3),
                                                        (128, 32, 8, 2, 3), (64, 64, 4, 2, 3), (256, 64, 8, 2, 2),
                                                        (128, 64, 8, 2, 0), (128, 128, 8, 2, 0)]]


def row_line(r: dict) -> str:
    cfg = r.get("config")
    brief = cfg if isinstance(cfg, str) else (f"q{cfg['block_q']} n{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']} "
             f"l{cfg.get('loop_stages', 0)} "
             f"p{cfg['min_partition']}x{cfg['programs_per_sm']}"
             + ("" if cfg.get("direct_decode", True) else " search")) if cfg else ""
    return (f"{r['case']:30} {r['impl']:18} {r['ms'] * 1e3:8.1f} {r['bandwidth_tb_s']:5.2f} {r['of_read']:7.1%} "
            f"{r['tflops']:7.1f} {r['max_abs_err']:7.4f}  {brief}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="paged_attention.json")
    parser.add_argument("--sweep", action="store_true", help="also time tile-size variants")
    parser.add_argument("--varlen-sweep", action="store_true", help="time the varlen forward's variants only")
    parser.add_argument("--int8", action="store_true", help="int8 caches (codes + scales), decode cases")
    parser.add_argument("--cases", default="", help="comma-separated case labels to run (default: all)")
    cli = parser.parse_args()
    torch.manual_seed(0)
    copy, ceiling = memory_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy / 1e12:.2f} TB/s (read + write), read {ceiling / 1e12:.2f} TB/s")
    rows: list[dict] = []
    cases = [(f"decode B={b} ctx={c}", b, c, 1) for b in (1, 32, 128) for c in (128, 1024, 4096)]
    cases += [("decode B=64 ctx=192", 64, 192, 1)]  # a GRPO rollout's (64 sequences, 64 + 128 tokens)
    cases += [("prefill 2048 (full)", 1, 2048, 2048), ("prefill chunk 2048 @ ctx 4096", 1, 4096, 2048),
              ("prefill 8 x 512 (full)", 8, 512, 512)]  # an offline mixed step's fresh prompts
    sweep_cases = {"decode B=1 ctx=4096", "decode B=32 ctx=1024", "decode B=128 ctx=4096", "prefill 2048 (full)",
                   "prefill 8 x 512 (full)"}
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'case':30} {'impl':18} {'us':>8} {'TB/s':>5} {'of read':>7} {'TFLOP/s':>7} {'max err':>7}  config")
    chosen = {c.strip() for c in cli.cases.split(",") if c.strip()}
    for label, b, c, q_len in cases:
        if (chosen and label not in chosen) or (cli.int8 and q_len != 1):
            continue
        swept = cli.sweep and (label in sweep_cases or bool(chosen))
        configs = variants(q_len == 1, int8=cli.int8) if swept else [None]
        if q_len == 1 and not cli.int8:  # the decode default against the same tiles finding sequences by search
            configs.insert(1, replace(default_config(decode=True, group=HQ // HKV, head_dim=D), direct_decode=False))
        for r in measure(label, b, c, q_len, ceiling, configs, int8=cli.int8, sweep=swept or cli.varlen_sweep):
            rows.append(r)
            print(row_line(r), flush=True)
            out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           copy_bandwidth_tb_s=copy / 1e12,
                                           read_bandwidth_tb_s=ceiling / 1e12, rows=rows), indent=1))
    if not cli.int8 and (not chosen or "mixed step" in chosen):
        for r in mixed_step_rows(ceiling):
            rows.append(r)
            print(row_line(r), flush=True)
        out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       copy_bandwidth_tb_s=copy / 1e12, read_bandwidth_tb_s=ceiling / 1e12,
                                       rows=rows), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
