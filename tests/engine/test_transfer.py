"""splice.engine.transfer: a step's tokens and logprobs packed into one tensor, brought to the host once."""

from __future__ import annotations

import pytest
import torch

from splice.engine.output import TokenLogprob
from splice.engine.sampling import token_logprobs
from splice.engine.transfer import ToHost, pack, unpack
from tests.numerics import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_alone_come_back_as_they_are(device: str) -> None:
    out = ToHost(rows=2, device=torch.device(device))
    out.start(pack(torch.tensor([5, 7, 9], device=device)))  # more rows than the buffer: it grows
    assert out.wait() == [5, 7, 9]
    assert unpack([5, 7, 9], 3, [], []) == ([5, 7, 9], [None, None, None])


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_of_the_rows_that_ask_come_back_with_the_tokens(device: str) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).to(device) * 4
    tokens = torch.tensor([3, 0, 49, 7], device=device)
    asked, tops = [1, 3], [0, 5]
    at = torch.tensor(asked, device=device)
    chosen, values, ids = token_logprobs(logits[at], tokens[at], max(tops))
    out = ToHost(rows=4, device=torch.device(device))
    out.start(pack(tokens, chosen, values, ids))
    got_tokens, found = unpack(out.wait(), 4, asked, tops)
    assert got_tokens == tokens.tolist() and found[0] is None and found[2] is None
    logp = torch.log_softmax(logits.double().cpu(), -1)
    assert found[1] == TokenLogprob(token=tokens[1].item(), logprob=float(chosen[0]), top=())
    row = found[3]
    assert row is not None and row.token == 7 and len(row.top) == 5
    assert row.logprob == pytest.approx(logp[3, 7].item(), abs=1e-6)
    assert [i for i, _ in row.top] == logits[3].topk(5).indices.tolist()
    assert [v for _, v in row.top] == pytest.approx(logp[3].topk(5).values.tolist(), abs=1e-6)


def test_token_ids_past_fp32_precision_stay_exact() -> None:
    tokens = torch.tensor([151_935, 2**24 + 1])
    packed = pack(tokens, torch.tensor([-0.5, -1.25]), torch.zeros(2, 1), torch.tensor([[2**24 + 3], [9]]))
    got, found = unpack(packed.tolist(), 2, [0, 1], [1, 1])
    assert got == [151_935, 2**24 + 1] and found[0] is not None and found[0].top == ((2**24 + 3, 0.0),)
