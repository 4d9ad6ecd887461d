"""The Triton sliced-head attention kernel against a float64 reference, and the backend switch.

On a machine without CUDA the kernel runs under Triton's interpreter: TRITON_INTERPRET must be set
before ``kernels.triton_attention`` is imported, so it is set here, at collection. It stays set for
the session (Triton reads it lazily too); for other tests its only effect is that backend
``triton`` on a CPU tensor runs the interpreter instead of raising. On a CUDA machine nothing is set
and the compiled kernel runs on the GPU (fp32 dots at ieee precision, so one tolerance serves both).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.attention import qkv_views, resolve_backend, sdpa_attention, sliced_attention  # noqa: E402
from kernels.triton_attention import KernelConfig, triton_attention  # noqa: E402
from model.thinkingvit import ThinkingViTConfig, create_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}  # atol = rtol; bf16 through fp32 tiles when interpreting
SMALL = KernelConfig(32, 32, 4, 1)  # many query and key tiles even at small N


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_qkv(B, N, k, hd, layout, dtype, heads=None, tokens=None, qk_scale=1.0):
    """Packed qkv ``(B, N, 3*H*hd)`` (a view of a NaN-filled ``(B, tokens, ...)`` buffer when
    ``tokens > N``) whose first k heads are random and whose other heads are NaN; q and k are
    multiplied by ``qk_scale`` (logits grow with its square)."""
    heads, tokens = heads or k, tokens or N
    buf = torch.full((B, tokens, 3 * heads * hd), float("nan"), dtype=dtype, device=DEVICE)
    qkv = buf[:, :N]  # (B, N, 3*H*hd), token-strided when tokens > N
    for t, scale in zip(qkv_views(qkv, k, hd, layout), (qk_scale, qk_scale, 1.0)):  # (B, N, k, hd)
        t.copy_(scale * torch.randn(t.shape))
    return qkv


def reference(q, k, v):
    """float64 softmax(q k^T / sqrt(hd)) v on the CPU; (B, N, k, hd) views in, (B, N, k*hd) out."""
    q, k, v = (t.detach().cpu().double().transpose(1, 2) for t in (q, k, v))  # each (B, k, N, hd)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, k, N, N)
    return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, N, k*hd)


def assert_matches(out, q, k, v, tol=None):
    tol = tol or TOL[out.dtype]
    torch.testing.assert_close(out.cpu().double(), reference(q, k, v), atol=tol, rtol=tol)


# Every value of every axis at least once, not the cartesian product (the interpreter is serial):
# (B, N, k, hd, layout, heads in the buffer, dtype, config)
CASES = [
    (1, 1, 1, 32, "head_major", 1, F32, None),
    (2, 5, 2, 64, "qkv_major", 2, F16, None),
    (1, 16, 3, 16, "head_major", 6, BF16, None),
    (2, 50, 6, 16, "qkv_major", 6, F32, SMALL),
    (1, 63, 2, 32, "head_major", 2, F16, SMALL),
    (2, 64, 1, 64, "head_major", 3, F32, SMALL),
    (1, 65, 3, 64, "qkv_major", 6, BF16, SMALL),
    (2, 197, 3, 64, "head_major", 3, F16, None),
    (1, 197, 6, 32, "qkv_major", 6, F32, None),
    (2, 50, 3, 16, "head_major", 3, BF16, None),
    (1, 64, 6, 32, "qkv_major", 6, F16, None),
    (2, 65, 2, 16, "head_major", 6, F32, None),
]


@pytest.mark.parametrize("B, N, k, hd, layout, heads, dtype, config", CASES)
def test_matches_float64_reference(B, N, k, hd, layout, heads, dtype, config):
    q, k_, v = qkv_views(make_qkv(B, N, k, hd, layout, dtype, heads=heads), k, hd, layout)
    assert_matches(triton_attention(q, k_, v, config=config), q, k_, v)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_large_logits_stay_finite_and_exact(dtype, config):
    """Logits in the hundreds: exp without the running max overflows even fp32.

    fp32 rounding of a logit near 300 is ~1e-5, so fp32 gets 1e-4 here (SDPA's own fp32 error on
    these inputs is the same as the kernel's, ~3e-5).
    """
    q, k, v = qkv_views(make_qkv(2, 65, 2, 64, "head_major", dtype, qk_scale=6.0), 2, 64)
    qh, kh = (t.double().transpose(1, 2) for t in (q, k))  # each (B, k, N, hd)
    logits = qh @ kh.transpose(-1, -2) / 8  # (B, k, N, N)
    assert logits.abs().max() > 100
    out = triton_attention(q, k, v, config=config)
    assert torch.isfinite(out).all()
    assert_matches(out, q, k, v, tol=max(TOL[dtype], 1e-4))


@pytest.mark.parametrize("layout", ["head_major", "qkv_major"])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_no_stray_reads(layout, config):
    """Heads >= k, tokens >= N and the batches a batch-strided view skips are NaN: none is read."""
    N, k, hd = 70, 2, 32
    qkv = make_qkv(3, N, k, hd, layout, F32, heads=6, tokens=N + 9)  # (3, N, 3*6*hd)
    qkv[1].fill_(float("nan"))  # the batch the strided view skips
    view = qkv[::2]  # (2, N, 3*6*hd)
    q, k_, v = qkv_views(view, k, hd, layout)
    out = triton_attention(q, k_, v, config=config)
    assert torch.isfinite(out).all()
    assert_matches(out, q, k_, v)


@pytest.mark.parametrize("N", [5, 65])
def test_no_holes(N):
    """An output poisoned with NaN is written everywhere, tail rows and every head included."""
    k, hd = 3, 16
    q, k_, v = qkv_views(make_qkv(2, N, k, hd, "head_major", F32), k, hd)
    out = torch.full((2, N, k * hd), float("nan"), device=DEVICE)
    assert triton_attention(q, k_, v, out=out, config=SMALL) is out
    assert torch.isfinite(out).all()
    assert_matches(out, q, k_, v)


def test_misaligned_views_after_aligned():
    """Same shapes, but base pointer and token stride off 16 bytes: the binary kept for the
    aligned call must not be reused (the launch cache keys on alignment, as Triton does)."""
    k, hd = 2, 16
    aligned = make_qkv(2, 33, k, hd, "head_major", F32)
    misaligned = torch.randn(2, 33, 3 * k * hd + 1, device=DEVICE)[..., 1:]  # 4 bytes in, odd stride
    for qkv in (aligned, misaligned, aligned):
        q, k_, v = qkv_views(qkv, k, hd)
        assert_matches(triton_attention(q, k_, v), q, k_, v)


def test_sliced_attention_dispatch_matches_sdpa():
    """The model's entry point: same result through either backend, for both layouts."""
    for layout in ("head_major", "qkv_major"):
        qkv = make_qkv(2, 50, 3, 16, layout, F32, heads=6)
        got = sliced_attention(qkv, 3, 16, "triton", layout=layout)
        want = sliced_attention(qkv, 3, 16, "sdpa", layout=layout)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sdpa_path_matches_reference():
    q, k, v = qkv_views(make_qkv(2, 65, 3, 32, "qkv_major", F32, heads=6), 3, 32, "qkv_major")
    assert_matches(sdpa_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("head_dim", [16, 32])
def test_full_model_triton_equals_sdpa(head_dim):
    cfg = ThinkingViTConfig(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=2, head_dim=head_dim, stages=(2, 4)
    )
    torch.manual_seed(0)
    model = create_model(cfg).to(DEVICE).eval()
    with torch.no_grad():
        for block in model.blocks:  # sharper attention than the 0.02 init, so heads matter
            block.attn.qkv.weight.normal_(0, 0.3)
        model.alpha[0].fill_(0.5)
    embedded = model.embed(torch.randn(2, 1, 16, 16, device=DEVICE))  # (2, 17, D)
    outs = {}
    with torch.inference_mode():
        for backend in ("sdpa", "triton"):
            model.set_attention_backend(backend)
            recycled, outs[backend] = None, []
            for stage in range(model.num_stages):
                logits, recycled = model.forward_stage(stage, embedded, recycled)
                outs[backend].append((logits, recycled))
    for (logits_s, tokens_s), (logits_t, tokens_t) in zip(outs["sdpa"], outs["triton"]):
        torch.testing.assert_close(logits_t, logits_s, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokens_t, tokens_s, atol=1e-4, rtol=1e-4)


def test_rejects_what_it_cannot_read():
    q, k, v = qkv_views(make_qkv(1, 8, 2, 32, "head_major", F32), 2, 32)
    with pytest.raises(ValueError, match="strides"):
        triton_attention(q, k.contiguous(), v)
    q8, k8, v8 = qkv_views(torch.randn(1, 8, 3 * 2 * 8, device=DEVICE), 2, 8)
    with pytest.raises(ValueError, match="head_dim 8"):
        triton_attention(q8, k8, v8)
    with pytest.raises(ValueError, match="share one of"):
        triton_attention(q, k, v, out=torch.empty(1, 8, 64, dtype=F16, device=DEVICE))


def test_auto_picks_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_backend_setting_and_env_override(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", torch.device("cpu"))
    monkeypatch.setenv("THINKINGVIT_ATTENTION_BACKEND", "sdpa")
    assert resolve_backend(None, torch.device("cpu")) == "sdpa"
    monkeypatch.setenv("THINKINGVIT_ATTENTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="THINKINGVIT_ATTENTION_BACKEND"):
        resolve_backend(None, torch.device("cpu"))


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        qkv_views(torch.randn(1, 4, 96), 1, 32, "bhnd")


def test_benchmark_smoke(tmp_path):
    from bench.kernel import main

    result = main(["--smoke", "--out", str(tmp_path), "--machine", "smoke"])
    assert (tmp_path / "kernel-smoke.json").exists() and (tmp_path / "kernel-smoke.md").exists()
    assert all(row["us"]["sdpa"] > 0 for row in result["kernels"])
    assert all(row["img_per_s"]["sdpa"] > 0 for row in result["model"])


def test_auto_falls_back_to_sdpa_for_head_sizes_the_kernel_lacks():
    """The kernel module owns its head sizes; auto reads them from it (triton imports here)."""
    assert resolve_backend("auto", torch.device("cuda"), head_dim=8) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), head_dim=64) == "triton"


def test_training_never_runs_the_forward_only_kernel():
    """A gradient through attention must exist: auto trains through SDPA, explicit triton refuses."""
    assert resolve_backend("auto", torch.device("cuda"), head_dim=16, needs_grad=True) == "sdpa"
    qkv = make_qkv(2, 17, 2, 16, "head_major", F32).requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        sliced_attention(qkv, 2, 16, "triton")
    sliced_attention(qkv, 2, 16, "auto").sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    with torch.no_grad():  # inference through the kernel stays allowed
        sliced_attention(qkv, 2, 16, "triton")
