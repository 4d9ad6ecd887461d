"""Offline adaptive inference: the exit rule per image, with real re-batching of survivors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.thinkingvit import ThinkingViT, confidence, exits_early


@dataclass
class AdaptiveResult:
    logits: torch.Tensor  # (B, classes), from each image's exit stage
    exit_stage: torch.Tensor  # (B,) int64
    confidence: torch.Tensor  # (B,) at the exit stage
    image_stages: int  # stage executions summed over images (compute actually run)


@torch.inference_mode()
def adaptive_inference(
    model: ThinkingViT, images: torch.Tensor, threshold: float | torch.Tensor
) -> AdaptiveResult:
    """Run stage 0 on all images, then each later stage only on the still-undecided ones.

    ``threshold`` is a float or a per-image tensor (B,). Undecided images are gathered, with
    their recycled tokens, into a smaller batch for the next stage.
    """
    B = images.shape[0]
    device = images.device
    thresholds = torch.as_tensor(threshold, dtype=torch.float32, device=device).expand(B)
    embedded = model.embed(images)  # (B, N, D)
    out_logits = torch.empty(B, model.config.num_classes, device=device)
    out_stage = torch.empty(B, dtype=torch.long, device=device)
    out_conf = torch.empty(B, device=device)
    active = torch.arange(B, device=device)  # indices into the batch of undecided images
    recycled, image_stages = None, 0
    for stage in range(model.num_stages):
        logits, tokens = model.forward_stage(stage, embedded, recycled)
        image_stages += active.numel()
        conf = confidence(logits)
        last = stage == model.num_stages - 1
        done = torch.ones_like(conf, dtype=torch.bool) if last else exits_early(conf, thresholds)
        idx = active[done]
        out_logits[idx] = logits[done].float()
        out_stage[idx] = stage
        out_conf[idx] = conf[done]
        keep = ~done
        if not keep.any():
            break
        active, thresholds = active[keep], thresholds[keep]
        embedded, recycled = embedded[keep], tokens[keep]  # gathered: (B', N, D), (B', N, d)
    return AdaptiveResult(out_logits, out_stage, out_conf, image_stages)
