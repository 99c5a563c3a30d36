"""pack_projections runs on a model when a CUDA engine is built on it (splice.generate, GRPO's rollouts):
the model may be training, its optimizer made before. Packing must keep the Parameter objects (only
where their values live changes), so what holds them (an optimizer, DDP, hooks) keeps training the model.
"""

from __future__ import annotations

import torch

from splice.fused.projections import pack_projections, packed
from tests import tiny


def test_an_optimizer_made_before_packing_still_trains_the_packed_weights() -> None:
    model = tiny.llama()
    attn = model.model.layers[0].self_attn
    before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert pack_projections(model) == 2 * len(model.model.layers)
    assert all(p is before[name] for name, p in model.named_parameters())  # the same objects
    assert packed([attn.q_proj, attn.k_proj, attn.v_proj]) is not None
    start = attn.k_proj.weight.detach().clone()
    ids = tiny.tokens(seed=2, batch=1, length=7)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(attn.k_proj.weight, start)  # the model's own weight moved
    pair = packed([attn.q_proj, attn.k_proj, attn.v_proj])
    assert pair is not None and torch.equal(pair[0][attn.q_proj.out_features:][: attn.k_proj.out_features],
                                            attn.k_proj.weight)  # still one buffer, updated in place
