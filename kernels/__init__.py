"""Triton kernels of distributed_pt, one op family per module, each with its pure-torch ``*_reference``:

* ``kernels.lora_matmul``: ``lora_linear``, ``lora_linear_reference``, ``dropout_keep_mask``
* ``kernels.cross_entropy``: ``masked_cross_entropy``, ``masked_cross_entropy_reference`` (CE on given logits)
* ``kernels.fused_linear_cross_entropy``: ``fused_linear_cross_entropy``, ``fused_linear_cross_entropy_reference``
* ``kernels.fused_linear_logprobs``: ``fused_linear_logprobs``, ``fused_linear_logprobs_reference``

Private: ``kernels._utils`` (interpreter detection, launch helpers, the tests' tolerance table) and
``kernels._linear_chunks`` (the chunked LM-head loop of the two fused-linear ops).

This package imports nothing (set ``TRITON_INTERPRET`` before importing a kernel module) and must not define
``__version__``: transformers probes for a hub package also called ``kernels`` and inspects whatever it finds under
that name.
"""
