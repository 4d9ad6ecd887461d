"""Threshold sweep: what each exit threshold buys in accuracy and compute, plus the calibration profile.

Every stage runs once on every image to get exact per-threshold figures (identical to the
re-batching helper's decisions, see tests); images/s is measured with the real re-batching helper.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.calibration import cheapest_row, percent_to_fraction
from model.compute import cumulative_gmacs
from model.data import ImageDataset
from model.inference import adaptive_inference
from model.preprocess import Preprocess, normalise
from model.thinkingvit import ThinkingViT, confidence, exits_early

FINE_THRESHOLDS = (0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
ACCURACY_TOLERANCE_PP = 0.3  # "as good as the full model" when within this many points
SWEEP_LABEL = "adaptive (threshold sweep)"  # legend entry of a sweep plotted alone


def default_thresholds() -> list[float]:
    coarse = [round(i / 20, 4) for i in range(21)]  # 0, 0.05, ..., 1
    return sorted(set(coarse) | set(FINE_THRESHOLDS))


@torch.inference_mode()
def all_stage_predictions(model: ThinkingViT, data: ImageDataset, pre: Preprocess, batch: int = 500):
    """(stages, n) predicted classes and confidences of every stage on every image."""
    preds, confs = [], []
    for i in range(0, len(data), batch):
        logits = model(normalise(data.images[i : i + batch], pre))
        preds.append(torch.stack([l.argmax(-1) for l in logits]))
        confs.append(torch.stack([confidence(l) for l in logits]))
    return torch.cat(preds, 1), torch.cat(confs, 1)


def exit_stages(confs: torch.Tensor, threshold: float) -> torch.Tensor:
    stages = confs.shape[0]
    stage = torch.full((confs.shape[1],), stages - 1)
    for s in reversed(range(stages - 1)):
        stage[exits_early(confs[s], threshold)] = s
    return stage


@torch.inference_mode()
def measure_images_per_second(model, images: torch.Tensor, threshold: float, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        adaptive_inference(model, images[i : i + batch], threshold)
    return len(images) / (time.perf_counter() - start)


def sweep(
    model: ThinkingViT, data: ImageDataset, pre: Preprocess, thresholds: list[float] | None = None,
    speed_images: int = 2000, batch: int = 256, progress: bool = True,
) -> dict:
    model.eval()
    thresholds = thresholds or default_thresholds()
    preds, confs = all_stage_predictions(model, data, pre)
    correct = preds == data.labels  # (stages, n)
    gmacs = cumulative_gmacs(model.config)
    speed_batch = normalise(data.images[:speed_images], pre)
    rows = []
    for t in tqdm(thresholds, desc="threshold sweep", disable=not progress):
        stage = exit_stages(confs, t)
        n_stages = confs.shape[0]
        picked = correct[stage, torch.arange(len(stage))]
        shares = [(stage == s).float().mean().item() for s in range(n_stages)]
        group_acc = [picked[stage == s].float().mean().item() * 100 if (stage == s).any() else None for s in range(n_stages)]
        rows.append({
            "threshold": t,
            "accuracy": round(picked.float().mean().item() * 100, 3),
            "exit_share": [round(f, 4) for f in shares],
            "exit_group_accuracy": [None if a is None else round(a, 3) for a in group_acc],
            "expected_gmacs": round(sum(f * g for f, g in zip(shares, gmacs)), 6),
            "images_per_second": round(measure_images_per_second(model, speed_batch, t, batch), 1),
        })
    stage_acc = [round(c.float().mean().item() * 100, 3) for c in correct]
    return {
        "images": len(data),
        "stage_accuracy": stage_acc,
        "stage_cumulative_gmacs": [round(g, 6) for g in gmacs],
        "rows": rows,
        "within_tolerance_threshold": threshold_within(rows, stage_acc[-1] - ACCURACY_TOLERANCE_PP),
    }


def threshold_within(rows: list[dict], target_accuracy: float) -> float | None:
    """The cheapest threshold whose accuracy reaches ``target_accuracy`` (model.calibration's rule)."""
    row = cheapest_row(rows, target_accuracy)
    return None if row is None else row["threshold"]


def calibration_profile(result: dict, split: str) -> dict:
    """The part of a sweep stored in checkpoint metadata for the server, accuracies as fractions
    (the sweep report says percent; the profile and the API use fractions, see model.calibration)."""
    keep = ("threshold", "exit_share", "expected_gmacs")
    return {
        "split": split, "images": result["images"],
        "stage_accuracy": [percent_to_fraction(a) for a in result["stage_accuracy"]],
        "rows": [{**{k: r[k] for k in keep}, "accuracy": percent_to_fraction(r["accuracy"])} for r in result["rows"]],
    }


def write_outputs(result: dict, out_dir: Path, title: str = "ThinkingViT", compared: dict[str, dict] | None = None,
                  label: str = SWEEP_LABEL) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, png_path = out_dir / "sweep.json", out_dir / "sweep.csv", out_dir / "sweep.png"
    json_path.write_text(json.dumps(result, indent=2))
    n_stages = len(result["stage_accuracy"])
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threshold", "accuracy", *[f"exit_share_{s + 1}" for s in range(n_stages)],
                    *[f"exit_group_accuracy_{s + 1}" for s in range(n_stages)], "expected_gmacs", "images_per_second"])
        for r in result["rows"]:
            w.writerow([r["threshold"], r["accuracy"], *r["exit_share"], *r["exit_group_accuracy"],
                        r["expected_gmacs"], r["images_per_second"]])
    plot_curve(result, png_path, title, compared, label)
    return [json_path, csv_path, png_path]


def plot_curve(result: dict, path: Path, title: str, compared: dict[str, dict] | None = None,
               label: str = SWEEP_LABEL) -> None:
    """Accuracy vs expected compute; ``compared`` sweeps (e.g. an ablation) share the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (name, res) in enumerate({label: result, **(compared or {})}.items()):
        rows = sorted(res["rows"], key=lambda r: r["expected_gmacs"])
        (line,) = ax.plot([r["expected_gmacs"] * 1000 for r in rows], [r["accuracy"] for r in rows], "o-", ms=3, label=name)
        for s, (acc, g) in enumerate(zip(res["stage_accuracy"], res["stage_cumulative_gmacs"])):
            ax.plot(g * 1000, acc, "s", ms=8, color="black" if i == 0 else line.get_color(), fillstyle="full" if i == 0 else "none")
            if i == 0:
                ax.annotate(f"always stage {s + 1}", (g * 1000, acc), textcoords="offset points", xytext=(6, -12))
    ax.set_xlabel("expected MMACs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
