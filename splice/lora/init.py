"""LoRA initialisations that start from the base weight: PiSSA and OLoRA (PEFT's definitions).

Both move the weight's principal part into the adapter and leave the rest in the base, so the
model's output is unchanged at step 0 but training starts on the directions that matter most.
With ``W`` (out, in) the base weight in fp32, ``s`` the LoRA scale and ``r`` the rank:

* **PiSSA** (Meng et al. 2024): ``W = V S U^T`` (SVD); ``A = sqrt(S_r / s) U_r^T`` (r, in),
  ``B = V_r sqrt(S_r / s)`` (out, r). ``"pissa_niter_N"`` takes the top ``r`` triplets from
  ``torch.svd_lowrank(W, r, niter=N)`` (randomised, fast for wide layers) instead of a full SVD.
* **OLoRA** (Büyükakyüz 2024): ``W = Q R`` (QR); ``B = Q[:, :r]``, ``A = R[:r]``.

Then the base keeps the residual ``W_res = W - s B A`` (rounded to its dtype). Such an adapter
only makes sense on ``W_res``: :func:`to_plain_lora` turns the trained one back into a plain
LoRA for the original ``W``: ``W_res + s B A = W + s (B A - B0 A0)``, i.e. rank ``2r`` with
``A' = [A; A0]`` and ``B' = [B, -B0]``, which PEFT writes with ``r`` and ``lora_alpha`` doubled
(``alpha * sqrt(2)`` with rsLoRA) so the scale is unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["INIT_METHODS", "from_weight", "init_factors", "init_name", "to_plain_lora"]

INIT_METHODS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")
_NITER = re.compile(r"^pissa_niter_(\d+)$")


def init_name(value: str | bool) -> str:
    """The canonical name of an initialisation given as splice or PEFT spell it.

    ``True`` / ``"default"`` / ``"true"`` -> ``"default"`` (A Kaiming-uniform, B zeros);
    ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"`` (N >= 1), ``"olora"`` as they are.
    """
    if value is True or (isinstance(value, str) and value.lower() in ("default", "true")):
        return "default"
    if isinstance(value, str):
        name = value.lower()
        if name in ("gaussian", "pissa", "olora"):
            return name
        match = _NITER.match(name)
        if match is not None and int(match[1]) >= 1:
            return name
    raise ValueError(
        f"unknown LoRA initialisation {value!r}: use one of {', '.join(INIT_METHODS)} (N a number of "
        "subspace iterations, e.g. pissa_niter_4); PEFT's init_lora_weights=True is 'default'"
    )


def from_weight(name: str) -> bool:
    """Whether initialisation ``name`` derives the adapter from the base weight (and changes it)."""
    return name == "olora" or name.startswith("pissa")


def init_factors(weight: Tensor, *, rank: int, scale: float, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, W_res)`` for ``weight`` (out, in) by ``method`` (module doc): A (r, in) and B
    (out, r) in fp32, ``W_res = W - scale * B A`` in ``weight``'s dtype."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"PiSSA/OLoRA need a float base weight, got {weight.dtype}: initialise on the float model "
            "(then quantize the residual)"
        )
    w = weight.detach().to(torch.float32)
    if method == "olora":
        q, r_factor = torch.linalg.qr(w)
        lora_b, lora_a = q[:, :rank].contiguous(), r_factor[:rank].contiguous()
    elif method.startswith("pissa"):
        match = _NITER.match(method)
        if match is None:
            v, s, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :rank], s[:rank] / scale, uh[:rank]
        else:
            vr, sr, ur = torch.svd_lowrank(w, rank, niter=int(match[1]))
            sr, uhr = sr / scale, ur.t()
        root = torch.diag(torch.sqrt(sr))
        lora_a, lora_b = root @ uhr, vr @ root
    else:
        raise ValueError(f"init_factors: {method!r} does not derive the adapter from the weight")
    residual = (w - scale * lora_b @ lora_a).to(weight.dtype)
    return lora_a, lora_b, residual


def to_plain_lora(lora_a: Tensor, lora_b: Tensor, initial_a: Tensor, initial_b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A', B')`` of rank 2r with ``B' A' = B A - B0 A0`` (PEFT's ``subtract_mutated_init``)."""
    return torch.cat([lora_a, initial_a], dim=0), torch.cat([lora_b, -initial_b], dim=1)
