"""Triton kernels of distributed_pt, one per module (lora_matmul, cross_entropy).

This package must import cleanly and cheaply and must not define ``__version__``: transformers probes for a hub
package also called ``kernels`` and inspects whatever it finds under that name.
"""
