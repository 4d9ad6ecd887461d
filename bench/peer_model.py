"""What both peers run: the full model (every stage, no early exit) on a checkpoint, with the same
preprocessing function as our server. A module of its own so that ``bench.peers`` (which starts a
peer) and ``bench.litserve_peer`` (LitServe pickles its API into worker processes) both import it
and neither imports the other at load time.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.preprocess import Preprocess, preprocess_image


def decode(data: bytes, pre: Preprocess) -> torch.Tensor:
    """PNG bytes -> normalised (C, H, W): the same preprocessing function our server uses."""
    return preprocess_image(Image.open(io.BytesIO(data)), pre)


@torch.inference_mode()
def full_model(loaded: LoadedCheckpoint, images: torch.Tensor) -> list[dict]:
    """Every stage on every image (threshold 1); the last stage answers."""
    probs = loaded.model(images)[-1].float().softmax(-1)  # (B, classes)
    best = probs.max(-1)
    names = loaded.class_names
    return [
        {"class_index": i, "label": names[i], "probability": p}
        for i, p in zip(best.indices.tolist(), best.values.tolist())
    ]


def load(checkpoint: str, device: str, threads: int) -> LoadedCheckpoint:
    if threads:
        torch.set_num_threads(threads)
    return load_checkpoint(checkpoint, device=device)
