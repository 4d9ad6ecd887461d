"""Preprocessing as data (stored in checkpoint metadata) plus the functions that apply it: to a
decoded image (serving) and to a batch already at the model's size (training, the sweep)."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # annotations only: the API server processes that decode uploads never import torch
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    size: int = 224  # center crop, the model's input side
    resize: int = 248  # short side before cropping (size / crop_pct)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3  # 3 = RGB, 1 = grayscale

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


IMAGENET_EVAL = Preprocess()
FASHION_MNIST = Preprocess(
    size=28, resize=28, crop_pct=1.0, interpolation="bilinear", mean=(0.2860,), std=(0.3530,), channels=1
)


def preprocess_array(image: Image.Image, cfg: Preprocess) -> np.ndarray:
    """PIL image -> normalised float32 array (C, size, size): resize short side, center crop.

    numpy only, so the API server processes that decode uploads never import torch. An image
    already in the model's mode and size (a Fashion-MNIST upload) is neither converted, resized
    nor cropped: each would copy it, and this runs once per request in the API servers.
    """
    mode = "RGB" if cfg.channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    w, h = image.size
    scale = cfg.resize / min(w, h)
    new_w, new_h = max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), INTERPOLATIONS[cfg.interpolation])
    if (new_w, new_h) != (cfg.size, cfg.size):
        left, top = (new_w - cfg.size) // 2, (new_h - cfg.size) // 2
        image = image.crop((left, top, left + cfg.size, top + cfg.size))
    array = np.asarray(image, dtype=np.float32).reshape(cfg.size, cfg.size, cfg.channels)  # (H, W, C)
    mean, inv_std = _normalisation(cfg)
    return np.ascontiguousarray(((array - mean) * inv_std).transpose(2, 0, 1))  # (C, size, size)


@functools.cache
def _normalisation(cfg: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / std) on the 0-255 scale, float32 (C,): computed once per preprocessing config."""
    return np.asarray(cfg.mean, dtype=np.float32) * 255.0, 1.0 / (np.asarray(cfg.std, dtype=np.float32) * 255.0)


def preprocess_image(image: Image.Image, cfg: Preprocess) -> torch.Tensor:
    """The same as :func:`preprocess_array`, as a torch tensor (C, size, size)."""
    import torch

    return torch.from_numpy(preprocess_array(image, cfg))


def normalise(images_u8: torch.Tensor, cfg: Preprocess) -> torch.Tensor:
    """A uint8 batch already at the model's size (B, C, H, W) -> normalised float32 (B, C, H, W):
    :func:`preprocess_array`'s last step for a whole dataset tensor (training, the sweep). The
    constants come from the batch (``new_tensor``), so this module still imports no torch."""
    x = images_u8.float() / 255.0  # (B, C, H, W) in [0, 1]
    mean = x.new_tensor(cfg.mean).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = x.new_tensor(cfg.std).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return (x - mean) / std
