"""Datasets held in memory as uint8 tensors: Fashion-MNIST from Debian's IDX files, image folders."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DOMAIN = (
    "Fashion-MNIST: 28x28 grayscale images of single clothing items and shoes, 10 classes. Any other "
    "image (a portrait, a cat) still gets one of these labels, often confidently: the early-exit "
    "confidence is not an out-of-distribution detector"
)  # the checkpoint metadata's "domain", which GET /v1/model shows
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageDataset:
    images: torch.Tensor  # (n, C, H, W) uint8
    labels: torch.Tensor  # (n,) int64
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "ImageDataset":
        return ImageDataset(self.images[:n], self.labels[:n], self.class_names)


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian), or pass --data-dir. Nothing is downloaded."
    )


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> ImageDataset:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),  # (n, 1, 28, 28)
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
    )


def load_image_folder(root: Path | str, size: int, channels: int = 3) -> ImageDataset:
    """One sub-folder per class (sorted names = class indices); images resized to size x size."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-folders")
    images, labels = [], []
    mode = "RGB" if channels == 3 else "L"
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(file) as im:
                array = np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BILINEAR))
            images.append(torch.from_numpy(array.reshape(size, size, channels).copy()).permute(2, 0, 1))
            labels.append(index)
    if not images:
        raise FileNotFoundError(f"{root}: no images found")
    return ImageDataset(torch.stack(images), torch.tensor(labels), classes)
