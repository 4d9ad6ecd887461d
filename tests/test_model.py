"""The nested model: shapes, the authors' numbers, timm cross-check, recycling, exit rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.compute import cumulative_gmacs, expected_gmacs, stage_gmacs
from model.inference import adaptive_inference
from model.config import PRESETS
from model.thinkingvit import (
    ThinkingViT,
    ThinkingViTConfig,
    confidence,
    create_model,
    exits_early,
    qkv_rows_to_authors,
    qkv_rows_to_head_major,
    recycle_proj_name,
)
from tests.timm_stub import import_timm_vit

SMALL = ThinkingViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, depth=2, head_dim=16, stages=(2, 3, 6))


def randomise(model: ThinkingViT, alpha: float = 0.0, seed: int = 0) -> ThinkingViT:
    """Non-trivial weights everywhere (LayerNorm affine and biases too), fixed alphas."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 1 else 0.1))
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
        for a in model.alpha:
            a.fill_(alpha)
    return model.eval()


def expected_deit_s_shapes() -> dict[str, tuple[int, ...]]:
    """The key/shape list of the authors' v2 3H->6H checkpoint, written out from the spec."""
    shapes = {
        "cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
        "norm.weight": (384,), "norm.bias": (384,), "head.weight": (1000, 384), "head.bias": (1000,),
        "alpha.0": (1,), "proj_layer.weight": (384, 192), "proj_layer.bias": (384,),
    }
    for i in range(12):
        b = f"blocks.{i}"
        shapes |= {
            f"{b}.norm1.weight": (384,), f"{b}.norm1.bias": (384,),
            f"{b}.norm2.weight": (384,), f"{b}.norm2.bias": (384,),
            f"{b}.attn.qkv.weight": (1152, 384), f"{b}.attn.qkv.bias": (1152,),
            f"{b}.attn.proj.weight": (384, 384), f"{b}.attn.proj.bias": (384,),
            f"{b}.mlp.fc1.weight": (1536, 384), f"{b}.mlp.fc1.bias": (1536,),
            f"{b}.mlp.fc2.weight": (384, 1536), f"{b}.mlp.fc2.bias": (384,),
        }
    return shapes


def test_deit_s_3_6_parameter_count_and_key_shapes():
    model = create_model("deit-s-3-6")
    assert sum(p.numel() for p in model.parameters()) == 22_124_777
    state = model.state_dict()
    assert len(state) == 155
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_deit_s_shapes()


def test_three_stage_preset_adds_second_recycling_transition():
    keys = set(create_model("deit-s-2-3-6").state_dict())
    assert {"alpha.0", "alpha.1", "proj_layer.weight", "proj_layer2.weight", "proj_layer2.bias"} <= keys
    assert create_model("deit-s-2-3-6").proj_layer.weight.shape == (384, 128)
    assert create_model("deit-s-2-3-6").proj_layer2.weight.shape == (384, 192)


@pytest.mark.parametrize("heads, gmacs", [(2, 0.60), (3, 1.25), (6, 4.60), (12, 17.56)])
def test_gmacs_reproduce_the_authors_constants(heads, gmacs):
    cfg = ThinkingViTConfig(stages=(heads,))
    assert stage_gmacs(cfg)[0] == pytest.approx(gmacs, rel=0.01)


def test_expected_gmacs_of_an_exit_distribution():
    cfg = PRESETS["deit-s-3-6"]
    g0, g1 = stage_gmacs(cfg)
    assert cumulative_gmacs(cfg) == pytest.approx([g0, g0 + g1])
    # the paper's tau 0.5 row: 59 % go on to stage 2 -> 1.25 + 0.59 * 4.6 = 3.96 GMACs
    assert expected_gmacs(cfg, [0.41, 0.59]) == pytest.approx(1.25 + 0.59 * 4.60, rel=0.01)


def test_qkv_row_permutation_round_trips_and_makes_heads_a_prefix():
    w = torch.arange(3 * 4 * 2).float().view(-1, 1)  # 3 blocks, 4 heads, head_dim 2
    hm = qkv_rows_to_head_major(w, num_heads=4)
    assert torch.equal(qkv_rows_to_authors(hm, num_heads=4), w)
    # the first head's q, k, v rows (authors' rows 0-1, 8-9, 16-17) are head-major rows 0-5
    assert hm[:6, 0].tolist() == [0, 1, 8, 9, 16, 17]


def slice_for_timm(state: dict, cfg: ThinkingViTConfig, stage: int) -> dict:
    """The stage's weights as a plain dense ViT of width d: top-left blocks, qkv per Q/K/V block."""
    d, D = cfg.stage_dim(stage), cfg.embed_dim
    h = cfg.mlp_dim(d)
    out = {
        "cls_token": state["cls_token"][..., :d], "pos_embed": state["pos_embed"][..., :d],
        "patch_embed.proj.weight": state["patch_embed.proj.weight"][:d],
        "patch_embed.proj.bias": state["patch_embed.proj.bias"][:d],
        "norm.weight": state["norm.weight"][:d], "norm.bias": state["norm.bias"][:d],
        "head.weight": state["head.weight"][:, :d], "head.bias": state["head.bias"],
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        qkv_w, qkv_b = state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"]
        out |= {
            f"{b}.norm1.weight": state[f"{b}.norm1.weight"][:d], f"{b}.norm1.bias": state[f"{b}.norm1.bias"][:d],
            f"{b}.norm2.weight": state[f"{b}.norm2.weight"][:d], f"{b}.norm2.bias": state[f"{b}.norm2.bias"][:d],
            f"{b}.attn.qkv.weight": torch.cat([qkv_w[j * D : j * D + d, :d] for j in range(3)]),
            f"{b}.attn.qkv.bias": torch.cat([qkv_b[j * D : j * D + d] for j in range(3)]),
            f"{b}.attn.proj.weight": state[f"{b}.attn.proj.weight"][:d, :d],
            f"{b}.attn.proj.bias": state[f"{b}.attn.proj.bias"][:d],
            f"{b}.mlp.fc1.weight": state[f"{b}.mlp.fc1.weight"][:h, :d], f"{b}.mlp.fc1.bias": state[f"{b}.mlp.fc1.bias"][:h],
            f"{b}.mlp.fc2.weight": state[f"{b}.mlp.fc2.weight"][:d, :h], f"{b}.mlp.fc2.bias": state[f"{b}.mlp.fc2.bias"][:d],
        }
    return out


def timm_stage_logits(state: dict, cfg: ThinkingViTConfig, stage: int, images: torch.Tensor) -> torch.Tensor:
    VisionTransformer = import_timm_vit()
    vit = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.stage_dim(stage), depth=cfg.depth, num_heads=cfg.stages[stage], mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, class_token=True, global_pool="token",
    ).eval()
    vit.load_state_dict(slice_for_timm(state, cfg, stage), strict=True)
    with torch.no_grad():
        return vit(images)


@pytest.mark.parametrize("cfg", [SMALL, PRESETS["deit-s-3-6"]], ids=["small-2-3-6", "deit-s-3-6"])
def test_every_stage_equals_a_plain_timm_vit_with_alpha_zero(cfg):
    model = randomise(ThinkingViT(cfg), alpha=0.0)
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images)
    state = model.state_dict()
    for stage in range(len(cfg.stages)):
        torch.testing.assert_close(ours[stage], timm_stage_logits(state, cfg, stage, images), atol=2e-4, rtol=1e-4)


def reference_forward(state: dict, cfg: ThinkingViTConfig, images: torch.Tensor) -> list[torch.Tensor]:
    """Hand-written ThinkingViT from the spec's formulas, in the authors' tensor layout."""
    D, hd = cfg.embed_dim, cfg.head_dim
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    embedded = torch.cat([state["cls_token"].expand(len(images), -1, -1), x], 1) + state["pos_embed"]
    logits, tokens = [], None
    for s, k in enumerate(cfg.stages):
        d = hd * k
        full = embedded
        if s > 0:
            proj = "proj_layer" if s == 1 else f"proj_layer{s}"
            full = embedded + state[f"alpha.{s - 1}"] * (tokens @ state[f"{proj}.weight"].T + state[f"{proj}.bias"])
        x = full[..., :d]
        for i in range(cfg.depth):
            p = lambda n: state[f"blocks.{i}.{n}"]  # noqa: E731
            y = F.layer_norm(x, (d,), p("norm1.weight")[:d], p("norm1.bias")[:d], 1e-6)
            q, kk, v = (y @ p("attn.qkv.weight")[j * D : j * D + d, :d].T + p("attn.qkv.bias")[j * D : j * D + d] for j in range(3))
            B, N, _ = q.shape
            q, kk, v = (t.view(B, N, k, hd).transpose(1, 2) for t in (q, kk, v))
            att = ((q @ kk.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1) @ v
            att = att.transpose(1, 2).reshape(B, N, d)
            x = x + att @ p("attn.proj.weight")[:d, :d].T + p("attn.proj.bias")[:d]
            h = cfg.mlp_dim(d)
            y = F.layer_norm(x, (d,), p("norm2.weight")[:d], p("norm2.bias")[:d], 1e-6)
            y = F.gelu(y @ p("mlp.fc1.weight")[:h, :d].T + p("mlp.fc1.bias")[:h])
            x = x + y @ p("mlp.fc2.weight")[:d, :h].T + p("mlp.fc2.bias")[:d]
        tokens = F.layer_norm(x, (d,), state["norm.weight"][:d], state["norm.bias"][:d], 1e-6)
        logits.append(tokens[:, 0] @ state["head.weight"][:, :d].T + state["head.bias"])
    return logits


def test_token_recycling_with_nonzero_alpha_matches_the_formula():
    model = randomise(ThinkingViT(SMALL), alpha=0.7)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images)
        ref = reference_forward(model.state_dict(), SMALL, images)
        no_recycling = randomise(ThinkingViT(SMALL), alpha=0.0)(images)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[1], no_recycling[1], atol=1e-3)  # alpha really changes stage 2


class WeightReads(TorchDispatchMode):
    """Records, for every aten op a forward runs, which parameters' storage it reads, and every op
    that makes a new tensor from parameters alone: a per-call copy (clone, contiguous, gather,
    cat of weight blocks, ...) of the weights, which a stage must never make."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
        self.read: set[str] = set()
        self.copies: list[str] = []

    def param(self, t: torch.Tensor) -> str | None:
        return self.storages.get(t.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = args[1:] if func is torch.ops.aten.copy_.default else (args, kwargs)
        if "out" in kwargs:  # an out= variant overwrites its destination: not a read
            sources = (args, {k: v for k, v in kwargs.items() if k != "out"})
        # index tensors (a gather's positions) are not data: only floating-point operands count
        reads = [t for t in tree_flatten(sources)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        names = [self.param(t) for t in reads]
        self.read.update(n for n in names if n)
        fresh = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and not self.param(t)]
        if reads and all(names) and fresh:
            self.copies.append(f"{func}({', '.join(names)})")
        return out


@torch.no_grad()
def test_stage_forward_reads_the_weights_in_place_without_copies():
    """No weight copies per call, checked through the real forward of every stage: every tensor
    an op reads that lives in a parameter's storage is read there (views only), and no op builds
    a new tensor from parameters alone."""
    model = randomise(ThinkingViT(SMALL), alpha=0.5).eval()
    model.set_attention_backend("sdpa")
    images = torch.randn(2, 3, SMALL.img_size, SMALL.img_size)
    embedded, recycled = model.embed(images), None
    for stage in range(model.num_stages):
        with WeightReads(model) as mode:
            recycled = model.forward_stage(stage, embedded, recycled).tokens
        assert mode.copies == [], f"stage {stage} copies weights per call: {mode.copies}"
        expected = {n for n, _ in model.named_parameters() if n.startswith(("blocks.", "norm.", "head."))}
        if stage > 0:
            proj = recycle_proj_name(stage - 1)
            expected |= {f"alpha.{stage - 1}", f"{proj}.weight", f"{proj}.bias"}
        assert expected <= mode.read, f"not seen reading {sorted(expected - mode.read)}"


def test_confidence_maps_entropy_to_unit_interval():
    sharp = torch.tensor([[20.0] + [0.0] * 9])
    flat = torch.zeros(1, 10)
    assert confidence(sharp).item() == pytest.approx(1.0, abs=1e-6)
    assert confidence(flat).item() == pytest.approx(0.0, abs=1e-6)
    # H < 0.46 nats <=> confidence > 0.8 (k = 10)
    probs = torch.tensor([[0.9] + [0.1 / 9] * 9])
    h = -(probs * probs.log()).sum()
    assert confidence(probs.log()).item() == pytest.approx(1 - h.item() / math.log(10), abs=1e-5)


def test_threshold_zero_always_exits_and_one_never_does():
    conf = torch.tensor([0.0, 0.5, 1.0])
    assert exits_early(conf, 0.0).all()
    assert not exits_early(conf, 1.0).any()  # even a saturated softmax (confidence exactly 1)
    assert exits_early(conf, 0.5).tolist() == [False, True, True]


@pytest.mark.parametrize("threshold", [0.0, "median", 1.0])
def test_adaptive_inference_equals_run_everything_and_pick(threshold):
    model = randomise(ThinkingViT(SMALL), alpha=0.3, seed=3)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        all_logits = model(images)
    if threshold == "median":  # random weights: a threshold that splits the batch
        threshold = confidence(all_logits[0]).median().item()
    result = adaptive_inference(model, images, threshold)
    expected_stage = torch.full((16,), len(SMALL.stages) - 1)
    for s in reversed(range(len(SMALL.stages) - 1)):
        expected_stage[exits_early(confidence(all_logits[s]), threshold)] = s
    assert torch.equal(result.exit_stage, expected_stage)
    picked = torch.stack([all_logits[s][i] for i, s in enumerate(expected_stage.tolist())])
    torch.testing.assert_close(result.logits, picked, atol=1e-5, rtol=1e-5)
    assert result.image_stages == int((expected_stage + 1).sum())
    if 0 < threshold < 1:
        assert result.image_stages < 16 * len(SMALL.stages)


def test_adaptive_inference_accepts_per_image_thresholds():
    model = randomise(ThinkingViT(SMALL), alpha=0.3, seed=5)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    result = adaptive_inference(model, images, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert result.exit_stage.tolist() == [0, 2, 0, 2, 0, 2]
