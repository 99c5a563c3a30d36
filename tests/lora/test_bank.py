"""splice.lora.bank: adapters packed per module into slots match the per-adapter path; adapters read
from folders (rsLoRA, rank/alpha patterns, PiSSA/OLoRA, DoRA) serve what PEFT computes."""

from __future__ import annotations

import os
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from splice.kernels import HAS_TRITON
from splice.kernels.multi_lora import multi_lora_reference
from splice.lora import bank as bank_module
from splice.lora.adapter_file import AdapterError
from splice.lora.apply import add_lora, lora_modules, use_adapters
from splice.lora.bank import (
    HostAdapter,
    LoraBank,
    add_bank_sites,
    add_packed_delta,
    bank_site,
    read_adapter,
    shared_input_groups,
    use_adapter_bank,
)
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from splice.lora.routing import Route, routed
from tests import tiny
from tests.numerics import GPU

INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                             reason="the kernels need a GPU or the Triton interpreter (TRITON_INTERPRET=1)")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model() -> torch.nn.Module:
    model = tiny.llama()
    add_lora(model, LoraConfig(name="first", targets=("q_proj", "v_proj"), rank=4))
    add_lora(model, LoraConfig(name="second", targets="all-linear", rank=8, alpha=4.0))
    add_lora(model, LoraConfig(name="emb", targets=("embed_tokens",), rank=2))
    tiny.randomize_lora(model, seed=4)
    return model


@pytest.mark.parametrize("length", [1, 5])
def test_bank_matches_per_adapter_routing_over_ranks_targets_and_base_rows(length: int) -> None:
    model = _model()
    ids = tiny.tokens(batch=5, length=length)
    rows = ["second", None, "first", "emb", "second"]
    with torch.no_grad():
        with use_adapters(model, rows):
            want = model(ids).logits
        with use_adapter_bank(model, rows) as bank:
            got = model(ids).logits
    assert bank.rank == 16 and set(bank.resident) == {"first", "second", "emb"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_host_adapters_served_through_bank_sites_with_lru(tmp_path: Path) -> None:
    trained = {}
    for name, targets, seed in (("a", ("q_proj",), 1), ("b", ("v_proj", "o_proj"), 2), ("c", ("q_proj",), 3)):
        model = tiny.llama()
        add_lora(model, LoraConfig(name=name, targets=targets, rank=4))
        tiny.randomize_lora(model, seed=seed)
        save_adapter(model, tmp_path / name, name=name)
        trained[name] = model
    host = {n: read_adapter(tmp_path / n, name=n) for n in trained}
    assert isinstance(host["a"], HostAdapter) and host["a"].nbytes > 0
    served = tiny.llama()
    paths = sorted({p for h in host.values() for p in h.weights})
    sites = add_bank_sites(served, paths)
    bank = LoraBank.for_sites(served, sites, capacity=2, rank=4, dtype=torch.float32)
    ids = tiny.tokens(batch=2)
    for pair in (("a", "b"), ("c", "a"), ("b", "c")):  # 3 adapters through 2 slots
        for name in pair:
            bank.put(host[name], keep=pair)
        with torch.no_grad(), routed(sites.values(), Route(rows=pair, bank=bank, slots=bank.slots(pair))):
            got = served(ids).logits
        assert set(bank.resident) == set(pair)
        for row, name in enumerate(pair):
            with torch.no_grad():
                want = trained[name](ids).logits[row]
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="in use"):
        bank.put(host["a"], keep=("b", "c"))


@GPU
def test_generate_on_gpu_routes_mixed_batches_through_the_bank(tiny_tokenizer, make_tiny_llama) -> None:
    from splice.generation.generate import generate

    model = make_tiny_llama()
    add_lora(model, LoraConfig(name="first", targets=("q_proj", "v_proj"), rank=4))
    add_lora(model, LoraConfig(name="second", targets="all-linear", rank=8))
    tiny.randomize_lora(model, seed=4)
    prompts = ["hello world", "the cat", "a b c", "xyz"]
    rows = ["first", None, "second", "first"]
    want = [generate(model, tiny_tokenizer, p, max_new_tokens=10, adapters=[r])[0] for p, r in zip(prompts, rows)]
    model.cuda()
    assert generate(model, tiny_tokenizer, prompts, max_new_tokens=10, adapters=rows) == want


def _serve(folder: Path, name: str, ids: torch.Tensor, *, base: bool = False) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of a fresh tiny Llama serving ``folder`` through bank sites: row 0 the adapter, row 1 none."""
    served = tiny.llama()
    host = read_adapter(folder, name=name, base=served if base else None)
    sites = add_bank_sites(served, host.weights)
    bank = LoraBank.for_sites(served, sites, capacity=1, rank=host.rank, dtype=torch.float32)
    bank.put(host)
    rows = (name, None)
    with torch.no_grad(), routed(sites.values(), Route(rows=rows, bank=bank, slots=bank.slots(rows))):
        return served(ids).logits, served


@pytest.mark.parametrize("peft_kwargs", [
    dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    dict(r=4, lora_alpha=8, target_modules="all-linear",
         rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 2, "down_proj": 6},
         alpha_pattern={r"self_attn\.(k|v)_proj": 3.0, "model.layers.0.mlp.up_proj": 32.0}),
])
def test_peft_adapters_served_through_the_bank_match_peft(tmp_path: Path, peft_kwargs: dict) -> None:
    """rsLoRA's alpha/sqrt(r), and rank/alpha patterns matched as PEFT matches them (regex keys)."""
    reference = tiny.peft_lora(tiny.llama(), **peft_kwargs)
    reference.save_pretrained(tmp_path)
    ids = tiny.tokens()
    got, _ = _serve(tmp_path, "x", ids)
    with torch.no_grad():
        want = reference(ids).logits
        base = tiny.llama()(ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)
    assert (want[0] - base[0]).abs().max() > 1e-2  # the adapter (and its scales) matter


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_and_olora_are_served_on_the_original_weights(tmp_path: Path, method: str) -> None:
    """``splice train --init pissa`` saves A, B of the residual base; the bank converts them as
    PEFT does ([A; A0], [B, -B0] with A0, B0 from the served weights) or refuses without them."""
    trained = tiny.llama()
    add_lora(trained, LoraConfig(targets=("q_proj", "v_proj", "up_proj"), rank=4, alpha=8, init=method))
    tiny.randomize_lora(trained, seed=6)  # training's stand-in: A, B far from A0, B0
    ids = tiny.tokens()
    with torch.no_grad():
        want = trained(ids).logits
    save_adapter(trained, tmp_path / "saved", name="default")
    with pytest.raises(AdapterError, match=f"init_lora_weights '{method}'.*residual base.*base=model.*"
                                           "convert_to_lora=True"):
        read_adapter(tmp_path / "saved", name="p")
    got, served = _serve(tmp_path / "saved", "p", ids, base=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = tiny.llama()(ids).logits
        # the base rows see the original weights (the bank changed none), and PEFT agrees
        in_peft = peft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "saved").eval()(ids).logits
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], in_peft[0], rtol=1e-4, atol=1e-4)
    assert (want[0] - base[0]).abs().max() > 1e-2
    # saved converted, the same adapter is a plain rank-2r LoRA: no base needed
    save_adapter(trained, tmp_path / "converted", convert_to_lora=True)
    plain, _ = _serve(tmp_path / "converted", "p", ids)
    torch.testing.assert_close(plain, got, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason(tmp_path: Path) -> None:
    for folder, config in (("niter", LoraConfig(targets=("q_proj",), rank=4, init="pissa_niter_2")),
                           ("dora", LoraConfig(targets=("q_proj",), rank=4, use_dora=True)),
                           ("emb", LoraConfig(targets=("embed_tokens",), rank=4))):
        model = tiny.llama()
        add_lora(model, config)
        save_adapter(model, tmp_path / folder)
    with pytest.raises(AdapterError, match="randomised SVD.*convert_to_lora=True"):
        read_adapter(tmp_path / "niter", name="n", base=tiny.llama())
    with pytest.raises(AdapterError, match="is a DoRA adapter: its magnitudes divide by the row norms of the "
                                           r"served weights W \+ s B A; pass base=model"):
        read_adapter(tmp_path / "dora", name="d")
    with pytest.raises(AdapterError, match="embed_tokens is an embedding or conv adapter: a LoRA bank holds linear LoRA only"):
        read_adapter(tmp_path / "emb", name="e")


def test_apply_takes_one_slot_per_row_or_per_token() -> None:
    model = _model()
    bank = LoraBank.from_model(model, ["first", "second"])
    path, _, layer = next(f for f in lora_modules(model) if f[0] == "model.layers.0.self_attn.q_proj")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 32, generator=g)
    per_token = torch.tensor([0, 1, -1, 1, 1, 0, 0, -1, -1, -1, 1, 0], dtype=torch.int32)
    want = y.clone()
    for t, slot in enumerate(per_token.tolist()):
        if slot >= 0:
            want.view(12, 32)[t] += bank.b[path][slot] @ (bank.a[path][slot] @ x.view(12, 32)[t])
    with torch.no_grad():
        torch.testing.assert_close(bank.apply(layer, x, y.clone(), per_token), want, rtol=1e-5, atol=1e-5)
        flat = bank.apply(layer, x.view(12, 1, 32), y.clone().view(12, 1, 32), per_token)  # the engine's (T, 1, H)
        torch.testing.assert_close(flat.view(3, 4, 32), want, rtol=1e-5, atol=1e-5)
        per_row = torch.tensor([1, -1, 0], dtype=torch.int32)
        torch.testing.assert_close(bank.apply(layer, x, y.clone(), per_row),
                                   bank.apply(layer, x, y.clone(), per_row.repeat_interleave(4)), rtol=0, atol=0)
        with pytest.raises(ValueError, match="5 routed slots fit neither the batch's 3 rows nor its 12 tokens"):
            bank.apply(layer, x, y.clone(), torch.zeros(5, dtype=torch.int32))


def _host_bank(device: str, *, adapters: int = 3, capacity: int = 4) -> tuple[torch.nn.Module, dict, LoraBank]:
    """A tiny Llama with bank sites on every linear of its layers and ``adapters`` random adapters of
    ranks 2, 4, 8, ... resident (adapter 1 leaves k_proj and up_proj out)."""
    served = tiny.llama().to(device)
    modules = dict(served.named_modules())
    paths = [p for p, m in modules.items() if isinstance(m, torch.nn.Linear) and ".layers." in p]
    sites = add_bank_sites(served, paths)
    bank = LoraBank.for_sites(served, sites, capacity=capacity, rank=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    for i in range(adapters):
        rank = 2 << (i % 3)
        weights = {}
        for path in paths:
            if i == 1 and path.endswith(("k_proj", "up_proj")):
                continue
            linear = modules[path]
            weights[path] = (torch.randn(rank, linear.in_features, generator=g) * 0.3,
                             torch.randn(linear.out_features, rank, generator=g) * 0.3)
        bank.put(HostAdapter(name=f"a{i}", weights=weights, rank=rank))
    return served, sites, bank


def test_shared_input_groups() -> None:
    shapes = {"l.0.attn.q_proj": (32, 32), "l.0.attn.k_proj": (32, 16), "l.0.attn.v_proj": (32, 16),
              "l.0.attn.o_proj": (32, 32), "l.0.mlp.up_proj": (32, 64), "l.0.mlp.down_proj": (64, 32),
              "l.1.attn.k_proj": (32, 16), "l.1.attn.v_proj": (32, 16), "l.1.mlp.gate_proj": (32, 64),
              "l.1.mlp.up_proj": (48, 64), "q_proj": (8, 8), "k_proj": (8, 8)}
    assert shared_input_groups(shapes) == [("l.0.attn.q_proj", "l.0.attn.k_proj", "l.0.attn.v_proj"),
                                           ("l.1.attn.k_proj", "l.1.attn.v_proj"), ("q_proj", "k_proj")]
    bank = LoraBank(shapes, capacity=2, rank=4, device=torch.device("cpu"), dtype=torch.float32, appliers={})
    a = bank.a["l.0.attn.k_proj"]
    assert a.shape == (2, 16, 32) and a._base is bank.a["l.0.attn.q_proj"]._base  # one (S, 3, R, K) storage
    assert bank.nbytes == sum(2 * 16 * (k + n) * 4 for k, n in shapes.values())


@KERNELS
@pytest.mark.parametrize("layout", ["tokens", "rows"])
def test_kernels_match_the_torch_path_with_one_shrink_per_group(layout: str, monkeypatch) -> None:
    """The engine's flat (T, 1, H) batch with a slot per token, or rows of tokens with a slot per row:
    the kernels add what the PyTorch path adds, with one shrink per layer for q/k/v and one for gate/up, all
    of the call's shrinks reading one tile plan (made once, kept by the call's route)."""
    device = KERNEL_DEVICE
    served, sites, bank = _host_bank(device)
    if layout == "tokens":
        ids = tiny.tokens(batch=20, length=1).to(device)
        slots = torch.tensor([0, 1, -1, 2, 2, 0, 1, 1, -1, 0, 2, 2, 2, 1, 0, -1, 0, 0, 1, 2], dtype=torch.int32)
    else:
        ids = tiny.tokens(batch=4, length=9).to(device)
        slots = torch.tensor([2, -1, 0, 1], dtype=torch.int32)
    shrinks, plans = [], []
    real = bank_module.multi_lora_shrink

    def counted(x, a, slots, **options):  # the real shrink, counted
        shrinks.append(a.dim())
        plans.append(options.get("plan"))
        return real(x, a, slots, **options)

    monkeypatch.setattr(bank_module, "multi_lora_shrink", counted)
    route = Route(bank=bank, slots=slots.to(device))
    with torch.no_grad(), routed(sites.values(), route):
        bank.kernels = False
        want = served(ids).logits
        bank.kernels = True
        got = served(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert shrinks == [4] * 8  # per layer: q/k/v, o, gate/up, down; every A passed as (S, G, R, K)
    assert plans[0] is not None and all(plan is plans[0] for plan in plans)


@KERNELS
def test_a_group_member_recomputes_when_its_input_changed() -> None:
    device = KERNEL_DEVICE
    served, sites, bank = _host_bank(device)
    attn = served.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 32, generator=g).to(device)
    slots = torch.tensor([1, 0, -1, 2, 0, 1], dtype=torch.int32, device=device)

    def check(name: str, x: torch.Tensor) -> None:
        path = f"model.layers.0.self_attn.{name}"
        base = getattr(attn, name).base(x)
        want = multi_lora_reference(x.view(6, 32), base.view(6, -1), bank.a[path], bank.b[path], slots)
        got = bank.apply(sites[path], x, base.clone(), slots)
        torch.testing.assert_close(got.view(6, -1), want, rtol=1e-5, atol=1e-5)

    bank.kernels = True
    with torch.no_grad():
        check("k_proj", x)  # out of order: k alone
        check("q_proj", x)  # q shrinks for q, k and v
        check("v_proj", x)  # reused
        check("k_proj", x.clone())  # another input object: recomputed
        x.mul_(2)  # changed in place: the version counter tells
        check("v_proj", x)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=KERNELS)])
def test_a_packed_gemm_gets_each_sites_delta(kernels: bool, monkeypatch) -> None:
    """A caller running q/k/v (or gate/up) as one GEMM adds the sites' deltas with add_packed_delta: one
    shrink for a whole group; other module lists (q and v) take a pass per module, same sums."""
    device = KERNEL_DEVICE if kernels else "cpu"
    served, sites, bank = _host_bank(device)
    bank.kernels = kernels
    attn, mlp = served.model.layers[0].self_attn, served.model.layers[0].mlp
    assert bank_site(attn.q_proj) is sites["model.layers.0.self_attn.q_proj"] and bank_site(attn) is None
    shrinks = []
    real = bank_module.multi_lora_shrink
    monkeypatch.setattr(bank_module, "multi_lora_shrink", lambda *a, **k: shrinks.append(1) or real(*a, **k))
    x = torch.randn(12, 1, 32, generator=torch.Generator().manual_seed(4)).to(device)
    slots = torch.tensor([2, 0, -1, 1, 1, 0, 2, -1, 0, 0, 1, 2], dtype=torch.int32, device=device)
    with torch.no_grad(), routed(sites.values(), Route(bank=bank, slots=slots)):
        for modules in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj], [attn.q_proj, attn.v_proj]):
            want = torch.cat([m(x) for m in modules], dim=-1)  # each site on its own
            shrinks.clear()
            y = torch.nn.functional.linear(x, torch.cat([m.base.weight for m in modules]))
            assert add_packed_delta(modules, x, y) is y
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
            assert len(shrinks) == kernels  # the kernels: one shrink each time (q's, reused by v)
        # gate/up into SwiGLU: with the kernels the expand runs inside it (no expand launch), y left as it was
        modules = [mlp.gate_proj, mlp.up_proj]
        gate, up = (m(x) for m in modules)
        y = torch.nn.functional.linear(x, torch.cat([m.base.weight for m in modules]))
        expands = []
        real_expand = bank_module.multi_lora_expand
        monkeypatch.setattr(bank_module, "multi_lora_expand", lambda *a, **k: expands.append(1) or real_expand(*a, **k))
        before = y.clone()
        h = add_packed_delta(modules, x, y, swiglu=True)
        torch.testing.assert_close(h, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
        assert h.shape == (12, 1, gate.shape[-1]) and not expands
        assert torch.equal(y, before) or not kernels  # (the PyTorch path adds into y, then takes SwiGLU)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=KERNELS)])
def test_a_gemm_not_yet_run_gets_the_same_sums_with_the_shrink_queued_first(kernels: bool, monkeypatch) -> None:
    """add_packed_delta given the GEMM as a function: the group's shrink is queued before the GEMM runs (with
    overlap_shrink on CUDA on a side stream, so the two overlap; the expand waits for it) and the sums are the same, bit for
    bit, as with the GEMM's output given; gate/up into SwiGLU too, and the per-module passes of a list that
    is no group (the shrink then runs after the GEMM)."""
    device = KERNEL_DEVICE if kernels else "cpu"
    served, sites, bank = _host_bank(device)
    bank.kernels, bank.overlap_shrink = kernels, True
    attn, mlp = served.model.layers[0].self_attn, served.model.layers[0].mlp
    order: list[str] = []
    real = bank_module.multi_lora_shrink

    def shrink(*args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("shrink" if kwargs.get("side") is None else "side shrink")
        return real(*args, **kwargs)

    monkeypatch.setattr(bank_module, "multi_lora_shrink", shrink)
    x = torch.randn(12, 1, 32, generator=torch.Generator().manual_seed(4)).to(device)
    slots = torch.tensor([2, 0, -1, 1, 1, 0, 2, -1, 0, 0, 1, 2], dtype=torch.int32, device=device)
    on_gpu = kernels and device == "cuda"
    with torch.no_grad(), routed(sites.values(), Route(bank=bank, slots=slots)):
        for modules, swiglu in (([attn.q_proj, attn.k_proj, attn.v_proj], False), ([mlp.gate_proj, mlp.up_proj], True),
                                ([attn.q_proj, attn.v_proj], False)):
            weight = torch.cat([m.base.weight for m in modules])

            def gemm() -> torch.Tensor:
                order.append("gemm")
                return torch.nn.functional.linear(x, weight)  # noqa: B023 - called before the loop moves on

            want = add_packed_delta(modules, x, gemm(), swiglu=swiglu)
            order.clear()
            got = add_packed_delta(modules, x, gemm, swiglu=swiglu)
            assert torch.equal(got, want)
            grouped = len(modules) > 2 or swiglu
            first = ("side shrink" if on_gpu else "shrink") if kernels and grouped else "gemm"
            assert order[0] == first and order.count("gemm") == 1
    if on_gpu:  # captured in a CUDA graph (the side stream becomes a branch of it), replayed on new inputs
        modules = [attn.q_proj, attn.k_proj, attn.v_proj]
        weight = torch.cat([m.base.weight for m in modules])

        def packed(gemm):  # type: ignore[no-untyped-def]  # a route per call: its memo keeps the slots' tile plan
            with torch.no_grad(), routed(sites.values(), Route(bank=bank, slots=slots)):
                return add_packed_delta(modules, x, gemm)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = packed(lambda: torch.nn.functional.linear(x, weight))
        g = torch.Generator().manual_seed(9)
        for _ in range(2):
            x.copy_(torch.randn(12, 1, 32, generator=g))
            slots.copy_(torch.randint(-1, 3, (12,), generator=g))
            graph.replay()
            torch.testing.assert_close(captured, packed(torch.nn.functional.linear(x, weight)), rtol=0, atol=0)


@GPU
@pytest.mark.parametrize("dora", [False, True])
def test_group_reuse_inside_a_cuda_graph_replays_new_slots(dora: bool) -> None:
    """q/k/v and gate/up sites captured in a CUDA graph (one shrink per group inside it) replay later
    slots and inputs, as the engine's decode graphs do; with a DoRA adapter resident too, and another put
    into a LoRA adapter's slot after the capture (factors written in place, the bank's version unchanged)."""
    served, sites, bank = _host_bank("cuda")
    if dora:
        bank.put(_random_dora(bank, "d1", rank=8, seed=1))
    layer = served.model.layers[1]
    x = torch.randn(24, 1, 32, device="cuda")
    slots = torch.full((24,), -1, dtype=torch.int32, device="cuda")

    def forward() -> list[torch.Tensor]:
        attn, mlp = layer.self_attn, layer.mlp
        with routed(sites.values(), Route(bank=bank, slots=slots)):
            return [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x), mlp.up_proj(x)]

    with torch.no_grad():
        forward()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = forward()
        g = torch.Generator().manual_seed(8)
        version = bank.version
        for step in range(3):
            if dora and step == 2:
                bank.drop("a0")
                bank.put(_random_dora(bank, "d2", rank=4, seed=2))
                assert bank.version == version
            x.copy_(torch.randn(24, 1, 32, generator=g))
            slots.copy_(torch.randint(-1, 3 + dora, (24,), generator=g))
            graph.replay()
            bank.kernels = False
            want = forward()
            bank.kernels = None
            for got, expected in zip(outs, want, strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---- DoRA ---------------------------------------------------------------------------------------------

def _biased() -> torch.nn.Module:
    """The tiny Llama with (non-zero) biases on every projection: DoRA's factor must not rescale them."""
    model = tiny.llama(attention_bias=True, mlp_bias=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model


def _peft_dora(folder: Path, *, seed: int = 5, **config) -> torch.nn.Module:
    """A PEFT DoRA adapter of :func:`_biased` saved to ``folder`` (the reference model returned): random
    A and B, magnitudes 0.6-1.4 x the row norms of ``W + s B A`` (a trained adapter's spread)."""
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    options.update(config)
    reference = tiny.peft_lora(_biased(), seed=seed, **options)
    tiny.spread_dora_magnitudes(reference, seed=seed)
    reference.save_pretrained(folder)
    return reference


def _bank_of(served: torch.nn.Module, host: list[HostAdapter], *, capacity: int, rank: int = 8):
    """Bank sites on every projection of ``served`` and a bank holding ``host``."""
    modules = dict(served.named_modules())
    sites = add_bank_sites(served, [p for p, m in modules.items() if isinstance(m, torch.nn.Linear) and ".layers." in p])
    bank = LoraBank.for_sites(served, sites, capacity=capacity, rank=rank, dtype=torch.float32)
    for adapter in host:
        bank.put(adapter)
    return sites, bank


def _routed_logits(served: torch.nn.Module, sites: dict, bank: LoraBank, rows: tuple, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), routed(sites.values(), Route(rows=rows, bank=bank, slots=bank.slots(rows))):
        return served(ids).logits


def test_dora_adapters_served_through_the_bank_match_peft_and_splice(tmp_path: Path) -> None:
    """A PEFT DoRA adapter (biases on every projection, rsLoRA and a rank pattern) read with the served
    model as base: the bank's rows equal PEFT's and splice's attached DoRA layers; a missing factor or one
    rescaling the bias would be off by far more than the tolerance."""
    reference = _peft_dora(tmp_path / "d", use_rslora=True, rank_pattern={"down_proj": 2})
    ids = tiny.tokens(batch=3)
    served = _biased()
    host = read_adapter(tmp_path / "d", name="d", base=served)
    assert set(host.dora) == set(host.weights) and len(host.dora) == 14
    sites, bank = _bank_of(served, [host], capacity=2)
    got = _routed_logits(served, sites, bank, ("d", None, "d"), ids)
    attached = _biased()
    load_adapter(attached, tmp_path / "d")
    with torch.no_grad():
        want, base, own = reference(ids).logits, _biased()(ids).logits, attached(ids).logits
    torch.testing.assert_close(got[0::2], want[0::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0::2], own[0::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base[1], rtol=0, atol=0)
    # the same A and B without the factor (plain LoRA), or with the bias rescaled too, are far off
    plain = HostAdapter(name="plain", weights=host.weights, rank=host.rank)
    unbiased = HostAdapter(name="unbiased", weights=host.weights, rank=host.rank,
                           dora={p: (g, torch.zeros_like(c)) for p, (g, c) in host.dora.items()})
    for wrong in (plain, unbiased):
        bank.put(wrong)
        assert (_routed_logits(served, sites, bank, (wrong.name,), ids[:1])[0] - want[0]).abs().max() > 1e-2


def test_dora_factor_is_the_row_norm_of_the_served_weights(tmp_path: Path) -> None:
    """g = m / ||W + s B A|| over each output row (dim 1 of (out, in)), fp32: pinned on one module."""
    _peft_dora(tmp_path / "d", target_modules=["k_proj"])
    served = _biased()
    host = read_adapter(tmp_path / "d", name="d", base=served)
    path = "model.layers.1.self_attn.k_proj"
    a, b = host.weights[path]  # b has the scale folded in
    linear = served.get_submodule(path)
    magnitude = next(v for k, v in load_file(tmp_path / "d" / "adapter_model.safetensors").items()
                     if path in k and "magnitude" in k)
    factor, shift = host.dora[path]
    want = magnitude / torch.linalg.norm(linear.weight.detach() + b @ a, dim=1)
    torch.testing.assert_close(factor, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(shift, (1 - want) * linear.bias.detach(), rtol=1e-6, atol=1e-7)
    assert factor.shape == (16,) and (factor - 1).abs().max() > 0.1


def _splice_lora(folder: Path, *, rank: int, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> torch.nn.Module:
    trained = _biased()
    add_lora(trained, LoraConfig(name="default", targets=targets, rank=rank))
    tiny.randomize_lora(trained, seed=seed)
    save_adapter(trained, folder)
    return trained


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=KERNELS)])
def test_a_mixed_batch_of_dora_lora_ranks_and_base_rows(tmp_path: Path, kernels: bool) -> None:
    """DoRA, LoRA r4, LoRA r8 and base rows in one batch (the DoRA adapter leaves o_proj out; the LoRA
    ones adapt paths it also adapts), each row equal to its adapter alone; eviction keeps it so."""
    references = {"d": _peft_dora(tmp_path / "d", target_modules=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]),
                  "r4": _splice_lora(tmp_path / "r4", rank=4, seed=1),
                  "r8": _splice_lora(tmp_path / "r8", rank=8, seed=2, targets="all-linear")}
    device = KERNEL_DEVICE if kernels else "cpu"
    served = _biased().to(device)
    host = [read_adapter(tmp_path / n, name=n, base=served) for n in references]
    sites, bank = _bank_of(served, host, capacity=3)
    bank.kernels = kernels
    rows = ("d", "r4", None, "r8", "d")
    ids = tiny.tokens(batch=5, length=6)
    got = _routed_logits(served, sites, bank, rows, ids.to(device)).cpu()
    with torch.no_grad():
        want = {n: m(ids).logits for n, m in references.items()} | {None: _biased()(ids).logits}
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], want[name][i], rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")


def test_a_lora_adapter_in_a_slot_a_dora_adapter_left_gets_no_factor(tmp_path: Path) -> None:
    """Eviction: a LoRA adapter loaded into the slot of an evicted DoRA adapter, while another DoRA
    adapter keeps the factors in use, runs as plain LoRA (its factors reset to one, shifts to zero); the
    DoRA adapter loaded back into a slot runs as DoRA again; with no DoRA adapter resident the bank
    applies no factor at all."""
    for name, seed in (("d1", 1), ("d2", 2)):
        _peft_dora(tmp_path / name, seed=seed)
    references = {"lora": _splice_lora(tmp_path / "lora", rank=4, seed=3),
                  "d1": peft.PeftModel.from_pretrained(_biased(), tmp_path / "d1").eval(),
                  "d2": peft.PeftModel.from_pretrained(_biased(), tmp_path / "d2").eval()}
    served = _biased()
    host = {n: read_adapter(tmp_path / n, name=n, base=served) for n in references}
    sites, bank = _bank_of(served, [host["d1"], host["d2"]], capacity=2)
    ids = tiny.tokens(batch=2, length=5)
    with torch.no_grad():
        want = {n: m(ids).logits for n, m in references.items()}

    def check(rows: tuple) -> None:
        got = _routed_logits(served, sites, bank, rows, ids)
        for i, name in enumerate(rows):
            torch.testing.assert_close(got[i], want[name][i], rtol=1e-5, atol=1e-5, msg=f"{rows}: {name}")

    slot = bank.resident["d1"]
    assert bank.put(host["lora"], keep=("d2",)) == slot  # d1 out, its slot reused
    check(("lora", "d2"))
    assert bank.put(host["d1"], keep=("lora",)) != slot  # d2 out: d1 back, in d2's old slot
    check(("d1", "lora"))
    version = bank.version
    bank.drop("d1")
    assert not bank._rescaled and bank.version == version + 1  # LoRA only: the expand applies no factor
    check(("lora", "lora"))


def test_packed_projections_add_dora_with_the_concatenated_factors(tmp_path: Path, monkeypatch) -> None:
    """pack_projections' one GEMM over q/k/v (gate/up), with their biases: add_packed_delta gives each
    projection's DoRA output, whether the kernels run the group at once or the PyTorch path per module."""
    from splice.fused.projections import pack_projections, packed

    _peft_dora(tmp_path / "d", target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
    _splice_lora(tmp_path / "l", rank=8, seed=4, targets=("k_proj", "v_proj", "up_proj"))
    served = _biased().to(KERNEL_DEVICE)  # the kernels' device: CUDA, or the CPU under the interpreter
    assert pack_projections(served) == 4
    sites, bank = _bank_of(served, [read_adapter(tmp_path / n, name=n, base=served) for n in "dl"], capacity=2)
    attn, mlp = served.model.layers[1].self_attn, served.model.layers[1].mlp
    x = torch.randn(7, 1, 32, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)
    slots = torch.tensor([0, 1, -1, 0, 1, 1, 0], dtype=torch.int32, device=KERNEL_DEVICE)
    for kernels in (False, True) if (torch.cuda.is_available() or INTERPRETED) else (False,):
        bank.kernels = kernels
        with torch.no_grad(), routed(sites.values(), Route(bank=bank, slots=slots)):
            for modules in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
                want = torch.cat([m(x) for m in modules], dim=-1)  # each site on its own
                weight, bias = packed(modules)
                y = add_packed_delta(modules, x, torch.nn.functional.linear(x, weight, bias))
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
                if len(modules) == 2:  # DoRA's factor on gate/up: SwiGLU after the unfused expand
                    h = add_packed_delta(modules, x, torch.nn.functional.linear(x, weight, bias), swiglu=True)
                    torch.testing.assert_close(h, torch.nn.functional.silu(want[..., :64]) * want[..., 64:],
                                               rtol=1e-5, atol=1e-5)
                base = torch.cat([m.base(x) for m in modules], dim=-1)
                assert (base - want)[slots == 0].abs().max() > 1e-2  # slot 0: the DoRA adapter


def test_model_attached_dora_layers_join_the_bank() -> None:
    """use_adapter_bank (what splice.generate's mixed batches use) packs splice's own DoRA layers with
    the LoRA ones: the same logits per row as routing each adapter by name."""
    model = _biased()
    add_lora(model, LoraConfig(name="dora", targets="all-linear", rank=4, use_dora=True))
    add_lora(model, LoraConfig(name="lora", targets=("q_proj", "up_proj"), rank=8))
    tiny.randomize_lora(model, seed=7)
    tiny.spread_dora_magnitudes(model)
    ids = tiny.tokens(batch=4, length=5)
    rows = ["dora", None, "lora", "dora"]
    with torch.no_grad():
        with use_adapters(model, rows):
            want = model(ids).logits
        with use_adapter_bank(model, rows) as bank:
            got = model(ids).logits
    assert set(bank.resident) == {"dora", "lora"} and len(bank._rescaled) == 14
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _random_dora(bank: LoraBank, name: str, *, rank: int, seed: int) -> HostAdapter:
    """A DoRA adapter on every module of ``bank``: random A, B, factors 0.6-1.4 and shifts."""
    g = torch.Generator().manual_seed(seed)
    weights, dora = {}, {}
    for path in bank.a:
        k, n = bank.a[path].shape[2], bank.b[path].shape[1]
        weights[path] = (torch.randn(rank, k, generator=g) * 0.3, torch.randn(n, rank, generator=g) * 0.3)
        dora[path] = (0.6 + 0.8 * torch.rand(n, generator=g), torch.randn(n, generator=g))
    return HostAdapter(name=name, weights=weights, rank=rank, dora=dora)
