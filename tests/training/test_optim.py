"""LoRA+ parameter groups against peft's create_loraplus_optimizer on the same models."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

from splice.lora.apply import add_lora
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.training.optim import param_groups
from tests import tiny

CASES = [  # (model, targets, DoRA, trainable extra: PEFT's bias="all" has no splice equivalent)
    (tiny.llama, ["q_proj", "v_proj", "embed_tokens"], False),
    (tiny.llama, ["q_proj", "o_proj", "down_proj"], True),
    (tiny.gpt2, ["c_attn", "c_proj"], True),
    (tiny.conv_net, ["0", "2"], True),
]


# Within a group the order differs (a DoRA layer holds its magnitude itself, PEFT in a ModuleDict after
# A and B) and does not matter to an optimizer: groups are compared as sorted names.
def _peft_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    names = {id(p): n.replace("base_model.model.", "").replace(".default", "").replace(".base_layer", "")
             for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def _splice_names(model: torch.nn.Module, groups: list[dict]) -> list[tuple[list[str], float, float]]:
    names = {id(p): n.replace(".fn.", ".").replace(".lora_magnitude_vector", ".lora_magnitude_vector.weight")
             for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize(("make", "targets", "dora"), CASES)
def test_groups_match_peft(make, targets, dora: bool) -> None:  # type: ignore[no-untyped-def]
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                        use_dora=dora))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.01)
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(targets=targets, rank=4, alpha=8, use_dora=dora))
    freeze(ours)
    groups = param_groups(ours, lr=2e-4, ratio=16, weight_decay=0.01)
    assert _splice_names(ours, groups) == _peft_names(theirs, optimizer)
    torch.optim.AdamW(groups)  # a valid torch optimizer spec


def test_layernorm_and_bias_parameters_skip_weight_decay() -> None:
    model = tiny.gpt2()
    add_lora(model, LoraConfig(targets=("c_attn",), rank=2))
    freeze(model, trainable=r"ln_f|c_attn\.base\.bias")  # a trained final LayerNorm and one bias
    groups = param_groups(model, lr=1.0, ratio=4.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for p in groups[3]["params"])
    assert "transformer.ln_f.weight" in no_decay and "transformer.ln_f.bias" in no_decay
    assert groups[3]["lr"] == 4.0 and groups[3]["weight_decay"] == 0.0
    assert all("lora_B" in names[id(p)] for p in groups[2]["params"])


def test_bad_ratio() -> None:
    with pytest.raises(ValueError, match="LoRA\\+ ratio"):
        param_groups(tiny.mlp(), lr=1e-3, ratio=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import json

    from tests.tiny import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("variants")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["alpha", "beta", "gamma", "delta"]
    with (root / "data.jsonl").open("w") as f:
        for i in range(32):
            f.write(json.dumps({"question": f"{words[i % 4]}?", "answer": words[(i + 1) % 4]}) + "\n")
    return root


def test_training_with_every_variant_learns_and_resumes(tiny_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from splice.training.loop import TrainConfig, train

    def config(out: str, **extra):  # type: ignore[no-untyped-def]
        options = dict(model=str(tiny_run / "model"), data=str(tiny_run / "data.jsonl"),
                       prompt_template="Q: {question}\nA: ", response_template="{answer}",
                       output_dir=str(tmp_path / out), steps=8, lr=1e-2, rank=4, alpha=8, dropout=0.1,
                       batch_size=4, max_length=32, eval_samples=0, compare_base=False, save_every=4,
                       warmup_steps=1, pack=False, device="cpu", dora=True, init="pissa_niter_2",
                       loraplus_ratio=4.0, schedule="constant")  # constant: a 4-step run is the 8-step one cut
        return TrainConfig(**{**options, **extra})

    full = train(config("full"))
    assert full.losses[-1] < full.losses[0] - 1.0
    saved = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["init_lora_weights"] == "pissa_niter_2"
    cut = train(config("cut", steps=4))
    rest = train(config("cut", resume=True))
    torch.testing.assert_close(torch.tensor(cut.losses + rest.losses), torch.tensor(full.losses),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="init must be default, gaussian, pissa"):
        config("bad", init="svd")
