"""What the API says about the loaded model: classes, stages, compute, calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.calibration import cheapest_row
from model.compute import cumulative_gmacs, stage_gmacs
from model.config import ThinkingViTConfig
from model.preprocess import Preprocess

if TYPE_CHECKING:  # the API servers hold a ServedModel and never load torch
    from model.checkpoint import LoadedCheckpoint


UNKNOWN_DOMAIN = (
    "not stated in the checkpoint: check what it was trained on. Any image gets one of its labels; "
    "the early-exit confidence is not an out-of-distribution detector"
)


@dataclass(frozen=True)
class ServedModel:
    checkpoint: str  # file name
    preset: str | None
    domain: str  # what images the model knows, from the checkpoint metadata
    config: ThinkingViTConfig
    class_names: tuple[str, ...]
    preprocess: Preprocess
    calibration: dict | None  # the checkpoint's threshold sweep, see cheapest_threshold
    stage_gmacs: tuple[float, ...]  # compute of each stage alone
    exit_gmacs: tuple[float, ...]  # compute of a request that exits at each stage

    @classmethod
    def from_checkpoint(cls, name: str, loaded: LoadedCheckpoint) -> ServedModel:
        cfg = loaded.model.config
        return cls(
            checkpoint=name,
            preset=loaded.metadata.get("preset"),
            domain=loaded.metadata.get("domain") or UNKNOWN_DOMAIN,
            config=cfg,
            class_names=tuple(loaded.class_names),
            preprocess=loaded.preprocess,
            calibration=loaded.metadata.get("calibration"),
            stage_gmacs=tuple(stage_gmacs(cfg)),
            exit_gmacs=tuple(cumulative_gmacs(cfg)),
        )

    @property
    def num_stages(self) -> int:
        return len(self.config.stages)

    def describe(self) -> dict:
        cfg = self.config
        stages = [
            {"stage": s, "heads": heads, "width": cfg.stage_dim(s),
             "gmacs": self.stage_gmacs[s], "exit_gmacs": self.exit_gmacs[s]}
            for s, heads in enumerate(cfg.stages)
        ]  # fmt: skip
        return {
            "checkpoint": self.checkpoint,
            "preset": self.preset,
            "domain": self.domain,
            "stages": stages,
            "num_classes": cfg.num_classes,
            "class_names": list(self.class_names),
            "img_size": cfg.img_size,
            "in_chans": cfg.in_chans,
            "config": cfg.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "calibration": self.calibration,
        }


def cheapest_threshold(calibration: dict | None, target_accuracy: float) -> dict | None:
    """The calibration row with the least expected compute whose accuracy (a fraction) reaches the
    target; None when there is no calibration or no threshold reaches the target."""
    return cheapest_row((calibration or {}).get("rows", []), target_accuracy)
