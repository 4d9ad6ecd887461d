"""The calibration profile a checkpoint stores, and the one rule that picks a threshold from it.

A profile is a threshold sweep cut down for the server: ``{"split", "images", "stage_accuracy",
"rows": [{"threshold", "accuracy", "exit_share", "expected_gmacs"}, ...]}`` with every accuracy a
fraction in [0, 1], the unit of ``GET /v1/model?target_accuracy=``. No torch: the server, the CLI
and the benchmark read it.
"""
from __future__ import annotations


def in_fractions(profile: dict | None) -> dict | None:
    """The profile with its accuracies as fractions in [0, 1].

    Checkpoints written before fractions became the unit store percent (90.16); a profile with any
    accuracy above 1 is one of those and is divided by 100. A profile already in fractions comes back
    as it is.
    """
    if not profile:
        return profile
    rows = profile.get("rows", [])
    stored = [r["accuracy"] for r in rows] + list(profile.get("stage_accuracy", []))
    if not any(a is not None and a > 1 for a in stored):
        return profile
    converted = {**profile, "rows": [{**r, "accuracy": percent_to_fraction(r["accuracy"])} for r in rows]}
    if "stage_accuracy" in profile:
        converted["stage_accuracy"] = [percent_to_fraction(a) for a in profile["stage_accuracy"]]
    return converted


def percent_to_fraction(accuracy: float | None) -> float | None:
    return None if accuracy is None else round(accuracy / 100, 6)


def cheapest_row(rows: list[dict], target_accuracy: float) -> dict | None:
    """The row with the least expected compute whose accuracy reaches ``target_accuracy``.

    Ties go to the more accurate row, then to the lower threshold. None when no row reaches the
    target. ``rows`` and the target share a unit (fractions in a profile, percent in a sweep report).
    """
    reaching = [r for r in rows if r["accuracy"] >= target_accuracy]
    return min(reaching, key=lambda r: (r["expected_gmacs"], -r["accuracy"], r["threshold"]), default=None)
