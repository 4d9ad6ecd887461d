"""Checkpoint formats: ours (round trip), the authors' v2 safetensors and v1 .pth.tar, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CheckpointError,
    build_metadata,
    convert_v1_to_v2,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model.preprocess import FASHION_MNIST
from model.thinkingvit import ThinkingViT, ThinkingViTConfig, get_config
from service.cli import main as cli_main
from tests.test_authors_reference import unpack
from tests.test_model import randomise

V2 = ThinkingViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=5, depth=2, head_dim=64, stages=(3, 6))
V1_FULL = ThinkingViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=5, depth=2, head_dim=64, stages=(3, 6, 12))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model: ThinkingViT) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(IMAGES)


def test_our_format_round_trips_weights_and_metadata(tmp_path):
    model = randomise(ThinkingViT(V2), alpha=0.4)
    meta = build_metadata(model, "custom", class_names=list("abcde"), preprocess=FASHION_MNIST.to_dict())
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, meta)
    loaded = load_checkpoint(path)
    assert loaded.source_layout == "thinkingvit-serve"
    assert loaded.class_names == list("abcde")
    assert loaded.preprocess == FASHION_MNIST
    assert loaded.model.config == V2
    for a, b in zip(logits(model), logits(loaded.model)):
        assert torch.equal(a, b)
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.model.state_dict().items())


def test_authors_v2_safetensors_without_metadata_infers_config(tmp_path):
    model = randomise(ThinkingViT(V2), alpha=0.2)
    path = tmp_path / "authors.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # authors' row order
    loaded = load_checkpoint(path)
    assert loaded.source_layout == "authors-v2"
    assert loaded.model.config == V2
    for a, b in zip(logits(model), logits(loaded.model)):
        assert torch.equal(a, b)


def make_v1_state(seed: int = 1) -> tuple[dict, ThinkingViT]:
    """Full-width (here 12 heads) tensors in the authors' v1 layout, 12 alphas, 3H->6H used."""
    full = randomise(ThinkingViT(V1_FULL), alpha=0.5, seed=seed)
    state = {k: v.clone() for k, v in full.state_dict().items() if not k.startswith("proj_layer2") and k != "alpha.1"}
    for i in range(12):
        state[f"alpha.{i}"] = torch.tensor([0.5 if i == 0 else 0.9])
    return state, full


def test_v1_conversion_gives_identical_logits():
    state, full = make_v1_state()
    converted = ThinkingViT(V2)
    converted.load_state_dict(convert_v1_to_v2(state, V2))
    ours = logits(converted)
    with torch.no_grad():  # the v1 model computes stages 0 and 1 on its full tensors, cropped on the fly
        emb = full.embed(IMAGES)
        s0 = full.forward_stage(0, emb)
        s1 = full.forward_stage(1, emb, s0.tokens)
    torch.testing.assert_close(ours[0], s0.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], s1.logits, atol=1e-5, rtol=1e-5)


def test_v1_pth_tar_prefers_ema_and_strips_module_prefix(tmp_path):
    state, _ = make_v1_state()
    ema = {f"module.{k}": v for k, v in state.items()}
    raw = {f"module.{k}": torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / "v1.pth.tar"
    torch.save({"epoch": 3, "state_dict": raw, "state_dict_ema": ema, "arch": "thinkingvit"}, path)
    loaded = load_checkpoint(path)
    assert loaded.source_layout == "authors-v1"
    assert loaded.model.config == V2  # 3 heads from proj_layer [768, 192], last stage doubled
    reference = ThinkingViT(V2)
    reference.load_state_dict(convert_v1_to_v2(state, V2))
    for a, b in zip(logits(reference), logits(loaded.model)):
        assert torch.equal(a, b)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": print}, path)  # a global needing unpickling
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)


def test_shape_mismatch_names_key_expected_and_found(tmp_path):
    model = ThinkingViT(V2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.bias"] = torch.zeros(7)
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"thinkingvit": json.dumps(build_metadata(model, None))})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "head.bias: expected (5,), found (7,)" in message
    assert "missing keys: norm.bias" in message
    assert "unexpected keys: extra.weight" in message


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage that is not a checkpoint at all"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, content):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_checkpoint(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(path, ThinkingViT(V2), build_metadata(ThinkingViT(V2), None))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_info_command_prints_metadata_params_and_gmacs(tmp_path, capsys):
    model = ThinkingViT(V2)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, build_metadata(model, "custom", class_names=list("abcde")))
    assert cli_main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["stage_heads"] == [3, 6]
    assert len(info["stage_gmacs"]) == 2 and info["cumulative_gmacs"][1] > info["stage_gmacs"][0]
    assert info["metadata"]["class_names"] == list("abcde")
    assert read_metadata(path)["preset"] == "custom"


def test_preset_reads_a_checkpoint_without_metadata_whose_shapes_cannot_say_its_config(tmp_path, capsys):
    """The authors' v2 export of a head_dim-8 model (tests/fixtures/authors): the shapes cannot say
    the head size (inference assumes their 64), so without a preset the file is refused; with
    ``--preset`` both ``thinkingvit info`` and ``load_checkpoint`` read it whole."""
    path = unpack(tmp_path, "v2-2-3-6-hd8.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert cli_main(["info", str(path)]) == 2  # a one-line error, no traceback
    assert "preset" in capsys.readouterr().err
    assert cli_main(["info", str(path), "--preset", "tiny-authors-2-3-6"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source_layout"] == "authors-v2"
    assert info["stage_heads"] == [2, 3, 6]
    assert info["metadata"]["preset"] == "tiny-authors-2-3-6"
    assert info["metadata"]["config"] == get_config("tiny-authors-2-3-6").to_dict()
    assert info["parameters"] == sum(t.numel() for t in load_file(str(path)).values())
    loaded = load_checkpoint(path, preset="tiny-authors-2-3-6")
    assert loaded.model.config == get_config("tiny-authors-2-3-6")
