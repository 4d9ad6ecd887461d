"""The ThinkingViT model: config, presets, nested forward, checkpoints, compute accounting."""
from model.thinkingvit import (
    PRESETS,
    StageOutput,
    ThinkingViT,
    ThinkingViTConfig,
    confidence,
    create_model,
    exits_early,
    get_config,
)

__all__ = [
    "PRESETS",
    "StageOutput",
    "ThinkingViT",
    "ThinkingViTConfig",
    "confidence",
    "create_model",
    "exits_early",
    "get_config",
]
