"""ThinkingViT: a nested ViT whose stage s runs the first ``stages[s]`` heads of every layer.

Every stage uses top-left blocks of the same full-width tensors (per Q/K/V block for qkv), so a
stage is a dense ViT of width ``d = head_dim * k``. Stage s > 0 starts from the image embedding plus
``alpha * proj(tokens of stage s-1)`` (Token Recycling). See ``shared/spec/thinkingvit.md``.

Serving-oriented forward: :meth:`ThinkingViT.embed` once per image, then
:meth:`ThinkingViT.forward_stage` per stage on whichever images are still undecided.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import sliced_attention
from model import exit_rule
from model.config import ThinkingViTConfig, get_config

LN_EPS = 1e-6


def recycle_proj_name(transition: int) -> str:
    """The authors' module names: ``proj_layer`` for stage 0 -> 1, ``proj_layer2`` for 1 -> 2, ..."""
    return "proj_layer" if transition == 0 else f"proj_layer{transition + 1}"


def qkv_rows_to_head_major(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Authors' row order (Q | K | V blocks, heads inside) -> head-major (head, q/k/v, hd)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_rows_to_authors(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _load_qkv_authors_layout(module, state_dict, prefix, *args):
    for name in ("weight", "bias"):
        key = f"{prefix}qkv.{name}"
        if key in state_dict and state_dict[key].shape == getattr(module.qkv, name).shape:
            state_dict[key] = qkv_rows_to_head_major(state_dict[key], module.num_heads)


def _save_qkv_authors_layout(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        key = f"{prefix}qkv.{name}"
        if key in state_dict:
            state_dict[key] = qkv_rows_to_authors(state_dict[key], module.num_heads)


class Attention(nn.Module):
    """Multi-head self-attention whose qkv rows are stored head-major.

    Head-major rows make the first k heads a contiguous row prefix ``qkv.weight[:3*k*hd, :d]``, a
    free view for ``F.linear``. ``state_dict`` and ``load_state_dict`` speak the authors' row
    order, so checkpoints round-trip unchanged; the permutation happens only at load/save.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.backend: str | None = None  # attention backend, see kernels.attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_load_state_dict_pre_hook(_load_qkv_authors_layout)
        self.register_state_dict_post_hook(_save_qkv_authors_layout)

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, d = x.shape
        rows = 3 * heads * self.head_dim
        qkv = F.linear(x, self.qkv.weight[:rows, :d], self.qkv.bias[:rows])  # (B, N, k*3*hd)
        out = sliced_attention(qkv, heads, self.head_dim, self.backend)  # (B, N, d)
        return F.linear(out, self.proj.weight[:d, :d], self.proj.bias[:d])  # (B, N, d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, mlp_ratio: float):
        super().__init__()
        self.mlp_ratio = mlp_ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        h = int(d * self.mlp_ratio)
        x = F.gelu(F.linear(x, self.fc1.weight[:h, :d], self.fc1.bias[:h]))  # (B, N, h)
        return F.linear(x, self.fc2.weight[:d, :h], self.fc2.bias[:d])  # (B, N, d)


def sliced_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return F.layer_norm(x, (d,), norm.weight[:d], norm.bias[:d], LN_EPS)


class Block(nn.Module):
    def __init__(self, cfg: ThinkingViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, cfg.mlp_dim(dim), cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        x = x + self.attn(sliced_layer_norm(self.norm1, x), heads)
        return x + self.mlp(sliced_layer_norm(self.norm2, x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ThinkingViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N-1, D)


class StageOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes)
    tokens: torch.Tensor  # (B, N, d_s), after the stage's final norm: what the next stage recycles


class ThinkingViT(nn.Module):
    def __init__(self, config: ThinkingViTConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.head = nn.Linear(D, cfg.num_classes)
        transitions = len(cfg.stages) - 1
        self.alpha = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(transitions))
        self._init_weights()
        for t in range(transitions):  # PyTorch's default Linear init, as the authors'
            self.add_module(recycle_proj_name(t), nn.Linear(cfg.stage_dim(t), D))

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def num_stages(self) -> int:
        return len(self.config.stages)

    def set_attention_backend(self, backend: str | None) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def recycle_proj(self, transition: int) -> nn.Linear:
        return getattr(self, recycle_proj_name(transition))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Class token, patch and position embedding at full width, computed once per image."""
        B = images.shape[0]
        x = self.patch_embed(images)  # (B, N-1, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, N, D)
        return x + self.pos_embed  # (B, N, D)

    def forward_stage(
        self, stage: int, embedded: torch.Tensor, recycled: torch.Tensor | None = None
    ) -> StageOutput:
        """Run stage ``stage`` on ``embedded`` (B, N, D); stages > 0 need stage-1's ``tokens``."""
        d = self.config.stage_dim(stage)
        heads = self.config.stages[stage]
        x = embedded[..., :d]  # (B, N, d)
        if stage > 0:
            # Token Recycling; only the first d output rows of the projection survive the cut.
            proj = self.recycle_proj(stage - 1)
            x = x + self.alpha[stage - 1] * F.linear(recycled, proj.weight[:d], proj.bias[:d])
        for block in self.blocks:
            x = block(x, heads)  # (B, N, d)
        tokens = sliced_layer_norm(self.norm, x)  # (B, N, d)
        logits = F.linear(tokens[:, 0], self.head.weight[:, :d], self.head.bias)  # (B, classes)
        return StageOutput(logits, tokens)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Training forward: every stage on every image; one logits tensor per stage."""
        embedded = self.embed(images)
        all_logits, recycled = [], None
        for stage in range(self.num_stages):
            logits, recycled = self.forward_stage(stage, embedded, recycled)
            all_logits.append(logits)
        return all_logits


def create_model(preset_or_config: str | ThinkingViTConfig) -> ThinkingViT:
    cfg = preset_or_config
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    return ThinkingViT(cfg)


# ----------------------------------------------------------------------------- exit rule

CONFIDENCE_TOP_K = 10


def confidence(logits: torch.Tensor, top_k: int = CONFIDENCE_TOP_K) -> torch.Tensor:
    """1 - H / ln(k): H the entropy (nats) of the renormalised top-k softmax, k = min(10, C).

    The authors exit on H < tau; this maps H to [0, 1] so a threshold reads as a confidence.
    """
    k = min(top_k, logits.shape[-1])
    if k < 2:
        return torch.ones(logits.shape[0], device=logits.device)
    probs = logits.float().softmax(-1).topk(k, dim=-1).values  # (B, k)
    probs = probs / probs.sum(-1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (B,)
    return (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)


def exits_early(conf: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Per-image exit decision before the last stage, on a batch (the rule: ``model.exit_rule``)."""
    threshold = torch.as_tensor(threshold, dtype=conf.dtype, device=conf.device)
    return exit_rule.exits_early(conf, threshold)
