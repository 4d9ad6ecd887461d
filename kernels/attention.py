"""One entry point for attention over the first k heads of a packed qkv tensor.

The model produces qkv in the head-major layout ``(B, N, k, 3, hd)`` (rows re-ordered once at load
time, see ``model.thinkingvit.Attention``); the authors' ``(B, N, 3, k, hd)`` and full-width buffers
of which only the first k heads are read are accepted too (:func:`qkv_views`). Backends:

- ``sdpa``: PyTorch scaled_dot_product_attention on strided views (no explicit copies);
- ``triton``: our Triton kernel, reading q/k/v straight from the packed tensor (CUDA, or CPU
  tensors under ``TRITON_INTERPRET=1``);
- ``auto``: Triton on CUDA tensors when it imports, SDPA elsewhere, and SDPA whenever autograd
  needs a gradient: the kernel is forward-only (inference), so training always runs SDPA.

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


def resolve_backend(
    backend: str | None, device: torch.device, head_dim: int | None = None, needs_grad: bool = False
) -> str:
    """Map a backend setting to the implementation that will actually run on ``device``.

    ``auto`` falls back to SDPA for head sizes the kernel does not cover and when a gradient is
    needed; an explicit ``triton`` does not (the kernel then says why it refuses, and training
    through it is refused here, since its output would silently carry no gradient).
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda" or needs_grad:
            return "sdpa"
        kernel = _triton_kernel()
        supported = kernel is not None and (head_dim is None or head_dim in kernel.HEAD_DIMS)
        return "triton" if supported else "sdpa"
    if backend == "triton" and needs_grad:
        raise RuntimeError(
            "attention backend 'triton' is forward-only and cannot train: use 'sdpa' or 'auto' "
            "(auto runs SDPA whenever a gradient is needed)"
        )
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "attention backend 'triton' needs a CUDA tensor; on CPU it runs only under the "
            "Triton interpreter (set TRITON_INTERPRET=1 before importing kernels.triton_attention)"
        )
    return backend


def _triton_kernel():
    """The Triton kernel's module (it owns its head sizes), or None when triton is missing or
    broken: SDPA still serves. Imported here, on first use, so that importing this module never
    imports triton; the kernel module does not import this one."""
    try:
        import kernels.triton_attention as triton_attention
    except Exception:
        return None
    return triton_attention


LAYOUTS = ("head_major", "qkv_major")


def qkv_views(qkv: torch.Tensor, num_heads: int, head_dim: int, layout: str = "head_major"):
    """Strided q, k, v views ``(B, N, k, hd)`` of the first ``num_heads`` heads; nothing is copied.

    ``qkv`` is ``(B, N, 3*H*hd)`` for any H >= k (a stage's own output, or a full-width buffer),
    possibly batch- or token-strided. ``head_major`` is the model's row order ``(H, 3, hd)``;
    ``qkv_major`` the authors' ``(3, H, hd)`` (a sliced GEMM over per-block weight slices).
    """
    if layout == "head_major":
        t = qkv.unflatten(-1, (-1, 3, head_dim))[:, :, :num_heads]  # (B, N, k, 3, hd)
        return t.unbind(3)
    if layout == "qkv_major":
        t = qkv.unflatten(-1, (3, -1, head_dim))[:, :, :, :num_heads]  # (B, N, 3, k, hd)
        return t.unbind(2)
    raise ValueError(f"unknown qkv layout {layout!r}: expected one of {LAYOUTS}")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference path: PyTorch SDPA on the strided ``(B, N, k, hd)`` views; returns ``(B, N, k*hd)``."""
    B, N, H, hd = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each (B, k, N, hd), still strided
    out = F.scaled_dot_product_attention(q, k, v)  # (B, k, N, hd)
    return out.transpose(1, 2).reshape(B, N, H * hd)  # (B, N, k*hd)


def sliced_attention(
    qkv: torch.Tensor,
    num_heads: int,
    head_dim: int,
    backend: str | None = None,
    layout: str = "head_major",
) -> torch.Tensor:
    """Attention of the first ``num_heads`` heads of packed qkv ``(B, N, 3*H*hd)``, H >= k.

    Returns ``(B, N, k*hd)``, heads concatenated token-major, as the output projection reads it.
    """
    q, k, v = qkv_views(qkv, num_heads, head_dim, layout)  # each (B, N, k, hd)
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    if resolve_backend(backend, qkv.device, head_dim, needs_grad) == "triton":
        from kernels.triton_attention import triton_attention

        return triton_attention(q, k, v)
    return sdpa_attention(q, k, v)
