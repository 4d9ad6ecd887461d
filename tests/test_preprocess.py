"""Preprocessing: the authors' ImageNet eval transform, and serving == training for Fashion-MNIST."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import load_fashion_mnist
from model.preprocess import FASHION_MNIST, IMAGENET_EVAL, Preprocess, normalise, preprocess_image


def test_imagenet_eval_resizes_short_side_then_center_crops():
    image = Image.new("RGB", (300, 400), (124, 116, 104))  # ~ the ImageNet mean
    x = preprocess_image(image, IMAGENET_EVAL)
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.02


def test_center_crop_takes_the_middle():
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, 100:200] = 255  # white middle third
    cfg = Preprocess(size=100, resize=100, crop_pct=1.0, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    x = preprocess_image(Image.fromarray(array), cfg)
    assert torch.all(x == 1.0)


def test_grayscale_model_accepts_rgb_and_palette_images():
    for mode in ("RGB", "P", "RGBA", "I;16"):
        x = preprocess_image(Image.new(mode, (28, 28)), FASHION_MNIST)
        assert x.shape == (1, 28, 28)


def test_served_png_equals_the_training_tensor():
    data = load_fashion_mnist("test").subset(8)
    for image in data.images:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
        served = preprocess_image(Image.open(io.BytesIO(buffer.getvalue())), FASHION_MNIST)
        torch.testing.assert_close(served, normalise(image[None], FASHION_MNIST)[0])


def test_preprocess_round_trips_through_metadata():
    assert Preprocess.from_dict(FASHION_MNIST.to_dict()) == FASHION_MNIST
    with pytest.raises(TypeError):
        Preprocess.from_dict({**FASHION_MNIST.to_dict(), "bogus": 1})
