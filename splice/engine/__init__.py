"""The generation engine: paged KV cache, a token-budget scheduler, a model runner over flat token batches
and an output processor. Everything in splice that generates (serve, ``splice.generate``, eval, training's
scoring) runs on it."""
