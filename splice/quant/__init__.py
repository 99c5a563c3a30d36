"""Weight-only quantization (int8, NF4) as replace rewrites.

``nf4``: :class:`~splice.quant.nf4.NF4Tensor`, bitsandbytes' NF4 with double-quantized absmax;
``nf4_encode``: its quantizer; ``nf4_ops``: its one op table (``@implements``); ``nf4_fsdp``: its
FSDP2 sharding ops and all-gather hooks; ``linear``: ``NF4Linear``/``Int8Linear`` and
``quantize_nf4``/``quantize_int8``; ``fp8``: ``FP8Linear`` (e4m3 weights, FP8 GEMMs) and ``quantize_fp8``.
"""
