"""A frozen input embedding kept in host memory, as a rewrite.

A LoRA run never trains the input embedding, yet its table sits on the GPU: for Llama-3-8B that
is 128,256 x 4,096 bf16 = 0.98 GiB, a sixth of an NF4 8B's footprint. A lookup reads only the
rows of the batch, so :func:`embeddings_to_host` keeps the table in (pinned) host memory and each
forward gathers the ``(batch, seq)`` rows there and copies just those to the GPU::

    ids (b, s) -> table[ids] (b, s, d) on the host -> the ids' device

(4,096 tokens x 4,096 x 2 bytes = 32 MiB a step for the 8B). The output is the same tensor
``nn.Embedding`` gives, bit for bit. Not for a table tied to the output head (the head needs it
on the GPU), a trainable one, nor inside a CUDA graph (a host gather cannot be captured).
:func:`~splice.core.rewrite.unrewrite` puts a plain ``nn.Embedding`` back on the device the
table came from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from splice.core.rewrite import Node, Replace, param_uses, rewrite

__all__ = ["HostEmbedding", "embeddings_to_host"]


class HostEmbedding(nn.Module):
    """``nn.Embedding``'s forward over a table in host memory (see the module doc).

    The table is a buffer, not a parameter (it is frozen, and ``model.device``-style lookups of
    the first parameter keep pointing at the GPU); ``.to()``/``.cuda()`` leave it where it is.
    """

    weight: Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        table = embedding.weight.detach().to("cpu", copy=True)
        if torch.cuda.is_available():
            table = table.pin_memory()  # the gathered rows come from pinned pages: async copy
        self.register_buffer("weight", table)
        self.home = embedding.weight.device  # where unrewrite puts the table back
        self.padding_idx = embedding.padding_idx  # (only the gradient reads it: kept for restore)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]  # torch's own signature
        return self  # the table stays in host memory whatever .to() asks

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "an input embedding in host memory (splice.embeddings_to_host) cannot run inside "
                "a CUDA graph: train without graphs, or keep the embedding on the GPU")
        flat = ids.reshape(-1).cpu()
        # gathered straight into pinned pages (one host copy), which then upload asynchronously
        rows = torch.empty((flat.numel(), self.embedding_dim), dtype=self.weight.dtype,
                           pin_memory=ids.device.type == "cuda")
        torch.index_select(self.weight, 0, flat, out=rows)
        return rows.view(*ids.shape, self.embedding_dim).to(ids.device, non_blocking=True)

    def restore(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the table on its original device (for ``unrewrite``)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device="meta", dtype=self.weight.dtype)
        embedding.weight = nn.Parameter(self.weight.to(self.home, copy=True), requires_grad=False)
        return embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host memory (was on {self.home})"


def embeddings_to_host(model: nn.Module) -> list[str]:
    """Move ``model``'s frozen input embedding(s) to host memory; returns the rewritten names.

    Raises ``ValueError`` (before changing anything) when the input embedding is trainable,
    renormalized (``max_norm``), or tied to another module's weight, such as an output head.
    """
    uses = param_uses(model)
    get = getattr(model, "get_input_embeddings", None)
    inputs = get() if callable(get) else None
    if inputs is not None and type(inputs) is not nn.Embedding:
        raise ValueError(f"the input embedding is a {type(inputs).__name__}, not a plain nn.Embedding "
                         "(e.g. it carries a LoRA adapter): it must stay on the GPU")
    targets = [inputs] if inputs is not None else [m for m in model.modules() if type(m) is nn.Embedding]
    if not targets:
        raise ValueError("embeddings_to_host found no nn.Embedding in the model")
    for embedding in targets:
        weight = embedding.weight
        if weight.requires_grad:
            raise ValueError("the input embedding is trainable: freeze it (splice.freeze, or "
                             "add_lora, which freezes the base) before moving it to host memory")
        if embedding.max_norm is not None:  # nn.Embedding would renormalize rows in its forward
            raise ValueError("the input embedding has max_norm set, which rewrites its table on "
                             "every lookup: it must stay an nn.Embedding")
        if uses.get(id(weight), 0) > 1:
            raise ValueError("the input embedding's weight is tied to another module (e.g. the "
                             "output head): it must stay on the GPU; untie the weights first")
    chosen = {id(m) for m in targets}

    def rule(node: Node) -> Replace | None:
        if id(node.module) not in chosen:
            return None
        assert isinstance(node.module, nn.Embedding)
        return Replace(HostEmbedding(node.module), keep_original=False)  # frees the GPU table

    return rewrite(model, rule)
