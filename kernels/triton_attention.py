"""Triton forward kernel: attention over the first k heads, read straight from the packed qkv tensor.

q, k and v arrive as strided views ``(B, N, k, hd)`` that share one set of strides (the head-major
layout ``(B, N, H, 3, hd)``, the sliced-GEMM layout ``(B, N, 3, H, hd)``, a full-width buffer of
which only the first k heads are read, batch- or token-strided views of any of these). Nothing is
copied: the kernel walks the strides, and the grid ``(cdiv(N, BLOCK_M), B * k)`` never visits heads
>= k. The output is written token-major ``(B, N, k*hd)``, the layout the projection GEMM reads.

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernel to run on CPU
tensors (the interpreter is chosen when ``@triton.jit`` decorates). Importing never touches the GPU
driver; configurations are plain data chosen on the host, so there is no autotuning to run at
import, at first call or under the interpreter.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel is decorated
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64)  # head sizes the kernel is built for (kernels.attention's auto falls back to SDPA otherwise)
TAIL_N = 16  # narrowest key tile tl.dot accepts: the masked tail wastes at most 15 columns
LOG2E = 1.4426950408889634


class KernelConfig(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # key columns per unmasked tile
    num_warps: int
    num_stages: int


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, K, V, kv_base, stride_n, start, stop, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key tiles [start, stop) into the running softmax state (m_i, l_i, acc)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = kv_base + offs_n[:, None] * stride_n + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
        # -- load K and V; only the tail tile needs a token mask (full tiles lie below N)
        if MASKED:
            k = tl.load(K + kv_ptrs, mask=offs_n[:, None] < N, other=0.0)
            v = tl.load(V + kv_ptrs, mask=offs_n[:, None] < N, other=0.0)
        else:
            k = tl.load(K + kv_ptrs)
            v = tl.load(V + kv_ptrs)
        if UPCAST:  # the interpreter's bf16 dot multiplies raw bit patterns
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # -- scores in base 2: s = q k^T * scale * log2(e); padded keys get -inf
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        # -- online softmax: new running max, rescale what was accumulated so far
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sliced_attention_fwd(
    Q, K, V, Out,
    stride_b, stride_n, stride_h,  # shared by q, k, v (elements); head_dim stride is 1
    stride_ob, stride_on,  # output (B, N, k*hd); heads are hd apart, head_dim stride 1
    N, H, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # -- program -> (query tile, batch, head); query tiles fastest so one head's tiles share K/V in L2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: B * stride_b can pass 2**31 elements
    h = pid_bh % H
    kv_base = b * stride_b + h * stride_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < N

    # -- this tile's queries; rows past N load as zeros and are never stored
    q = tl.load(Q + kv_base + offs_m[:, None] * stride_n + offs_d[None, :], mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # -- fp32 running max, sum and accumulator
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- keys: full tiles unmasked, then narrow masked tiles for the remainder
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, K, V, kv_base, stride_n, 0, n_full, N, qk_scale,
        HEAD_DIM, BLOCK_N, False, UPCAST, DOT_PRECISION,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, K, V, kv_base, stride_n, n_full, N, N, qk_scale,
        HEAD_DIM, TAIL_N, True, UPCAST, DOT_PRECISION,
    )

    # -- normalise and write heads side by side: out[b, n, h*hd : (h+1)*hd]
    acc = acc / l_i[:, None]
    out_ptrs = Out + b * stride_ob + h * HEAD_DIM + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask)


def pick_config(dtype: torch.dtype) -> KernelConfig:
    """Block sizes. In an H100 sweep (N 197, hd 64, bf16, k 3/6, batch 1-256; docs/kernel.md)
    64 x 64 tiles, 4 warps, 3 stages were fastest for 5 of 6 shapes and within 10 % for the sixth.

    Under the interpreter one config serves every shape: big tiles mean few (serial) programs.
    """
    if INTERPRETED:
        return KernelConfig(64, 64, 4, 1)
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: keep shared memory in bounds
        return KernelConfig(64, 32, 4, 2)
    return KernelConfig(64, 64, 4, 3)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()):
        raise ValueError(
            f"q, k, v must be views with one shape and one set of strides; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, strides {q.stride()}, "
            f"{k.stride()}, {v.stride()}"
        )
    if q.dim() != 4 or q.stride(-1) != 1:
        raise ValueError(f"q, k, v must be (B, N, k, hd) with unit head_dim stride, got {q.stride()}")
    B, N, H, hd = q.shape
    if hd not in HEAD_DIMS:
        raise ValueError(f"head_dim {hd} not supported; expected one of {HEAD_DIMS}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype == out.dtype):
        raise ValueError(f"q, k, v, out must share one of {DTYPES}, got {q.dtype}, {out.dtype}")
    if out.shape != (B, N, H * hd) or out.stride(-1) != 1:
        raise ValueError(f"out must be (B, N, k*hd) = {(B, N, H * hd)} with unit last stride")
    if not (q.device == k.device == v.device == out.device):
        raise ValueError("q, k, v and out must be on one device")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "kernels.triton_attention was imported without TRITON_INTERPRET=1, so it runs on CUDA "
            "tensors only; set TRITON_INTERPRET=1 before the import to run it on CPU"
        )


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for strided views ``(B, N, k, hd)``; returns ``(B, N, k*hd)``.

    ``out`` may be given to write into (it must be ``(B, N, k*hd)`` with unit last stride);
    ``config`` overrides :func:`pick_config` (the benchmark sweeps it).
    """
    B, N, H, hd = q.shape
    if out is None:
        out = torch.empty(B, N, H * hd, dtype=q.dtype, device=q.device)
    _check(q, k, v, out)
    if B * N * H == 0:
        return out
    cfg = config or pick_config(q.dtype)
    args = (
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1),
        N, H, LOG2E / math.sqrt(hd),
    )
    constexprs = dict(  # in signature order: a cached binary takes them positionally
        HEAD_DIM=hd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TAIL_N=TAIL_N,
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    _launch((triton.cdiv(N, cfg.block_m), B * H, 1), args, constexprs, cfg)
    return out


_COMPILED: dict[tuple, object] = {}  # launch key -> triton CompiledKernel (see _launch)


def _spec(arg) -> tuple:
    """What Triton specialises a runtime argument on (tensor dtype and 16-byte alignment; int
    equal to 1, multiple of 16, 32-bit or not): a key at least this fine never picks a wrong binary."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    return (type(arg),)


def _launch(grid: tuple[int, int, int], args: tuple, constexprs: dict, cfg: KernelConfig) -> None:
    """Launch, skipping Triton's per-call argument binder once the binary for a key is known.

    The binder costs ~10-30 us of Python per launch (triton-lang/triton#6064), which shows end to
    end when the model is launch-bound (small batches, eager). The first launch per key goes
    through ``kernel[grid]`` (compiling if needed); later ones hand the kept binary the same
    positional arguments ``JITFunction.run`` would (its runner wants all three grid dimensions).
    """
    key = (args[0].device, cfg, *constexprs.values(), *map(_spec, args))
    kernel = _COMPILED.get(key)
    if kernel is not None:
        kernel[grid](*args, *constexprs.values())
        return
    kernel = _sliced_attention_fwd[grid](
        *args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )
    if not INTERPRETED:  # the interpreter returns no binary
        _COMPILED[key] = kernel
