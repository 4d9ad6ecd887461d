"""The training recipe's settings: a light module (no torch), so ``thinkingvit --help`` shows the
defaults without loading PyTorch. ``model.train`` runs them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    preset: str = "fmnist-3-6"
    epochs: int = 22  # 3.6-4.3 min each on a 2-core AMD EPYC with 2 workers: 84 min; see docs/training-notes.md
    batch_size: int = 64  # more updates per epoch: the budget is passes over the data, not capacity
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0  # 0.1 caps confidence near 0.78 on 10 classes: thresholds lose meaning
    pad_crop: int = 0  # random crop after padding by this many pixels; 0: the model underfits at this budget
    hflip: bool = True
    erase_prob: float = 0.0
    seed: int = 0
    threads: int = 0  # in all; 0 = torch's default
    workers: int = 2  # data-parallel CPU processes; 1 = a single process (always on a GPU)
    freeze_alpha: bool = False  # ablation: no token recycling (alpha fixed at 0)
    eval_every: int = 5  # test accuracy every N epochs (and after the last)
