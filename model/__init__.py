"""The ThinkingViT model: config, presets, nested forward, checkpoints, compute accounting.

The names below load ``model.thinkingvit`` (and torch) on first use, except the configuration's
(``model.config``), so light modules of this package (``model.config``, ``model.compute``,
``model.calibration``, ``model.train_settings``, ``model.exit_rule``, ``model.preprocess``) import
without torch: the launcher and the API server processes never load it.
"""

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


CONFIG_NAMES = ("PRESETS", "ThinkingViTConfig", "get_config")


def __getattr__(name: str):
    if name in CONFIG_NAMES:
        from model import config

        return getattr(config, name)
    if name in __all__:
        from model import thinkingvit

        return getattr(thinkingvit, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
