"""The rewriter: around/replace rewrites, composition, shared modules, errors, unrewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.core.rewrite import Around, Replace, kind_of, nodes
from tests import tiny


def relu_to_tanh(node: splice.Node):
    return (lambda x, y: torch.tanh(x)) if node.kind == "relu" else None


def test_relu_becomes_tanh_like_the_seed() -> None:
    model = tiny.mlp()
    x = torch.randn(5, 8)
    l0, l2, l4 = model[0], model[2], model[4]
    expected = l4(torch.tanh(l2(torch.tanh(l0(x)))))
    assert splice.rewrite(model, relu_to_tanh) == ["1", "3"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_around_gets_input_and_original_output() -> None:
    model = tiny.mlp()
    x = torch.randn(2, 8)
    seen = {}

    def spy(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        seen["x"], seen["y"] = inp, out
        return out * 2

    reference = model[0](x)
    splice.rewrite(model, lambda n: spy if n.name == "0" else None)
    model(x)
    torch.testing.assert_close(seen["x"], x)
    torch.testing.assert_close(seen["y"], reference)


def test_replace_runs_instead_of_the_original() -> None:
    model = tiny.mlp()
    calls = []
    original = model[0]
    original.register_forward_hook(lambda *a: calls.append("original"))
    new = nn.Linear(8, 16)
    splice.rewrite(model, lambda n: Replace(new) if n.name == "0" else None)
    x = torch.randn(2, 8)
    assert model[0] is new
    torch.testing.assert_close(model(x), model[4](model[3](model[2](model[1](new(x))))))
    assert calls == []


def test_kinds_of_common_modules() -> None:
    from transformers.pytorch_utils import Conv1D

    assert kind_of(nn.Linear(2, 2)) == "linear"
    assert kind_of(nn.Embedding(3, 2)) == "embedding"
    assert kind_of(nn.Conv2d(1, 1, 1)) == "conv2d"
    assert kind_of(nn.ReLU()) == "relu"
    assert kind_of(Conv1D(4, 2)) == "conv1d"
    assert kind_of(nn.MultiheadAttention(4, 2).out_proj) == "linear"
    assert kind_of(Around(nn.Linear(2, 2), lambda x, y: y)) == "linear"


def test_rewrites_compose_and_wrappers_are_leaves() -> None:
    model = tiny.mlp()
    x = torch.randn(3, 8)
    base = model(x)
    splice.rewrite(model, lambda n: (lambda x, y: y + 1) if n.kind == "linear" else None)
    # The second walk sees the wrapped linears as linears (not their inner .base again).
    names = splice.rewrite(model, lambda n: (lambda x, y: y * 2) if n.kind == "linear" else None)
    assert names == ["0", "2", "4"]
    assert isinstance(model[0], Around) and isinstance(model[0].base, Around)
    splice.unrewrite(model)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_shared_module_is_rewritten_once_at_every_path() -> None:
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(4, 4)})
    calls: list[str] = []

    def rule(node: splice.Node):
        if node.kind != "linear":
            return None
        calls.append(node.name)
        return lambda x, y: y

    names = splice.rewrite(model, rule)
    assert calls == ["a", "c"] and names == ["a", "c"]
    assert model["a"] is model["b"] and isinstance(model["a"], Around)
    node = next(n for n in nodes(model) if n.name == "a")
    assert node.paths == ("a", "b")
    splice.unrewrite(model)
    assert model["a"] is shared and model["b"] is shared


def test_nothing_matched_lists_what_it_saw() -> None:
    model = tiny.mlp()
    with pytest.raises(splice.NothingMatchedError, match=r"linear x3 \(e\.g\. 0, 2\).*relu x2"):
        splice.rewrite(model, lambda n: None)
    assert splice.rewrite(model, lambda n: None, allow_empty=True) == []


def test_bad_rewriter_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="return None to skip"):
        splice.rewrite(tiny.mlp(), lambda n: 3 if n.kind == "relu" else None)  # type: ignore[return-value, arg-type]


def test_unrewrite_restores_original_modules_exactly() -> None:
    model = tiny.llama()
    originals = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    splice.rewrite(model, lambda n: (lambda x, y: y) if n.kind == "llamarmsnorm" else None)
    restored = splice.unrewrite(model)
    assert len(restored) == 14 + 5  # 7 linears x 2 layers, 2x2 layer norms + final norm
    assert all(originals[name] is module for name, module in model.named_modules())
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_unrewrite_select_and_replace_keep_original() -> None:
    model = tiny.mlp()
    first, last = model[0], model[4]
    splice.rewrite(model, lambda n: Replace(nn.Identity()) if n.name in ("0", "4") else None)
    assert splice.unrewrite(model, select=r"^4$") == ["4"]
    assert model[4] is last and isinstance(model[0], nn.Identity)
    splice.unrewrite(model)
    assert model[0] is first


def test_works_on_gpt2_conv1d_and_hf_models() -> None:
    model = tiny.gpt2()
    kinds = {n.kind for n in nodes(model)}
    assert {"conv1d", "embedding", "linear"} <= kinds
    names = splice.rewrite(model, lambda n: (lambda x, y: y) if n.kind == "conv1d" else None)
    assert names[0] == "transformer.h.0.attn.c_attn" and len(names) == 8


def test_replacement_children_are_walked_but_around_internals_are_not() -> None:
    class Doubled(nn.Module):  # a replacement holding the original's child at the same path
        def __init__(self, inner: nn.Sequential) -> None:
            super().__init__()
            self.first = inner[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.first(x)

    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    splice.rewrite(model, lambda n: Replace(Doubled(n.module)) if n.name == "0" else None)
    # The inner linear is still a node (at "0.first"); LoRA's own linears inside an Around are not.
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    assert [n.name for n in nodes(model) if n.kind == "linear"] == ["0.first"]
