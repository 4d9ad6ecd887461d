"""The ThinkingViT model: config, presets, nested forward, checkpoints, compute accounting.

The names below load ``model.thinkingvit`` (and torch) on first use, not at import: the API server
processes import ``model.preprocess`` and ``model.exit_rule`` and never need torch's model code.
"""

_EXPORTS = (
    "PRESETS",
    "StageOutput",
    "ThinkingViT",
    "ThinkingViTConfig",
    "confidence",
    "create_model",
    "exits_early",
    "get_config",
)
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from model import thinkingvit

        return getattr(thinkingvit, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
