"""Our loader and forward against outputs recorded with the authors' own code.

The files under tests/fixtures/authors/ were written by the authors' timm and training code
(ds-kiel/ThinkingViT; commits and the generator in that folder's README): their v1 training
checkpoints (768-wide, CheckpointSaver dicts with EMA weights and the argparse args), their v2
export (scripts/export_hf_models.py) and one v2-era training checkpoint, each with the per-stage
logits, entropies and exit decisions their model produced on fixed images with Token Recycling on.
Nothing here is produced by our own ``state_dict()``.
"""
from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model import confidence, exits_early
from model.checkpoint import load_checkpoint
from model.inference import adaptive_inference

FIXTURES = Path(__file__).parent / "fixtures" / "authors"
LOGITS_ATOL = 2e-4  # logits have a std of about 8; float32 summation order differs
LN10 = math.log(10)

# (reference name, checkpoint file, preset, layout our loader must report)
CASES = [
    ("v1-3-6", "v1-3-6.pth.tar", None, "authors-v1"),
    ("v1-2-3-6", "v1-2-3-6.pth.tar", None, "authors-v1"),
    ("v2-3-6", "v2-3-6.safetensors", None, "authors-v2"),
    ("v2-2-3-6-hd8", "v2-2-3-6-hd8.safetensors", "tiny-authors-2-3-6", "authors-v2"),
    ("v2-2-3-6-hd8", "v2-2-3-6-hd8-train.pth.tar", "tiny-authors-2-3-6", "authors-v1"),
]
IDS = [case[1] for case in CASES]


def reference(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = FIXTURES / f"{name}.reference.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["reference"])
    return load_file(str(path)), meta


def unpack(tmp_path: Path, filename: str) -> Path:
    """The fixtures are stored xz-compressed; the loader sees the authors' file as written."""
    out = tmp_path / filename
    out.write_bytes(lzma.decompress((FIXTURES / f"{filename}.xz").read_bytes()))
    return out


@pytest.fixture(params=CASES, ids=IDS)
def loaded_case(request, tmp_path):
    name, filename, preset, layout = request.param
    ref, meta = reference(name)
    loaded = load_checkpoint(unpack(tmp_path, filename), preset=preset)
    return loaded, ref, meta, layout


def stage_logits(model, images):
    embedded = model.embed(images)
    logits, recycled = [], None
    for stage in range(model.num_stages):
        out = model.forward_stage(stage, embedded, recycled)
        logits.append(out.logits)
        recycled = out.tokens
    return logits


def test_fixtures_come_from_the_authors_code():
    for name in {case[0] for case in CASES}:
        _, meta = reference(name)
        assert len(meta["authors_commit"]) == 40
        assert meta["layout"] in ("authors-v1", "authors-v2")


def test_config_and_layout_match_the_authors_model(loaded_case):
    loaded, _, meta, layout = loaded_case
    cfg = loaded.model.config
    assert loaded.source_layout == layout
    assert list(cfg.stages) == meta["stages"]
    assert cfg.head_dim == meta["head_dim"]
    assert cfg.num_classes == meta["num_classes"]
    assert cfg.depth == meta["depth"]
    assert cfg.img_size == meta["img_size"] and cfg.patch_size == meta["patch_size"]


@torch.no_grad()
def test_per_stage_logits_match_the_authors(loaded_case):
    loaded, ref, meta, _ = loaded_case
    ours = stage_logits(loaded.model, ref["images"])
    assert len(ours) == len(meta["stages"])
    for stage, logits in enumerate(ours):
        theirs = ref[f"logits_stage{stage}"]
        err = (logits - theirs).abs().max().item()
        assert err < LOGITS_ATOL, f"stage {stage}: max |ours - authors'| = {err:.3g}"


@torch.no_grad()
def test_confidence_is_the_authors_top10_entropy(loaded_case):
    loaded, ref, _, _ = loaded_case
    for stage, logits in enumerate(stage_logits(loaded.model, ref["images"])):
        expected = 1 - ref[f"entropy_stage{stage}"] / LN10
        assert torch.allclose(confidence(logits), expected, atol=1e-4)


def authors_tau_as_threshold(tau: float) -> float:
    """Their rule exits when H < tau; ours when 1 - H / ln 10 >= threshold, threshold in [0, 1]."""
    return min(1.0, max(0.0, 1.0 - tau / LN10))


@torch.no_grad()
def test_exit_decisions_match_the_authors_exactly(loaded_case):
    loaded, ref, _, _ = loaded_case
    model, images = loaded.model, ref["images"]
    all_logits = stage_logits(model, images)
    last = model.num_stages - 1
    for tau, theirs in zip(ref["taus"].tolist(), ref["exit_stage"]):
        threshold = authors_tau_as_threshold(tau)
        # the serving exit rule, stage by stage on every image
        exit_stage = torch.full((images.shape[0],), last)
        for stage in reversed(range(last)):
            leaves = exits_early(confidence(all_logits[stage]), threshold)
            exit_stage[leaves] = stage
        assert exit_stage.tolist() == theirs.tolist(), f"tau {tau}"
        # the offline path with real re-batching of survivors
        result = adaptive_inference(model, images, threshold)
        assert result.exit_stage.tolist() == theirs.tolist(), f"tau {tau} (adaptive_inference)"
        chosen = torch.stack([all_logits[s][i] for i, s in enumerate(theirs.tolist())])
        assert (result.logits - chosen).abs().max().item() < LOGITS_ATOL


def test_every_exit_stage_is_exercised():
    """The recorded decisions cover every stage, so a wrong exit rule cannot pass unseen."""
    for name in {case[0] for case in CASES}:
        ref, meta = reference(name)
        assert set(ref["exit_stage"].unique().tolist()) == set(range(len(meta["stages"])))
