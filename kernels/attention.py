"""One entry point for attention over the first k heads of a packed qkv tensor.

The model produces qkv in the head-major layout ``(B, N, k, 3, hd)`` (rows re-ordered once at load
time, see ``model.thinkingvit.Attention``). Backends:

- ``sdpa``: PyTorch scaled_dot_product_attention on strided views (no explicit copies);
- ``triton``: our Triton kernel, reading q/k/v straight from the packed tensor (CUDA, or CPU
  tensors under ``TRITON_INTERPRET=1``);
- ``auto``: Triton on CUDA tensors when it imports, SDPA elsewhere.

``THINKINGVIT_ATTENTION_BACKEND`` overrides the default backend for the whole process.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa")
ENV_BACKEND = "THINKINGVIT_ATTENTION_BACKEND"


def default_backend() -> str:
    backend = os.environ.get(ENV_BACKEND, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={backend!r}: expected one of {BACKENDS}")
    return backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Map a backend setting to the implementation that will actually run on ``device``."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "sdpa"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "attention backend 'triton' needs a CUDA tensor; on CPU it runs only under the "
            "Triton interpreter (set TRITON_INTERPRET=1 before importing kernels.triton_attention)"
        )
    return backend


def _triton_available() -> bool:
    try:
        import kernels.triton_attention  # noqa: F401
    except Exception:  # triton missing or broken: SDPA still serves
        return False
    return True


def split_heads(qkv: torch.Tensor, num_heads: int, head_dim: int):
    """Strided q, k, v views ``(B, k, N, hd)`` of a head-major packed tensor; nothing is copied."""
    B, N, _ = qkv.shape
    qkv = qkv.view(B, N, num_heads, 3, head_dim)  # (B, N, k, 3, hd)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, k, N, hd)
    return q, k, v


def sdpa_attention(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    B, N, _ = qkv.shape
    q, k, v = split_heads(qkv, num_heads, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, k, N, hd)
    return out.transpose(1, 2).reshape(B, N, num_heads * head_dim)  # (B, N, k*hd)


def sliced_attention(
    qkv: torch.Tensor, num_heads: int, head_dim: int, backend: str | None = None
) -> torch.Tensor:
    """Attention of ``num_heads`` heads from packed head-major qkv ``(B, N, 3*k*hd)``.

    Returns ``(B, N, k*hd)``, heads concatenated token-major, as the output projection reads it.
    """
    impl = resolve_backend(backend, qkv.device)
    if impl == "triton":
        from kernels.triton_attention import triton_sliced_attention

        return triton_sliced_attention(qkv.view(*qkv.shape[:2], num_heads, 3, head_dim))
    return sdpa_attention(qkv, num_heads, head_dim)
