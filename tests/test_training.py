"""Training (loss goes down, deterministic resume), data loading and the threshold sweep."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tools.ship_default_model import accuracy_cells
from model import create_model
from model.calibration import percent_to_fraction
from model.checkpoint import build_metadata, load_checkpoint, read_metadata, save_checkpoint
from model.data import load_fashion_mnist, load_image_folder, read_idx
from model.evaluate import calibration_profile, default_thresholds, sweep, threshold_within, write_outputs
from model.preprocess import FASHION_MNIST, normalise
from model.train import TrainSettings, train
from service.cli import main as cli_main

SETTINGS = TrainSettings(preset="fmnist-3-6", epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.25,
                         threads=1, workers=1)


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist("train").subset(384), load_fashion_mnist("test").subset(200)


def test_fashion_mnist_loads_from_debian_files():
    test = load_fashion_mnist("test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert test.class_names[9] == "Ankle boot"


def test_missing_dataset_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_image_folder_loader(tmp_path):
    from PIL import Image

    for name, color in (("cats", 10), ("dogs", 200)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), (color, color, color)).save(tmp_path / name / f"{i}.png")
    data = load_image_folder(tmp_path, size=16)
    assert data.images.shape == (4, 3, 16, 16)
    assert data.labels.tolist() == [0, 0, 1, 1] and data.class_names == ["cats", "dogs"]


def train_loss(model, data) -> float:
    with torch.no_grad():
        logits = model.eval()(normalise(data.images, FASHION_MNIST))
    return sum(F.cross_entropy(l, data.labels).item() for l in logits) / len(logits)


def test_training_lowers_the_loss(tmp_path, fmnist):
    train_data, test_data = fmnist
    out = tmp_path / "m.safetensors"
    summary = train(SETTINGS, train_data, test_data, FASHION_MNIST, out, progress=False)
    loaded = load_checkpoint(out)
    torch.manual_seed(SETTINGS.seed)  # the same initial weights train() starts from
    initial = train_loss(create_model(SETTINGS.preset), train_data)
    assert train_loss(loaded.model, train_data) < initial - 0.2
    assert loaded.metadata["training"]["machine"] and summary["train_seconds"] > 0
    assert loaded.class_names[0] == "T-shirt/top" and loaded.preprocess == FASHION_MNIST


def test_resume_continues_exactly_where_it_stopped(tmp_path, fmnist, capsys):
    train_data, test_data = fmnist
    steps_per_epoch = len(train_data) // SETTINGS.batch_size
    interrupted = tmp_path / "interrupted.safetensors"
    train(SETTINGS, train_data, test_data, FASHION_MNIST, interrupted, max_steps=steps_per_epoch, progress=False)
    assert torch.load(interrupted.with_suffix(".state.pt"), weights_only=True)["epoch"] == 1
    resumed = train(SETTINGS, train_data, test_data, FASHION_MNIST, interrupted, progress=False)
    assert "resuming" in capsys.readouterr().out
    straight = tmp_path / "straight.safetensors"
    train(SETTINGS, train_data, test_data, FASHION_MNIST, straight, progress=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    a, b = load_checkpoint(interrupted).model.state_dict(), load_checkpoint(straight).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_workers_train_the_same_model_as_one_process(tmp_path, fmnist):
    """Two gloo workers split each batch; only the summation order of the gradients differs."""
    train_data, test_data = fmnist
    settings = dataclasses.replace(SETTINGS, epochs=1, threads=2)
    one = train(settings, train_data, test_data, FASHION_MNIST, tmp_path / "one.safetensors", progress=False)
    two = train(dataclasses.replace(settings, workers=2), train_data, test_data, FASHION_MNIST,
                tmp_path / "two.safetensors", progress=False)
    a = load_checkpoint(tmp_path / "one.safetensors").model.state_dict()
    b = load_checkpoint(tmp_path / "two.safetensors").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # really trained apart
    assert two["threads"] == 2 and two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], abs=1e-3)
    assert two["final_test_acc"] == pytest.approx(one["final_test_acc"], abs=1.0)  # 2 of 200 images


def test_eval_every_skips_test_passes_but_not_the_last(tmp_path, fmnist, capsys):
    train_data, test_data = fmnist
    settings = dataclasses.replace(SETTINGS, eval_every=2)
    summary = train(settings, train_data, test_data, FASHION_MNIST, tmp_path / "m.safetensors", progress=False)
    evaluated = [h["test_acc"] is not None for h in summary["history"]]
    assert evaluated == [False, True, True]  # epoch 2 by the schedule, epoch 3 as the last
    assert summary["final_test_acc"] == summary["history"][-1]["test_acc"]
    assert "epoch 1: loss" in capsys.readouterr().out
    assert accuracy_cells(None) == "- | -" and accuracy_cells([88.0, 90.5]) == "88.00 | 90.50"


def test_sweep_writes_all_outputs_and_a_calibration_profile(tmp_path, fmnist):
    _, test_data = fmnist
    torch.manual_seed(0)
    model = create_model("fmnist-3-6").eval()
    result = sweep(model, test_data, FASHION_MNIST, speed_images=64, progress=False)
    assert len(result["rows"]) >= 23 and result["rows"][0]["threshold"] == 0.0 and result["rows"][-1]["threshold"] == 1.0
    assert result["rows"][0]["exit_share"] == [1.0, 0.0] and result["rows"][-1]["exit_share"] == [0.0, 1.0]
    assert result["rows"][-1]["accuracy"] == pytest.approx(result["stage_accuracy"][-1])
    paths = write_outputs(result, tmp_path / "eval")
    assert all(p.stat().st_size > 0 for p in paths)
    with paths[1].open() as f:
        assert len(list(csv.DictReader(f))) == len(default_thresholds())
    profile = calibration_profile(result, "test[:200]")
    assert set(profile["rows"][0]) == {"threshold", "accuracy", "exit_share", "expected_gmacs"}
    assert threshold_within(result["rows"], 101.0) is None
    assert threshold_within(result["rows"], 0.0) == 0.0  # cheapest: everyone leaves after stage 1


def test_eval_compares_an_ablation_on_the_same_axes(tmp_path, capsys):
    torch.manual_seed(0)
    recycling, frozen = create_model("fmnist-3-6"), create_model("fmnist-3-6")
    with torch.no_grad():
        recycling.alpha[0].fill_(0.25)
    paths = {"recycling": tmp_path / "recycling.safetensors", "frozen": tmp_path / "alpha0.safetensors"}
    for name, model in (("recycling", recycling), ("frozen", frozen)):
        save_checkpoint(paths[name], model, build_metadata(model, "fmnist-3-6", preprocess=FASHION_MNIST.to_dict()))
    out = tmp_path / "eval"
    assert cli_main(["eval", str(paths["recycling"]), "--compare", str(paths["frozen"]), "--subset", "100",
                     "--speed-images", "16", "--threads", "1", "--out-dir", str(out), "--title", "ablation"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(printed["compared"]) == ["alpha0 (alpha +0.000)"]
    frozen_sweep = json.loads((out / "alpha0" / "sweep.json").read_text())
    main_sweep = json.loads((out / "sweep.json").read_text())
    assert frozen_sweep["images"] == main_sweep["images"] == 100
    assert [r["threshold"] for r in frozen_sweep["rows"]] == [r["threshold"] for r in main_sweep["rows"]]
    assert printed["compared"]["alpha0 (alpha +0.000)"]["stage_accuracy"] == frozen_sweep["stage_accuracy"]
    assert (out / "sweep.png").stat().st_size > 0 and (out / "alpha0" / "sweep.png").stat().st_size > 0


def test_eval_write_calibration_round_trips_into_the_checkpoint(tmp_path, capsys):
    """``thinkingvit eval --write-calibration`` stores the sweep it wrote as the checkpoint's
    calibration profile (accuracies as fractions, the sweep report's percent converted); the
    weights and every other metadata entry come back unchanged."""
    torch.manual_seed(0)
    model = create_model("fmnist-3-6")
    with torch.no_grad():
        model.alpha[0].fill_(0.25)
    path, out = tmp_path / "m.safetensors", tmp_path / "eval"
    metadata = build_metadata(model, "fmnist-3-6", class_names=[f"c{i}" for i in range(10)],
                              preprocess=FASHION_MNIST.to_dict(), training={"epochs": 3})  # fmt: skip
    save_checkpoint(path, model, metadata)
    assert "calibration" not in read_metadata(path)
    assert cli_main(["eval", str(path), "--subset", "64", "--speed-images", "8", "--threads", "1",
                     "--out-dir", str(out), "--write-calibration"]) == 0  # fmt: skip
    capsys.readouterr()
    swept = json.loads((out / "sweep.json").read_text())
    stored = read_metadata(path)
    calibration = stored.pop("calibration")
    assert calibration["split"] == "test[:64]" and calibration["images"] == swept["images"] == 64
    assert calibration["stage_accuracy"] == [percent_to_fraction(a) for a in swept["stage_accuracy"]]
    keep = ("threshold", "exit_share", "expected_gmacs")
    assert calibration["rows"] == [
        {**{k: row[k] for k in keep}, "accuracy": percent_to_fraction(row["accuracy"])} for row in swept["rows"]
    ]
    assert [r["threshold"] for r in calibration["rows"]] == default_thresholds()
    assert stored == json.loads(json.dumps({**metadata, "config": model.config.to_dict()}))
    reloaded = load_checkpoint(path)
    assert reloaded.metadata["calibration"] == calibration
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], tensor), name


def test_idx_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(bad)
