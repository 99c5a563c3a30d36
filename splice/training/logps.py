"""Per-token log-probabilities of given tokens, through the head without the full logits.

Preference and reward losses (DPO, GRPO) need ``log p(y_t | y_<t)`` of each answer token, not a
cross-entropy summed over the batch. With the decoder's last hidden state ``h`` (B, T, H), the
head ``W`` (V, H) and bias ``b``, and unshifted ``labels`` (B, T) (-100: not an answer token)::

    z_{b,t}      = h_{b,t} W^T + b                                           (V,)
    logp[b, t]   = z_{b,t}[labels[b, t+1]] - logsumexp(z_{b,t})   where labels[b, t+1] != -100
                 = 0                                               elsewhere       -> (B, T-1)

Only positions with a target go through the head, in chunks of ``chunk_size`` rows; each chunk
runs under non-reentrant activation checkpointing, so backward recomputes its (chunk, V) logits
instead of keeping them: the peak extra memory is one chunk's logits, as in the fused SFT loss.
Softmax in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from splice.data.rows import IGNORE_INDEX
from splice.training.loss import lm_head_params, model_hidden_states

__all__ = ["selected_logps", "selected_logps_reference", "token_logps"]


def _chunk_logps(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """(c,) fp32 log-probs of ``targets`` (c,) under the logits of ``rows`` (c, H)."""
    logits = (rows @ weight.to(rows.dtype).T).float()  # (c, V)
    if bias is not None:
        logits = logits + bias.float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def selected_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *,
                   chunk_size: int = 1024) -> Tensor:
    """``logp`` (B, T-1) fp32 of the module doc from ``hidden`` (B, T, H) and ``labels`` (B, T)."""
    targets = labels[:, 1:].to(hidden.device)  # (B, T-1): position t predicts labels[t + 1]
    b_idx, t_idx = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    rows = hidden[:, :-1][b_idx, t_idx]  # (N, H): only the positions with a target
    ids = targets[b_idx, t_idx]
    if torch.is_autocast_enabled(rows.device.type):  # the head's matmul in the autocast dtype, as lm_head
        rows = rows.to(torch.get_autocast_dtype(rows.device.type))
    parts = [checkpoint(_chunk_logps, rows[s:s + chunk_size], weight, bias, ids[s:s + chunk_size],
                        use_reentrant=False) if torch.is_grad_enabled() else
             _chunk_logps(rows[s:s + chunk_size], weight, bias, ids[s:s + chunk_size])
             for s in range(0, rows.shape[0], chunk_size)]
    picked = torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((b_idx, t_idx), picked)


def selected_logps_reference(logits: Tensor, labels: Tensor) -> Tensor:
    """The same from full ``logits`` (B, T, V): log_softmax and gather (tests' reference)."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(2, torch.where(keep, targets, 0)[..., None])[..., 0]
    return torch.where(keep, picked, torch.zeros_like(picked))


def token_logps(model: nn.Module, *, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                chunk_size: int = 1024) -> Tensor:
    """(B, T-1) fp32 log-probs of each answer token (``labels[:, t+1]``, -100 elsewhere: 0) under
    ``model`` (a Hugging Face causal LM, LoRA or not; inside ``adapters_disabled`` the reference)."""
    hidden = model_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    weight, bias = lm_head_params(model)
    return selected_logps(hidden, weight, bias, labels, chunk_size=chunk_size)
