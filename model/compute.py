"""Analytic compute, counted as the ThinkingViT authors count it.

Per stage of width d: patch-embed conv + depth * N * (12 d^2 + 2 N d) + head. Norms, softmax,
GELU, the recycling projection and the exit rule are not counted.
"""
from __future__ import annotations

from collections.abc import Sequence

from model.config import ThinkingViTConfig


def stage_macs(cfg: ThinkingViTConfig, stage: int) -> int:
    d, N = cfg.stage_dim(stage), cfg.num_tokens
    patch_embed = cfg.num_patches * d * cfg.in_chans * cfg.patch_size**2
    # 12 d^2 = qkv 3d^2 + proj d^2 + mlp 8d^2 (ratio 4); 2 N d = q k^T and attn v.
    per_token = 4 * d * d + 2 * d * cfg.mlp_dim(d) + 2 * N * d
    head = d * cfg.num_classes
    return patch_embed + cfg.depth * N * per_token + head


def stage_gmacs(cfg: ThinkingViTConfig) -> list[float]:
    return [stage_macs(cfg, s) / 1e9 for s in range(len(cfg.stages))]


def cumulative_gmacs(cfg: ThinkingViTConfig) -> list[float]:
    """GMACs spent by an image that exits at stage s (it ran stages 0..s)."""
    out, total = [], 0.0
    for g in stage_gmacs(cfg):
        total += g
        out.append(total)
    return out


def expected_gmacs(cfg: ThinkingViTConfig, exit_shares: Sequence[float]) -> float:
    """sum_s f_s * sum_{j<=s} G_j, f_s the share of images that exit at stage s."""
    if len(exit_shares) != len(cfg.stages):
        raise ValueError(f"need one exit share per stage ({len(cfg.stages)}), got {len(exit_shares)}")
    return sum(f * g for f, g in zip(exit_shares, cumulative_gmacs(cfg)))
