"""The shipped default model loads and still measures what its model card states."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools.ship_default_model import CHECK_SUBSET, DEFAULT_MODEL, subset_figures
from model.checkpoint import load_checkpoint
from model.compute import expected_gmacs

MODEL_CARD = Path(__file__).resolve().parent.parent / "docs" / "model-card.md"


def stated_subset_figures() -> list[dict]:
    match = re.search(r"<!-- subset-figures (.*?) -->", MODEL_CARD.read_text())
    assert match, "docs/model-card.md lacks its subset-figures line"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_MODEL)


def test_shipped_checkpoint_is_small_and_complete(shipped):
    assert DEFAULT_MODEL.stat().st_size <= 20_000_000
    meta = shipped.metadata
    assert meta["preset"] == "fmnist-3-6" and len(meta["class_names"]) == 10
    assert meta["training"]["train_seconds"] > 0 and meta["training"]["machine"]
    rows = meta["calibration"]["rows"]
    assert len(rows) >= 23 and rows[0]["threshold"] == 0.0 and rows[-1]["threshold"] == 1.0
    for row in rows:  # the stored expected compute is consistent with the stored exit shares
        assert row["expected_gmacs"] == pytest.approx(expected_gmacs(shipped.model.config, row["exit_share"]), rel=1e-3)


def test_accuracy_on_fixed_subset_matches_the_model_card(shipped):
    measured = subset_figures(shipped.model, shipped.preprocess, CHECK_SUBSET)
    stated = stated_subset_figures()
    assert [r["threshold"] for r in measured] == [r["threshold"] for r in stated] == [0.0, 0.8, 1.0]
    for m, s in zip(measured, stated):
        assert m["accuracy"] == pytest.approx(s["accuracy"], abs=0.5)
    assert measured[0]["exit_share"][0] == 1.0 and measured[-1]["exit_share"][-1] == 1.0
