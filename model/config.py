"""ThinkingViT's configuration and named presets: plain data, no torch.

The API server processes and the launcher describe the served model (classes, stages, compute)
without loading torch, which took about 2 s and 230 MB in each of them; ``model.thinkingvit``
builds the model from these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ThinkingViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    depth: int = 12
    head_dim: int = 64
    stages: tuple[int, ...] = (3, 6)  # heads per stage, strictly increasing
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(int(k) for k in self.stages))
        if not self.stages or any(k <= 0 for k in self.stages):
            raise ValueError(f"stages must be positive head counts, got {self.stages}")
        if any(a >= b for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"stages must be strictly increasing, got {self.stages}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch {self.patch_size}")

    @property
    def num_heads(self) -> int:
        return self.stages[-1]

    @property
    def embed_dim(self) -> int:
        return self.head_dim * self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + class token

    def stage_dim(self, stage: int) -> int:
        return self.head_dim * self.stages[stage]

    def mlp_dim(self, dim: int) -> int:
        return int(dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ThinkingViTConfig":
        return cls(**{**d, "stages": tuple(d["stages"])})


# Named layouts. The authors' ImageNet models, and the shipped Fashion-MNIST model.
PRESETS: dict[str, ThinkingViTConfig] = {
    "deit-s-3-6": ThinkingViTConfig(stages=(3, 6)),
    "deit-s-2-3-6": ThinkingViTConfig(stages=(2, 3, 6)),
    "deit-b-3-6-12": ThinkingViTConfig(stages=(3, 6, 12)),
    "fmnist-3-6": ThinkingViTConfig(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=6, head_dim=16, stages=(3, 6)
    ),
    "tiny-test": ThinkingViTConfig(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, depth=2, head_dim=8, stages=(2, 4)
    ),
    # the layout of tests/fixtures/authors/v2-2-3-6-hd8: head_dim 8 cannot be inferred from shapes
    "tiny-authors-2-3-6": ThinkingViTConfig(
        img_size=16, patch_size=4, in_chans=1, num_classes=1000, depth=2, head_dim=8, stages=(2, 3, 6)
    ),
}


def get_config(preset: str) -> ThinkingViTConfig:
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]
