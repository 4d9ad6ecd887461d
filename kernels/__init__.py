"""Attention kernels for sliced-head (nested) attention.

The model calls only :func:`kernels.attention.sliced_attention`; which implementation runs is
decided there. Importing this package never touches a GPU driver.
"""
from kernels.attention import BACKENDS, LAYOUTS, resolve_backend, sliced_attention

__all__ = ["BACKENDS", "LAYOUTS", "resolve_backend", "sliced_attention"]
