"""Weight-only quantization (int8, NF4) as replace rewrites.

``nf4``: :class:`~splice.quant.nf4.NF4Tensor`, bitsandbytes' NF4 with double-quantized absmax, and
its quantizer; ``linear``: ``NF4Linear``/``Int8Linear`` and ``quantize_nf4``/``quantize_int8``.
"""
