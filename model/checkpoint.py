"""Checkpoints: our format, the authors' v2 safetensors and their v1 ``.pth.tar``.

Our format is one safetensors file: the weights in the authors' v2 layout (so their timm code reads
it too) and JSON metadata under the header key ``thinkingvit`` (config, preset, class names,
preprocessing, training summary, calibration). Pickles are read with ``weights_only=True`` only.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.calibration import in_fractions
from model.preprocess import IMAGENET_EVAL, Preprocess
from model.thinkingvit import ThinkingViT, ThinkingViTConfig, get_config, recycle_proj_name

METADATA_KEY = "thinkingvit"
FORMAT_VERSION = "thinkingvit-serve/1"
AUTHORS_HEAD_DIM = 64

# timm's CheckpointSaver, which wrote the authors' training checkpoints, pickles the training args
# as an argparse.Namespace (a plain attribute bag) next to the weights; without this allowance a
# weights-only load refuses every one of their .pth.tar files. (torch>=2.4 has add_safe_globals;
# the safe_globals context manager needs 2.5.)
torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending key."""


@dataclass
class LoadedCheckpoint:
    model: ThinkingViT
    metadata: dict = field(default_factory=dict)
    source_layout: str = "thinkingvit-serve"  # or "authors-v2", "authors-v1"

    @property
    def preprocess(self) -> Preprocess:
        d = self.metadata.get("preprocess")
        return Preprocess.from_dict(d) if d else IMAGENET_EVAL

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.get("class_names")
        return list(names) if names else [str(i) for i in range(self.model.config.num_classes)]


def build_metadata(model: ThinkingViT, preset: str | None = None, **extra) -> dict:
    return {"format": FORMAT_VERSION, "preset": preset, "config": model.config.to_dict(), **extra}


def save_checkpoint(path: str | Path, model: ThinkingViT, metadata: dict) -> None:
    metadata = {**metadata, "format": FORMAT_VERSION, "config": model.config.to_dict()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})


def read_metadata(path: str | Path) -> dict:
    """Our metadata from a safetensors header, without reading the weights ({} if absent)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    if metadata.get("calibration"):  # older files store percent; every reader gets fractions
        metadata["calibration"] = in_fractions(metadata["calibration"])
    return metadata


def load_checkpoint(
    path: str | Path, preset: str | None = None, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load any supported checkpoint; the config comes from metadata, ``preset`` or the shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file: {e}") from e
        layout = "thinkingvit-serve" if metadata else "authors-v2"
    else:
        state, metadata, layout = _read_v1(path), {}, "authors-v1"

    if metadata.get("config"):
        config = ThinkingViTConfig.from_dict(metadata["config"])
    elif preset:
        config = get_config(preset)
    else:
        config = infer_config(state, layout)
    if layout == "authors-v1":
        state = convert_v1_to_v2(state, config)
    if not metadata:
        metadata = {"format": FORMAT_VERSION, "preset": preset, "config": config.to_dict(),
                    "preprocess": IMAGENET_EVAL.to_dict(), "source": str(path.name)}
    model = ThinkingViT(config)
    check_state_dict(state, model, path)
    model.load_state_dict(state, strict=True)
    return LoadedCheckpoint(model.to(device).eval(), metadata, layout)


def _read_v1(path: Path) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # PyTorch's own text advises loading unsafely: it is not passed on
        raise CheckpointError(_pickle_problem(path, e)) from None
    if isinstance(blob, dict) and ("state_dict_ema" in blob or "state_dict" in blob):
        blob = blob.get("state_dict_ema") or blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors inside")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def _pickle_problem(path: Path, error: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if not found:
        return f"{path}: not a checkpoint (neither safetensors nor a PyTorch weights file)"
    return f"{path}: refused: the pickle holds {found.group(1)}; checkpoints are read weights-only, never run"


def _block_count(state: dict) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _recycle_widths(state: dict) -> list[int]:
    widths, t = [], 0
    while (key := f"{recycle_proj_name(t)}.weight") in state:
        widths.append(state[key].shape[1])
        t += 1
    return widths


def infer_config(state: dict, layout: str, head_dim: int = AUTHORS_HEAD_DIM) -> ThinkingViTConfig:
    """Config from tensor shapes. v1 files hold 768-wide tensors whatever the stages: the last
    stage is taken as twice the previous (the authors' 3->6, 2->3->6, 3->6->12); else pass a preset."""
    try:
        patch = state["patch_embed.proj.weight"]
        n_tokens = state["pos_embed"].shape[1]
        stages = [w // head_dim for w in _recycle_widths(state)]
        if layout == "authors-v1":
            stages.append(2 * stages[-1])
        else:
            stages.append(state["cls_token"].shape[-1] // head_dim)
        return ThinkingViTConfig(
            img_size=math.isqrt(n_tokens - 1) * patch.shape[-1], patch_size=patch.shape[-1],
            in_chans=patch.shape[1], num_classes=state["head.weight"].shape[0],
            depth=_block_count(state), head_dim=head_dim, stages=tuple(stages),
            mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / state["blocks.0.mlp.fc1.weight"].shape[1],
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot infer the model config from the tensors ({e}); pass a preset") from e


def convert_v1_to_v2(state: dict, cfg: ThinkingViTConfig) -> dict[str, torch.Tensor]:
    """Exact v1 -> v2: qkv per Q/K/V block, every other tensor cropped to its v2 shape."""
    target = ThinkingViT(cfg).state_dict()
    D = cfg.embed_dim
    out = {}
    for key, shape in ((k, v.shape) for k, v in target.items()):
        if key not in state:
            raise CheckpointError(f"v1 checkpoint lacks {key} (expected a tensor cropping to {tuple(shape)})")
        t = state[key]
        if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            full = t.shape[0] // 3
            t = torch.cat([t[b * full : b * full + D] for b in range(3)])  # (3D, ...) per Q/K/V block
        if t.dim() != len(shape) or any(have < want for have, want in zip(t.shape, shape)):
            raise CheckpointError(f"v1 tensor {key}: shape {tuple(t.shape)} cannot crop to {tuple(shape)}")
        out[key] = t[tuple(slice(0, n) for n in shape)].clone()  # prefix crop
    return out


def check_state_dict(state: dict, model: ThinkingViT, source: str | Path = "checkpoint") -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise CheckpointError(f"{source}: does not match the model config: " + " | ".join(problems))
