"""splice.fused.projections: packing q/k/v and gate/up weights into one buffer keeps every output, and
packed() finds the concatenated weight only while the layout and the modules allow it."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from torch import nn

from splice.engine.runner import ModelRunner
from splice.engine.scheduler import Chunk, Sequence, StepPlan
from splice.fused.projections import lora_tail, pack_projections, packed
from splice.kernels import use_triton
from splice.kernels.swiglu import swiglu_packed, swiglu_reference
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.quant.linear import quantize_nf4
from tests import tiny
from tests.numerics import DEVICES, GPU, rel_err


def test_packing_keeps_the_models_outputs_and_parameters() -> None:
    model = tiny.llama()
    ids = tiny.tokens(seed=1, batch=2, length=9)
    with torch.no_grad():
        before = model(ids).logits
    names = [n for n, _ in model.named_parameters()]
    assert pack_projections(model) == 2 * len(model.model.layers)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert [n for n, _ in model.named_parameters()] == names
    attn = model.model.layers[0].self_attn
    pair = packed([attn.q_proj, attn.k_proj, attn.v_proj])
    assert pair is not None and pair[1] is None
    weight = pair[0]
    assert weight.shape[0] == sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.equal(weight[attn.q_proj.out_features:][: attn.k_proj.out_features], attn.k_proj.weight)
    assert weight.data_ptr() == attn.q_proj.weight.data_ptr()  # a view, no copy
    assert pack_projections(model) == 2 * len(model.model.layers)  # idempotent


def test_packed_weights_save_and_train_like_separate_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny.llama()
    pack_projections(model)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    twin = tiny.llama()
    twin.load_state_dict(safetensors.torch.load_file(str(path)))
    ids = tiny.tokens(seed=2, batch=1, length=7)
    loss = model(ids, labels=ids).loss
    loss.backward()  # full fine-tuning through the views
    twin_loss = twin(ids, labels=ids).loss
    twin_loss.backward()
    assert torch.equal(loss, twin_loss)
    mlp, twin_mlp = model.model.layers[1].mlp, twin.model.layers[1].mlp
    assert torch.allclose(mlp.up_proj.weight.grad, twin_mlp.up_proj.weight.grad)


def test_packed_is_none_unless_plain_linears_lie_back_to_back() -> None:
    model = tiny.llama()
    attn = model.model.layers[0].self_attn
    assert packed([attn.q_proj, attn.k_proj, attn.v_proj]) is None  # separate tensors
    pack_projections(model)
    attn.k_proj.weight = nn.Parameter(attn.k_proj.weight.detach().clone())  # moved out of the buffer
    assert packed([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    lora = tiny.llama()
    pack_projections(lora)
    add_lora(lora, LoraConfig(rank=2, targets=["q_proj"]))  # a wrapper: the projections run one by one
    attn = lora.model.layers[0].self_attn
    assert packed([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    assert packed([lora.model.layers[0].mlp.gate_proj, lora.model.layers[0].mlp.up_proj]) is not None


def test_the_engine_step_over_packed_projections_equals_separate_ones() -> None:
    model = tiny.llama()
    twin = copy.deepcopy(model)
    pack_projections(twin)
    prompt = tiny.tokens(seed=3, batch=1, length=11)[0].tolist()
    results = []
    for m in (model, twin):
        runner = ModelRunner(m, block_size=4, max_seqs=2, max_len=32, num_blocks=10, cuda_graphs=False)
        seq = Sequence(seq_id=0, tokens=prompt, prompt_len=len(prompt), max_tokens=1, arrival=0, block_ids=[1, 2, 3])
        with torch.inference_mode():  # the packed GEMM runs outside autograd only
            results.append(runner.execute(StepPlan(chunks=[Chunk(seq=seq, start=0, count=11, sample=True)])))
    assert rel_err(results[1], results[0]) < 1e-6


def test_swiglu_packed_reference_is_silu_of_the_first_half_times_the_second() -> None:
    gu = torch.randn(3, 1, 10)
    want = swiglu_reference(gu[..., :5], gu[..., 5:])
    if use_triton(gu):  # the kernel (Triton's interpreter): its sigmoid may differ from torch's in the last bit
        assert rel_err(swiglu_packed(gu), want) < 1e-6
    else:
        assert torch.equal(swiglu_packed(gu), want)


@GPU
def test_swiglu_packed_kernel_matches_the_reference() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        gu = torch.randn(37, 1, 2 * 1500, device="cuda", dtype=dtype)
        with torch.inference_mode():
            out = swiglu_packed(gu)
        want = swiglu_reference(gu[..., :1500].float(), gu[..., 1500:].float())
        assert out.shape == (37, 1, 1500)
        assert rel_err(out.float(), want) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_packed_projections_inside_an_adapter_banks_sites_add_every_rows_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from splice.engine.engine import Engine
    from splice.engine.sampling import SamplingParams
    from splice.fused.apply import fuse
    from splice.lora.bank import LoraBank, add_bank_sites, read_adapter
    from splice.lora.peft_io import load_adapter, save_adapter
    from splice.serve.service import linear_paths

    tokenizer = tiny.build_tiny_tokenizer()
    plan = [("a", ("q_proj", "v_proj")), ("b", "all-linear")]
    for seed, (name, targets) in enumerate(plan, start=1):
        trained = tiny.build_tiny_llama(len(tokenizer))
        add_lora(trained, LoraConfig(name=name, targets=targets, rank=4))
        tiny.randomize_lora(trained, seed=seed)
        save_adapter(trained, tmp_path / name, name=name)
    prompts = [list(tokenizer(p)["input_ids"]) for p in ("hello world", "the cat sat", "xyz 123", "a b c d")]
    names = ["a", "b", None, "b"]
    outputs = []
    for pack in (False, True):
        model = tiny.build_tiny_llama(len(tokenizer))
        sites = add_bank_sites(model, linear_paths(model))  # as splice serve does: every linear
        if pack:
            fuse(model, lora=False, rope=False)  # the packed gate/up path lives in the fused MLP
            assert pack_projections(model) == 2 * len(model.model.layers)
        bank = LoraBank.for_sites(model, sites, capacity=2, rank=4, dtype=torch.float32)
        host = {name: read_adapter(tmp_path / name, name=name) for name, _ in plan}
        engine = Engine(model, tokenizer, max_seqs=4, max_len=48, bank=bank, sites=list(sites.values()),
                        adapters=host)
        attn = model.model.layers[0].self_attn
        assert (packed([attn.q_proj, attn.k_proj, attn.v_proj]) is not None) == pack
        done = []
        for ids, name in zip(prompts, names, strict=True):
            from splice.engine.engine import Request
            request = Request(prompt_ids=ids, params=SamplingParams(max_tokens=6), adapter=name)
            engine.submit(request)
            done.append(request)
        while engine.busy:
            engine.step()
        outputs.append([r.generated for r in done])
    assert outputs[1] == outputs[0]
    for ids, name, got in zip(prompts, names, outputs[1], strict=True):
        alone = tiny.build_tiny_llama(len(tokenizer))
        if name is not None:
            load_adapter(alone, tmp_path / name, name=name)
        assert got == tiny.greedy_loop(alone, ids, 6), name


def test_lora_bases_pack_and_packed_lora_adds_each_projections_own_adapter() -> None:
    """pack_projections packs the plain bases under LoRA linears (``packed`` still refuses the LoRA group; with
    ``lora=True`` it gives the bases' weight). packed_lora then runs a fused q/k/v or gate/up group as three GEMMs
    over the bases and an engine call's group copies (mixed ranks and scales): each projection's own output side
    by side, to bf16 rounding. Only in inference, only inside the copies' block, never for disabled adapters."""
    from splice.fused.apply import fuse
    from splice.fused.modules import FusedSwiGLUMLP, packed_lora, packed_lora_groups
    from splice.lora.apply import adapters_disabled
    from splice.lora.casts import AdapterCasts
    from splice.lora.freeze import freeze

    model = tiny.llama(seed=2).to(torch.bfloat16)  # fp32 adapters over a bf16 base, as training keeps them
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear", rank_pattern={"k_proj": 2, "up_proj": 6},
                               alpha_pattern={"v_proj": 3.0}))
    tiny.randomize_lora(model, seed=4)
    freeze(model)
    fuse(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    casts = AdapterCasts(model, dtype=torch.bfloat16, groups=packed_lora_groups)
    casts.refresh()
    assert not casts.group_copies  # bases not packed yet: no group
    assert pack_projections(model) == 2 * len(model.model.layers)
    assert packed(qkv) is None and packed(qkv, lora=True) is not None
    assert packed(qkv, lora=True)[0].data_ptr() == attn.q_proj.base.weight.data_ptr()  # type: ignore[index]
    casts.refresh()
    assert len(casts.group_copies) == 2 * len(model.model.layers)
    # the stacked A lives in the rows packed after the bases (4 + 2 + 4 for q/k/v, 4 + 6 for gate/up)
    extended = lora_tail(qkv)
    assert extended is not None and extended.shape == (packed(qkv, lora=True)[0].shape[0] + 10, 32)  # type: ignore[index]
    a_copy = casts.group_copies[tuple(id(m.rewriter) for m in qkv)][0]
    assert a_copy.data_ptr() == extended[-10:].data_ptr()
    assert lora_tail(gate_up) is not None and lora_tail(gate_up).shape[0] == 2 * 64 + 10  # type: ignore[union-attr]
    x = torch.randn(5, 1, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert packed_lora(qkv, x) is None  # outside the copies' block
        want_qkv = torch.cat([m(x) for m in qkv], dim=-1)
        want_mlp = mlp.activation(x)
        with casts.active():
            got = packed_lora(qkv, x)
            assert got is not None and got.shape == want_qkv.shape
            assert rel_err(got, want_qkv) < 1e-2
            assert rel_err(packed_lora(gate_up, x), torch.cat([m(x) for m in gate_up], dim=-1)) < 1e-2  # type: ignore[arg-type]
            assert isinstance(mlp, FusedSwiGLUMLP) and rel_err(mlp.activation(x), want_mlp) < 2e-2
            with adapters_disabled(model):
                assert packed_lora(qkv, x) is None
    with casts.active():
        assert packed_lora(qkv, x) is None  # autograd on: training's own path
    base = torch.cat([m.base(x) for m in qkv], dim=-1)
    assert rel_err(want_qkv, base) > 0.1  # the adapters add something the check above would miss
    # the A rows after the bases feed the one-GEMM path: zeroing them must change the output (they are read)
    with torch.no_grad(), casts.active():
        extended[-10:].zero_()
        assert rel_err(packed_lora(qkv, x), want_qkv) > 0.05  # type: ignore[arg-type]
        casts.refresh()  # (an engine call rewrites them)
        assert rel_err(packed_lora(qkv, x), want_qkv) < 1e-2  # type: ignore[arg-type]


def test_bases_packed_before_the_adapters_came_have_no_tail_and_take_three_gemms() -> None:
    """Bases packed before LoRA was added have no rows after them: lora_tail is None, the group's A gets its own
    copy, and packed_lora still gives each projection's output (three GEMMs). A clone of one base (a load, a
    device move) unpacks the group: then no packed path at all."""
    from splice.fused.apply import fuse
    from splice.fused.modules import packed_lora, packed_lora_groups
    from splice.lora.casts import AdapterCasts
    from splice.lora.freeze import freeze

    model = tiny.llama(seed=2).to(torch.bfloat16)
    assert pack_projections(model)  # plain linears: no adapters, no rows after them
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    tiny.randomize_lora(model, seed=4)
    freeze(model)
    fuse(model)
    attn = model.model.layers[0].self_attn
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert packed(qkv, lora=True) is not None and lora_tail(qkv) is None
    casts = AdapterCasts(model, dtype=torch.bfloat16, groups=packed_lora_groups)
    casts.refresh()
    a_copy = casts.group_copies[tuple(id(m.rewriter) for m in qkv)][0]
    assert a_copy.untyped_storage().data_ptr() != attn.q_proj.base.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.cat([m(x) for m in qkv], dim=-1)
        with casts.active():
            assert rel_err(packed_lora(qkv, x), want) < 1e-2  # type: ignore[arg-type]
        attn.k_proj.base.weight.data = attn.k_proj.base.weight.data.clone()
        assert packed(qkv, lora=True) is None and lora_tail(qkv) is None


@pytest.mark.parametrize("device", DEVICES)
def test_sibling_nf4_projections_run_as_one_launch_with_the_one_by_one_logits(device: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-bit model's one-token engine step: q/k/v (and, on the GPU, gate/up: the fused MLP) each in one launch
    over their separate NF4 weights (nf4_group_output), the same logits as one launch per projection."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the NF4 kernels need a GPU, or TRITON_INTERPRET=1 set before pytest starts")
    import splice.engine.attention as attention
    import splice.fused.modules as modules
    import splice.fused.projections as projections

    model = tiny.llama(hidden=128, intermediate=256).to(device)
    quantize_nf4(model)
    grouped: list[bool] = []

    def counted(modules_: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
        out = projections.nf4_group_output(modules_, x)
        grouped.append(out is not None)
        return out

    def step(runner_model: nn.Module) -> torch.Tensor:
        runner = ModelRunner(runner_model, block_size=4, max_seqs=2, max_len=32, num_blocks=10, cuda_graphs=False)
        seq = Sequence(seq_id=0, tokens=[5], prompt_len=1, max_tokens=1, arrival=0, block_ids=[1])
        with torch.inference_mode():
            return runner.execute(StepPlan(chunks=[Chunk(seq=seq, start=0, count=1, sample=True)])).clone()

    monkeypatch.setattr(attention, "nf4_group_output", counted)
    monkeypatch.setattr(modules, "nf4_group_output", counted)
    one = step(copy.deepcopy(model))
    assert grouped and all(grouped) and len(grouped) == (4 if device == "cuda" else 2)  # 2 layers' q/k/v (+ gate/up)
    monkeypatch.setattr(attention, "nf4_group_output", lambda *_: None)
    monkeypatch.setattr(modules, "nf4_group_output", lambda *_: None)
    assert rel_err(one, step(copy.deepcopy(model))) < 1e-5
