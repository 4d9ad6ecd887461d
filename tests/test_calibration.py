"""The calibration profile's unit (fractions) and the one cheapest-threshold rule."""
from __future__ import annotations

import pytest

from model.calibration import cheapest_row, in_fractions
from model.checkpoint import read_metadata
from model.evaluate import calibration_profile, threshold_within
from service.served_model import cheapest_threshold
from service.settings import DEFAULT_CHECKPOINT


@pytest.fixture(scope="module")
def shipped_profile() -> dict:
    return read_metadata(DEFAULT_CHECKPOINT)["calibration"]


def test_shipped_profile_reads_as_fractions(shipped_profile):
    assert shipped_profile["stage_accuracy"] == pytest.approx([0.9016, 0.9124])
    assert all(0 <= r["accuracy"] <= 1 for r in shipped_profile["rows"])


def test_target_accuracy_on_the_shipped_model(shipped_profile):
    assert cheapest_threshold(shipped_profile, 0.91)["threshold"] > 0  # stage 0 alone reaches 0.9016
    assert cheapest_threshold(shipped_profile, 0.90)["threshold"] == 0.0
    assert cheapest_threshold(shipped_profile, 0.99) is None


def test_percent_profiles_are_converted_and_fraction_profiles_kept():
    old = {"split": "test", "stage_accuracy": [90.16, 91.24],
           "rows": [{"threshold": 0.5, "accuracy": 90.5, "exit_share": [1, 0], "expected_gmacs": 0.01}]}
    new = in_fractions(old)
    assert new["stage_accuracy"] == [0.9016, 0.9124] and new["rows"][0]["accuracy"] == 0.905
    assert in_fractions(new) is new and in_fractions(None) is None


def test_new_profiles_store_fractions():
    result = {"images": 2, "stage_accuracy": [50.0, 100.0], "rows": [
        {"threshold": 0.0, "accuracy": 50.0, "exit_share": [1.0, 0.0], "expected_gmacs": 0.1,
         "exit_group_accuracy": [50.0, None], "images_per_second": 1.0}]}  # fmt: skip
    profile = calibration_profile(result, "test[:2]")
    assert profile["stage_accuracy"] == [0.5, 1.0] and profile["rows"][0]["accuracy"] == 0.5
    assert set(profile["rows"][0]) == {"threshold", "accuracy", "exit_share", "expected_gmacs"}


def test_ties_go_to_the_more_accurate_then_the_lower_threshold():
    rows = [
        {"threshold": 0.2, "accuracy": 0.90, "expected_gmacs": 0.1},
        {"threshold": 0.1, "accuracy": 0.90, "expected_gmacs": 0.1},
        {"threshold": 0.3, "accuracy": 0.91, "expected_gmacs": 0.1},
        {"threshold": 0.9, "accuracy": 0.95, "expected_gmacs": 0.3},
    ]
    assert cheapest_row(rows, 0.9)["threshold"] == 0.3
    assert cheapest_row(rows[:2], 0.9)["threshold"] == 0.1
    assert threshold_within(rows, 0.93) == cheapest_threshold({"rows": rows}, 0.93)["threshold"] == 0.9
