"""Pick the sample images of the page at ``GET /`` (run at development time, output committed).

    python -m tools.page_samples

Runs the shipped model's first stage (stage 0) over the first 2,000 Fashion-MNIST test images and keeps a
dozen: six it is sure of after a glance (easy: they exit at stage 0 under the default threshold)
and six it is unsure of (hard: they go on to stage 1), each from a different class where it can.
They go to ``service/page/samples/`` as 28x28 grayscale PNGs with ``samples.json`` (file, true
label, stage-0 confidence, easy or hard). Needs Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.data import load_fashion_mnist
from model.thinkingvit import confidence
from service.settings import DEFAULT_CHECKPOINT, Settings

OUT = Path(__file__).resolve().parents[1] / "service" / "page" / "samples"
SCAN = 2000
PER_KIND = 6


def first_stage_confidence(images: torch.Tensor) -> list[float]:
    """Stage-1 confidence of (n, 1, 28, 28) uint8 images, through the model's own preprocessing."""
    from model.preprocess import preprocess_image

    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    batch = torch.stack([preprocess_image(Image.fromarray(im[0].numpy()), loaded.preprocess) for im in images])
    with torch.inference_mode():
        logits = loaded.model.forward_stage(0, loaded.model.embed(batch)).logits  # (n, classes)
    return confidence(logits).tolist()


def pick(order: list[int], labels: list[int]) -> list[int]:
    """The first PER_KIND of ``order`` with distinct true labels (then any, if classes run out)."""
    chosen, seen = [], set()
    for i in order:
        if labels[i] not in seen:
            chosen.append(i)
            seen.add(labels[i])
        if len(chosen) == PER_KIND:
            return chosen
    return chosen + [i for i in order if i not in chosen][: PER_KIND - len(chosen)]


def main() -> int:
    data = load_fashion_mnist("test").subset(SCAN)
    conf = first_stage_confidence(data.images)
    labels = data.labels.tolist()
    threshold = Settings().default_threshold
    easy = pick(sorted(range(SCAN), key=lambda i: -conf[i]), labels)
    hard = pick(sorted(range(SCAN), key=lambda i: conf[i]), labels)
    OUT.mkdir(parents=True, exist_ok=True)
    samples = []
    for kind, indices in (("easy", easy), ("hard", hard)):
        for i in indices:
            name = f"fmnist-test-{i:04d}.png"
            Image.fromarray(data.images[i, 0].numpy()).save(OUT / name, optimize=True)
            samples.append({"file": name, "label": data.class_names[labels[i]], "test_index": i,
                            "first_stage_confidence": round(conf[i], 4), "kind": kind})  # fmt: skip
    (OUT / "samples.json").write_text(json.dumps({"threshold": threshold, "samples": samples}, indent=1) + "\n")
    print(f"{len(samples)} samples in {OUT} (default threshold {threshold})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
