"""Causal language-model loss computed outside ``model.forward``, without the full logits.

A causal LM's loss is ``mean_i CE(h_i W^T + b, y_i)`` over the target tokens ``i``. Computing it
through ``model(...).logits`` materialises an (N, V) logits tensor (N tokens, V vocab) plus its
fp32 upcast and its gradient: for 8k tokens and a 128k vocab that is 4 GiB each. Here the decoder
runs without its head (:func:`model_hidden_states`) and :func:`causal_lm_loss` picks the hidden
rows that have a target and feeds them, with the head's weight (:func:`lm_head_params`), to the
chunked fused linear + cross-entropy of :mod:`splice.kernels.linear_cross_entropy`, whose peak
extra memory is one (chunk, V) logits block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.context import causal_only
from splice.core.rewrite import Around
from splice.data.batching import Batch
from splice.fused.varlen import PACKING_KWARG, Packing, varlen_unsupported
from splice.kernels import use_triton
from splice.kernels.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "causal_lm_loss",
    "check_labels",
    "lm_head_params",
    "train_step_loss",
    "model_hidden_states",
    "naive_causal_lm_loss",
]

_REDUCTIONS = ("mean", "sum")
PACKED_ATTENTION = ("auto", "varlen", "mask")  # how packed rows attend (model_hidden_states)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _shifted_targets(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Flat row indices into the (B*T, H) hidden states and the target ids they predict.

    Position ``t`` of row ``b`` predicts ``labels[b, t + 1]``; the last position predicts nothing.
    Only rows whose target is not ``ignore_index`` are returned, so ignored tokens (prompts,
    padding) cost no matmul at all.
    """
    batch, time = labels.shape
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != ignore_index
    b_idx, t_idx = keep.nonzero(as_tuple=True)  # one host sync: the loop needs the row count
    return b_idx * time + t_idx, targets[b_idx, t_idx]


def _check_inputs(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, lm_head_bias: Tensor | None, *,
                  reduction: str) -> int:
    """Raise on inputs :func:`causal_lm_loss` cannot take (naming the fix); returns the vocab size."""
    _check_reduction(reduction)
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden must be (batch, seq, hidden), got shape {tuple(hidden.shape)}; "
            "pass the decoder's last hidden state, e.g. from splice.training.loss.model_hidden_states"
        )
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's (batch, seq) "
            f"{tuple(hidden.shape[:2])}; labels are unshifted (usually labels = input_ids with "
            "ignored positions set to ignore_index)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be (vocab, hidden={hidden.shape[-1]}), got "
            f"{tuple(lm_head_weight.shape)}; pass the output head's weight (lm_head_params)"
        )
    vocab = int(lm_head_weight.shape[0])
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be ({vocab},), got {tuple(lm_head_bias.shape)}")
    if not hidden.is_floating_point() or not lm_head_weight.is_floating_point():
        raise TypeError(
            f"hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) must be floating "
            "point; a quantized head cannot be used here: compute logits with the model instead"
        )
    return vocab


def causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "mean",
    lm_head_bias: Tensor | None = None,
    static_shapes: bool = False,
) -> Tensor:
    """Next-token cross-entropy of ``hidden @ lm_head_weight.T (+ bias)`` against shifted ``labels``.

    ``hidden`` (B, T, H) is the decoder's last hidden state (after the final norm); ``labels``
    (B, T) are *not* shifted: position ``t`` predicts ``labels[:, t + 1]``, and targets equal to
    ``ignore_index`` are skipped. With ``S`` the non-ignored (b, t) pairs and
    ``z = hidden[b, t] W^T + bias``::

        loss_sum  = sum_{(b,t) in S} logsumexp(z) - z[labels[b, t + 1]]
        "mean": loss_sum / |S|  (0 with a zero gradient when S is empty)   "sum": loss_sum

    (with gradient accumulation, use "sum" and divide by the total target count yourself).
    Never builds the (|S|, V) logits: rows go through in chunks of ``chunk_size``, each chunk's
    logits computed in the inputs' dtype and upcast to fp32 for the softmax. Gradients are made in
    the forward pass: wrt ``hidden`` in its dtype, wrt the weight (only when it requires grad, so a
    frozen LoRA head costs no extra matmul) and bias accumulated in fp32 and cast to their dtype.
    The matmuls run in ``promote_types(hidden.dtype, weight.dtype)``, or in the autocast dtype when
    that is float32 and autocast is on (as ``lm_head`` would under autocast). Returns a float32
    scalar (float64 for float64 inputs).

    ``static_shapes=True`` makes the call free of host syncs (as capture in a CUDA graph needs,
    see :mod:`splice.training.graphs`): every position goes through the head, ignored ones weighted 0,
    instead of selecting the target rows first (which needs their count on the host); label ids
    are range-checked only when ``labels`` are on the CPU. Same result, more head FLOPs when many
    positions are ignored.
    """
    vocab = _check_inputs(hidden, lm_head_weight, labels, lm_head_bias, reduction=reduction)
    if not static_shapes or labels.device.type == "cpu":
        check_labels(labels, vocab=vocab, ignore_index=ignore_index)
    valid: Tensor | None = None
    row_weight: float | Tensor
    if static_shapes:
        targets = labels[:, 1:].to(hidden.device)  # (B, T-1)
        valid_b = targets != ignore_index
        targets = torch.where(valid_b, targets, torch.zeros_like(targets)).reshape(-1)
        valid = valid_b.reshape(-1)
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
        row_weight = (1.0 / valid.sum().clamp(min=1).float()) if reduction == "mean" else 1.0
    else:
        flat_index, targets = _shifted_targets(labels.to(hidden.device), ignore_index)
        # (B*T, H) is a view when hidden is contiguous; index_select copies only the target rows.
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)
        n_targets = targets.numel()
        row_weight = 1.0 / n_targets if reduction == "mean" and n_targets > 0 else 1.0
    return linear_cross_entropy(rows, lm_head_weight, targets, bias=lm_head_bias, row_weight=row_weight,
                                valid=valid, chunk_size=chunk_size)


def check_labels(labels: Tensor, *, vocab: int, ignore_index: int = -100) -> None:
    """Raise unless every target id in ``labels`` (B, T) (past position 0, not ignored) is a
    token id below ``vocab`` (a host sync when ``labels`` are on a GPU)."""
    targets = labels[:, 1:]
    targets = targets[targets != ignore_index]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"labels contain ids outside [0, {vocab}) (min {int(targets.min())}, max "
            f"{int(targets.max())}); mask ignored positions with ignore_index={ignore_index}"
        )


def naive_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The reference: shift, upcast the (B, T, V) ``logits`` to fp32 and call ``F.cross_entropy``.

    Same definition as :func:`causal_lm_loss` (``logits[:, t]`` predicts ``labels[:, t + 1]``;
    "mean" over non-ignored targets, 0 when there are none; "sum"), but it holds the full logits.
    Inputs in float64 stay float64 (for reference computations).
    """
    _check_reduction(reduction)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (batch, seq, vocab) and labels (batch, seq); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(dtype)
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shifted, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def _decoder(model: nn.Module) -> nn.Module:
    """The model's decoder stack (embeddings, blocks, final norm), without the output head."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    prefix = getattr(model, "base_model_prefix", "")
    for name in (prefix, "model", "transformer"):  # HF's own prefix, Llama-likes, GPT-2-likes
        child = getattr(model, name, None) if name else None
        if isinstance(child, nn.Module):
            return child
    raise TypeError(
        f"cannot find the decoder of {type(model).__name__}: expected a Hugging Face causal LM "
        "with get_decoder() or a .model / .transformer / base_model_prefix submodule; compute "
        "model(...).logits and use naive_causal_lm_loss instead"
    )


def _packing(decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
             kwargs: dict[str, Any], mode: str) -> Packing | None:
    """The segments to attend through the varlen kernel, or None for Hugging Face's masked path (see
    :func:`model_hidden_states`); raises when ``mode="varlen"`` cannot be honoured."""
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"packed_attention must be one of {', '.join(PACKED_ATTENTION)}, got {mode!r}")
    packed = (position_ids is not None and attention_mask is None and input_ids.dim() == 2
              and kwargs.get("past_key_values", kwargs.get("cache")) is None)
    if mode == "mask" or (mode == "auto" and not (packed and use_triton(input_ids))):
        return None
    reason = varlen_unsupported(decoder) if packed else "it takes packed rows: position_ids and no attention_mask"
    if reason is not None:
        if mode == "varlen":
            raise ValueError(f"packed_attention='varlen' cannot run: {reason}")
        return None
    assert position_ids is not None
    return Packing.from_position_ids(position_ids.expand_as(input_ids))


def model_hidden_states(
    model: nn.Module,
    *,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    packed_attention: str = "auto",
    **kwargs: Any,
) -> Tensor:
    """Run a Hugging Face causal LM's decoder without its head; returns the last hidden state.

    The result (B, T, H) is what the head would multiply: ``model(...).logits == hidden @ W^T``
    (+ bias). Works through splice rewrites (``Around`` wrappers inside the decoder are ordinary
    modules). Extra ``kwargs`` go to the decoder; no KV cache is built.

    Packed rows (``position_ids`` restarting per segment, no ``attention_mask``): ``packed_attention="varlen"``
    attends within each segment through :mod:`splice.fused.varlen` (the varlen kernel, no mask built); it
    needs every attention module to take packed rows (``splice.fuse`` on Llama, or
    ``install_varlen_attention``) and raises otherwise. ``"mask"``: Hugging Face's block-diagonal mask.
    ``"auto"`` (default): varlen when the model takes it and the Triton kernel runs (a GPU), else the mask.
    """
    decoder = _decoder(model)
    kwargs.setdefault("use_cache", False)
    # No mask and no position ids: plain causal attention (lets splice's fused attention skip the explicit
    # mask Hugging Face builds inside a CUDA-graph capture).
    plain = attention_mask is None and position_ids is None and kwargs.get("past_key_values") is None
    packing = _packing(decoder, input_ids, attention_mask, position_ids, kwargs, packed_attention)
    if packing is not None:  # the decoder runs plain causal (no mask built); the packing carries the segments
        kwargs[PACKING_KWARG], position_ids = packing, None
    with causal_only(plain):
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise TypeError(
            f"the decoder of {type(model).__name__} returned no (batch, seq, hidden) last hidden "
            "state; compute model(...).logits and use naive_causal_lm_loss instead"
        )
    return hidden


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output head's ``(weight (V, H), bias (V,) or None)``: logits = ``h @ weight.T + bias``.

    Raises (does not fall back) when the head cannot be expressed that way: it is wrapped by a
    splice rewrite (e.g. LoRA on ``lm_head``), replaced by a non-float (quantized) module, or the
    model post-processes its logits (Gemma-2 final softcapping, Cohere logit scale). In those
    cases compute ``model(...).logits`` and use :func:`naive_causal_lm_loss`.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None); "
            "pass a causal LM such as LlamaForCausalLM, not the bare decoder"
        )
    if isinstance(head, Around):
        raise ValueError(
            "the output head is wrapped by a splice rewrite (e.g. LoRA targets lm_head), so its "
            "output is not hidden @ weight.T: leave lm_head out of the LoRA targets to use the "
            "fused loss, or compute model(...).logits and use naive_causal_lm_loss"
        )
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(config, "logit_scale", None)
    if softcap is not None or (logit_scale is not None and logit_scale != 1.0):
        raise ValueError(
            f"{type(model).__name__} post-processes its logits (final_logit_softcapping="
            f"{softcap}, logit_scale={logit_scale}), which the fused loss does not model: compute "
            "model(...).logits and use naive_causal_lm_loss"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(
            f"the output head {type(head).__name__} has no float (vocab, hidden) weight (quantized "
            "or replaced?): compute model(...).logits and use naive_causal_lm_loss"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def train_step_loss(model: nn.Module, batch: Batch, *, device: torch.device,
                    static_shapes: bool = False, packed_attention: str = "auto") -> torch.Tensor:
    """Summed cross-entropy of one micro-batch's target tokens (the loss lives outside forward).
    ``static_shapes``: no host syncs (for CUDA graphs; see :func:`causal_lm_loss`); ``packed_attention``:
    how packed rows attend (see :func:`model_hidden_states`)."""
    hidden = model_hidden_states(
        model,
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
        position_ids=batch["position_ids"].to(device) if "position_ids" in batch else None,
        packed_attention=packed_attention,
    )
    weight, bias = lm_head_params(model)
    return causal_lm_loss(hidden, weight, batch["labels"].to(device), reduction="sum",
                          lm_head_bias=bias, static_shapes=static_shapes)
